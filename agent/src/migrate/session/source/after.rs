//! The source after the switchover: answer demand requests, push what the destination
//! lacks, wait for its report, drop the VM's RAM here; and the roll-back of a migration that
//! failed before the switchover.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Held, SourceError, SourceRun, REPORT_TIMEOUT};

/// Pages pushed between two updates of the status's `pages_pushed`.
const PUSHED_STEP: u64 = 256;
use crate::migrate::bulk::{push_pages, PushOrder, SentPages, SourcePage};
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Message, WireError};
use crate::migrate::page_server::serve_page_requests_with;
use crate::migrate::qmp::Qmp;
use crate::migrate::session::pages::SourcePages;

impl SourceRun {
    /// Push what the destination lacks while answering its demand requests, until its
    /// report; a link that breaks meanwhile is dialled again ([`super::resume`]) and the
    /// push goes on with what the destination says it lacks.
    pub(super) fn after_switchover(
        &self,
        urgent: Link,
        bulk: Link,
        version: u16,
        session: [u8; 16],
        source: Arc<SourcePages>,
        held: Arc<Held>,
    ) -> Result<(), SourceError> {
        let pages = self.vm.layout.pages();
        let ps = self.vm.layout.page_size();
        let mut links = (urgent, bulk);
        // Before any cut: what the pre-copy left current there; after one: what the
        // destination says it holds.
        let mut resumed: Option<Arc<SentPages>> = None;
        let report = loop {
            let first = resumed.is_none();
            let sent = resumed
                .take()
                .unwrap_or_else(|| Arc::new(SentPages::new(pages)));
            let (urgent, bulk) = links;
            match self.serve_and_push(urgent, bulk, version, &source, &held, sent, first) {
                Ok(report) => break report,
                Err(e) if e.link_broke() => match self.reconnect(session, version, &e, &held)? {
                    super::resume::Reconnected::Links { urgent, bulk, sent } => {
                        links = (urgent, bulk);
                        resumed = Some(sent);
                    }
                    super::resume::Reconnected::Finished(report) => break report,
                },
                Err(e) => return Err(e),
            }
        };
        // Every page is on the destination: drop the source's copy.
        crate::migrate::precopy::punch(source.memory(), 0, pages * ps as u64)
            .map_err(SourceError::Memory)?;
        let released = self.job.started.elapsed().as_millis() as u64;
        self.job.update(|s| {
            s.source_released_ms = Some(released);
            if let Some(paths) = report.get("dest_paths").and_then(Value::as_object) {
                s.dest_paths = paths
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect();
            }
            s.destination = Some(report);
        });
        Ok(())
    }

    /// One pair of connections: answer demand requests on `urgent`, push every page `sent`
    /// does not hold on `bulk` (and, on the first pair, none the pre-copy left current
    /// there), then read the destination's report.
    #[allow(clippy::too_many_arguments)]
    fn serve_and_push(
        &self,
        urgent: Link,
        bulk: Link,
        version: u16,
        source: &Arc<SourcePages>,
        held: &Arc<Held>,
        sent: Arc<SentPages>,
        first: bool,
    ) -> Result<Value, SourceError> {
        let pages = self.vm.layout.pages();
        let ps = self.vm.layout.page_size();
        let (faults_tx, faults_rx) = crossbeam_channel::unbounded();
        let urgent_handle = urgent.try_clone().map_err(WireError::Io)?;
        let server = {
            let (sent, source, job) = (sent.clone(), source.clone(), self.job.clone());
            // A broken urgent channel breaks the pair: the push stops too.
            let bulk = bulk.try_clone().map_err(WireError::Io)?;
            std::thread::Builder::new()
                .name(format!("migrate-{}-urgent", self.request.vm))
                .spawn(move || {
                    let served = serve_page_requests_with(
                        urgent,
                        ps,
                        pages,
                        version,
                        Some(&sent),
                        |p| {
                            job.requests.fetch_add(1, Ordering::Relaxed);
                            let _ = faults_tx.send(p);
                        },
                        |p, buf| match source.read(p, buf, false)? {
                            SourcePage::Data => Ok(()),
                            _ => {
                                buf.fill(0);
                                Ok(())
                            }
                        },
                    );
                    if served.is_err() {
                        let _ = bulk.shutdown(std::net::Shutdown::Both);
                    }
                    served
                })
                .map_err(|e| SourceError::Memory(std::io::Error::other(e)))?
        };
        let pushed_and_reported = (|| -> Result<Value, SourceError> {
            let never = Arc::new(AtomicBool::new(false));
            let mut order = {
                let held = held.clone();
                PushOrder::new(sent, move |p| first && held.get(p))
            };
            let out = self.throttled(&bulk, never.clone())?;
            // The status shows the push as it goes, a step of pages at a time.
            let job = &self.job;
            let (mut read, mut reported) = (0u64, 0u64);
            let (data, zero) = push_pages(out, &mut order, ps, &faults_rx, &never, |p, buf| {
                read += 1;
                if read % PUSHED_STEP == 0 {
                    job.update(|s| s.pages_pushed = s.pages_pushed.saturating_add(PUSHED_STEP));
                    reported += PUSHED_STEP;
                }
                source.read(p, buf, false)
            })?;
            let rest = (data + zero).saturating_sub(reported);
            self.job
                .update(|s| s.pages_pushed = s.pages_pushed.saturating_add(rest));
            let mut reader = &bulk;
            reader
                .set_read_timeout(Some(REPORT_TIMEOUT))
                .map_err(WireError::Io)?;
            match read_message(&mut reader, Some(version))? {
                Message::Report(text) => {
                    Ok(serde_json::from_str::<Value>(&text).unwrap_or(Value::Null))
                }
                Message::Abort(r) => Err(SourceError::Aborted(r)),
                other => Err(SourceError::Unexpected {
                    got: other.command(),
                    expected: "Report",
                }),
            }
        })();
        if pushed_and_reported.is_err() {
            // The urgent channel's thread ends with the pair.
            let _ = urgent_handle.shutdown(std::net::Shutdown::Both);
        }
        drop(bulk);
        let served = server
            .join()
            .map_err(|_| SourceError::Aborted("the urgent channel's thread panicked".into()))?;
        match (pushed_and_reported, served) {
            (Ok(report), Err(e)) => {
                tracing::warn!(vm = %self.request.vm, "urgent channel: {}", pager::error_chain(&e));
                Ok(report)
            }
            (Ok(report), Ok(_)) => Ok(report),
            (Err(pushing), Err(serving)) => {
                // A peer that broke the protocol on the urgent channel is the failure to name.
                let serving = SourceError::PageServer(serving);
                Err(if serving.link_broke() {
                    pushing
                } else {
                    serving
                })
            }
            (Err(e), Ok(_)) => Err(e),
        }
    }

    /// Undo a migration that failed before the switchover: the guest runs on here.
    pub(super) fn roll_back(
        &self,
        qmp: &mut Qmp,
        bulk: &mut Link,
        migrate_started: bool,
        was_running: bool,
        why: &SourceError,
    ) {
        // Every page is on this host again (nothing was punched before the switchover).
        self.daemon.set_reattach(&self.request.vm, true);
        let _ = write_message(bulk, &Message::Abort(pager::error_chain(why)));
        let _ = bulk.flush();
        // The destination closes the connection once it removed what it made: wait for
        // that, so a failed or cancelled migration is over on both hosts when it is reported.
        let _ = bulk.shutdown(std::net::Shutdown::Write);
        let _ = bulk.set_read_timeout(Some(Duration::from_secs(2)));
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match read_message(bulk, None) {
                Ok(_) => {}
                Err(WireError::TimedOut) => {}
                Err(_) => break,
            }
        }
        if migrate_started {
            let _ = qmp.execute("migrate_cancel", json!({}));
            let _ = qmp.wait_status(&["cancelled", "failed"], Duration::from_secs(10));
        }
        let running = qmp
            .execute("query-status", json!({}))
            .ok()
            .and_then(|s| s["running"].as_bool());
        if was_running && running == Some(false) {
            let _ = qmp.execute("cont", json!({}));
        }
        self.take_back_shared_device();
    }

    /// Agile rolled back after the hand-off: the shared swap device was released to the
    /// destination, which (having removed what it made) released it again, or acquired it
    /// and died. Take it back so this host, where the guest runs, owns it again (its
    /// evictions go on); if that is refused the guest still runs, reading it as it was.
    fn take_back_shared_device(&self) {
        let Ok(dev) = self.shared_device() else {
            return;
        };
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if !dev.is_released() {
            return;
        }
        let taken = self
            .shared_spec()
            .map_err(|e| pager::error_chain(&e))
            .and_then(|spec| {
                let fresh = swapdev::backend::spec::open_backend(&spec, &Default::default())
                    .map_err(|e| format!("opening {spec} again: {}", pager::error_chain(&e)))?;
                dev.reclaim(fresh).map_err(|e| pager::error_chain(&e))
            });
        match taken {
            Ok(r) => {
                tracing::info!(vm = %self.request.vm, generation = r.generation,
                    taken_from = r.taken_from.as_deref().unwrap_or("(nobody: it was unowned)"),
                    "the migration rolled back: this host owns the shared swap device again");
                self.job.update(|s| s.swapdev_reclaimed = Some(true));
            }
            Err(why) => {
                tracing::warn!(vm = %self.request.vm, %why,
                    "the guest runs on here, reading its released swap device: taking it back \
                     failed, evictions of it are refused until the VM is attached again \
                     (nothing is lost)");
                self.job.update(|s| s.swapdev_reclaimed = Some(false));
            }
        }
    }
}
