//! `pagewise` — the one CLI binary. Each subcommand group lives in its own module under
//! `cli/`; this file only parses arguments, sets up logging and dispatches.

use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser, Debug)]
#[command(
    name = "pagewise",
    version,
    about = "Kernel-assisted userspace paging for VMs: swap devices, userfaultfd pager, agile migration"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, inspect, check and move swap devices.
    Swapdev(cli::swapdev::SwapdevArgs),
    /// Benchmarks that print a table against a baseline measured in the same run.
    Bench(cli::bench::BenchArgs),
    /// Offload cold pages of a running VM to its swap device (eviction), with progress.
    Evict(cli::evict::EvictArgs),
    /// Run the pager daemon: serve VMs' page faults from their swap devices.
    Serve(Box<cli::serve::ServeArgs>),
    /// Show a running pager's per-VM counters (or send it a control request).
    Stats(cli::stats::StatsArgs),
    /// Run an unmodified QEMU with its guest RAM served by the pager.
    Vm(cli::vm::VmArgs),
    /// Move a running VM to another host's pager daemon (pre-copy, post-copy or agile).
    Migrate(cli::migrate::MigrateArgs),
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: a daemon's log file must not be full of escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Swapdev(args) => cli::swapdev::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Evict(args) => cli::evict::run(args),
        Command::Serve(args) => cli::serve::run(*args),
        Command::Stats(args) => cli::stats::run(args),
        Command::Vm(args) => cli::vm::run(args),
        Command::Migrate(args) => cli::migrate::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagewise: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
