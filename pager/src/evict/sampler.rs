//! The working-set sampler: every interval, write-protect the whole guest (synchronous WP;
//! the fault loop marks first writes dirty and un-protects), then close the interval in the
//! tracker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{Uffd, UffdError};

use crate::dirty::Subscription;
use crate::layout::GuestLayout;
use crate::page_state::PageStateTable;
use crate::wss::{WorkingSetTracker, WssSample};

/// Re-protect every region, then sample. Protecting first means a write is seen in this
/// interval or the next, never in neither.
pub fn protect_and_sample(
    uffd: &Uffd,
    layout: &GuestLayout,
    states: &PageStateTable,
    dirty: &Subscription,
    tracker: &WorkingSetTracker,
) -> Result<WssSample, UffdError> {
    crate::vm::protect_all(uffd, layout)?;
    Ok(tracker.sample(states, dirty, Instant::now()))
}

/// What the sampler thread needs; the daemon's per-VM state provides it.
pub trait SamplerTarget: Send + Sync + 'static {
    fn uffd(&self) -> &Uffd;
    fn layout(&self) -> &GuestLayout;
    fn states(&self) -> &PageStateTable;
    /// The tracker's own write-tracking subscription.
    fn writes(&self) -> &Subscription;
    fn tracker(&self) -> &WorkingSetTracker;
    /// Runs after every sample on the sampler thread (housekeeping; default: nothing).
    fn after_sample(&self) {}
}

/// A running sampler thread; stops (and joins) on drop.
pub struct Sampler {
    stop: Arc<(Mutex<bool>, Condvar)>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Sample `target` every `interval` until dropped. A uffd error (the VMM is gone) ends
    /// the thread; [`Sampler::failed`] then reports it.
    pub fn spawn<T: SamplerTarget>(target: Arc<T>, interval: Duration) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let failed = Arc::new(AtomicBool::new(false));
        let (stop2, failed2) = (stop.clone(), failed.clone());
        let thread = std::thread::Builder::new()
            .name("pw-wss".into())
            .spawn(move || {
                let (lock, cv) = &*stop2;
                let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let (guard, _) = cv
                        .wait_timeout(stopped, interval)
                        .unwrap_or_else(|e| e.into_inner());
                    stopped = guard;
                    if *stopped {
                        return;
                    }
                    match protect_and_sample(
                        target.uffd(),
                        target.layout(),
                        target.states(),
                        target.writes(),
                        target.tracker(),
                    ) {
                        Ok(s) => {
                            tracing::debug!(
                                wss = s.wss_pages,
                                written = s.written,
                                refaulted = s.refaulted,
                                "working-set sample"
                            );
                            target.after_sample();
                        }
                        Err(e) => {
                            tracing::warn!(error = %crate::error_chain(&e), "working-set sampler stops");
                            failed2.store(true, Ordering::Release);
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            failed,
            thread: Some(thread),
        })
    }

    /// Whether the thread ended on an error.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
