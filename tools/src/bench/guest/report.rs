//! The bench's result table.

use serde_json::Value;

use super::serial::GuestLine;
use super::GuestBenchArgs;

/// The median, None for no samples.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

/// Passes and hot sweeps of one phase.
#[derive(Debug, Default, Clone)]
pub struct PhaseTimes {
    pub full_ms: Vec<f64>,
    pub hot_ms: Vec<f64>,
}

impl PhaseTimes {
    pub fn from_lines<'a>(lines: impl Iterator<Item = &'a GuestLine>) -> Self {
        let mut t = Self::default();
        for l in lines {
            match l {
                GuestLine::Pass { ms, .. } => t.full_ms.push(*ms),
                GuestLine::HotPass { busy_ms, .. } => t.hot_ms.push(*busy_ms),
                GuestLine::Done { .. } | GuestLine::Heartbeat { .. } => {}
            }
        }
        t
    }
}

/// What phases (b) and (c) measured, plus the daemon's figures.
pub struct PagerRun {
    pub nothing_evicted: PhaseTimes,
    /// The first full pass and the first hot sweep that started after the eviction ended.
    pub first_after: PhaseTimes,
    /// Later ones (the refaulted pages are resident again).
    pub later_after: PhaseTimes,
    pub stats_before: Value,
    pub stats_after_evict: Value,
    pub stats_end: Value,
    pub evict_report: Value,
    pub resident_before: u64,
    pub resident_after: u64,
}

fn metric(stats: &Value, key: &str) -> u64 {
    stats
        .pointer(&format!("/vms/0/metrics/{key}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn fmt_ratio(v: Option<f64>, base: Option<f64>) -> String {
    match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

pub fn print_table(a: &GuestBenchArgs, plain: &PhaseTimes, r: &PagerRun) {
    let base_hot = median(plain.hot_ms.clone());
    let base_full = median(plain.full_ms.clone());
    println!();
    println!(
        "pagewise bench guest: memverify {} MiB, hot set {} MiB at {} MiB/s, full pass every \
         {} s, {} s per guest; {} MiB guest, TCG",
        a.mib, a.hot_mib, a.hot_rate_mibs, a.verify_secs, a.duration_secs, a.ram_mib
    );
    println!(
        "{:<44} {:>11} {:>7} {:>12} {:>7} {:>9}",
        "phase", "hot pass ms", "vs (a)", "full pass ms", "vs (a)", "samples"
    );
    let rows = [
        ("(a) plain QEMU, no pager (median)", plain),
        ("(b) pager, nothing evicted (median)", &r.nothing_evicted),
        ("(c) pager, evicted: first pass after", &r.first_after),
        ("(c') pager, evicted: later passes (median)", &r.later_after),
    ];
    for (label, t) in rows {
        let (hot, full) = (median(t.hot_ms.clone()), median(t.full_ms.clone()));
        println!(
            "{:<44} {:>11} {:>7} {:>12} {:>7} {:>9}",
            label,
            fmt_ms(hot),
            fmt_ratio(hot, base_hot),
            fmt_ms(full),
            fmt_ratio(full, base_full),
            format!("{}/{}", t.hot_ms.len(), t.full_ms.len())
        );
    }
    println!(
        "hot pass: guest time inside the check+rewrite of every hot page once (memverify \
         'hot pass' hot_pass_ms); full pass: memverify pass_ms; samples: hot/full"
    );

    let page = r
        .stats_before
        .pointer("/vms/0/page_size")
        .and_then(Value::as_u64)
        .unwrap_or(4096);
    let mib = |pages: u64| (pages * page) as f64 / (1 << 20) as f64;
    let p = |k: &str| {
        r.evict_report
            .pointer(&format!("/progress/{k}"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    println!();
    println!(
        "eviction ({}): {} pages ({:.1} MiB) + {} zero pages in {} ms ({:.0} MB/s), {} skipped, \
         {} abandoned; working-set estimate before: {} pages ({:.1} MiB)",
        a.evict,
        p("evicted"),
        mib(p("evicted")),
        p("zero"),
        r.evict_report
            .get("elapsed_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        r.evict_report
            .get("mb_per_s")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        p("skipped"),
        p("abandoned"),
        r.stats_before
            .pointer("/vms/0/eviction/wss/wss_pages")
            .and_then(Value::as_u64)
            .map_or("-".into(), |w| w.to_string()),
        r.stats_before
            .pointer("/vms/0/eviction/wss/wss_pages")
            .and_then(Value::as_u64)
            .map_or(0.0, mib),
    );
    println!(
        "guest RAM file resident: {:.1} MiB before, {:.1} MiB after the eviction",
        r.resident_before as f64 / (1 << 20) as f64,
        r.resident_after as f64 / (1 << 20) as f64
    );
    println!(
        "{:<36} {:>10} {:>10} {:>12} {:>11}",
        "daemon faults", "faults", "wp_faults", "from device", "prefetched"
    );
    let keys = [
        "faults",
        "wp_faults",
        "faults_to_source",
        "pages_prefetched",
    ];
    let row = |label: &str, to: &Value, from: Option<&Value>| {
        let d: Vec<u64> = keys
            .iter()
            .map(|k| metric(to, k).saturating_sub(from.map_or(0, |f| metric(f, k))))
            .collect();
        println!(
            "{:<36} {:>10} {:>10} {:>12} {:>11}",
            label, d[0], d[1], d[2], d[3]
        );
    };
    row("(b) attach .. eviction start", &r.stats_before, None);
    if r.stats_end.is_null() {
        println!("(c) after the eviction: - (the daemon dropped the VM when QEMU exited)");
    } else {
        row(
            "(c) eviction end .. guest done",
            &r.stats_end,
            Some(&r.stats_after_evict),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(fmt_ratio(Some(3.0), Some(2.0)), "1.50");
        assert_eq!(fmt_ratio(Some(3.0), None), "-");
    }
}
