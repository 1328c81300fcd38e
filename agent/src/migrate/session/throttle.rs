//! A writer that keeps to a byte rate (`--max-bandwidth`) and stops when the migration is
//! cancelled, counting what it wrote.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The error a cancelled migration's writes fail with.
pub const CANCELLED: &str = "the migration was cancelled";

pub struct Throttle<W> {
    inner: W,
    /// Bytes per second; 0: unlimited.
    rate: u64,
    started: Instant,
    written: u64,
    cancel: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
}

impl<W: Write> Throttle<W> {
    pub fn new(inner: W, rate: u64, cancel: Arc<AtomicBool>, counter: Arc<AtomicU64>) -> Self {
        Self {
            inner,
            rate,
            started: Instant::now(),
            written: 0,
            cancel,
            counter,
        }
    }
}

impl<W: Write> Write for Throttle<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(std::io::Error::other(CANCELLED));
        }
        if self.rate > 0 {
            let due = Duration::from_secs_f64(self.written as f64 / self.rate as f64);
            let elapsed = self.started.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_to_its_rate_counts_and_stops_when_cancelled() {
        let cancel = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicU64::new(0));
        let mut t = Throttle::new(Vec::new(), 1_000_000, cancel.clone(), counter.clone());
        let start = Instant::now();
        for _ in 0..20 {
            t.write_all(&[0u8; 10_000]).unwrap();
        }
        // 200 kB at 1 MB/s: the last write waits until ~190 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(180),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(counter.load(Ordering::Relaxed), 200_000);
        cancel.store(true, Ordering::Release);
        let e = t.write_all(&[0u8; 10]).unwrap_err();
        assert_eq!(e.to_string(), CANCELLED);
    }
}
