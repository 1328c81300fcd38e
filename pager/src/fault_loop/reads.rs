//! Answers from the page sources: each checked against the claims before it indexes
//! anything, failures sorted by what they mean (retry an I/O error, never place a damaged
//! page, park the pages of a gone host), good pages handed to placement.

use super::sources::Claim;
use super::{FaultLoop, FaultLoopError};
use crate::metrics::VmMetrics;
use crate::page_state::PageState;
use crate::route::Route;
use crate::source::{PageCompletion, PageContent, SourceError};

impl FaultLoop {
    /// A source failed as a whole. A gone host parks the pages it routes (the VM keeps
    /// running on its other sources); anything else ends the loop.
    pub(super) fn source_failed(
        &mut self,
        route: Route,
        e: SourceError,
    ) -> Result<(), FaultLoopError> {
        match e {
            SourceError::HostGone { .. } => {
                tracing::warn!(vm = %self.vm.name, route = route.name(), error = %crate::error_chain(&e),
                    "the host behind a page source is gone; its pages wait for a new source");
                self.sources.mark_gone(route);
                self.void_claims(route);
                Ok(())
            }
            e => Err(e.into()),
        }
    }

    /// Record where a fetched page's bytes come from before it is placed: bytes read from
    /// the VM's own swap device are placed write-protected (when the VM registered for WP)
    /// and stay that device's current copy until the guest writes the page.
    fn note_origin(&self, page: u64, route: Route, content: &PageContent) {
        // Only a page still in flight gets these bytes (one that took a pushed copy
        // meanwhile drops them at placement).
        let from_device = route == Route::Swapdev
            && self.vm.wp_registered
            && !matches!(content, PageContent::Zero)
            && self.vm.states.get(page) == PageState::InFlight;
        if from_device {
            self.vm.dirty.note_device_copy(page, 1);
        } else {
            self.vm.dirty.forget_device_copy(page, 1);
        }
    }

    /// Collect finished reads from every source, check each against the claims, place them.
    pub(super) fn drain_completions(&mut self) -> Result<(), FaultLoopError> {
        let mut done = std::mem::take(&mut self.completions);
        let mut polled = std::mem::take(&mut self.polled);
        done.clear();
        let mut failed = Vec::new();
        let mut result = Ok(());
        for route in Route::ALL {
            let Some(installed) = self.sources.get_mut(route) else {
                continue;
            };
            if installed.gone {
                continue;
            }
            polled.clear();
            if let Err(e) = installed.source.poll(&mut polled, 0) {
                if let Err(e) = self.source_failed(route, e) {
                    result = Err(e);
                    break;
                }
            }
            for c in polled.drain(..) {
                match self.sources.settle(c.page, route) {
                    Some(claim) => match c.result {
                        Ok(content) => {
                            self.note_origin(c.page, route, &content);
                            done.push(PageCompletion {
                                page: c.page,
                                tag: claim.tag,
                                result: Ok(content),
                            })
                        }
                        // Settled: the page stays in flight for the copy on its way
                        // (voided if this source is replaced before it comes).
                        Err(SourceError::Elsewhere { .. }) => {
                            if self.vm.states.get(c.page) == PageState::InFlight {
                                self.sources.await_elsewhere(c.page, claim);
                            }
                        }
                        Err(e) => failed.push((c.page, claim, e)),
                    },
                    None => {
                        VmMetrics::add(&self.metrics().unrequested_pages, 1);
                        let e = SourceError::Unrequested {
                            page: c.page,
                            source_name: self
                                .sources
                                .get_mut(route)
                                .map(|s| s.source.describe())
                                .unwrap_or_default(),
                        };
                        tracing::warn!(vm = %self.vm.name, route = route.name(), error = %crate::error_chain(&e), "answer dropped");
                    }
                }
            }
        }
        for (page, claim, e) in failed {
            if result.is_ok() {
                result = self.read_failed(page, claim, e);
            }
        }
        if result.is_ok() {
            result = self.place_completions(&mut done);
        }
        done.clear();
        self.completions = done;
        self.polled = polled;
        result
    }

    /// A read failed. An I/O error is retried; a damaged page fails at once; a gone host
    /// parks the page's waiters. A page given up on keeps the state it had before its claim
    /// (an evicted page stays evicted); that is fatal only when a guest thread waits on it.
    fn read_failed(
        &mut self,
        page: u64,
        claim: Claim,
        error: SourceError,
    ) -> Result<(), FaultLoopError> {
        VmMetrics::add(&self.metrics().read_errors, 1);
        let attempts = {
            let n = self.retries.entry(page).or_insert(1);
            *n += 1;
            *n
        };
        if error.is_retryable() && attempts <= self.config.read_attempts {
            tracing::warn!(vm = %self.vm.name, page, attempts, error = %crate::error_chain(&error), "page read failed, retrying");
            if let Some(source) = self.sources.live(claim.route) {
                match source.submit(page, claim.tag) {
                    Ok(()) => {
                        self.sources.claim(page, claim);
                        return Ok(());
                    }
                    Err(e) => return self.give_up(page, claim, attempts, e),
                }
            }
        }
        self.give_up(page, claim, attempts, error)
    }

    fn give_up(
        &mut self,
        page: u64,
        claim: Claim,
        attempts: u64,
        error: SourceError,
    ) -> Result<(), FaultLoopError> {
        self.retries.remove(&page);
        self.prefetched.remove(&page);
        let _ = self
            .vm
            .states
            .transition(page, PageState::InFlight, claim.from);
        if let SourceError::HostGone { .. } = error {
            if let Some(waiters) = self.waiters.remove(&page) {
                self.parked.extend(waiters.into_iter().map(|at| (page, at)));
            }
            return self.source_failed(claim.route, error);
        }
        let damaged = matches!(error, SourceError::Damaged { .. });
        if damaged {
            VmMetrics::add(&self.metrics().pages_damaged, 1);
            tracing::error!(vm = %self.vm.name, page, error = %crate::error_chain(&error),
                "page is damaged; it is never placed");
        }
        if damaged && self.config.on_damaged != crate::damage::DamagePolicy::TearDown {
            if let Some(waiters) = self.waiters.remove(&page) {
                // Never woken: the page is never placed, the thread waits (see
                // crate::damage); the VMM is paused on the first.
                let why = crate::error_chain(&error);
                self.vm.damage.faults_held(
                    page,
                    why.clone(),
                    waiters.len() as u64,
                    self.config.on_damaged,
                    self.vm.peer.pid,
                );
                let record = self.vm.damage.get();
                tracing::error!(vm = %self.vm.name, page, error = %why,
                    paused_pid = ?record.as_ref().and_then(|r| r.paused_pid),
                    not_paused = ?record.as_ref().and_then(|r| r.not_paused.clone()),
                    "a guest thread waits on a damaged page: held, never placed");
                return Ok(());
            }
        }
        if self.waiters.contains_key(&page) {
            return Err(if damaged {
                FaultLoopError::Damaged {
                    page,
                    source: error,
                }
            } else {
                FaultLoopError::ReadFailed {
                    page,
                    attempts,
                    source: error,
                }
            });
        }
        if !damaged {
            tracing::warn!(vm = %self.vm.name, page, error = %crate::error_chain(&error),
                "prefetch read failed; page left for a later fault");
        }
        Ok(())
    }
}
