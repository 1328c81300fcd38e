//! Hot-set pass timing: how long one sweep over the whole hot set (check each page against its
//! last generation, then rewrite it) takes. The sweep is spread over seconds by the rewrite
//! rate, so the clock sums only the time spent inside the rewrites (`hot_pass_ms`, what a host
//! pager slows down) and also reports the sweep's wall time (`wall_ms`, set by the rate).

use std::time::{Duration, Instant};

/// Accumulates one sweep at a time.
#[derive(Debug, Default)]
pub struct HotPassClock {
    busy: Duration,
    sweep_started: Option<Instant>,
    passes: u64,
}

/// One finished sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotPass {
    pub pass: u64,
    pub busy: Duration,
    pub wall: Duration,
}

impl HotPass {
    /// The stable output line (after the `memverify: ` prefix), parsed by `pagewise bench
    /// guest`: `hot pass N pages=P hot_pass_ms=B wall_ms=W`.
    pub fn line(&self, pages: usize) -> String {
        format!(
            "hot pass {} pages={pages} hot_pass_ms={:.1} wall_ms={}",
            self.pass,
            self.busy.as_secs_f64() * 1e3,
            self.wall.as_millis()
        )
    }
}

impl HotPassClock {
    /// Time `rewrite` (one hot page); `wrapped` says whether it was the sweep's last page.
    /// Returns the finished sweep when it was.
    pub fn time(&mut self, rewrite: impl FnOnce(), wrapped: bool) -> Option<HotPass> {
        let started = Instant::now();
        let sweep_started = *self.sweep_started.get_or_insert(started);
        rewrite();
        let ended = Instant::now();
        self.busy += ended - started;
        if !wrapped {
            return None;
        }
        self.passes += 1;
        let pass = HotPass {
            pass: self.passes,
            busy: std::mem::take(&mut self.busy),
            wall: ended - sweep_started,
        };
        self.sweep_started = None;
        Some(pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_once_per_sweep_with_summed_busy_time() {
        let mut clock = HotPassClock::default();
        let work = || std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.time(work, false), None);
        std::thread::sleep(Duration::from_millis(20)); // idle: wall time, not busy time
        let pass = clock.time(work, true).expect("the sweep ended");
        assert_eq!(pass.pass, 1);
        assert!(pass.busy >= Duration::from_millis(4), "{pass:?}");
        assert!(pass.busy < Duration::from_millis(20), "{pass:?}");
        assert!(pass.wall >= Duration::from_millis(24), "{pass:?}");
        let second = clock.time(work, true).expect("a one-page sweep");
        assert_eq!(second.pass, 2);
        assert!(
            second.busy < Duration::from_millis(20),
            "busy was reset: {second:?}"
        );
        assert!(pass.line(8).starts_with("hot pass 1 pages=8 hot_pass_ms="));
        assert!(pass.line(8).contains(" wall_ms="));
    }
}
