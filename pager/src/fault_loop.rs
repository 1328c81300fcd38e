//! The fault loop: one thread per VM serving its userfaultfd.
//!
//! Life of a fault: the kernel queues a uffd message -> the loop (blocked in `poll(2)` on the
//! non-blocking uffd, the page source's completion eventfd, a stop eventfd and the VMM's
//! attach connection) reads messages in batches and handles them in order ([`events`]) ->
//! page-state lookup: Removed/Zero -> UFFDIO_ZEROPAGE; Present -> UFFDIO_WAKE; InFlight ->
//! record the waiter; Evicting -> leave it to the evictor; Missing/Evicted -> claim InFlight,
//! ask the prefetch policy for more, submit reads -> completion -> UFFDIO_COPY per contiguous
//! run ([`place`]) -> Present -> latency recorded. Many reads are in flight at once, so a slow
//! read never holds up other faults; the loop never spins when idle.
//!
//! Several sources serve one VM: the page's [`Route`] (in the VM's route table) names the
//! source that fetches it ([`sources`]). A [`LoopController`] sends the loop orders while it
//! runs ([`orders`]): pushed pages to place, sources to install or remove, pause/resume, a
//! state report.

mod events;
mod orders;
mod place;
mod reads;
mod sources;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use uffd::Event;

use crate::metrics::VmMetrics;
use crate::page_state::PageState;
use crate::prefetch::PrefetchPolicy;
use crate::route::Route;
use crate::source::{PageCompletion, PageSource, SourceError};
use crate::vm::Vm;

use orders::OrderInbox;
pub use orders::{LoopController, LoopReport, OrderError, PlaceReport, PushedPage, SourceReport};
use sources::{Claim, SourceSet};

mod config;
pub use config::FaultLoopConfig;

/// Why a fault loop ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopExit {
    /// Asked to stop (daemon shutdown / detach).
    Stopped,
    /// The VMM closed its attach connection (it exited or detached).
    PeerHangup,
    /// The VMM's address space is gone (ESRCH from the kernel).
    ProcessGone,
}

/// A fault loop failed; the VM is torn down, other VMs are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum FaultLoopError {
    #[error("userfaultfd")]
    Uffd(#[from] uffd::UffdError),
    #[error("placing page {page}")]
    Place {
        page: u64,
        #[source]
        source: uffd::CopyError,
    },
    #[error("page source")]
    Source(#[from] SourceError),
    #[error("page {page} could not be read after {attempts} attempts, a guest thread waits on it")]
    ReadFailed {
        page: u64,
        attempts: u64,
        #[source]
        source: SourceError,
    },
    #[error("page {page} is damaged and a guest thread waits on it; it is never placed")]
    Damaged {
        page: u64,
        #[source]
        source: SourceError,
    },
    #[error("the userfaultfd reports an error condition (was UFFDIO_API done by the VMM?)")]
    UffdUnusable,
    #[error("poll")]
    Poll(#[from] nix::Error),
    #[error("setting up the order channel")]
    Orders(#[from] OrderError),
    #[error("the VMM remapped guest memory ({len:#x} bytes {from:#x} -> {to:#x}); mremap of guest RAM is not supported")]
    Remapped { from: u64, to: u64, len: u64 },
}

/// Why a page is fetched. The reason travels as the read's tag (`as u64`): sources that
/// batch requests submit lower tags first, so demand reads go out ahead of prefetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum FetchReason {
    /// A guest thread faulted on it.
    Demand,
    /// The prefetch policy picked it around a demand fault.
    Prefetch,
    /// The prefetch policy picked it while the loop was idle (active push).
    Background,
    /// Pushed by someone else (a migration source) through an order.
    Push,
}

impl FetchReason {
    fn tag(self) -> u64 {
        self as u64
    }
}

/// Page-fault loop state for one VM.
pub struct FaultLoop {
    vm: Arc<Vm>,
    /// Page sources by route, and the claims of reads in flight.
    sources: SourceSet,
    orders: OrderInbox,
    /// Serving paused by an order: page faults are held in `deferred`.
    paused: bool,
    deferred: Vec<(Event, Instant)>,
    /// Faults on pages whose route has no live source, waiting for one.
    parked: Vec<(u64, Instant)>,
    prefetch: Box<dyn PrefetchPolicy>,
    config: FaultLoopConfig,
    stop: Arc<EventFd>,
    /// The VMM's attach connection: HUP on it means the VMM is gone.
    connection: Option<OwnedFd>,
    /// Demand faults waiting for an in-flight page: page -> times their messages were read.
    waiters: HashMap<u64, Vec<Instant>>,
    /// In-flight pages whose read the prefetch policy started.
    prefetched: HashSet<u64>,
    /// Read attempts per in-flight page beyond the first.
    retries: HashMap<u64, u64>,
    /// Completions of one source, as polled (before they are checked against the claims).
    polled: Vec<PageCompletion>,
    events: Vec<Event>,
    completions: Vec<PageCompletion>,
    candidates: Vec<u64>,
    staging: Vec<u8>,
    /// One zeroed huge page, for hugetlbfs guests (no UFFDIO_ZEROPAGE there); empty until needed.
    zero_huge_page: Vec<u8>,
}

impl FaultLoop {
    /// A loop serving every page of `vm` from `source`: the route table routes all pages to
    /// the source's route.
    pub fn new(
        vm: Arc<Vm>,
        source: Box<dyn PageSource>,
        prefetch: Box<dyn PrefetchPolicy>,
        config: FaultLoopConfig,
        stop: Arc<EventFd>,
        connection: Option<OwnedFd>,
    ) -> Result<Self, FaultLoopError> {
        let route = source.route();
        let pages = vm.layout.pages();
        vm.routes
            .set_range(0..pages, route)
            .expect("the route table has one entry per guest page");
        Self::with_sources(vm, vec![source], prefetch, config, stop, connection)
    }

    /// A loop serving `vm` from several sources, each installed for its own
    /// [`PageSource::route`]; the VM's route table (as prepared) says which page goes where.
    pub fn with_sources(
        vm: Arc<Vm>,
        sources: Vec<Box<dyn PageSource>>,
        prefetch: Box<dyn PrefetchPolicy>,
        config: FaultLoopConfig,
        stop: Arc<EventFd>,
        connection: Option<OwnedFd>,
    ) -> Result<Self, FaultLoopError> {
        let mut set = SourceSet::default();
        for source in sources {
            set.install(source.route(), source);
        }
        Ok(Self {
            vm,
            sources: set,
            orders: OrderInbox::new()?,
            paused: false,
            deferred: Vec::new(),
            parked: Vec::new(),
            prefetch,
            config,
            stop,
            connection,
            waiters: HashMap::new(),
            prefetched: HashSet::new(),
            retries: HashMap::new(),
            polled: Vec::with_capacity(64),
            events: Vec::with_capacity(64),
            completions: Vec::with_capacity(64),
            candidates: Vec::new(),
            staging: Vec::new(),
            zero_huge_page: Vec::new(),
        })
    }

    /// A handle to send this loop orders while it runs (valid until the loop ends).
    pub fn controller(&self) -> LoopController {
        LoopController::new(&self.orders)
    }

    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }

    fn metrics(&self) -> &VmMetrics {
        &self.vm.metrics
    }

    /// Serve faults until stopped, the VMM goes away, or an error makes serving impossible.
    pub fn run(mut self) -> Result<LoopExit, FaultLoopError> {
        // One span for the loop's life: every event logged inside names the VM.
        let _vm_span = tracing::info_span!("fault_loop", vm = %self.vm.name).entered();
        let mut zero = 0;
        let routes: Vec<Route> = self.sources.routes().collect();
        for route in routes {
            let vm = self.vm.clone();
            let routed_here = move |page: u64| vm.routes.get(page) == Some(route);
            if let Some(source) = self.sources.live(route) {
                zero += source.seed_zero_pages(&self.vm.states, &routed_here);
            }
        }
        let described: Vec<String> = self
            .sources
            .iter()
            .map(|(r, s)| format!("{}: {}", r.name(), s.source.describe()))
            .collect();
        tracing::info!(vm = %self.vm.name, sources = ?described,
            prefetch = self.prefetch.name(), zero, "fault loop started");
        let result = match self.serve() {
            // ESRCH from the kernel: the VMM's address space is gone; a normal end.
            Err(FaultLoopError::Place {
                source: uffd::CopyError::ProcessGone,
                ..
            }) => Ok(LoopExit::ProcessGone),
            other => other,
        };
        tracing::info!(vm = %self.vm.name, ?result, "fault loop ended");
        result
    }

    fn serve(&mut self) -> Result<LoopExit, FaultLoopError> {
        loop {
            for route in Route::ALL {
                if let Some(source) = self.sources.live(route) {
                    if let Err(e) = source.flush() {
                        self.source_failed(route, e)?;
                    }
                }
            }
            let ready = self.wait()?;
            if ready.stop {
                return Ok(LoopExit::Stopped);
            }
            // Per wake-up, at trace level: a disabled callsite costs one cached check.
            let _wake_span =
                tracing::trace_span!("wake", uffd_ready = ready.uffd, orders = ready.orders)
                    .entered();
            let mut saw_faults = false;
            if ready.orders {
                self.drain_orders()?;
            }
            if ready.uffd {
                saw_faults = self.drain_events()? > 0;
            }
            // A source's fd can be readable with nothing in flight (a late signal, or its
            // host gone): it is read anyway, else poll(2) would return at once forever.
            if self.sources.in_flight() > 0 || ready.sources {
                self.drain_completions()?;
            }
            if ready.hangup {
                return Ok(LoopExit::PeerHangup);
            }
            // While a migration source serves pages (Route::Remote), it pushes the rest
            // itself (in bubbling order): pulling them too would only double the traffic.
            let pushed_by_peer = self.sources.routes().any(|r| r == Route::Remote);
            // After faults, push only if nothing is in flight: no completion would wake the
            // loop to start it otherwise (the faults' reads were submitted first).
            let idle = !saw_faults || self.sources.in_flight() == 0;
            if idle && !self.paused && !pushed_by_peer {
                self.idle_prefetch()?;
            }
            self.metrics().inflight.store(
                self.sources.in_flight() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    /// Block until something needs doing.
    fn wait(&mut self) -> Result<Ready, FaultLoopError> {
        let uffd_fd: BorrowedFd<'_> = self.vm.uffd.as_fd();
        let mut fds = vec![
            PollFd::new(uffd_fd, PollFlags::POLLIN),
            PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.orders.fd(), PollFlags::POLLIN),
        ];
        const FIRST_SOURCE: usize = 3;
        let mut sources = 0;
        for (_, s) in self.sources.iter() {
            if !s.gone {
                fds.push(PollFd::new(s.source.completion_fd(), PollFlags::POLLIN));
                sources += 1;
            }
        }
        if let Some(c) = &self.connection {
            fds.push(PollFd::new(
                c.as_fd(),
                PollFlags::from_bits_retain(libc::POLLRDHUP),
            ));
        }
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // `revents()` is None when the kernel set bits nix does not name (POLLRDHUP): that
        // still means "look at this fd".
        let ready = |i: usize| {
            fds.get(i)
                .is_some_and(|f| f.revents().is_none_or(|r| !r.is_empty()))
        };
        let broken = PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL;
        if fds[0].revents().is_some_and(|r| r.intersects(broken)) {
            // E.g. a uffd whose UFFDIO_API handshake was never done reports POLLERR forever.
            return Err(FaultLoopError::UffdUnusable);
        }
        let (uffd, stop, orders) = (ready(0), ready(1), ready(2));
        let sources_ready = (FIRST_SOURCE..FIRST_SOURCE + sources).any(ready);
        let connection_ready = self.connection.is_some() && ready(FIRST_SOURCE + sources);
        drop(fds);
        Ok(Ready {
            uffd,
            stop,
            orders,
            sources: sources_ready,
            hangup: connection_ready && self.connection_closed(),
        })
    }

    /// The attach connection is readable: EOF or an error means the VMM is gone; stray bytes
    /// (neither handshake sends more) are read and ignored.
    fn connection_closed(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let Some(c) = &self.connection else {
            return false;
        };
        let mut buf = [0u8; 256];
        match recv(c.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => true,
            Ok(n) => {
                tracing::warn!(vm = %self.vm.name, bytes = n, "unexpected bytes on the attach connection ignored");
                false
            }
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => false,
            Err(_) => true,
        }
    }

    /// Read and handle every pending uffd message, in order. Returns how many page faults
    /// were among them.
    fn drain_events(&mut self) -> Result<usize, FaultLoopError> {
        let mut faults = 0;
        loop {
            let mut events = std::mem::take(&mut self.events);
            let n = self.vm.uffd.read_events(&mut events, 64)?;
            let read_at = Instant::now();
            for ev in events.drain(..) {
                if matches!(ev, Event::PageFault { .. }) {
                    faults += 1;
                }
                self.handle_event(ev, read_at)?;
            }
            self.events = events;
            if n == 0 {
                return Ok(faults);
            }
        }
    }

    /// Claim `page` for a fetch (-> InFlight) and submit its read to the source its route
    /// names. Demand faults and prefetches around them fetch Missing and Evicted pages;
    /// background (idle) prefetch fetches only Missing ones, so active push never undoes the
    /// evictor's work. Returns whether a read was submitted; a page whose route has no live
    /// source is not claimed (a demand fault on it parks, see `missing_fault`).
    fn fetch(&mut self, page: u64, why: FetchReason) -> Result<Fetch, FaultLoopError> {
        let Some(table_route) = self.vm.routes.get(page) else {
            return Ok(Fetch::NotClaimed);
        };
        if table_route == Route::Zero && self.vm.states.get(page) != PageState::Evicted {
            return Ok(Fetch::Zero);
        }
        if self.paused {
            return Ok(Fetch::NoSource);
        }
        let from_states: &[PageState] = match why {
            FetchReason::Background => &[PageState::Missing],
            FetchReason::Demand | FetchReason::Prefetch | FetchReason::Push => {
                &[PageState::Missing, PageState::Evicted]
            }
        };
        let Some(from) = claim_absent(&self.vm.states, page, from_states) else {
            return Ok(Fetch::NotClaimed);
        };
        // An evicted page's current copy is in the VM's own swap device (where the evictor
        // stores), whatever the route table says: on a migration destination the table routes
        // a page's content *before* this host had it (zero, remote, handed-over pages). A VM
        // with no swap-device source (one store on another route) keeps its table route.
        let route = if from == PageState::Evicted && self.sources.live(Route::Swapdev).is_some() {
            Route::Swapdev
        } else {
            self.vm.routes.get(page).unwrap_or(table_route)
        };
        if route == Route::Zero {
            self.vm.states.set(page, from);
            return Ok(Fetch::Zero);
        }
        let Some(source) = self.sources.live(route) else {
            self.vm.states.set(page, from);
            return Ok(Fetch::NoSource);
        };
        let submitted = source.submit(page, why.tag());
        if let Err(e) = submitted {
            self.vm.states.set(page, from);
            return match e {
                SourceError::HostGone { .. } => {
                    self.source_failed(route, e)?;
                    Ok(Fetch::NoSource)
                }
                e => Err(e.into()),
            };
        }
        self.sources.claim(
            page,
            Claim {
                route,
                from,
                tag: why.tag(),
            },
        );
        if why != FetchReason::Demand {
            self.prefetched.insert(page);
            VmMetrics::add(&self.metrics().pages_prefetched, 1);
        }
        Ok(Fetch::Submitted)
    }

    fn room(&self) -> usize {
        self.config
            .max_inflight
            .saturating_sub(self.sources.in_flight())
    }

    /// After a demand fault on `page`: let the policy pick more pages, within the budget.
    fn prefetch_around(&mut self, page: u64) -> Result<(), FaultLoopError> {
        let budget = self.config.prefetch_per_fault.min(self.room());
        if budget == 0 {
            return Ok(());
        }
        let mut candidates = std::mem::take(&mut self.candidates);
        candidates.clear();
        self.prefetch
            .on_fault(page, &self.vm.states, budget, &mut candidates);
        let result = self.fetch_candidates(&candidates, budget, FetchReason::Prefetch);
        self.candidates = candidates;
        result.map(|_| ())
    }

    /// The fetcher has room and no faults are pending: background prefetch, with at most
    /// 1/[`PUSH_SHARE`] of `max_inflight` in flight, so the guest's next demand read queues
    /// behind little push on the device. If a round offers only pages background prefetch
    /// does not take (evicted ones), ask again a few times: nothing else would wake the
    /// loop to ask later.
    fn idle_prefetch(&mut self) -> Result<(), FaultLoopError> {
        const ROUNDS: usize = 4;
        let mut candidates = std::mem::take(&mut self.candidates);
        let mut result = Ok(());
        for _ in 0..ROUNDS {
            let budget = (self.config.max_inflight / PUSH_SHARE)
                .max(1)
                .saturating_sub(self.sources.in_flight());
            if budget == 0 {
                break;
            }
            candidates.clear();
            self.prefetch
                .on_idle(&self.vm.states, budget, &mut candidates);
            if candidates.is_empty() {
                break;
            }
            match self.fetch_candidates(&candidates, budget, FetchReason::Background) {
                Ok(0) => continue,
                Ok(_) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.candidates = candidates;
        result
    }

    /// Fetch the policy's candidates (at most `budget`); returns how many were submitted.
    fn fetch_candidates(
        &mut self,
        pages: &[u64],
        budget: usize,
        why: FetchReason,
    ) -> Result<usize, FaultLoopError> {
        let limit = self.vm.layout.pages();
        let mut submitted = 0;
        for &p in pages.iter().take(budget) {
            if p < limit
                && self.vm.layout.addr_of_page(p).is_some()
                && self.fetch(p, why)? == Fetch::Submitted
            {
                submitted += 1;
            }
        }
        Ok(submitted)
    }
}

/// Background push keeps at most `max_inflight / PUSH_SHARE` reads in flight. Measured with
/// `pagewise bench restore`: with the whole budget (1024 pages, 4 MiB) a restored guest's
/// demand reads queued behind the push on disk and its first answer took 1.0 s against
/// 0.18 s with no prefetch.
const PUSH_SHARE: usize = 4;

/// Claim `page` for a fetch: CAS it to `InFlight` from the first of `from` it is in.
/// Returns the state it had.
fn claim_absent(
    states: &crate::page_state::PageStateTable,
    page: u64,
    from: &[PageState],
) -> Option<PageState> {
    from.iter()
        .copied()
        .find(|&f| states.transition(page, f, PageState::InFlight).is_ok())
}

/// What woke the loop.
struct Ready {
    uffd: bool,
    stop: bool,
    orders: bool,
    /// Some source's completion fd is readable.
    sources: bool,
    hangup: bool,
}

/// The outcome of [`FaultLoop::fetch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Claimed and submitted.
    Submitted,
    /// Not claimed: another component changed the page's state first.
    NotClaimed,
    /// The page's route is `Zero`: it is placed as a zero page, no read.
    Zero,
    /// The page's route has no live source (or serving is paused): not claimed.
    NoSource,
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_damage;
#[cfg(test)]
mod tests_device_copy;
#[cfg(test)]
mod tests_idle;
#[cfg(test)]
mod tests_routed;
#[cfg(test)]
mod tests_scripted;
