//! The bench's rows, table and ratios.

use serde::Serialize;
use serde_json::Value;

macro_rules! outln {
    ($o:expr) => {
        $o.push('\n')
    };
    ($o:expr, $($t:tt)*) => {{
        use std::fmt::Write as _;
        let _ = writeln!($o, $($t)*);
    }};
}

use super::observe::{Health, HotPasses};

/// One migration of one fresh guest.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Row {
    pub mode: String,
    pub run: u32,
    /// "completed", "did not converge (...)", or "failed: ...".
    pub status: String,
    pub completed: bool,
    /// Milliseconds from the migrate command to completion (QEMU's / pagewise's total-time).
    pub total_ms: Option<u64>,
    /// QEMU's downtime figure (for pagewise rows: the device-state part QEMU saw).
    pub qemu_downtime_ms: Option<u64>,
    /// pagewise's measured downtime (source paused -> destination running).
    pub pagewise_downtime_ms: Option<u64>,
    /// The longest gap in the guest's heartbeat during the migration, as the host saw it.
    pub guest_gap_ms: Option<u64>,
    /// ram.transferred as the migration reported it.
    pub ram_transferred: Option<u64>,
    /// Bytes through the shaped link during the migration (both directions, all traffic).
    pub link_bytes: u64,
    /// Demand faults at the destination (QEMU: ram.postcopy-requests).
    pub demand_faults: Option<u64>,
    pub fault_p50_us: Option<u64>,
    pub fault_p99_us: Option<u64>,
    /// Milliseconds until the source held none of the VM's RAM.
    pub source_released_ms: Option<u64>,
    /// Bytes sent after the first full round (pagewise pre-copy rows).
    pub resent_bytes: Option<u64>,
    /// Data pages sent (ram.normal; deltas included).
    pub pages_sent: Option<u64>,
    pub hot: HotPasses,
    pub health: Health,
    /// query-migrate at the end (QEMU rows) or `pagewise migrate --json` (pagewise rows).
    pub raw: Value,
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |m| format!("{:.1}", m as f64 / 1e3))
}

fn mb(b: Option<u64>) -> String {
    b.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
}

fn ms1(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

pub struct Recipe {
    pub title: String,
}

pub fn table(recipe: &Recipe, rows: &[Row]) -> String {
    let mut out = String::new();
    let out = &mut out;
    outln!(out);
    outln!(out, "{}", recipe.title);
    outln!(
        out,
        "{:<19} {:>3} {:<24} {:>7} {:>15} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>8} {:>15} {:<12}",
        "mode",
        "run",
        "status",
        "total s",
        "downtime ms",
        "RAM MB",
        "link MB",
        "2nd+ MB",
        "kpages",
        "faults",
        "p50/p99 us",
        "src 0 s",
        "hot ms b/w/a",
        "guest (dst)"
    );
    for r in rows {
        let status: String = r.status.chars().take(24).collect();
        outln!(
            out,
            "{:<19} {:>3} {:<24} {:>7} {:>15} {:>7} {:>7} {:>7} {:>7} {:>7} {:>11} {:>8} {:>15} {:<12}",
            r.mode,
            r.run,
            status,
            secs(r.total_ms),
            format!(
                "{}/{}/{}",
                opt(r.qemu_downtime_ms),
                opt(r.pagewise_downtime_ms),
                opt(r.guest_gap_ms)
            ),
            mb(r.ram_transferred),
            mb(Some(r.link_bytes)),
            mb(r.resent_bytes),
            r.pages_sent.map_or("-".into(), |p| format!("{:.1}", p as f64 / 1e3)),
            opt(r.demand_faults),
            format!("{}/{}", opt(r.fault_p50_us), opt(r.fault_p99_us)),
            secs(r.source_released_ms),
            format!(
                "{}/{}/{}",
                ms1(r.hot.before_ms),
                ms1(r.hot.during_worst_ms),
                ms1(r.hot.after_ms)
            ),
            guest_cell(&r.health),
        );
    }
    outln!(
        out,
        "downtime: QEMU's figure / pagewise's measured pause / the longest gap in the guest's \
         heartbeat (20 ms beats, consoles read every 5 ms); RAM MB: ram.transferred; link MB: \
         all bytes through the shaped link during the migration; 2nd+ MB: bytes after the first \
         round (pagewise pre-copy rows: re-sent pages, the final set included); kpages: data \
         pages sent (ram.normal, deltas included); faults: demand faults at the \
         destination (QEMU: postcopy-requests, no latency figure); src 0 s: until the source \
         held none of the VM's RAM (QEMU: its total time, the source quits then); hot ms: \
         memverify hot_pass_ms median before / worst during / median after; guest: memverify's \
         DONE on the host it ended on"
    );
    for r in rows.iter().filter(|r| r.health.note.is_some()) {
        outln!(
            out,
            "  {} run {}: {}",
            r.mode,
            r.run,
            r.health.note.as_deref().unwrap_or("")
        );
    }
    for r in rows.iter().filter(|r| !r.completed) {
        outln!(out, "  {} run {}: {}", r.mode, r.run, r.status);
    }
    totals(out, rows);
    ratios(out, rows);
    std::mem::take(out)
}

fn guest_cell(h: &Health) -> String {
    if h.host == "source" {
        format!("{} (src)", h.verdict())
    } else {
        h.verdict()
    }
}

fn totals(out: &mut String, rows: &[Row]) {
    let mut modes: Vec<&str> = rows.iter().map(|r| r.mode.as_str()).collect();
    modes.dedup();
    if rows.len() == modes.len() {
        return;
    }
    outln!(out, "totals per mode:");
    for m in modes {
        let of: Vec<&Row> = rows.iter().filter(|r| r.mode == m).collect();
        let bad: u64 = of.iter().filter_map(|r| r.health.bad_pages).sum();
        outln!(
            out,
            "  {m:<13} runs {}, completed {}, bad pages {bad}, guest crashes {}, no DONE {}",
            of.len(),
            of.iter().filter(|r| r.completed).count(),
            of.iter().filter(|r| r.health.crashed).count(),
            of.iter()
                .filter(|r| !r.health.done && !r.health.crashed)
                .count(),
        );
    }
}

/// Median of a field over one mode's completed runs (all runs for the time of a QEMU
/// pre-copy that did not converge: its cap, a lower bound).
fn figure(rows: &[Row], mode: &str, f: impl Fn(&Row) -> Option<u64>) -> Option<(f64, bool)> {
    let of: Vec<&Row> = rows.iter().filter(|r| r.mode == mode).collect();
    let done: Vec<f64> = of
        .iter()
        .filter(|r| r.completed)
        .filter_map(|r| f(r).map(|v| v as f64))
        .collect();
    if !done.is_empty() {
        return crate::bench::guest::report::median(done).map(|v| (v, false));
    }
    let bound: Vec<f64> = of.iter().filter_map(|r| f(r).map(|v| v as f64)).collect();
    crate::bench::guest::report::median(bound).map(|v| (v, true))
}

fn ratio(
    out: &mut String,
    rows: &[Row],
    label: &str,
    what: &str,
    f: impl Fn(&Row) -> Option<u64> + Copy,
) {
    ratio_of(out, rows, label, "agile", what, f)
}

fn ratio_of(
    out: &mut String,
    rows: &[Row],
    label: &str,
    of: &str,
    what: &str,
    f: impl Fn(&Row) -> Option<u64> + Copy,
) {
    if !rows.iter().any(|r| r.mode == of) {
        return;
    }
    let (num, den) = (figure(rows, of, f), figure(rows, what, f));
    let text = match (num, den) {
        (Some((a, false)), Some((b, lower))) if b > 0.0 => {
            if lower {
                format!(
                    "<= {:.2} ({what} did not complete: its figure is a lower bound)",
                    a / b
                )
            } else {
                format!("{:.2}", a / b)
            }
        }
        (Some((_, true)), _) => format!("- ({of} did not complete)"),
        _ => "- (row missing)".into(),
    };
    outln!(out, "  {label:<58} {text}");
}

/// Issue 9's ratios: each pre-copy variant against plain pagewise pre-copy.
fn encoding_ratios(out: &mut String, rows: &[Row]) {
    if !rows.iter().any(|r| r.mode == "precopy") {
        return;
    }
    outln!(
        out,
        "pre-copy variants / pagewise precopy (targets: xbzrle 2nd+ bytes <= 0.20 and downtime \
         <= 0.50 on the sparse-write guest; microwiper pages <= 0.50 on a skewed hot set):"
    );
    type Figure = fn(&Row) -> Option<u64>;
    let rules: [(&str, &str, Figure); 6] = [
        ("precopy-xbzrle", "bytes after the first round", |r| {
            r.resent_bytes
        }),
        ("precopy-xbzrle", "downtime (pagewise's pause)", |r| {
            r.pagewise_downtime_ms
        }),
        ("precopy-xbzrle", "bytes (ram.transferred)", |r| {
            r.ram_transferred
        }),
        ("precopy-microwiper", "data pages sent", |r| r.pages_sent),
        ("precopy-microwiper", "bytes (ram.transferred)", |r| {
            r.ram_transferred
        }),
        ("precopy-lz4", "bytes (ram.transferred)", |r| {
            r.ram_transferred
        }),
    ];
    for (of, what, f) in rules {
        ratio_of(
            out,
            rows,
            &format!("{of} / precopy, {what}"),
            of,
            "precopy",
            f,
        );
    }
}

fn ratios(out: &mut String, rows: &[Row]) {
    encoding_ratios(out, rows);
    if !rows.iter().any(|r| r.mode == "agile") {
        return;
    }
    outln!(
        out,
        "ratios (medians over completed runs; issue 8's targets are <= 0.25):"
    );
    ratio(
        out,
        rows,
        "agile / qemu-postcopy, bytes (ram.transferred)",
        "qemu-postcopy",
        |r| r.ram_transferred,
    );
    ratio(
        out,
        rows,
        "agile / qemu-postcopy, bytes (link)",
        "qemu-postcopy",
        |r| Some(r.link_bytes),
    );
    ratio(
        out,
        rows,
        "agile / qemu-postcopy, total time",
        "qemu-postcopy",
        |r| r.total_ms,
    );
    ratio(
        out,
        rows,
        "agile / qemu-precopy, total time",
        "qemu-precopy",
        |r| r.total_ms,
    );
    let released = |r: &Row| r.source_released_ms;
    let (a, b) = (
        figure(rows, "agile", released),
        figure(rows, "qemu-precopy", |r| r.total_ms),
    );
    let text = match (a, b) {
        (Some((a, false)), Some((b, lower))) if b > 0.0 => format!(
            "{:.2}{}",
            a / b,
            if lower {
                " (qemu-precopy did not complete: <=)"
            } else {
                ""
            }
        ),
        _ => "-".into(),
    };
    outln!(
        out,
        "  {:<58} {text}",
        "agile source-released / qemu-precopy total time"
    );
}
