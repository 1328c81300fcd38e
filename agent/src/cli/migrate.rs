//! `pagewise migrate --socket S --vm VM --to ADDR:PORT --mode precopy|postcopy|agile`: ask the
//! source daemon to move a running VM to another host's daemon, show progress (pages sent and
//! remaining, rate, phase) and end with a report (`--json`: QEMU's `query-migrate` names
//! where they mean the same). `--cancel` stops a running migration before its switchover;
//! `--resume` makes a post-copy paused by a broken link reconnect now (it also does by
//! itself, every second, until the daemon's `--recover-timeout`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use pager::conventions::{default_stats_socket, parse_size};
use pager::server::migration::MigrateRequest;
use pager::server::protocol::{Request, Response};
use pager::server::ControlClient;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source daemon's socket (`pagewise serve --socket`; its control socket SOCKET.stats
    /// is used).
    #[arg(long)]
    socket: PathBuf,
    /// The VM to move.
    #[arg(long)]
    vm: String,
    /// The destination daemon's migration endpoint (its `--migrate-listen`).
    #[arg(long, value_name = "ADDR:PORT", required_unless_present_any = ["cancel", "resume"])]
    to: Option<String>,
    /// precopy, postcopy or agile.
    #[arg(long, default_value = "agile")]
    mode: String,
    /// Most bytes per second the migration may send (K/M/G suffixes, e.g. 30M).
    #[arg(long, value_name = "RATE")]
    max_bandwidth: Option<String>,
    /// Longest pause pre-copy plans for, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    downtime_limit: u64,
    /// Finish a pre-copy that has not converged after this many seconds as post-copy.
    #[arg(long, value_name = "SECONDS")]
    postcopy_after: Option<f64>,
    /// Send pages written again as XBZRLE deltas against the copy sent before (checked at
    /// the destination; a delta that does not match is sent again whole).
    #[arg(long)]
    xbzrle: bool,
    /// The source's cache of sent pages for --xbzrle (K/M/G suffixes).
    #[arg(long, value_name = "SIZE", default_value = "64M", requires = "xbzrle")]
    xbzrle_cache: String,
    /// lz4-compress pages sent whole where they shrink, while that beats the link
    /// (measured as it goes: off on a link faster than the encoder).
    #[arg(long)]
    compress: bool,
    /// The order of pre-copy rounds: address, or microwiper (coolest stripes first, each
    /// round cut where what it sent is rewritten faster than the link moves pages).
    #[arg(long, default_value = "address", value_parser = ["address", "microwiper"])]
    order: String,
    /// Draw the migration's timeline into this PNG at the end (bytes/s sent by kind, pages
    /// dirtied/s, demand faults/s and their latency, the switchover marked).
    #[arg(long, value_name = "FILE.png")]
    plot: Option<PathBuf>,
    /// Print the final report as JSON (no progress bar).
    #[arg(long)]
    json: bool,
    /// Cancel the running migration of --vm (before its switchover) instead.
    #[arg(long)]
    cancel: bool,
    /// Reconnect the post-copy of --vm paused by a broken link now, and follow it to its end.
    #[arg(long, conflicts_with = "cancel")]
    resume: bool,
}

fn rate(arg: &str) -> Result<u64> {
    let bytes = parse_size(arg.trim_end_matches("/s"))
        .with_context(|| format!("--max-bandwidth {arg:?}"))?;
    if bytes == 0 {
        bail!("--max-bandwidth must be more than 0");
    }
    Ok(bytes)
}

fn call(client: &mut ControlClient, request: &Request) -> Result<Value> {
    match client.call(request)? {
        Response::Migration(v) => Ok(v),
        Response::Error { message } => bail!("the daemon refused: {message}"),
        other => bail!(
            "the daemon answered {:?} to a migration request",
            other.kind()
        ),
    }
}

fn num(v: &Value, path: &[&str]) -> u64 {
    path.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

fn is_over(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

pub fn run(args: MigrateArgs) -> Result<ExitCode> {
    let control = default_stats_socket(&args.socket);
    let mut client = ControlClient::connect(&control)
        .with_context(|| format!("the source daemon's control socket {}", control.display()))?;
    if args.cancel {
        let s = call(
            &mut client,
            &Request::MigrateCancel {
                vm: args.vm.clone(),
            },
        )?;
        println!(
            "cancelling the migration of {} (status {})",
            args.vm,
            text(&s, "status")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.resume {
        let s = call(
            &mut client,
            &Request::MigrateResume {
                vm: args.vm.clone(),
            },
        )?;
        eprintln!(
            "resuming the migration of {} (status {})",
            args.vm,
            text(&s, "status")
        );
        return follow(&mut client, &args);
    }
    let request = MigrateRequest {
        vm: args.vm.clone(),
        to: args.to.clone().unwrap_or_default(),
        mode: args.mode.clone(),
        max_bandwidth: args.max_bandwidth.as_deref().map(rate).transpose()?,
        downtime_limit_ms: Some(args.downtime_limit),
        postcopy_after_ms: args.postcopy_after.map(|s| (s * 1000.0) as u64),
        xbzrle_cache: args
            .xbzrle
            .then(|| parse_size(&args.xbzrle_cache))
            .transpose()
            .with_context(|| format!("--xbzrle-cache {:?}", args.xbzrle_cache))?,
        compress: args.compress,
        order: Some(args.order.clone()),
    };
    call(&mut client, &Request::Migrate(request))?;
    follow(&mut client, &args)
}

/// Show the migration of `args.vm` until it is over, then its report (and plot).
fn follow(client: &mut ControlClient, args: &MigrateArgs) -> Result<ExitCode> {
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:36} {bytes}/{total_bytes} of RAM held there, {msg}",
            )
            .expect("valid template"),
        );
        bar
    };
    let status = loop {
        let s = call(
            client,
            &Request::MigrateStatus {
                vm: args.vm.clone(),
            },
        )?;
        let total = num(&s, &["ram", "total"]);
        let remaining = num(&s, &["ram", "remaining"]);
        bar.set_length(total);
        bar.set_position(total.saturating_sub(remaining));
        bar.set_message(format!(
            "{} sent, {:.0} Mbit/s, {}",
            indicatif::HumanBytes(num(&s, &["ram", "transferred"])),
            s["ram"]["mbps"].as_f64().unwrap_or(0.0),
            text(&s, "status")
        ));
        if is_over(text(&s, "status")) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    if let Some(png) = &args.plot {
        let title = format!(
            "pagewise migrate {} ({}): {}",
            args.vm,
            text(&status, "mode"),
            text(&status, "status")
        );
        pagewise_tools::plot::migration_timeline(&status, png, &title)
            .with_context(|| format!("--plot {}", png.display()))?;
        eprintln!("timeline drawn in {}", png.display());
    }
    Ok(if text(&status, "status") == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The report as text.
fn render(s: &Value) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let mut out = format!(
        "migration of {} to {} ({}): {}\n",
        text(s, "vm"),
        text(s, "peer"),
        s["mode"].as_str().unwrap_or("?"),
        text(s, "status")
    );
    if let Some(e) = s["error"].as_str() {
        out += &format!("  error: {e}\n");
    }
    if num(s, &["link_cuts"]) > 0 {
        out += &format!(
            "  link cut {} times after the switchover, recovered {} times, paused {} ms\n",
            num(s, &["link_cuts"]),
            num(s, &["recoveries"]),
            num(s, &["paused_for_link_ms"]),
        );
    }
    out += &format!(
        "  total {} ms, setup {} ms, downtime {} ms (QEMU's {} ms)\n",
        num(s, &["total-time"]),
        num(s, &["setup-time"]),
        s["downtime"].as_u64().map_or("-".into(), |d| d.to_string()),
        s["qemu_downtime_ms"]
            .as_u64()
            .map_or("-".into(), |d| d.to_string()),
    );
    out += &format!(
        "  sent {:.1} MB ({} pages, {} zero pages as counts), {:.0} Mbit/s, {} dirty syncs\n",
        mb(num(s, &["ram", "transferred"])),
        num(s, &["ram", "normal"]),
        num(s, &["ram", "duplicate"]),
        s["ram"]["mbps"].as_f64().unwrap_or(0.0),
        num(s, &["ram", "dirty-sync-count"]),
    );
    out += &format!(
        "  left in the swap device {} pages, freed {}, stale after pre-copy {}, pushed {}, demand requests {}\n",
        num(s, &["pages_stored"]),
        num(s, &["pages_freed"]),
        num(s, &["pages_stale"]),
        num(s, &["pages_pushed"]),
        num(s, &["ram", "postcopy-requests"]),
    );
    if let Some(x) = s.get("xbzrle-cache") {
        out += &format!(
            "  xbzrle: {} pages as deltas ({:.1} MB), {} cache misses, {} overflows, {} sent again whole\n",
            num(x, &["pages"]),
            mb(num(x, &["bytes"])),
            num(x, &["cache-miss"]),
            num(x, &["overflow"]),
            num(x, &["resent"]),
        );
    }
    if let Some(c) = s.get("compression") {
        out += &format!(
            "  lz4: {} pages, {:.1} MB for {:.1} MB, on at the end: {}\n",
            num(c, &["pages"]),
            mb(num(c, &["compressed-size"])),
            mb(num(c, &["plain_size"])),
            c["on"].as_bool().unwrap_or(false),
        );
    }
    if let Some(d) = s.get("destination").filter(|d| !d.is_null()) {
        out += &format!(
            "  destination: QEMU pid {}, demand faults {} (p50 {} us, p99 {} us), blocktime {} ms\n",
            num(d, &["qemu_pid"]),
            num(d, &["demand_faults"]),
            num(d, &["fault_latency_p50_us"]),
            num(d, &["fault_latency_p99_us"]),
            num(d, &["blocktime_ms"]),
        );
    }
    if let Some(t) = s["source_released_ms"].as_u64() {
        out += &format!("  the source held none of the VM's RAM after {t} ms\n");
    }
    if let Some(paths) = s["dest_paths"].as_object() {
        for (from, to) in paths {
            out += &format!("  {from} -> {}\n", to.as_str().unwrap_or("?"));
        }
    }
    out
}
