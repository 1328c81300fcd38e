//! The destination side: the migration endpoint (`serve --migrate-listen`) pairs each
//! migration's two authenticated connections by session id, then one [`Incoming`] per VM
//! prepares it in the daemon, starts its QEMU under the pager with `-incoming defer`,
//! writes pre-copied pages into its memory file, applies the switchover (routes and
//! sources) and places what the source pushes after it.
//!
//! The receiver is a state machine: `Setup` first; then pre-copy frames until
//! `Switchover`; then pushed pages until `Done`. Any other frame in a state is refused with
//! an error naming it, and until `Ready` is sent every failure removes what was made here
//! (QEMU, the prepared VM, its files) and tells the source why.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::engine::{Engine, Job};
use super::incoming::{Incoming, IncomingError};
use super::recovery::{Offer, LINK_DEAD_AFTER};
use super::status::{Phase, Role};
use crate::migrate::auth::open_server;
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Channel, Message};

/// A connection waits this long for its other half.
const PAIRING_WINDOW: Duration = Duration::from_secs(30);

/// One authenticated connection waiting for the other of its session.
pub(super) struct Half {
    channel: Channel,
    stream: Link,
    version: u16,
    at: Instant,
}

pub(super) type PendingHalves = HashMap<[u8; 16], Half>;

/// Accept migration connections until the daemon stops.
pub(super) fn accept_loop(engine: &Arc<Engine>, listener: TcpListener) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(%e, "migration endpoint: cannot poll the listener");
        return;
    }
    loop {
        let Some(daemon) = engine.daemon.upgrade() else {
            return;
        };
        if !daemon.wait_readable(listener.as_fd(), "migration endpoint") {
            return;
        }
        drop(daemon);
        match listener.accept() {
            Ok((stream, _)) => {
                let engine = engine.clone();
                let _ = std::thread::Builder::new()
                    .name("migrate-in".into())
                    .spawn(move || handle_connection(&engine, stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(%e, "migration endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Authenticate one connection (TLS first, when this endpoint has it); the second of a
/// session runs the migration.
fn handle_connection(engine: &Arc<Engine>, tcp: TcpStream) {
    let peer = tcp
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let mut stream = match &engine.config.tls {
        None => Link::plain(tcp),
        Some(tls) => match Link::accept_tls(tcp, tls) {
            Ok(link) => link,
            Err(e) => {
                tracing::warn!(%peer, "refused migration peer {peer}: {}", pager::error_chain(&e));
                return;
            }
        },
    };
    if let Err(e) = stream.detect_dead_link(LINK_DEAD_AFTER) {
        tracing::warn!(%peer, %e, "migration connection: cannot set its keepalive");
    }
    let opened = match open_server(&mut stream, &engine.config.psk) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(%peer, "refused migration peer {peer}: {}", pager::error_chain(&e));
            return;
        }
    };
    let other = {
        let mut pending = engine.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.retain(|_, h| {
            let alive = h.at.elapsed() < PAIRING_WINDOW;
            if !alive {
                let why = format!(
                    "the other connection of this session did not arrive within {PAIRING_WINDOW:?}"
                );
                let _ = write_message(&mut h.stream, &Message::Refuse(why));
            }
            alive
        });
        match pending.remove(&opened.session) {
            Some(h) if h.channel != opened.channel => h,
            Some(h) => {
                let why = format!("a second {:?} connection for one session", h.channel);
                let _ = write_message(&mut stream, &Message::Refuse(why.clone()));
                tracing::warn!(%peer, "refused migration peer {peer}: {why}");
                pending.insert(opened.session, h);
                return;
            }
            None => {
                pending.insert(
                    opened.session,
                    Half {
                        channel: opened.channel,
                        stream,
                        version: opened.version,
                        at: Instant::now(),
                    },
                );
                return;
            }
        }
    };
    let (urgent, bulk) = match opened.channel {
        Channel::Urgent => (stream, other.stream),
        Channel::Bulk => (other.stream, stream),
    };
    if other.version != opened.version {
        tracing::warn!(%peer, "refused migration peer {peer}: its two connections speak versions {} and {}", other.version, opened.version);
        return;
    }
    run_session(engine, urgent, bulk, opened.version, opened.session, peer);
}

fn run_session(
    engine: &Arc<Engine>,
    urgent: Link,
    mut bulk: Link,
    version: u16,
    session: [u8; 16],
    peer: String,
) {
    let _ = bulk.set_read_timeout(Some(Duration::from_secs(30)));
    let setup = match read_message(&mut bulk, Some(version)) {
        Ok(Message::Setup(s)) => s,
        Ok(Message::Resume { session, vm }) => {
            let offer = Offer {
                urgent,
                bulk,
                version,
            };
            return resume_session(engine, offer, session, &vm, &peer);
        }
        Ok(other) => {
            let e = IncomingError::OutOfOrder {
                got: other.command(),
                state: "waiting for Setup",
            };
            let _ = write_message(&mut bulk, &Message::Refuse(e.to_string()));
            tracing::warn!(%peer, "migration from {peer}: {e}");
            return;
        }
        Err(e) => {
            let why = pager::error_chain(&e);
            let _ = write_message(&mut bulk, &Message::Refuse(why.clone()));
            tracing::warn!(%peer, "migration from {peer}: {why}");
            return;
        }
    };
    let Some(daemon) = engine.daemon.upgrade() else {
        return;
    };
    let job = Job::new(&setup.vm, Role::Destination, Some(setup.mode), peer.clone());
    job.recovery.set_session(session);
    if let Err(e) = engine.claim(&setup.vm, job.clone()) {
        let _ = write_message(&mut bulk, &Message::Refuse(pager::error_chain(&e)));
        return;
    }
    tracing::info!(vm = %setup.vm, %peer, mode = ?setup.mode, "incoming migration");
    let local_ip = bulk
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| "0.0.0.0".into());
    let mut incoming = Incoming::new(engine.clone(), daemon, setup, job.clone(), local_ip);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        incoming.run(urgent, &mut bulk, version)
    }));
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(pager::error_chain(&e)),
        Err(_) => Some("the migration thread panicked".to_string()),
    };
    match error {
        None => job.finish(Phase::Completed, None),
        Some(text) => {
            tracing::warn!(vm = %incoming.vm_name(), "incoming migration failed: {text}");
            if !incoming.is_ready() {
                let _ = write_message(&mut bulk, &Message::Abort(text.clone()));
                incoming.clean_up();
            }
            job.finish(Phase::Failed, Some(text));
        }
    }
}

/// A source reconnecting the post-copy of `session` (VM `vm`) after its link broke: the new
/// connections go to the paused migration, which answers on them. A migration that ended
/// meanwhile answers with its report (the source lost it with the link); one this host does
/// not know is refused.
fn resume_session(engine: &Arc<Engine>, mut offer: Offer, session: [u8; 16], vm: &str, peer: &str) {
    let job = engine.job(vm).ok().filter(|j| {
        j.snapshot().role == Role::Destination && j.recovery.session() == Some(session)
    });
    let refuse = |offer: &mut Offer, why: String| {
        tracing::warn!("migration from {peer}: refused to resume a migration: {why}");
        let _ = write_message(&mut offer.bulk, &Message::Refuse(why));
    };
    let Some(job) = job else {
        return refuse(
            &mut offer,
            format!("no migration of VM {vm:?} with this session is known here"),
        );
    };
    match job.phase() {
        Phase::PostcopyActive | Phase::PostcopyPaused | Phase::PostcopyRecover => {
            tracing::info!(%peer, vm, "the source reconnected: resuming post-copy");
            let _ = offer.bulk.set_read_timeout(None);
            job.recovery.offer(offer);
        }
        Phase::Completed => {
            let report = job.snapshot().destination.unwrap_or_default();
            let _ = write_message(&mut offer.bulk, &Message::Report(report.to_string()));
        }
        phase => refuse(
            &mut offer,
            format!(
                "the migration of VM {vm:?} is {}: nothing to resume",
                phase.name()
            ),
        ),
    }
}
