//! The destination's pre-copy: pages into the memory file, zero/freed/stored/stale runs
//! into routes, acknowledgements of rounds, until `Switchover`.
//!
//! An encoded page is decoded against this host's copy (for a delta: the page as the file
//! holds it, which is what was sent before) and checked against the checksum of the page
//! it must give. One that does not check is never written: the destination asks for it
//! again whole (`Resend`) and does not apply the switchover until every such page came.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use pager::page_state::PageState;
use pager::route::Route;

use super::{checked, Incoming, IncomingError};
use crate::migrate::delta::{decode_into, Encoding};
use crate::migrate::frame::Command;
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Message, Mode};

/// Test hook: spoil this host's copy of every Nth page before its delta is applied (so the
/// delta does not check and the page is asked for again). Never set in production.
pub const SPOIL_DELTA_ENV: &str = "PAGEWISE_TEST_SPOIL_DELTA_EVERY";

/// What pre-copy keeps between frames.
struct Precopy {
    rounds: u64,
    /// Pages asked for again, not yet received.
    pending: BTreeSet<u64>,
    deltas: u64,
    spoil_every: Option<u64>,
}

impl Incoming {
    /// Pre-copy frames until `Switchover` (and until every page asked for again came).
    pub(super) fn receive_precopy(
        &mut self,
        bulk: &mut Link,
        version: u16,
    ) -> Result<(), IncomingError> {
        let mut st = Precopy {
            rounds: 0,
            pending: BTreeSet::new(),
            deltas: 0,
            spoil_every: std::env::var(SPOIL_DELTA_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0),
        };
        let mut switched = false;
        loop {
            if switched && st.pending.is_empty() {
                return Ok(());
            }
            let msg = read_message(bulk, Some(version))?;
            if switched
                && !matches!(&msg, Message::Page { page, .. } | Message::EncodedPage { page, .. }
                    if st.pending.contains(page))
            {
                return Err(match msg {
                    Message::Abort(why) => IncomingError::Aborted(why),
                    other => IncomingError::OutOfOrder {
                        got: other.command(),
                        state: "waiting for pages asked for again",
                    },
                });
            }
            match msg {
                Message::Switchover => switched = true,
                Message::Abort(why) => return Err(IncomingError::Aborted(why)),
                other => self.precopy_frame(bulk, other, &mut st)?,
            }
        }
    }

    fn precopy_frame(
        &mut self,
        bulk: &mut Link,
        msg: Message,
        st: &mut Precopy,
    ) -> Result<(), IncomingError> {
        let vm = self.daemon.vm(&self.setup.vm).ok_or(IncomingError::Gone)?;
        let (pages, ps) = (self.pages(), self.page_size());
        let range = |first, count| {
            let r = checked(first, count, pages)?;
            Ok::<_, IncomingError>(r)
        };
        match msg {
            Message::Page { page, data } => {
                checked(page, 1, pages)?;
                if data.len() != ps {
                    return Err(IncomingError::WrongPageSize {
                        got: data.len(),
                        want: ps,
                    });
                }
                self.write_page(page, &data)?;
                st.pending.remove(&page);
            }
            Message::EncodedPage {
                page,
                checksum,
                encoding,
                body,
            } => {
                checked(page, 1, pages)?;
                let mut copy = vec![0u8; ps];
                let decoded =
                    if encoding == Encoding::Xbzrle && vm.states.get(page) != PageState::Present {
                        // Nothing here to apply it to: ask for the page whole, like a mismatch.
                        Err(IncomingError::DeltaWithoutBase { page })
                    } else {
                        if encoding == Encoding::Xbzrle {
                            self.memory()
                                .read_exact_at(&mut copy, page * ps as u64)
                                .map_err(|source| IncomingError::Read { page, source })?;
                            st.deltas += 1;
                            if st.spoil_every.is_some_and(|n| st.deltas.is_multiple_of(n)) {
                                copy[ps / 2] ^= 0x5a;
                            }
                        }
                        decode_into(encoding, &body, checksum, &mut copy)
                            .map_err(|source| IncomingError::Decode { page, source })
                    };
                match decoded {
                    Ok(()) => {
                        self.write_page(page, &copy)?;
                        st.pending.remove(&page);
                    }
                    Err(e) => {
                        tracing::warn!(vm = %self.setup.vm, page, "asking for the page again: {}", pager::error_chain(&e));
                        self.job.resent.fetch_add(1, Ordering::Relaxed);
                        st.pending.insert(page);
                        write_message(bulk, &Message::Resend { page })?;
                    }
                }
            }
            Message::ZeroPages { first, count } | Message::FreedPages { first, count } => {
                let r = range(first, count)?;
                self.forget_pending(st, &r);
                self.absent(r, Route::Zero)?;
                self.job.duplicate.fetch_add(count, Ordering::Relaxed);
            }
            Message::StoredPages { first, count } => {
                if self.setup.mode != Mode::Agile {
                    return Err(IncomingError::OutOfOrder {
                        got: Command::StoredPages,
                        state: "migrating without a shared swap device",
                    });
                }
                let r = range(first, count)?;
                self.forget_pending(st, &r);
                self.absent(r, Route::Local)?;
                self.job.stored.fetch_add(count, Ordering::Relaxed);
            }
            Message::StalePages { first, count } => {
                let r = range(first, count)?;
                self.forget_pending(st, &r);
                self.absent(r, Route::Remote)?;
            }
            Message::RoundEnd { .. } => {
                st.rounds += 1;
                let rounds = st.rounds;
                self.job.update(|s| s.ram.dirty_sync_count = rounds);
                // The source waits for this before it pauses the guest, so the pause does
                // not begin while pre-copy data still sits in the link.
                write_message(
                    bulk,
                    &Message::Ack {
                        first: 0,
                        count: rounds,
                    },
                )?;
            }
            Message::Released if self.setup.mode == Mode::Agile && !self.acquired => {
                self.acquire_shared()?;
                write_message(
                    bulk,
                    &Message::Ack {
                        first: 0,
                        count: st.rounds,
                    },
                )?;
            }
            other => {
                return Err(IncomingError::OutOfOrder {
                    got: other.command(),
                    state: "receiving pre-copy",
                })
            }
        }
        Ok(())
    }

    /// Pages of `range` are no longer awaited whole: the source sent them otherwise.
    fn forget_pending(&self, st: &mut Precopy, range: &std::ops::Range<u64>) {
        if !st.pending.is_empty() {
            st.pending.retain(|p| !range.contains(p));
        }
    }

    fn write_page(&self, page: u64, data: &[u8]) -> Result<(), IncomingError> {
        let vm = self.daemon.vm(&self.setup.vm).ok_or(IncomingError::Gone)?;
        self.memory()
            .write_all_at(data, page * self.page_size() as u64)
            .map_err(|source| IncomingError::Write { page, source })?;
        let _ = vm
            .states
            .transition(page, PageState::Missing, PageState::Present);
        self.job.normal.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
