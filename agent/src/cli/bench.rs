//! `pagewise bench ...`: each benchmark prints a table against a baseline from the same run.

pub mod evict;
pub mod pager;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Bench,
}

#[derive(clap::Subcommand, Debug)]
enum Bench {
    /// Fault latency vs a null handler; scans under each prefetch policy vs one page per
    /// fault and vs pwrite prefill.
    Pager(pager::PagerBenchArgs),
    /// Eviction throughput vs raw I/O, refault cost, and write-tracking (sync WP) overhead.
    Evict(evict::EvictBenchArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.which {
        Bench::Pager(a) => pager::run(a),
        Bench::Evict(a) => evict::run(a),
    }
}
