//! `pagewise swapdev ...` (filled by the swapdev work).

#[derive(clap::Args, Debug)]
pub struct SwapdevArgs {}

pub fn run(_args: SwapdevArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::bail!("swapdev commands are not built yet")
}
