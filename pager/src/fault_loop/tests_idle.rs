//! The loop sleeps when nothing needs doing: a source whose completion fd is readable while
//! nothing is in flight (a signal that lands after the answers were taken, or a host that
//! went away) is read, not left readable for `poll(2)` to return at once forever.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::tests_routed::{Guest, PAGE};
use crate::route::Route;
use crate::source::{PageCompletion, PageSource, SourceError};

/// A source with nothing in flight whose fd was signalled once; counts the loop's wake-ups
/// (the loop flushes every live source once per wake-up) and its polls.
struct LateSignal {
    efd: EventFd,
    flushes: Arc<AtomicUsize>,
    polls: Arc<AtomicUsize>,
}

impl PageSource for LateSignal {
    fn page_size(&self) -> usize {
        PAGE
    }
    fn capacity_pages(&self) -> u64 {
        4
    }
    fn submit(&mut self, page: u64, _tag: u64) -> Result<(), SourceError> {
        Err(SourceError::OutOfRange { page, capacity: 0 })
    }
    fn flush(&mut self) -> Result<(), SourceError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn poll(&mut self, _out: &mut Vec<PageCompletion>, _min: usize) -> Result<usize, SourceError> {
        self.polls.fetch_add(1, Ordering::Relaxed);
        let _ = self.efd.read();
        Ok(0)
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
    fn describe(&self) -> String {
        "late signal".into()
    }
    fn route(&self) -> Route {
        Route::Remote
    }
}

#[test]
fn a_source_signalled_with_nothing_in_flight_does_not_make_the_loop_spin() {
    let efd =
        EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).unwrap();
    efd.write(1).unwrap();
    let (flushes, polls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let source = LateSignal {
        efd,
        flushes: flushes.clone(),
        polls: polls.clone(),
    };
    let mut g = Guest::start(4, |_| Route::Remote, vec![Box::new(source)], "none", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let (woke, polled) = (
        flushes.load(Ordering::Relaxed),
        polls.load(Ordering::Relaxed),
    );
    g.stop().unwrap();
    assert!(polled >= 1, "the readable fd was never read");
    // Spinning, the loop wakes up hundreds of thousands of times in 300 ms.
    assert!(woke < 20, "the idle loop woke {woke} times in 300 ms");
}
