//! A source daemon that died during a migration, before `migrate-continue`, leaves its QEMU
//! in a QEMU migration that only that daemon would have finished: QEMU pauses the guest at
//! `pre-switchover` and waits there for ever (QEMU's own migration thread never notices that
//! the destination is gone). Every page is still on this host then (nothing is punched
//! before the switchover, so the VMM could attach again). When such a VMM attaches again to
//! the restarted daemon, that migration is cancelled here so the guest runs on: QEMU resumes
//! a guest that was running when it paused it.
//!
//! Only a migration pagewise drives is touched: both capabilities the source sets
//! (`x-ignore-shared`, `pause-before-switchover`) on. One still moving device state is
//! waited for (it reaches `pre-switchover` or fails, its destination being gone).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::migrate::qmp::{Qmp, QmpError};

/// How long a migration still moving device state is waited for.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);

/// What was found and done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// No QMP socket on the VMM's command line, or no migration pagewise drives.
    NotOurs,
    /// The migration had already ended (`status` as QEMU reports it).
    Over(String),
    /// Cancelled at `pre-switchover`; whether the guest runs now.
    Cancelled { running: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("reading the VMM's command line (pid {pid})")]
    Cmdline {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the QEMU migration stayed {status:?} for {} s", SETTLE_WITHIN.as_secs())]
    StillMoving { status: String },
}

/// Start settling VM `vm`'s VMM (pid `pid`) in a thread of its own; the outcome is logged.
pub fn settle_in_background(vm: String, pid: i32) {
    let spawned = std::thread::Builder::new()
        .name(format!("settle-{vm}"))
        .spawn(move || match settle(pid) {
            Ok(Settled::NotOurs) => {}
            Ok(Settled::Over(status)) => {
                tracing::debug!(vm, status, "re-attach: no interrupted migration to settle")
            }
            Ok(Settled::Cancelled { running }) => tracing::warn!(
                vm,
                running,
                "re-attach: the migration this daemon was running when it died was cancelled \
                 at pre-switchover; the guest runs on here"
            ),
            Err(e) => tracing::error!(vm, error = %pager::error_chain(&e),
                "re-attach: settling an interrupted migration failed; the guest may stay \
                 paused at pre-switchover (QMP migrate_cancel resumes it)"),
        });
    if let Err(e) = spawned {
        tracing::error!(%e, "re-attach: spawning the settle thread");
    }
}

/// Cancel the pagewise-driven QEMU migration of the VMM with pid `pid`, once it waits at
/// `pre-switchover`.
pub fn settle(pid: i32) -> Result<Settled, SettleError> {
    let argv = crate::qemu::cmdline::of_process(pid)
        .map_err(|source| SettleError::Cmdline { pid, source })?;
    let Some(path) = crate::qemu::dest::qmp_socket(&argv) else {
        return Ok(Settled::NotOurs);
    };
    let mut qmp = Qmp::connect(&path, Duration::from_secs(5))?;
    let caps = qmp.execute("query-migrate-capabilities", json!({}))?;
    if !(capability(&caps, "x-ignore-shared") && capability(&caps, "pause-before-switchover")) {
        return Ok(Settled::NotOurs);
    }
    let start = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("none").to_string();
        match status.as_str() {
            "pre-switchover" => break,
            "setup" | "active" | "device" | "wait-unplug" | "cancelling" => {}
            _ => return Ok(Settled::Over(status)),
        }
        if start.elapsed() > SETTLE_WITHIN {
            return Err(SettleError::StillMoving { status });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    qmp.execute("migrate_cancel", json!({}))?;
    match qmp.wait_status(&["cancelled"], Duration::from_secs(10)) {
        Ok(_) | Err(QmpError::MigrationFailed { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // QEMU restarts a guest it paused for the migration; give it a moment.
    let start = Instant::now();
    loop {
        let running = qmp.execute("query-status", json!({}))?["running"]
            .as_bool()
            .unwrap_or(false);
        if running || start.elapsed() > Duration::from_secs(5) {
            return Ok(Settled::Cancelled { running });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `query-migrate-capabilities`' answer has capability `name` on.
fn capability(caps: &Value, name: &str) -> bool {
    caps.as_array().is_some_and(|list| {
        list.iter()
            .any(|c| c["capability"] == name && c["state"] == true)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_migration_with_both_capabilities_is_ours() {
        let caps = json!([
            {"capability": "xbzrle", "state": false},
            {"capability": "x-ignore-shared", "state": true},
            {"capability": "pause-before-switchover", "state": true},
        ]);
        assert!(capability(&caps, "x-ignore-shared"));
        assert!(capability(&caps, "pause-before-switchover"));
        assert!(!capability(&caps, "xbzrle"));
        assert!(!capability(&caps, "postcopy-ram"));
        assert!(!capability(&json!({"return": 1}), "x-ignore-shared"));
    }

    #[test]
    fn a_vmm_without_a_qmp_socket_is_left_alone() {
        // This test process has no `-qmp` on its command line.
        let me = i32::try_from(std::process::id()).unwrap();
        assert_eq!(settle(me).unwrap(), Settled::NotOurs);
        let e = settle(i32::MAX).unwrap_err();
        assert!(matches!(e, SettleError::Cmdline { .. }), "{e}");
    }
}
