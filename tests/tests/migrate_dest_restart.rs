//! The destination daemon is killed (kill -9) after the switchover, while the source pushes
//! the guest's pages, and is started again. The guest's QEMU on the destination lives on
//! (the daemon started it; it is not part of it): its attach library waits for a pager, and
//! its vCPUs that fault meanwhile wait. The restarted daemon finds the migration's journal,
//! prepares the VM with the journal's routes before it accepts any attach, takes the QEMU's
//! re-attach (page states rebuilt from the memory file), takes the source back when it
//! dials again, tells it which pages it holds, and the source pushes the rest. The guest
//! must finish verifying on the destination with 0 bad pages, and `pagewise migrate` on the
//! source reports the migration completed.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::sync::Mutex;
use std::time::Duration;

use migration_lab::pushing::pushing;
use migration_lab::{dest_path, migration_status, wait_status};
use qemu_lab::assert_memverify_passed;

/// One lab at a time: two TCG guests on two cores would starve the timing these rely on.
static ONE_LAB: Mutex<()> = Mutex::new(());

#[test]
fn a_destination_daemon_restarted_after_the_switchover_finishes_the_migration() {
    restart_mid_push("pwmdrp", "postcopy", 1000);
}

/// Agile: the cold pages are in the shared device, which the restarted destination opens
/// again (it owns it since the hand-off); the source pushes the pages the guest wrote.
#[test]
fn a_destination_daemon_restarted_after_an_agile_switchover_finishes_the_migration() {
    restart_mid_push("pwmdra", "agile", 100);
}

/// Migrate a verifying guest in `mode` on a 20 Mbit/s link, kill -9 the destination daemon
/// once `pushed` pages were pushed, start it again.
fn restart_mid_push(prefix: &str, mode: &str, pushed: u64) {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, guest, mut migrate, _) = pushing(prefix, mode, pushed);
    let (src, dst) = (lab.src.socket.clone(), lab.dst.socket.clone());
    let journal = lab.dst.dir.join("journal").join("vm1.incoming");
    let before = migration_status(&dst, "vm1");
    assert_eq!(before["status"], "postcopy-active", "{before}");
    let qemu_pid = before["dest_qemu_pid"].as_u64().expect("dest_qemu_pid");
    assert!(journal.exists(), "no journal at {}", journal.display());

    lab.dst.kill9();
    wait_status(
        &src,
        "source paused",
        Duration::from_secs(30),
        || lab.logs(),
        |s| s["status"] == "postcopy-paused",
    );
    std::thread::sleep(Duration::from_secs(2));
    let qemu_alive = || std::path::Path::new(&format!("/proc/{qemu_pid}")).exists();
    assert!(qemu_alive(), "the destination QEMU ended with its daemon");
    lab.dst.restart();

    let logs = || lab.logs();
    let dst_done = wait_status(
        &dst,
        "destination completed",
        Duration::from_secs(300),
        logs,
        |s| s["status"] == "completed" || s["status"] == "failed",
    );
    assert_eq!(dst_done["status"], "completed", "{dst_done}\n{}", logs());
    assert_eq!(dst_done["restarted"], true, "{dst_done}");
    let done = wait_status(
        &src,
        "source completed",
        Duration::from_secs(60),
        logs,
        |s| s["status"] == "completed" || s["status"] == "failed",
    );
    assert_eq!(done["status"], "completed", "{done}\n{}", logs());
    assert!(done["recoveries"].as_u64().unwrap_or(0) >= 1, "{done}");
    eprintln!(
        "source: pages_pushed {} link_cuts {} recoveries {} paused_for_link_ms {}; restarted \
         destination: recoveries {} paused_for_link_ms {}",
        done["pages_pushed"],
        done["link_cuts"],
        done["recoveries"],
        done["paused_for_link_ms"],
        dst_done["recoveries"],
        dst_done["paused_for_link_ms"]
    );
    assert!(qemu_alive(), "the destination QEMU ended");
    let serial = dest_path(&done, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(300), logs);
    assert_memverify_passed(&text);
    if let Some(line) = text.lines().find(|l| l.contains("memverify: DONE")) {
        eprintln!("destination guest: {line}");
    }
    assert!(!journal.exists(), "the destination journal is still there");
    let exit = migrate.wait().expect("wait for pagewise migrate");
    assert!(exit.success(), "pagewise migrate failed\n{}", logs());
}
