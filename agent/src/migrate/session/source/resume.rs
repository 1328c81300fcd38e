//! The source when post-copy's link breaks: pause (the guest runs on the destination; its
//! faults on pages still here wait there), dial the destination again every
//! [`RETRY_EVERY`] (at once on `pagewise migrate --resume`) until the recovery deadline,
//! open the new pair with `Resume`, and learn from the destination's `Ack` runs which pages
//! it holds: the push goes on with the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::push::Pusher;
use super::{connect, Held, SourceError};
use crate::migrate::auth::open_client;
use crate::migrate::bulk::{BulkError, SentPages};
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Channel, Message, WireError};
use crate::migrate::page_server::PageServerError;
use crate::migrate::session::recovery::{link_broke, RETRY_EVERY};
use crate::migrate::session::status::Phase;

/// Longest wait for the destination's answer to `Resume`.
const RESUME_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a successful reconnection brings.
pub(super) enum Reconnected {
    /// A new pair, and the pages the destination holds (claimed: never pushed again).
    Links {
        urgent: Link,
        bulk: Link,
        sent: Arc<SentPages>,
    },
    /// The destination had finished (its report was lost with the link): here it is.
    Finished(Value),
}

impl SourceError {
    /// Whether this failure is a broken connection (recovered from after the switchover).
    pub(super) fn link_broke(&self) -> bool {
        match self {
            SourceError::Wire(e)
            | SourceError::Push(BulkError::Wire(e))
            | SourceError::PageServer(PageServerError::Wire(e)) => link_broke(e),
            _ => false,
        }
    }

    /// Whether a failed attempt to reconnect is worth another.
    fn worth_retrying(&self) -> bool {
        matches!(
            self,
            SourceError::Connect { .. } | SourceError::Auth { .. } | SourceError::Tls { .. }
        ) || self.link_broke()
    }
}

impl Pusher {
    /// Get a new pair of connections to the destination after `why` broke the last one.
    pub(super) fn reconnect(
        &self,
        session: [u8; 16],
        version: u16,
        why: &str,
        held: &Held,
    ) -> Result<Reconnected, SourceError> {
        let paused = Instant::now();
        let timeout = self.config.recover_timeout;
        self.job.link_cut();
        tracing::warn!(vm = %self.vm, "post-copy paused: the link to the destination \
            broke ({why}); every page stays here; reconnecting for up to {} s (`pagewise migrate \
            --resume` tries at once)", timeout.as_secs());
        let mut deadline = paused + timeout;
        let mut attempts = 0u64;
        loop {
            if self.job.recovery.wait_nudge(RETRY_EVERY) {
                deadline = Instant::now() + timeout;
                tracing::info!(vm = %self.vm, "resume asked for: reconnecting now");
            }
            if Instant::now() > deadline {
                return Err(SourceError::LinkLost {
                    attempts,
                    waited_s: paused.elapsed().as_secs(),
                });
            }
            attempts += 1;
            self.job.update(|s| s.status = Phase::PostcopyRecover);
            match self.try_resume(session, version, held) {
                Ok(r) => {
                    let ms = self.job.link_recovered(paused);
                    tracing::info!(vm = %self.vm, attempts, paused_ms = ms, "post-copy resumed");
                    return Ok(r);
                }
                Err(e) if e.worth_retrying() => {
                    self.job.update(|s| s.status = Phase::PostcopyPaused);
                    tracing::debug!(vm = %self.vm, attempts, "reconnecting: {}", pager::error_chain(&e));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt: both channels, `Resume`, the destination's holdings.
    fn try_resume(
        &self,
        session: [u8; 16],
        version: u16,
        held: &Held,
    ) -> Result<Reconnected, SourceError> {
        let pair: [u8; 16] = rand::random();
        let addr = self.addr;
        let open = |channel| -> Result<(Link, u16), SourceError> {
            let mut link = connect(&self.config, &self.to, addr)?;
            let opened = open_client(&mut link, &self.config.psk, channel, pair)
                .map_err(|source| SourceError::Auth { addr, source })?;
            Ok((link, opened.version))
        };
        let (urgent, v_urgent) = open(Channel::Urgent)?;
        let (mut bulk, v_bulk) = open(Channel::Bulk)?;
        if v_urgent != version || v_bulk != version {
            return Err(SourceError::Refused(format!(
                "the destination now speaks version {v_bulk}, the migration began with {version}"
            )));
        }
        write_message(
            &mut bulk,
            &Message::Resume {
                session,
                vm: self.vm.clone(),
            },
        )?;
        bulk.set_read_timeout(Some(RESUME_ANSWER_TIMEOUT))
            .map_err(WireError::Io)?;
        let pages = self.pages;
        let sent = Arc::new(SentPages::new(pages));
        loop {
            match read_message(&mut bulk, Some(version))? {
                Message::Ack { first, count } => {
                    let end = first.checked_add(count).filter(|e| *e <= pages).ok_or(
                        SourceError::AckOutOfRange {
                            first,
                            count,
                            pages,
                        },
                    )?;
                    for p in first..end {
                        sent.claim(p);
                        held.set(p, true);
                    }
                }
                Message::Ready => break,
                Message::Report(text) => {
                    return Ok(Reconnected::Finished(
                        serde_json::from_str(&text).unwrap_or(Value::Null),
                    ))
                }
                Message::Refuse(r) => return Err(SourceError::Refused(r)),
                Message::Abort(r) => return Err(SourceError::Aborted(r)),
                other => {
                    return Err(SourceError::Unexpected {
                        got: other.command(),
                        expected: "Ack, Ready or Report",
                    })
                }
            }
        }
        bulk.set_read_timeout(None).map_err(WireError::Io)?;
        Ok(Reconnected::Links { urgent, bulk, sent })
    }
}
