//! `pagewise bench ...`: each benchmark prints a table against a baseline from the same run.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("benchmarks are not built yet")
}
