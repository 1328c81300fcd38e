//! The push after the switchover, shared by a live source and a restarted one
//! (`restarted.rs`): answer demand requests on the urgent channel, push every page the
//! destination lacks on the bulk channel, read its report; a pair that breaks is dialled
//! again (`resume.rs`) and the push goes on with what the destination says it lacks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use super::{Held, SourceError, REPORT_TIMEOUT};
use crate::migrate::bulk::{push_pages, PushOrder, SentPages, SourcePage};
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, Message, WireError};
use crate::migrate::page_server::serve_page_requests_with;
use crate::migrate::session::engine::{EngineConfig, Job};
use crate::migrate::session::pages::PushSource;
use crate::migrate::session::throttle::Throttle;

/// Pages pushed between two updates of the status's `pages_pushed`.
const PUSHED_STEP: u64 = 256;

/// Everything the push needs of its migration.
pub(super) struct Pusher {
    pub config: EngineConfig,
    pub job: Arc<Job>,
    pub vm: String,
    /// The destination as `pagewise migrate` named it, and resolved.
    pub to: String,
    pub addr: SocketAddr,
    /// Bytes per second (0: unlimited).
    pub max_bandwidth: u64,
    pub pages: u64,
    pub page_size: usize,
}

/// `bulk`, its writes counted in `job`'s `transferred` and held to `max_bandwidth`.
pub(super) fn throttled(
    job: &Job,
    bulk: &Link,
    max_bandwidth: u64,
    cancel: Arc<AtomicBool>,
) -> Result<Throttle<Link>, SourceError> {
    let stream = bulk.try_clone().map_err(WireError::Io)?;
    Ok(Throttle::new(
        stream,
        max_bandwidth,
        cancel,
        job.transferred.clone(),
    ))
}

impl Pusher {
    /// Push until the destination's report. `links`: the pair the switchover used (the
    /// pages `held` marks are current there and not pushed); none: dial first (the pair
    /// died with an earlier daemon).
    pub fn push_until_report(
        &self,
        mut links: Option<(Link, Link)>,
        version: u16,
        session: [u8; 16],
        source: Arc<dyn PushSource>,
        held: Arc<Held>,
    ) -> Result<Value, SourceError> {
        // Before any cut: what the pre-copy left current there; after one (or a restart):
        // what the destination says it holds.
        let mut resumed = None;
        let mut why = "the source daemon was restarted after the switchover".to_string();
        loop {
            let (urgent, bulk) = match links.take() {
                Some(pair) => pair,
                None => match self.reconnect(session, version, &why, &held)? {
                    super::resume::Reconnected::Links { urgent, bulk, sent } => {
                        resumed = Some(sent);
                        (urgent, bulk)
                    }
                    super::resume::Reconnected::Finished(report) => return Ok(report),
                },
            };
            let first = resumed.is_none();
            let sent = resumed
                .take()
                .unwrap_or_else(|| Arc::new(SentPages::new(self.pages)));
            match self.serve_and_push(urgent, bulk, version, &source, &held, sent, first) {
                Ok(report) => return Ok(report),
                Err(e) if e.link_broke() => why = pager::error_chain(&e),
                Err(e) => return Err(e),
            }
        }
    }

    /// The destination holds every page: drop this host's copy and record its report.
    pub fn release(&self, source: &dyn PushSource, report: Value) -> Result<(), SourceError> {
        crate::migrate::precopy::punch(source.memory(), 0, self.pages * self.page_size as u64)
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
        source: &Arc<dyn PushSource>,
        held: &Arc<Held>,
        sent: Arc<SentPages>,
        first: bool,
    ) -> Result<Value, SourceError> {
        let pages = self.pages;
        let ps = self.page_size;
        let (faults_tx, faults_rx) = crossbeam_channel::unbounded();
        let urgent_handle = urgent.try_clone().map_err(WireError::Io)?;
        let server = {
            let (sent, source, job) = (sent.clone(), source.clone(), self.job.clone());
            // A broken urgent channel breaks the pair: the push stops too.
            let bulk = bulk.try_clone().map_err(WireError::Io)?;
            std::thread::Builder::new()
                .name(format!("migrate-{}-urgent", self.vm))
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
                        |p, buf| match source.read_for_push(p, buf)? {
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
            let out = throttled(&self.job, &bulk, self.max_bandwidth, never.clone())?;
            // The status shows the push as it goes, a step of pages at a time.
            let job = &self.job;
            let (mut read, mut reported) = (0u64, 0u64);
            let (data, zero) = push_pages(out, &mut order, ps, &faults_rx, &never, |p, buf| {
                read += 1;
                if read % PUSHED_STEP == 0 {
                    job.update(|s| s.pages_pushed = s.pages_pushed.saturating_add(PUSHED_STEP));
                    reported += PUSHED_STEP;
                }
                source.read_for_push(p, buf)
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
                tracing::warn!(vm = %self.vm, "urgent channel: {}", pager::error_chain(&e));
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
}
