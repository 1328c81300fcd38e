//! `pagewise evict --vm NAME (--target-rss SIZE | --cold-for SECONDS | --auto)`: offload cold
//! pages of a running VM to its swap device through the daemon's control socket, with a
//! progress bar on a terminal (plain progress lines otherwise).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::conventions::{default_stats_socket, parse_size};
use pager::evict::EvictProgress;
use pager::server::protocol::{EvictTarget, Request};
use pager::server::ControlClient;

use super::vm::DEFAULT_PAGER_SOCKET;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("goal").required(true).multiple(false)))]
pub struct EvictArgs {
    /// The attached VM's name.
    #[arg(long)]
    vm: String,
    /// Evict coldest pages first until the VM's resident memory is at most SIZE
    /// (bytes, or with a suffix: K, M, G, T; KiB/MiB/... accepted).
    #[arg(long, value_name = "SIZE", group = "goal", value_parser = parse_size)]
    target_rss: Option<u64>,
    /// Evict every page not written and not faulted in for SECONDS.
    #[arg(long, value_name = "SECONDS", group = "goal")]
    cold_for: Option<f64>,
    /// Evict down to the working-set estimate plus a margin.
    #[arg(long, group = "goal")]
    auto: bool,
    /// Margin for --auto, in percent of the estimate.
    #[arg(long, default_value_t = 10, requires = "auto")]
    margin_percent: u32,
    /// Pages per eviction batch (write-protect, read, store, punch, wake).
    #[arg(long)]
    batch_pages: Option<u64>,
    /// The daemon's control socket (`pagewise serve --stats-socket`), or its serve socket, in
    /// which case SOCKET.stats is used [default: $PAGEWISE_SOCKET, else
    /// /run/pagewise/pager.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Start the eviction and return without waiting for it.
    #[arg(long)]
    no_wait: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// The control socket: `--socket` (or $PAGEWISE_SOCKET, or the default serve socket); a
/// serve socket is mapped to its `.stats` control socket (as `pagewise stats` does).
pub fn control_socket(arg: Option<PathBuf>) -> PathBuf {
    let path = arg
        .or_else(|| {
            std::env::var_os("PAGEWISE_SOCKET")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PAGER_SOCKET));
    let derived = default_stats_socket(&path);
    if !path.to_string_lossy().ends_with(".stats") && derived.exists() {
        derived
    } else {
        path
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Catch Ctrl-C so the daemon's eviction can be cancelled cleanly.
fn catch_sigint() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_sigint),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGINT, &action) }.context("installing the SIGINT handler")?;
    Ok(())
}

fn mib(pages: u64, page_size: u64) -> f64 {
    (pages * page_size) as f64 / (1 << 20) as f64
}

/// One progress line (bar on a terminal).
fn progress_line(p: &EvictProgress, page_size: u64, elapsed: Duration, bar: bool) -> String {
    let (planned, done) = (p.planned, p.done);
    let out = p.evicted + p.zero;
    let frac = if planned == 0 {
        1.0
    } else {
        done as f64 / planned as f64
    };
    let rate = mib(out, page_size) / elapsed.as_secs_f64().max(1e-3);
    let target = p.target.map_or(String::new(), |t| {
        format!(" -> {:.1} MiB", mib(t, page_size))
    });
    let text = format!(
        "{done}/{planned} pages, {out} out ({:.1} MiB, {rate:.0} MiB/s), resident {:.1} MiB{target}",
        mib(out, page_size),
        mib(p.resident, page_size),
    );
    if bar {
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        format!(
            "\r[{}{}] {:>3.0}% {text}\x1b[K",
            "#".repeat(filled),
            " ".repeat(width - filled),
            frac * 100.0
        )
    } else {
        format!("evict: {:>3.0}% {text}", frac * 100.0)
    }
}

pub fn run(args: EvictArgs) -> anyhow::Result<ExitCode> {
    let socket = control_socket(args.socket);
    let goal = if let Some(b) = args.target_rss {
        EvictTarget::TargetRssBytes(b)
    } else if let Some(s) = args.cold_for {
        if !(s.is_finite() && s >= 0.0) {
            bail!("--cold-for must be a non-negative number of seconds, got {s}");
        }
        EvictTarget::ColdForSecs(s)
    } else {
        EvictTarget::Auto {
            margin_percent: Some(args.margin_percent),
            min_margin_pages: None,
        }
    };
    let mut client = ControlClient::connect(&socket)?;
    let page_size = client
        .stats(Some(&args.vm))
        .with_context(|| {
            format!(
                "asking the daemon at {} about VM {}",
                socket.display(),
                args.vm
            )
        })?
        .vms
        .first()
        .map_or(4096, |v| v.page_size);
    client
        .call(&Request::Evict {
            vm: args.vm.clone(),
            goal,
            batch_pages: args.batch_pages,
            wait: false,
        })
        .with_context(|| format!("starting the eviction of VM {}", args.vm))?;
    if args.no_wait {
        eprintln!("eviction of VM {} started", args.vm);
        return Ok(ExitCode::SUCCESS);
    }
    catch_sigint()?;
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut cancel_sent = false;
    let status = loop {
        std::thread::sleep(Duration::from_millis(if tty { 150 } else { 250 }));
        if INTERRUPTED.load(Ordering::Relaxed) && !cancel_sent {
            client.call(&Request::EvictCancel {
                vm: args.vm.clone(),
            })?;
            cancel_sent = true;
        }
        let st = client.evict_status(&args.vm)?;
        if tty {
            eprint!(
                "{}",
                progress_line(&st.progress, page_size, started.elapsed(), true)
            );
            let _ = std::io::stderr().flush();
        } else if !st.running || last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "{}",
                progress_line(&st.progress, page_size, started.elapsed(), false)
            );
            last_line = Instant::now();
        }
        if !st.running {
            if tty {
                eprintln!();
            }
            break st;
        }
    };
    if let Some(err) = &status.error {
        bail!("eviction of VM {} failed: {err}", args.vm);
    }
    let Some(report) = status.report else {
        bail!(
            "the daemon reported the eviction of VM {} finished without a report",
            args.vm
        );
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let p = &report.progress;
        println!(
            "VM {}: evicted {} pages ({:.1} MiB) + {} zero pages in {} ms ({:.0} MB/s); \
             resident now {:.1} MiB; {} skipped, {} abandoned",
            args.vm,
            p.evicted,
            mib(p.evicted, page_size),
            p.zero,
            report.elapsed_ms,
            report.mb_per_s,
            mib(p.resident, page_size),
            p.skipped,
            p.abandoned,
        );
        for e in &report.errors {
            eprintln!("warning: {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_render() {
        let p = EvictProgress {
            planned: 100,
            done: 50,
            evicted: 40,
            zero: 10,
            resident: 256,
            target: Some(128),
            ..Default::default()
        };
        let bar = progress_line(&p, 4096, Duration::from_secs(1), true);
        assert!(
            bar.contains("[###############               ]  50%"),
            "{bar}"
        );
        assert!(bar.contains("resident 1.0 MiB -> 0.5 MiB"), "{bar}");
        let plain = progress_line(&p, 4096, Duration::from_secs(1), false);
        assert!(
            plain.starts_with("evict:  50% 50/100 pages, 50 out"),
            "{plain}"
        );
    }
}
