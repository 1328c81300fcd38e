//! `memverify` — the guest workload. Run by the guest's /init as
//! `memverify $(cat /proc/cmdline)`; parameters are `memverify.KEY=VALUE` words (see
//! `config.rs`). Prints progress and bad-page counts on stdout (the serial console) and exits
//! 0 when no page was ever found bad, 1 when some were, 2 on bad parameters.

mod config;
mod free_phase;
mod heartbeat;
mod hot_pass;
mod pattern;
mod workload;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config::Config::parse(args.iter().map(String::as_str)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("memverify: error: {e}");
            return ExitCode::from(2);
        }
    };
    if cfg.heartbeat_ms > 0 {
        heartbeat::spawn(std::time::Duration::from_millis(cfg.heartbeat_ms));
    }
    let summary = workload::Workload::new(cfg, std::io::stdout().lock()).run();
    if summary.bad_pages == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
