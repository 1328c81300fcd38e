//! What the guest itself shows: its hot-pass times before, during and after the migration
//! (memverify's `hot pass` lines, on the source then the destination serial log), and its
//! health where it ended up (memverify's DONE line; a QEMU exit without one is a crash).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::guest::report::median;
use crate::bench::guest::serial::{done_of, GuestLine, SerialLog};

/// memverify `hot_pass_ms` (guest time inside one sweep of the hot set) by phase.
#[derive(Debug, Default, Clone, Serialize)]
pub struct HotPasses {
    /// Median of the sweeps that ended before the migration started.
    pub before_ms: Option<f64>,
    /// Worst sweep that overlapped the migration.
    pub during_worst_ms: Option<f64>,
    /// Median of the sweeps that started after the migration ended.
    pub after_ms: Option<f64>,
    pub samples: [usize; 3],
}

fn hot(lines: &[(Instant, GuestLine)]) -> impl Iterator<Item = (Instant, Instant, f64)> + '_ {
    lines.iter().filter_map(|(seen, l)| match l {
        GuestLine::HotPass {
            busy_ms, wall_ms, ..
        } => {
            let start = seen
                .checked_sub(Duration::from_secs_f64(wall_ms / 1e3))
                .unwrap_or(*seen);
            Some((start, *seen, *busy_ms))
        }
        _ => None,
    })
}

/// Split the sweeps at the migration's start `t0` and end `t_end`. `dst` is the destination
/// console, None when the guest stayed on the source.
pub fn hot_passes(
    src: &SerialLog,
    dst: Option<&SerialLog>,
    t0: Instant,
    t_end: Instant,
) -> HotPasses {
    let (mut before, mut during, mut after) = (Vec::new(), Vec::new(), Vec::new());
    for (start, end, ms) in hot(&src.lines) {
        if end < t0 {
            before.push(ms);
        } else if dst.is_some() || start < t_end {
            during.push(ms);
        } else {
            after.push(ms);
        }
    }
    for (start, _, ms) in dst.into_iter().flat_map(|d| hot(&d.lines)) {
        if start < t_end {
            during.push(ms);
        } else {
            after.push(ms);
        }
    }
    HotPasses {
        samples: [before.len(), during.len(), after.len()],
        before_ms: median(before),
        during_worst_ms: during.into_iter().max_by(f64::total_cmp),
        after_ms: median(after),
    }
}

/// How often the consoles are read while a migration runs: the heartbeat gap is measured
/// from the host times lines are first seen, so this is its resolution.
pub const POLL_EVERY: Duration = Duration::from_millis(5);

/// Read every console each [`POLL_EVERY`] for `total`.
pub fn poll_for(serials: &mut [&mut SerialLog], total: Duration) {
    let until = Instant::now() + total;
    loop {
        for s in serials.iter_mut() {
            let _ = s.poll();
        }
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep(POLL_EVERY.min(until - now));
    }
}

/// The longest gap between two heartbeats the guest printed (memverify `hb` lines, source
/// console then destination console) that ends after the migration's start `t0` and begins
/// before its end `t_end`: the pause the guest lived through, as a host sees it.
pub fn heartbeat_gap_ms(
    src: &SerialLog,
    dst: Option<&SerialLog>,
    t0: Instant,
    t_end: Instant,
) -> Option<u64> {
    let mut beats: Vec<Instant> = std::iter::once(src)
        .chain(dst)
        .flat_map(|log| log.lines.iter())
        .filter(|(_, l)| matches!(l, GuestLine::Heartbeat { .. }))
        .map(|(seen, _)| *seen)
        .collect();
    beats.sort_unstable();
    beats
        .windows(2)
        .filter(|w| w[1] >= t0 && w[0] <= t_end)
        .map(|w| w[1].duration_since(w[0]).as_millis() as u64)
        .max()
}

/// The guest's health at the end of a row.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Health {
    /// Where the guest ran at the end: "destination" or "source" (a migration that did not
    /// complete).
    pub host: &'static str,
    /// memverify's DONE line was printed.
    pub done: bool,
    pub bad_pages: Option<u64>,
    /// The kernel died or QEMU exited without DONE.
    pub crashed: bool,
    /// What the console showed when it did not finish (panic text, last lines).
    pub note: Option<String>,
}

impl Health {
    pub fn ok(&self) -> bool {
        self.done && self.bad_pages == Some(0) && !self.crashed
    }

    pub fn verdict(&self) -> String {
        match (self.done, self.bad_pages, self.crashed) {
            (true, Some(0), _) => "ok (0 bad)".into(),
            (true, Some(b), _) => format!("{b} BAD pages"),
            (_, _, true) => "CRASHED".into(),
            _ => "no DONE".into(),
        }
    }
}

fn crash_note(serial: &Path) -> String {
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    let keys = ["Kernel panic", "BUG:", "Oops", "general protection", "RIP:"];
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(i) = lines
        .iter()
        .position(|l| keys.iter().any(|k| l.contains(k)))
    {
        return lines[i..lines.len().min(i + 4)].join(" | ");
    }
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Poll `serial` (and `others`, to keep their timestamps) until DONE, the guest's QEMU is
/// gone (`alive` false) or `limit` passes.
pub fn wait_health(
    serial: &mut SerialLog,
    others: &mut [&mut SerialLog],
    host: &'static str,
    mut alive: impl FnMut() -> bool,
    limit: Duration,
) -> Health {
    let deadline = Instant::now() + limit;
    loop {
        let _ = serial.poll();
        for o in others.iter_mut() {
            let _ = o.poll();
        }
        if let Some((bad, _)) = done_of(&serial.lines) {
            return Health {
                host,
                done: true,
                bad_pages: Some(bad),
                crashed: false,
                note: None,
            };
        }
        let gone = !alive();
        if gone || Instant::now() > deadline {
            std::thread::sleep(Duration::from_millis(200));
            let _ = serial.poll();
            if let Some((bad, _)) = done_of(&serial.lines) {
                return Health {
                    host,
                    done: true,
                    bad_pages: Some(bad),
                    crashed: false,
                    note: None,
                };
            }
            let note = crash_note(&serial.path);
            return Health {
                host,
                done: false,
                bad_pages: None,
                crashed: gone,
                note: Some(if gone {
                    format!("QEMU exited without DONE: {note}")
                } else {
                    format!("no DONE within {limit:?}: {note}")
                }),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep(at: Instant, busy_ms: f64) -> (Instant, GuestLine) {
        (
            at,
            GuestLine::HotPass {
                pass: 1,
                busy_ms,
                wall_ms: 1000.0,
            },
        )
    }

    #[test]
    fn sweeps_split_at_the_migration() {
        let base = Instant::now();
        let t = |s: u64| base + Duration::from_secs(s);
        let (t0, t_end) = (t(10), t(20));
        let mut src = SerialLog::new("src".into());
        src.lines = vec![sweep(t(5), 100.0), sweep(t(9), 120.0), sweep(t(12), 300.0)];
        let mut dst = SerialLog::new("dst".into());
        // Started before the end (during), then two after.
        dst.lines = vec![
            sweep(t(20), 900.0),
            sweep(t(23), 130.0),
            sweep(t(25), 110.0),
        ];
        let h = hot_passes(&src, Some(&dst), t0, t_end);
        assert_eq!(h.samples, [2, 2, 2]);
        assert_eq!(h.before_ms, Some(110.0));
        assert_eq!(h.during_worst_ms, Some(900.0));
        assert_eq!(h.after_ms, Some(120.0));
        // Stayed on the source: its sweeps after the end are "after".
        let h = hot_passes(&src, None, t0, t(11));
        assert_eq!(h.samples, [2, 0, 1]);
    }

    #[test]
    fn the_heartbeat_gap_is_the_longest_pause_across_both_consoles_during_the_migration() {
        let base = Instant::now();
        let ms = |m: u64| base + Duration::from_millis(m);
        let beat = |m: u64| (ms(m), GuestLine::Heartbeat { n: m });
        let mut src = SerialLog::new("src".into());
        // A 500 ms stall before the migration does not count; the pause at 1040-1110 does.
        src.lines = vec![beat(0), beat(500), beat(1000), beat(1020), beat(1040)];
        let mut dst = SerialLog::new("dst".into());
        dst.lines = vec![beat(1110), beat(1130), beat(1150)];
        assert_eq!(
            heartbeat_gap_ms(&src, Some(&dst), ms(1010), ms(1200)),
            Some(70)
        );
        // No heartbeats at all: no figure.
        let quiet = SerialLog::new("quiet".into());
        assert_eq!(heartbeat_gap_ms(&quiet, None, ms(0), ms(10)), None);
    }

    #[test]
    fn verdicts() {
        let mut h = Health {
            host: "destination",
            done: true,
            bad_pages: Some(0),
            ..Health::default()
        };
        assert!(h.ok());
        h.bad_pages = Some(3);
        assert_eq!(h.verdict(), "3 BAD pages");
        h = Health {
            crashed: true,
            ..Health::default()
        };
        assert_eq!(h.verdict(), "CRASHED");
        assert!(!h.ok());
    }
}
