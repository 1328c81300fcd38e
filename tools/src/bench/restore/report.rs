//! The `bench restore` table.

use super::{RestoreBenchArgs, Saved, RECOVERED_FACTOR};

/// One restore, as measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub how: &'static str,
    /// Device state (QEMU: and all RAM) loaded, from the restore's start.
    pub loaded_ms: Option<f64>,
    /// The first heartbeat, from the restore's start.
    pub answer_ms: f64,
    /// (when, that pass's ms) of the first hot pass back within the factor.
    pub hot_back: Option<(f64, f64)>,
    pub bytes_at_answer: Option<u64>,
    pub bytes_at_hot: Option<u64>,
    pub bytes_total: Option<u64>,
    pub bad_pages: u64,
    pub passed: bool,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.passed && self.bad_pages == 0
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

fn mb(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| format!("{:.0}", b as f64 / 1e6))
}

/// The table lines (header, separator, one per row).
pub fn table_lines(rows: &[Row]) -> Vec<String> {
    let base = rows.first().map(|r| r.answer_ms);
    let mut out = vec![
        format!(
            "| restore | how | loaded ms | answers after ms | vs qemu | hot pass ≤ {RECOVERED_FACTOR}x \
             after ms (pass ms) | MB read by answer | by hot pass back | by the end | guest |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for r in rows {
        let speedup = base
            .filter(|b| r.answer_ms > 0.0 && *b > 0.0)
            .map_or("-".into(), |b| format!("{:.1}x sooner", b / r.answer_ms));
        let hot = r
            .hot_back
            .map_or("- (not within the run)".into(), |(at, pass)| {
                format!("{at:.0} ({pass:.0})")
            });
        let guest = if r.ok() {
            "ok (0 bad)".to_string()
        } else {
            format!("**{} bad pages**", r.bad_pages)
        };
        out.push(format!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.how,
            ms(r.loaded_ms),
            r.answer_ms,
            speedup,
            hot,
            mb(r.bytes_at_answer),
            mb(r.bytes_at_hot),
            mb(r.bytes_total),
            guest
        ));
    }
    out
}

pub fn print_table(a: &RestoreBenchArgs, saved: &Saved, rows: &[Row]) {
    println!(
        "guest: {} MiB RAM, memverify {} MiB, hot set {} MiB at {} MiB/s, heartbeat {} ms; \
         pre-save hot pass median {:.0} ms; saved files in {}",
        a.ram_mib,
        a.mib,
        a.hot_mib,
        a.hot_rate_mibs,
        a.heartbeat_ms,
        saved.hot_ms_before,
        a.dir.display()
    );
    for line in table_lines(rows) {
        println!("{line}");
    }
    if let [q, lazy @ ..] = rows {
        for p in lazy {
            println!(
                "{} answers {:.1}x sooner than QEMU's own restore (target >= 5x)",
                p.name,
                q.answer_ms / p.answer_ms.max(1.0)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_compare_against_the_first() {
        let r = |name: &str, answer_ms, hot_back, bad_pages| Row {
            name: name.to_string(),
            how: "h",
            loaded_ms: Some(10.0),
            answer_ms,
            hot_back,
            bytes_at_answer: Some(5_000_000),
            bytes_at_hot: None,
            bytes_total: Some(9_000_000),
            bad_pages,
            passed: bad_pages == 0,
        };
        let lines = table_lines(&[
            r("qemu", 2000.0, Some((2500.0, 100.0)), 0),
            r("pagewise", 200.0, None, 3),
        ]);
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("| 1.0x sooner |") && lines[2].contains("2500 (100)"));
        assert!(lines[3].contains("10.0x sooner") && lines[3].contains("not within"));
        assert!(lines[3].contains("**3 bad pages**") && lines[3].contains("| 5 | - | 9 |"));
    }
}
