//! The destination after the switchover: place what the source pushes until `Done`, and
//! when the link breaks, pause and wait for the source to come back ([`super::super::recovery`]).
//!
//! Paused, the VM runs on: the remote source is removed, so faults on pages only the source
//! holds park in the fault loop (their vCPUs wait) while every other page is served. When a
//! new pair of connections arrives, this host tells the source every page it holds (`Ack`
//! runs: placed here, or routed to a source of this host), then `Ready`, and installs a
//! remote source over the new urgent channel, which asks again for every parked fault.

use std::io::{BufWriter, Write};
use std::time::Instant;

use pager::fault_loop::LoopController;
use pager::page_state::PageState;
use pager::route::Route;

use super::{Incoming, IncomingError};
use crate::migrate::bulk::{receive_pages_into, BulkError, Received};
use crate::migrate::link::Link;
use crate::migrate::message::{write_message, Message, WireError};
use crate::migrate::remote::RemoteSource;
use crate::migrate::session::recovery::{link_broke, Offer};
use crate::migrate::session::status::Phase;

/// Page numbers named in the error when pages are lost.
const LOST_NAMED: usize = 16;

impl Incoming {
    /// Place pushed pages until the source's `Done`, through any number of link cuts.
    pub(super) fn receive_pushed(
        &mut self,
        bulk: &mut Link,
        version: u16,
        controller: &LoopController,
    ) -> Result<Received, IncomingError> {
        let mut got = Received::default();
        loop {
            self.job.recovery.set_live(&[&*bulk]);
            let result = receive_pages_into(
                &mut *bulk,
                controller,
                self.page_size(),
                self.pages(),
                version,
                &mut got,
            );
            match result {
                Ok(()) => {
                    self.job.recovery.drop_offer();
                    return Ok(got);
                }
                Err(BulkError::Wire(e)) if link_broke(&e) => {
                    *bulk = self.await_source(&e, bulk, version, controller)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The link broke: pause, and wait for the source's new connections.
    fn await_source(
        &mut self,
        why: &WireError,
        bulk: &Link,
        version: u16,
        controller: &LoopController,
    ) -> Result<Link, IncomingError> {
        let paused = Instant::now();
        let _ = bulk.shutdown(std::net::Shutdown::Both);
        // Faults on the source's pages park until a new remote source is installed.
        controller.remove_source(Route::Remote)?;
        self.job.link_cut();
        tracing::warn!(vm = %self.setup.vm, "post-copy paused: the link to the source broke ({}); \
            faults on pages still on the source wait; waiting up to {} s for it to reconnect",
            pager::error_chain(why), self.engine.config.recover_timeout.as_secs());
        self.wait_for_source(paused, version, controller)
    }

    /// Paused since `paused`: take the source's new connections (any number of attempts)
    /// until the recovery deadline.
    pub(super) fn wait_for_source(
        &mut self,
        paused: Instant,
        version: u16,
        controller: &LoopController,
    ) -> Result<Link, IncomingError> {
        let deadline = paused + self.engine.config.recover_timeout;
        loop {
            let Some(offer) = self.job.recovery.wait_offer(deadline) else {
                return Err(self.source_lost(paused));
            };
            self.job.update(|s| s.status = Phase::PostcopyRecover);
            match self.take_offer(offer, version, controller) {
                Ok(bulk) => {
                    let ms = self.job.link_recovered(paused);
                    tracing::info!(vm = %self.setup.vm, paused_ms = ms, "post-copy resumed");
                    return Ok(bulk);
                }
                Err(e) => {
                    // A cut during the recovery: wait for the next attempt.
                    let _ = controller.remove_source(Route::Remote);
                    self.job.update(|s| s.status = Phase::PostcopyPaused);
                    tracing::warn!(vm = %self.setup.vm, "resuming post-copy failed: {}; waiting \
                        for the source's next attempt", pager::error_chain(&e));
                }
            }
        }
    }

    /// Answer a new pair: what this host holds, `Ready`; then serve faults over it.
    fn take_offer(
        &mut self,
        offer: Offer,
        version: u16,
        controller: &LoopController,
    ) -> Result<Link, IncomingError> {
        let Offer {
            urgent,
            bulk,
            version: offered,
        } = offer;
        if offered != version {
            let why =
                format!("the new connections speak version {offered}, the migration {version}");
            let mut b = &bulk;
            let _ = write_message(&mut b, &Message::Refuse(why.clone()));
            return Err(IncomingError::Aborted(why));
        }
        self.job.recovery.set_live(&[&urgent, &bulk]);
        let held = self.held_runs()?;
        {
            let mut w = BufWriter::with_capacity(64 * 1024, &bulk);
            for (first, count) in &held {
                write_message(
                    &mut w,
                    &Message::Ack {
                        first: *first,
                        count: *count,
                    },
                )?;
            }
            write_message(&mut w, &Message::Ready)?;
            w.flush().map_err(WireError::Io)?;
        }
        let remote = RemoteSource::new(urgent, self.page_size(), self.pages(), version)?;
        controller.install_source(Route::Remote, Box::new(remote))?;
        Ok(bulk)
    }

    /// Whether this host holds page `p` (no need of the source's copy): anything but a page
    /// routed to the source and absent (or still on its way).
    fn holds(&self, vm: &pager::vm::Vm, p: u64) -> bool {
        let absent = matches!(vm.states.get(p), PageState::Missing | PageState::InFlight);
        !(absent && vm.routes.get(p) == Some(Route::Remote))
    }

    /// Runs of the pages this host holds.
    fn held_runs(&self) -> Result<Vec<(u64, u64)>, IncomingError> {
        let vm = self.daemon.vm(&self.setup.vm).ok_or(IncomingError::Gone)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in 0..self.pages() {
            if !self.holds(&vm, p) {
                continue;
            }
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        Ok(runs)
    }

    /// The source did not come back: name the pages only it held.
    fn source_lost(&self, paused: Instant) -> IncomingError {
        let missing: Vec<u64> = match self.daemon.vm(&self.setup.vm) {
            Some(vm) => (0..self.pages()).filter(|p| !self.holds(&vm, *p)).collect(),
            None => Vec::new(),
        };
        let mut runs: Vec<[u64; 2]> = Vec::new();
        for &p in &missing {
            match runs.last_mut() {
                Some([first, count]) if *first + *count == p => *count += 1,
                _ => runs.push([p, 1]),
            }
        }
        self.job.update(|s| s.pages_lost = runs);
        IncomingError::SourceLost {
            waited_s: paused.elapsed().as_secs(),
            missing: missing.len() as u64,
            first: missing.into_iter().take(LOST_NAMED).collect(),
        }
    }
}
