//! Post-copy recovery. After the switchover the guest runs on the destination while some
//! of its pages are still only on the source, so a broken link must not end the
//! migration: both sides pause (faults on the source's pages wait, the rest of the guest
//! runs), the source dials again with a new pair of connections whose bulk channel opens
//! with `Resume` naming the migration's first session, the destination answers with `Ack`
//! runs of every page it holds and `Ready`, and the push goes on with the rest; the
//! destination's waiting faults are asked again of the new urgent channel. Any number of
//! cuts is survived, one during a recovery too, until the recovery deadline.
//!
//! A cut link gives no error by itself (packets just stop), so every migration connection
//! has TCP keepalive and `TCP_USER_TIMEOUT` set ([`LINK_DEAD_AFTER`]): a blocked read or
//! write fails once the peer has been silent that long.
//!
//! [`Recovery`] is what a job's two sides meet at: on the destination, the endpoint thread
//! that accepted a `Resume` hands the new connections ([`Offer`]) to the paused migration
//! (cutting the old ones, in case it has not noticed yet); on the source, `pagewise migrate
//! --resume` nudges the paused migration to dial at once (and restarts its deadline).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::status::Phase;
use crate::migrate::link::Link;
use crate::migrate::message::WireError;

/// A migration connection whose peer is silent this long is dead.
pub const LINK_DEAD_AFTER: Duration = Duration::from_secs(8);
/// The source waits this long between two attempts to reach the destination again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Whether `e` says the connection broke (as opposed to a peer that said something wrong):
/// only such a failure is recovered from.
pub fn link_broke(e: &WireError) -> bool {
    matches!(
        e,
        WireError::Closed
            | WireError::TruncatedHeader { .. }
            | WireError::Truncated { .. }
            | WireError::TimedOut
            | WireError::Io(_)
    )
}

/// A new pair of connections for a paused post-copy (destination side).
pub struct Offer {
    pub urgent: Link,
    pub bulk: Link,
    pub version: u16,
}

#[derive(Default)]
struct State {
    /// The migration's first session id (what `Resume` names).
    session: Option<[u8; 16]>,
    /// Handles on the connections in use, cut when a new pair arrives.
    live: Vec<Link>,
    offer: Option<Offer>,
    nudged: bool,
}

/// Where a paused migration and its way back meet (one per job).
#[derive(Default)]
pub struct Recovery {
    state: Mutex<State>,
    changed: Condvar,
}

impl Recovery {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_session(&self, session: [u8; 16]) {
        self.lock().session = Some(session);
    }

    pub fn session(&self) -> Option<[u8; 16]> {
        self.lock().session
    }

    /// The connections now in use (handles on them: cutting one cuts the original).
    pub fn set_live(&self, links: &[&Link]) {
        let live = links.iter().filter_map(|l| l.try_clone().ok()).collect();
        self.lock().live = live;
    }

    /// Shut the connections in use down: whoever blocks on them sees the link broken.
    pub fn cut_live(&self) {
        for l in self.lock().live.drain(..) {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Destination: new connections from the source. The old ones are cut (the migration
    /// may still be blocked on them) and the offer waits for the migration to take it; an
    /// offer not taken yet is replaced (its connections close).
    pub fn offer(&self, offer: Offer) {
        let mut s = self.lock();
        for l in s.live.drain(..) {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        s.offer = Some(offer);
        drop(s);
        self.changed.notify_all();
    }

    /// Destination: wait until `until` for an offer.
    pub fn wait_offer(&self, until: Instant) -> Option<Offer> {
        let mut s = self.lock();
        loop {
            if let Some(o) = s.offer.take() {
                return Some(o);
            }
            let left = until.checked_duration_since(Instant::now())?;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// An offer that arrived while the migration was not paused is stale once it is over.
    pub fn drop_offer(&self) {
        self.lock().offer = None;
    }

    /// Source: `pagewise migrate --resume`, try to reconnect now.
    pub fn nudge(&self) {
        self.lock().nudged = true;
        self.changed.notify_all();
    }

    /// Source: sleep `d` or until nudged; true if nudged.
    pub fn wait_nudge(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut s = self.lock();
        loop {
            if std::mem::take(&mut s.nudged) {
                return true;
            }
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return false;
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl super::engine::Job {
    /// The link broke after the switchover: count the cut, show the job paused.
    pub(super) fn link_cut(&self) {
        self.update(|s| {
            s.status = Phase::PostcopyPaused;
            s.link_cuts += 1;
        });
    }

    /// The link is back after a pause that began at `paused`: count the recovery and the
    /// time paused, show the job active; the milliseconds paused.
    pub(super) fn link_recovered(&self, paused: Instant) -> u64 {
        let ms = u64::try_from(paused.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.update(|s| {
            s.status = Phase::PostcopyActive;
            s.recoveries += 1;
            s.paused_for_link_ms = s.paused_for_link_ms.saturating_add(ms);
        });
        ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    fn pair() -> (Link, Link) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (Link::plain(a), Link::plain(b))
    }

    #[test]
    fn an_offer_cuts_the_live_links_and_reaches_the_waiting_side() {
        let r = Arc::new(Recovery::default());
        let (old, mut old_peer) = pair();
        r.set_live(&[&old]);
        let waiter = {
            let r = r.clone();
            std::thread::spawn(move || r.wait_offer(Instant::now() + Duration::from_secs(10)))
        };
        let (urgent, _u) = pair();
        let (bulk, _b) = pair();
        r.offer(Offer {
            urgent,
            bulk,
            version: 3,
        });
        assert_eq!(waiter.join().unwrap().map(|o| o.version), Some(3));
        // The old connection was shut down: its peer reads the end of the stream.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut old_peer, &mut buf).unwrap(), 0);
    }

    #[test]
    fn waiting_for_an_offer_ends_at_the_deadline() {
        let r = Recovery::default();
        let t = Instant::now();
        assert!(r
            .wait_offer(Instant::now() + Duration::from_millis(100))
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_nudge_wakes_the_retry_sleep_once() {
        let r = Arc::new(Recovery::default());
        let t = Instant::now();
        let sleeper = {
            let r = r.clone();
            std::thread::spawn(move || r.wait_nudge(Duration::from_secs(20)))
        };
        std::thread::sleep(Duration::from_millis(50));
        r.nudge();
        assert!(sleeper.join().unwrap());
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(
            !r.wait_nudge(Duration::from_millis(20)),
            "a nudge counts once"
        );
    }

    #[test]
    fn only_a_broken_connection_is_recovered_from() {
        assert!(link_broke(&WireError::Closed));
        assert!(link_broke(&WireError::TimedOut));
        assert!(link_broke(&WireError::Io(std::io::Error::other("reset"))));
        assert!(!link_broke(&WireError::Malformed {
            command: crate::migrate::frame::Command::Page,
            why: "truncated"
        }));
    }
}
