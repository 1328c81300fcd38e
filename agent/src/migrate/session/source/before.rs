//! The source before the switchover: pre-copy by mode, the pause at pre-switchover, the last
//! dirty set, `Switchover` and the destination's `Ready`, then `migrate-continue`.

use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::dirty::{SubscribeOptions, Subscription};
use pager::page_state::PageState;
use serde_json::{json, Value};

use super::{runs, Finish, Held, SourceError, SourceRun, QEMU_STEP_TIMEOUT, READY_TIMEOUT};
use crate::migrate::bulk::SourcePage;
use crate::migrate::delta::PageEncoder;
use crate::migrate::frame::Command;
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Message, Mode, WireError};
use crate::migrate::precopy::{run_rounds, send_round, PrecopyLimits, StopRule};
use crate::migrate::qmp::Qmp;
use crate::migrate::session::pages::SourcePages;
use crate::migrate::session::status::{Census, Phase};
use crate::migrate::session::timeline::now_ms;

/// Test hook: `STAGE:MS` holds the source for MS milliseconds (at most 10 minutes) at
/// STAGE, so a test can kill a daemon there: `released` (agile released the shared swap
/// device and said so), `paused` (QEMU paused the guest at pre-switchover) or `journaled`
/// (the journal is written, `migrate-continue` not sent). Never set in production.
pub const HOLD_ENV: &str = "PAGEWISE_TEST_HOLD";

/// Sleep as [`HOLD_ENV`] asks at `stage`, if it does.
fn hold_at(stage: &str, vm: &str) {
    let Ok(spec) = std::env::var(HOLD_ENV) else {
        return;
    };
    let Some(ms) = spec
        .split_once(':')
        .filter(|(s, _)| *s == stage)
        .and_then(|(_, ms)| ms.parse::<u64>().ok())
    else {
        return;
    };
    tracing::warn!(vm, ms, "test hook: holding at {stage} ({HOLD_ENV})");
    std::thread::sleep(Duration::from_millis(ms.min(600_000)));
}

/// How recent a write (or fault-in) must be for agile to leave the page to post-copy.
const HOT_WINDOW: Duration = Duration::from_secs(10);

/// A reader of the destination's answers on the bulk channel, waiting at most
/// [`READY_TIMEOUT`] for each.
fn answers(bulk: &Link) -> Result<Link, SourceError> {
    let reader = bulk.try_clone().map_err(WireError::Io)?;
    reader
        .set_read_timeout(Some(READY_TIMEOUT))
        .map_err(WireError::Io)?;
    Ok(reader)
}

impl SourceRun {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn before_switchover(
        &self,
        qmp: &mut Qmp,
        bulk: &Link,
        incoming: &str,
        version: u16,
        source: &Arc<SourcePages>,
        held: &Arc<Held>,
        migrate_started: &mut bool,
        journal: &dyn Fn(&SourcePages) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        qmp.set_capabilities(&[("x-ignore-shared", true), ("pause-before-switchover", true)])?;
        let writes = Arc::new(self.vm.dirty.subscribe(SubscribeOptions {
            placed_counts_as_written: true,
        })?);
        self.job.dirty_probe.set(Some(writes.clone()));
        let census = self.census();
        tracing::info!(vm = %self.request.vm, ?census, "pages when the migration began");
        self.job.update(|s| s.census = Some(census));
        let mut out =
            BufWriter::with_capacity(256 * 1024, self.throttled(bulk, self.job.cancel.clone())?);
        let mut enc = PageEncoder::new(self.encoder, self.vm.layout.page_size());
        let precopy = self.precopy(&writes, &mut out, source, held, &mut enc);
        self.record_encoding(&enc);
        let (finish, syncs) = precopy?;
        if self.mode == Mode::Agile {
            // Hand the swap device over while the guest still runs (it is only read here
            // from now on: evictions wait for the migration), so the destination opens it
            // outside the downtime.
            // The shared device: the VM's own, or on a former agile destination the one
            // handed over to this host (the VM's own is then local to this host).
            let dev = self.shared_device()?;
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_ownership()
                .map_err(SourceError::Release)?;
            write_message(&mut out, &Message::Released)?;
            out.flush().map_err(WireError::Io)?;
            hold_at("released", &self.request.vm);
        }
        out.flush().map_err(WireError::Io)?;
        let acks = syncs + u64::from(self.mode == Mode::Agile);
        self.wait_acks(bulk, version, acks, &writes, &mut enc)?;
        if self.job.cancel.load(Ordering::Acquire) {
            return Err(SourceError::Cancelled);
        }
        // QEMU moves the devices; it pauses the guest at pre-switchover.
        qmp.execute("migrate", json!({ "uri": incoming }))?;
        *migrate_started = true;
        qmp.wait_status(&["pre-switchover"], QEMU_STEP_TIMEOUT)?;
        let paused = Instant::now();
        self.job.update(|s| {
            s.status = Phase::PreSwitchover;
            s.paused_at_ms = Some(now_ms());
        });
        hold_at("paused", &self.request.vm);
        // Placements already under way land (and count as written) before the last harvest.
        let settle = Instant::now();
        while source.in_flight() > 0 && settle.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let settled = paused.elapsed();
        let mut last = writes.harvest();
        last.sort_unstable();
        match finish {
            Finish::Data => {
                let mut read = self.reader(source, held, self.mode == Mode::Agile);
                send_round(&self.vm, &last, &mut out, &mut read, None, &mut enc)?;
            }
            Finish::Stale => {
                for &p in &last {
                    enc.forget(p);
                }
                let stale: Vec<u64> = last.iter().copied().filter(|&p| held.get(p)).collect();
                for (first, count) in runs(&stale) {
                    write_message(&mut out, &Message::StalePages { first, count })?;
                }
                for &p in &stale {
                    held.set(p, false);
                }
                self.job.update(|s| s.pages_stale = stale.len() as u64);
            }
        }
        self.job
            .update(|s| s.ram.dirty_sync_count = s.rounds.len() as u64);
        let final_sent = paused.elapsed();
        write_message(&mut out, &Message::Switchover)?;
        out.flush().map_err(WireError::Io)?;
        drop(out);
        let ready = self.wait_ready(bulk, version, source, held, &mut enc);
        self.record_encoding(&enc);
        ready?;
        let ready = paused.elapsed();
        // From here on the destination runs the guest (no roll-back) and pages leave this
        // host for good: should this daemon die, its QEMU must not attach to a restarted one
        // that would take them as lost (it exits). Until now every page was still here, and
        // a restarted daemon cancels the QEMU migration left waiting at pre-switchover
        // (`interrupted.rs`). Where each page is goes to disk first: a daemon restarted after
        // the switchover resumes the push from it (`restarted.rs`).
        let journaling = Instant::now();
        journal(source)?;
        let journaled = journaling.elapsed();
        hold_at("journaled", &self.request.vm);
        self.daemon.set_reattach(&self.request.vm, false);
        qmp.execute("migrate-continue", json!({ "state": "pre-switchover" }))?;
        let info = qmp.wait_status(&["completed"], QEMU_STEP_TIMEOUT)?;
        let downtime = paused.elapsed().as_millis() as u64;
        tracing::info!(
            vm = %self.request.vm,
            settled_ms = settled.as_millis() as u64,
            final_set = last.len(),
            final_sent_ms = final_sent.as_millis() as u64,
            ready_ms = ready.as_millis() as u64,
            journal_ms = journaled.as_millis() as u64,
            downtime_ms = downtime,
            "switchover"
        );
        self.job.update(|s| {
            s.resumed_at_ms = Some(now_ms());
            s.downtime = Some(downtime);
            s.qemu_downtime_ms = info.get("downtime").and_then(Value::as_u64);
            s.status = Phase::PostcopyActive;
        });
        Ok(())
    }

    /// Agile's first round leaves out the resident pages the guest is writing now (its
    /// working-set tracker saw them within [`HOT_WINDOW`]; none when the VM is not
    /// tracked): sent before the switchover they would be written again and cross twice,
    /// after it they cross once. Pages whose swap-device copy is current are not among
    /// them: those never cross.
    fn writing_now(&self, source: &SourcePages) -> Vec<u64> {
        let Some(pages) = self
            .daemon
            .evictor()
            .and_then(|e| e.accessed_within(&self.request.vm, HOT_WINDOW))
        else {
            return Vec::new();
        };
        pages
            .into_iter()
            .filter(|&p| {
                self.vm.states.get(p) == PageState::Present && !source.device_copy_shared(p)
            })
            .collect()
    }

    fn census(&self) -> Census {
        let mut c = Census::default();
        for p in 0..self.vm.layout.pages() {
            match self.vm.states.get(p) {
                PageState::Present => {
                    c.resident += 1;
                    c.device_copies += u64::from(self.vm.dirty.device_copy_current(p));
                }
                PageState::Evicted => c.evicted += 1,
                _ => {}
            }
        }
        c
    }

    /// A page reader for sends: records what the destination now holds.
    pub(super) fn reader<'a>(
        &'a self,
        source: &'a SourcePages,
        held: &'a Held,
        stored_ok: bool,
    ) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<SourcePage> + 'a {
        move |p, buf| {
            let kind = source.read(p, buf, stored_ok)?;
            held.set(p, true);
            let job = &self.job;
            match kind {
                SourcePage::Data => job.normal.fetch_add(1, Ordering::Relaxed),
                SourcePage::Zero => job.duplicate.fetch_add(1, Ordering::Relaxed),
                SourcePage::Freed => job.freed.fetch_add(1, Ordering::Relaxed),
                SourcePage::Stored => job.stored.fetch_add(1, Ordering::Relaxed),
            };
            Ok(kind)
        }
    }

    /// The encoder's figures into the status (also when the migration fails).
    fn record_encoding(&self, enc: &PageEncoder) {
        self.job.update(|s| {
            let stats = enc.stats();
            s.xbzrle = stats.xbzrle;
            s.compression = stats.compression;
            s.pages_resent = enc.resent();
        });
    }

    /// A page the destination asks to be sent again whole, if it is one of the VM's.
    fn resend_of(&self, page: u64) -> Result<u64, SourceError> {
        if page >= self.vm.layout.pages() {
            return Err(SourceError::Unexpected {
                got: Command::Resend,
                expected: "a page of the VM",
            });
        }
        Ok(page)
    }

    /// Read `count` acknowledgements (of rounds, of the release): the destination has taken
    /// in everything sent so far. A page it could not decode is forgotten by the encoder
    /// and marked written: the final set sends it whole.
    pub(super) fn wait_acks(
        &self,
        bulk: &Link,
        version: u16,
        count: u64,
        writes: &Subscription,
        enc: &mut PageEncoder,
    ) -> Result<(), SourceError> {
        let mut reader = answers(bulk)?;
        let mut acked = 0;
        while acked < count {
            match read_message(&mut reader, Some(version))? {
                Message::Ack { .. } => acked += 1,
                Message::Resend { page } => {
                    let page = self.resend_of(page)?;
                    tracing::debug!(vm = %self.request.vm, page, "destination asks for a page again");
                    enc.resend(page);
                    writes.mark(page);
                }
                Message::Abort(r) => return Err(SourceError::Aborted(r)),
                other => {
                    return Err(SourceError::Unexpected {
                        got: other.command(),
                        expected: "Ack",
                    })
                }
            }
        }
        Ok(())
    }

    /// Wait for the destination's `Ready`, sending whole each page of the final set it could
    /// not decode (the guest is paused: its memory does not change).
    fn wait_ready(
        &self,
        bulk: &Link,
        version: u16,
        source: &SourcePages,
        held: &Held,
        enc: &mut PageEncoder,
    ) -> Result<(), SourceError> {
        let mut reader = answers(bulk)?;
        let mut whole = PageEncoder::plain();
        loop {
            match read_message(&mut reader, Some(version))? {
                Message::Ready => return Ok(()),
                Message::Resend { page } => {
                    let page = self.resend_of(page)?;
                    enc.resend(page);
                    let mut out = BufWriter::new(bulk.try_clone().map_err(WireError::Io)?);
                    let mut read = self.reader(source, held, self.mode == Mode::Agile);
                    send_round(&self.vm, &[page], &mut out, &mut read, None, &mut whole)?;
                    out.flush().map_err(WireError::Io)?;
                }
                Message::Abort(r) => return Err(SourceError::Aborted(r)),
                other => {
                    return Err(SourceError::Unexpected {
                        got: other.command(),
                        expected: "Ready",
                    })
                }
            }
        }
    }

    /// The pre-copy part of each mode; says how the last dirty set goes, and how many
    /// rounds the destination acknowledges.
    pub(super) fn precopy(
        &self,
        writes: &Subscription,
        out: &mut impl Write,
        source: &SourcePages,
        held: &Held,
        enc: &mut PageEncoder,
    ) -> Result<(Finish, u64), SourceError> {
        let downtime = Duration::from_millis(self.request.downtime_limit_ms.unwrap_or(300));
        let postcopy_after = self.request.postcopy_after_ms.map(Duration::from_millis);
        let limits = match self.mode {
            Mode::Postcopy => {
                self.announce_absent(out, source, held)?;
                write_message(
                    out,
                    &Message::RoundEnd {
                        round: 0,
                        sent: 0,
                        dirty: 0,
                    },
                )?;
                return Ok((Finish::Stale, 1));
            }
            // A guest that still dirties more than the link moves after 10 rounds will not
            // converge with more of them: they only cost bandwidth.
            Mode::Precopy => PrecopyLimits {
                order: self.order,
                downtime_limit: downtime,
                max_rounds: 10,
                max_time: postcopy_after.unwrap_or(Duration::from_secs(60)),
                rewrite_share: None,
            },
            // One pass over what is not in the swap device; more only while it converges:
            // a round the guest rewrites more than a quarter of costs more than post-copy.
            Mode::Agile => PrecopyLimits {
                order: self.order,
                downtime_limit: downtime,
                max_rounds: 3,
                max_time: postcopy_after.unwrap_or(Duration::from_secs(30)),
                rewrite_share: Some(0.25),
            },
        };
        let held_back = match self.mode {
            Mode::Agile => self.writing_now(source),
            _ => Vec::new(),
        };
        self.job
            .update(|s| s.pages_held_back = held_back.len() as u64);
        let read = self.reader(source, held, self.mode == Mode::Agile);
        let outcome = run_rounds(&self.vm, writes, &mut *out, limits, &held_back, enc, read)?;
        let (rule, rounds) = (outcome.stop, outcome.rounds.len());
        self.job.update(|s| {
            s.stop_rule = Some(outcome.stop);
            s.rounds = outcome.rounds;
        });
        let finish = match (self.mode, rule) {
            (Mode::Precopy, StopRule::Converged) => Finish::Data,
            (Mode::Precopy, _) if postcopy_after.is_some() => Finish::Stale,
            (Mode::Precopy, rule) => return Err(SourceError::NotConverged { rule, rounds }),
            _ => Finish::Stale,
        };
        Ok((finish, rounds as u64))
    }

    /// Post-copy's only pre-copy: which pages are zero or freed (never sent), as runs.
    pub(super) fn announce_absent(
        &self,
        out: &mut impl Write,
        source: &SourcePages,
        held: &Held,
    ) -> Result<(), SourceError> {
        let mut zero = Vec::new();
        let mut freed = Vec::new();
        for p in 0..self.vm.layout.pages() {
            match self.vm.states.get(p) {
                PageState::Removed => freed.push(p),
                PageState::Missing | PageState::Zero if !source.in_a_store(p) => zero.push(p),
                _ => {}
            }
        }
        for (first, count) in runs(&zero) {
            write_message(out, &Message::ZeroPages { first, count })?;
        }
        for (first, count) in runs(&freed) {
            write_message(out, &Message::FreedPages { first, count })?;
        }
        for &p in zero.iter().chain(&freed) {
            held.set(p, true);
        }
        self.job
            .duplicate
            .fetch_add(zero.len() as u64, Ordering::Relaxed);
        self.job
            .freed
            .fetch_add(freed.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
