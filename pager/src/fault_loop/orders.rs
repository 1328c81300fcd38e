//! Orders into a running fault loop: place pages pushed by someone else, install or remove a
//! page source, pause and resume serving, report state.
//!
//! Orders travel over a channel beside the stop eventfd; an eventfd in the loop's poll set
//! wakes it. The loop handles them between uffd batches, so an order never races a fault's
//! own handling. A [`LoopController`] is cheap to clone and may be used from any thread; once
//! the loop has ended every call fails with [`OrderError::LoopGone`].

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::{Deserialize, Serialize};

use super::{FaultLoop, FaultLoopError, FetchReason};
use crate::metrics::VmMetrics;
use crate::page_state::PageState;
use crate::route::Route;
use crate::source::{PageCompletion, PageContent, PageSource};

/// A page someone else fetched for this VM (a migration source pushing pages unasked).
#[derive(Debug)]
pub struct PushedPage {
    pub page: u64,
    pub content: PageContent,
}

/// What became of a batch of pushed pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaceReport {
    /// Placed into guest memory (including pages a waiting fault wanted).
    pub placed: u64,
    /// Dropped because the guest already has the page (present, being evicted or discarded):
    /// a push never overwrites a page.
    pub already_present: u64,
    /// Dropped because the page number lies outside the guest.
    pub rejected: u64,
}

/// One source as the loop sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceReport {
    pub route: Route,
    pub description: String,
    pub in_flight: usize,
    /// The source reported its host gone; its pages wait for a replacement.
    pub gone: bool,
}

/// The state of a running loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopReport {
    pub paused: bool,
    pub sources: Vec<SourceReport>,
    /// Reads in flight over all sources.
    pub in_flight: usize,
    /// Pages with at least one waiting guest thread whose read is in flight.
    pub waiting_pages: usize,
    /// Faults held while paused.
    pub deferred_faults: usize,
    /// Faults on pages whose route has no live source (waiting for one).
    pub parked_faults: usize,
}

/// An order for the loop.
pub(super) enum Order {
    Place {
        pages: Vec<PushedPage>,
        reply: Option<Sender<PlaceReport>>,
    },
    Install {
        route: Route,
        source: Box<dyn PageSource>,
        reply: Sender<()>,
    },
    Remove {
        route: Route,
        reply: Sender<bool>,
    },
    Pause {
        reply: Sender<()>,
    },
    Resume {
        reply: Sender<()>,
    },
    Report {
        reply: Sender<LoopReport>,
    },
}

/// An order could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("the fault loop has ended")]
    LoopGone,
    #[error("the fault loop did not answer within {0:?}")]
    Timeout(Duration),
    #[error("creating the order eventfd")]
    EventFd(#[source] nix::Error),
}

/// How long a controller waits for the loop to answer an order.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The receiving end, owned by the loop.
pub(super) struct OrderInbox {
    pub rx: Receiver<Order>,
    pub wake: Arc<EventFd>,
    pub tx: Sender<Order>,
}

impl OrderInbox {
    pub fn new() -> Result<Self, OrderError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(OrderError::EventFd)?;
        Ok(Self {
            rx,
            wake: Arc::new(wake),
            tx,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Reset the wake-up counter (before draining, so a later order sets it again).
    pub fn reset(&self) {
        let _ = self.wake.read();
    }
}

/// A handle that sends orders to one VM's fault loop.
#[derive(Clone)]
pub struct LoopController {
    tx: Sender<Order>,
    wake: Arc<EventFd>,
}

impl LoopController {
    pub(super) fn new(inbox: &OrderInbox) -> Self {
        Self {
            tx: inbox.tx.clone(),
            wake: inbox.wake.clone(),
        }
    }

    fn send(&self, order: Order) -> Result<(), OrderError> {
        self.tx.send(order).map_err(|_| OrderError::LoopGone)?;
        // EAGAIN (counter saturated) still leaves it readable.
        let _ = self.wake.write(1);
        Ok(())
    }

    fn ask<T>(&self, make: impl FnOnce(Sender<T>) -> Order) -> Result<T, OrderError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.send(make(reply))?;
        answer.recv_timeout(ANSWER_TIMEOUT).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => OrderError::Timeout(ANSWER_TIMEOUT),
            crossbeam_channel::RecvTimeoutError::Disconnected => OrderError::LoopGone,
        })
    }

    /// Place pushed pages and wait for the outcome.
    pub fn place(&self, pages: Vec<PushedPage>) -> Result<PlaceReport, OrderError> {
        self.ask(|reply| Order::Place {
            pages,
            reply: Some(reply),
        })
    }

    /// Place pushed pages without waiting (the loop counts them in its metrics).
    pub fn place_async(&self, pages: Vec<PushedPage>) -> Result<(), OrderError> {
        self.send(Order::Place { pages, reply: None })
    }

    /// Install (or replace) the source answering for `route`. Reads the replaced source
    /// still had in flight are asked again of the new one.
    pub fn install_source(
        &self,
        route: Route,
        source: Box<dyn PageSource>,
    ) -> Result<(), OrderError> {
        self.ask(|reply| Order::Install {
            route,
            source,
            reply,
        })
    }

    /// Remove the source of `route`; faults on its pages wait until one is installed.
    /// Returns whether one was installed.
    pub fn remove_source(&self, route: Route) -> Result<bool, OrderError> {
        self.ask(|reply| Order::Remove { route, reply })
    }

    /// Stop serving: faults wait (nothing is lost) until [`LoopController::resume`].
    pub fn pause(&self) -> Result<(), OrderError> {
        self.ask(|reply| Order::Pause { reply })
    }

    pub fn resume(&self) -> Result<(), OrderError> {
        self.ask(|reply| Order::Resume { reply })
    }

    pub fn report(&self) -> Result<LoopReport, OrderError> {
        self.ask(|reply| Order::Report { reply })
    }
}

impl FaultLoop {
    /// Carry out every queued order.
    pub(super) fn drain_orders(&mut self) -> Result<(), FaultLoopError> {
        self.orders.reset();
        while let Ok(order) = self.orders.rx.try_recv() {
            self.carry_out(order)?;
        }
        Ok(())
    }

    fn carry_out(&mut self, order: Order) -> Result<(), FaultLoopError> {
        match order {
            Order::Place { pages, reply } => {
                let report = self.place_pushed(pages)?;
                if let Some(reply) = reply {
                    let _ = reply.send(report);
                }
            }
            Order::Install {
                route,
                source,
                reply,
            } => {
                tracing::info!(vm = %self.vm.name, route = route.name(), source = %source.describe(), "page source installed");
                self.sources.install(route, source);
                self.reissue(route)?;
                let _ = reply.send(());
            }
            Order::Remove { route, reply } => {
                let had = self.sources.remove(route).is_some();
                self.reissue(route)?;
                let _ = reply.send(had);
            }
            Order::Pause { reply } => {
                self.paused = true;
                tracing::info!(vm = %self.vm.name, "serving paused");
                let _ = reply.send(());
            }
            Order::Resume { reply } => {
                self.paused = false;
                tracing::info!(vm = %self.vm.name, deferred = self.deferred.len(), "serving resumed");
                let deferred = std::mem::take(&mut self.deferred);
                for (ev, at) in deferred {
                    self.handle_event(ev, at)?;
                }
                self.retry_parked()?;
                let _ = reply.send(());
            }
            Order::Report { reply } => {
                let _ = reply.send(self.report());
            }
        }
        Ok(())
    }

    fn report(&self) -> LoopReport {
        LoopReport {
            paused: self.paused,
            sources: self
                .sources
                .iter()
                .map(|(route, s)| SourceReport {
                    route,
                    description: s.source.describe(),
                    in_flight: s.source.in_flight(),
                    gone: s.gone,
                })
                .collect(),
            in_flight: self.sources.in_flight(),
            waiting_pages: self.waiters.len(),
            deferred_faults: self.deferred.len(),
            parked_faults: self.parked.len(),
        }
    }

    /// The source of `route` changed: claims on the old one are void. Each such page goes
    /// back to the state it had, and a waiting fault asks again (of the new source, or it
    /// parks until there is one).
    fn reissue(&mut self, route: Route) -> Result<(), FaultLoopError> {
        self.void_claims(route);
        self.retry_parked()
    }

    /// Every read in flight at `route` is void: its page goes back to the state it had and
    /// its waiting faults park until a source serves the route again.
    pub(super) fn void_claims(&mut self, route: Route) {
        for (page, claim) in self.sources.drop_claims_of(route) {
            let _ = self
                .vm
                .states
                .transition(page, PageState::InFlight, claim.from);
            self.prefetched.remove(&page);
            self.retries.remove(&page);
            if let Some(waiters) = self.waiters.remove(&page) {
                for at in waiters {
                    self.parked.push((page, at));
                }
            }
        }
    }

    /// Faults parked for want of a live source: try them again.
    pub(super) fn retry_parked(&mut self) -> Result<(), FaultLoopError> {
        let parked = std::mem::take(&mut self.parked);
        for (page, at) in parked {
            // Counted as a fault when it parked; `missing_fault` counts it again.
            self.metrics()
                .faults
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            self.missing_fault(page, at)?;
        }
        Ok(())
    }

    /// Pushed pages: claim each absent page (never one the guest has), place them in runs.
    fn place_pushed(&mut self, pages: Vec<PushedPage>) -> Result<PlaceReport, FaultLoopError> {
        let mut report = PlaceReport::default();
        let mut batch = Vec::with_capacity(pages.len());
        let limit = self.vm.layout.pages();
        let ps = self.vm.page_size() as usize;
        for p in pages {
            let whole_page = match &p.content {
                PageContent::Zero => true,
                PageContent::Data(buf) => buf.len() >= ps,
                PageContent::Shared { buf, at } => {
                    at.checked_add(ps).is_some_and(|end| end <= buf.len())
                }
            };
            if p.page >= limit || self.vm.layout.addr_of_page(p.page).is_none() || !whole_page {
                report.rejected += 1;
                continue;
            }
            let absent = [PageState::Missing, PageState::Evicted, PageState::Zero];
            let claimed = super::claim_absent(&self.vm.states, p.page, &absent).is_some();
            // A page whose own read is in flight takes the pushed copy now; the read's
            // answer is dropped when it arrives (the page is no longer in flight).
            if !claimed && self.vm.states.get(p.page) != PageState::InFlight {
                report.already_present += 1;
                continue;
            }
            report.placed += 1;
            self.sources.arrived(p.page);
            self.vm.dirty.forget_device_copy(p.page, 1);
            batch.push(PageCompletion {
                page: p.page,
                tag: FetchReason::Push.tag(),
                result: Ok(p.content),
            });
        }
        VmMetrics::add(&self.metrics().pages_pushed, report.placed);
        self.place_completions(&mut batch)?;
        Ok(report)
    }
}
