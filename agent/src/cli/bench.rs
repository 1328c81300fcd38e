//! `pagewise bench ...`: the clap front of the benchmark drivers in `pagewise_tools::bench`;
//! each benchmark prints a table against a baseline from the same run.

use pagewise_tools::bench::{evict, guest, migrate, pager, restore, swapdev};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Bench,
}

#[derive(clap::Subcommand, Debug)]
enum Bench {
    /// Fault latency vs a null handler; first-touch restore (seq, random, zipf; anonymous
    /// and shared memory; device on disk and tmpfs) under the simplest pread+copy handler,
    /// the defaults and each policy, next to pwrite prefill and the device's own read rates.
    Pager(pager::PagerBenchArgs),
    /// Eviction throughput vs raw I/O, refault cost, and write-tracking (sync WP) overhead.
    Evict(evict::EvictBenchArgs),
    /// Random 4 KiB page writes/reads through a swap device vs raw io_uring on the same
    /// file at the same queue depth; lz4 ratio and speed on page mixes.
    Swapdev(swapdev::SwapdevBenchArgs),
    /// memverify's hot-set and full pass times in a QEMU guest (TCG): plain QEMU vs under
    /// the pager with nothing evicted vs evicted to the working set, as ratios.
    Guest(guest::GuestBenchArgs),
    /// Live migration between the two lab hosts over a tc-shaped link: QEMU's own pre-copy
    /// and post-copy vs pagewise precopy, postcopy and agile, one fresh guest per row,
    /// verified on the destination.
    Migrate(migrate::MigrateBenchArgs),
    /// Restore of a saved QEMU guest (TCG): QEMU's own (`-incoming` from a file holding all
    /// RAM) vs `pagewise vm restore` (RAM served lazily from the image): time until the guest
    /// answers, until its hot pass is back within 1.5x, bytes read; one run, both rows.
    Restore(restore::RestoreBenchArgs),
}

pub fn run(args: BenchArgs) -> anyhow::Result<std::process::ExitCode> {
    match args.which {
        Bench::Pager(a) => pager::run(a),
        Bench::Swapdev(a) => swapdev::run(a),
        Bench::Evict(a) => evict::run(a),
        Bench::Guest(a) => guest::run(a),
        Bench::Migrate(a) => migrate::run(a),
        Bench::Restore(a) => restore::run(a),
    }
}
