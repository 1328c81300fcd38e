//! A migration's timeline: what each host counted, sampled every [`EVERY`] while the
//! migration runs, for `migrate --plot` and the JSON report. The source samples bytes and
//! pages sent and the pages the guest newly wrote; the destination its demand faults and
//! their latency. Samples carry Unix-epoch milliseconds, so the two hosts' series share one
//! time axis.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pager::dirty::Subscription;
use pager::metrics::HistogramSnapshot;
use pager::vm::Vm;
use serde::Serialize;

use super::engine::Job;

/// Time between samples.
pub const EVERY: Duration = Duration::from_millis(200);
/// Samples kept; past it every other one is dropped (the series keeps its span).
const MAX_SAMPLES: usize = 2048;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One sample of the source (counters are totals since the start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SourceSample {
    pub at_ms: u64,
    /// Bytes put on the link (ram.transferred).
    pub bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub stored_pages: u64,
    /// Pages the guest wrote again (newly dirty in the migration's write tracking).
    pub dirtied_pages: u64,
    /// Demand requests answered (after the switchover).
    pub demand_requests: u64,
}

/// One sample of the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DestSample {
    pub at_ms: u64,
    /// Faults served from the source (total).
    pub demand_faults: u64,
    /// Latency of the faults resolved since the previous sample (bucket upper bounds).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// Keeps at most [`MAX_SAMPLES`].
fn push<T>(series: &mut Vec<T>, s: T) {
    if series.len() >= MAX_SAMPLES {
        let mut i = 0;
        series.retain(|_| {
            i += 1;
            i % 2 == 1
        });
    }
    series.push(s);
}

/// What the source sampler reads the dirty count from: the migration's write tracking,
/// while it exists.
#[derive(Default)]
pub struct DirtyProbe {
    writes: Mutex<Option<Arc<Subscription>>>,
}

impl DirtyProbe {
    pub fn set(&self, writes: Option<Arc<Subscription>>) {
        *self.writes.lock().unwrap_or_else(|e| e.into_inner()) = writes;
    }
    fn count(&self) -> Option<u64> {
        let w = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        w.as_ref().map(|s| s.count() as u64)
    }
}

/// A sampling thread, stopped (and joined) when dropped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, mut tick: impl FnMut() + Send + 'static) -> Option<Sampler> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !flag.load(Ordering::Acquire) {
                tick();
                std::thread::sleep(EVERY);
            }
            tick();
        })
        .ok()?;
    Some(Sampler {
        stop,
        thread: Some(thread),
    })
}

/// Sample the source's counters into `job`'s timeline.
pub fn sample_source(job: Arc<Job>, probe: Arc<DirtyProbe>) -> Option<Sampler> {
    let (mut last, mut dirtied) = (0u64, 0u64);
    spawn("migrate-timeline", move || {
        if let Some(now) = probe.count() {
            // A harvest empties the set: what is in it now was written since.
            dirtied += if now >= last { now - last } else { now };
            last = now;
        }
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let s = SourceSample {
            at_ms: now_ms(),
            bytes: get(&job.transferred),
            data_pages: get(&job.normal),
            zero_pages: get(&job.duplicate),
            stored_pages: get(&job.stored),
            dirtied_pages: dirtied,
            demand_requests: get(&job.requests),
        };
        job.update(|st| push(&mut st.timeline, s));
    })
}

/// Sample the destination VM's demand faults and their latency into `job`'s timeline.
pub fn sample_destination(job: Arc<Job>, vm: Arc<Vm>) -> Option<Sampler> {
    let mut prev = HistogramSnapshot::default();
    spawn("migrate-timeline", move || {
        let m = vm.metrics.snapshot();
        let hist = m.fault_latency;
        let interval = HistogramSnapshot {
            buckets: hist
                .buckets
                .iter()
                .enumerate()
                .map(|(i, &c)| c.saturating_sub(prev.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_ns: hist.sum_ns.saturating_sub(prev.sum_ns),
        };
        let s = DestSample {
            at_ms: now_ms(),
            demand_faults: m.faults_to_source,
            p50_us: interval.quantile_us(0.5),
            p99_us: interval.quantile_us(0.99),
        };
        prev = hist;
        job.update(|st| push(&mut st.dest_timeline, s));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_series_keeps_its_span_at_half_the_resolution() {
        let mut v = Vec::new();
        for i in 0..(MAX_SAMPLES as u64 + 1) {
            push(&mut v, i);
        }
        assert_eq!(v.len(), MAX_SAMPLES / 2 + 1);
        assert_eq!(v[0], 0);
        assert_eq!(v[1], 2);
        assert_eq!(*v.last().unwrap(), MAX_SAMPLES as u64);
    }
}
