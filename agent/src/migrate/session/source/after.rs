//! The source after the switchover: the push (`push.rs`) until the destination's report,
//! then drop the VM's RAM here; and the roll-back of a migration that failed before the
//! switchover.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::push::Pusher;
use super::{Held, SourceError, SourceRun};
use crate::migrate::link::Link;
use crate::migrate::message::{read_message, write_message, Message, WireError};
use crate::migrate::qmp::Qmp;
use crate::migrate::session::pages::{PushSource, SourcePages};

impl SourceRun {
    /// Push what the destination lacks while answering its demand requests, until its
    /// report; then drop the VM's RAM here.
    pub(super) fn after_switchover(
        &self,
        urgent: Link,
        bulk: Link,
        version: u16,
        session: [u8; 16],
        source: Arc<SourcePages>,
        held: Arc<Held>,
    ) -> Result<(), SourceError> {
        let pusher = self.pusher();
        let source: Arc<dyn PushSource> = source;
        let report = pusher.push_until_report(
            Some((urgent, bulk)),
            version,
            session,
            source.clone(),
            held,
        )?;
        pusher.release(&*source, report)
    }

    pub(super) fn pusher(&self) -> Pusher {
        Pusher {
            config: self.config.clone(),
            job: self.job.clone(),
            vm: self.request.vm.clone(),
            to: self.request.to.clone(),
            addr: self.to,
            max_bandwidth: self.request.max_bandwidth.unwrap_or(0),
            pages: self.vm.layout.pages(),
            page_size: self.vm.layout.page_size(),
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
