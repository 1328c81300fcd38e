//! The source daemon is killed (kill -9) after the switchover, while post-copy pushes a
//! guest that was partly evicted to its swap device, and is started again: the restarted
//! daemon finds the migration's journal, dials the destination (paused, waiting for its
//! source), learns which pages it holds, pushes the rest from the guest's RAM file and the
//! swap device, and the migration completes. The guest must finish verifying on the
//! destination with 0 bad pages; the source host then keeps nothing of it.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::process::Stdio;
use std::time::Duration;

use migration_lab::{dest_path, migration_status, wait_status, MigrationLab};
use qemu_lab::assert_memverify_passed;

#[test]
fn a_source_daemon_restarted_after_the_switchover_finishes_the_migration() {
    let mut lab = MigrationLab::up("pwmrst", "20mbit");
    let mut guest = lab.start_verifying_guest(
        256,
        "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=4 memverify.duration_secs=150",
        Some("64M"),
    );
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let mut migrate = lab
        .migrate_command(&to, "vm1", "postcopy", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    let (src, dst) = (lab.src.socket.clone(), lab.dst.socket.clone());
    let journal = lab.src.dir.join("journal").join("vm1.journal");
    let pushing = wait_status(
        &src,
        "pushing",
        Duration::from_secs(120),
        || lab.logs(),
        |s| s["status"] == "postcopy-active" && s["pages_pushed"].as_u64().unwrap_or(0) > 1000,
    );
    assert!(journal.exists(), "no journal at {}", journal.display());
    let census = pushing["census"].clone();
    assert!(
        census["evicted"].as_u64().unwrap_or(0) > 1000,
        "the guest was not evicted: {census}"
    );

    lab.src.kill9();
    wait_status(
        &dst,
        "destination paused",
        Duration::from_secs(30),
        || lab.logs(),
        |s| s["status"] == "postcopy-paused",
    );
    // Its QEMU, told at the switchover not to wait for a restarted daemon, ends.
    let exit = guest.qemu.wait(Duration::from_secs(30));
    eprintln!("source QEMU exited: {exit}");
    std::thread::sleep(Duration::from_secs(2));
    lab.src.restart();

    let logs = || lab.logs();
    let done = wait_status(
        &src,
        "source completed",
        Duration::from_secs(300),
        logs,
        |s| s["status"] == "completed" || s["status"] == "failed",
    );
    assert_eq!(done["status"], "completed", "{done}\n{}", logs());
    assert_eq!(done["restarted"], true, "{done}");
    assert!(done["recoveries"].as_u64().unwrap_or(0) >= 1, "{done}");
    let dst_done = wait_status(
        &dst,
        "destination completed",
        Duration::from_secs(60),
        logs,
        |s| s["status"] == "completed",
    );
    eprintln!(
        "restarted source: pages_pushed {} recoveries {}; destination: link_cuts {} \
         recoveries {} paused_for_link_ms {}",
        done["pages_pushed"],
        done["recoveries"],
        dst_done["link_cuts"],
        dst_done["recoveries"],
        dst_done["paused_for_link_ms"]
    );
    let serial = dest_path(&done, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(300), logs);
    assert_memverify_passed(&text);
    if let Some(line) = text.lines().find(|l| l.contains("memverify: DONE")) {
        eprintln!("destination guest: {line}");
    }
    // The source host keeps nothing of the guest: its RAM file and the journal are gone.
    assert!(!guest.mem.0.exists(), "the source RAM file is still there");
    assert!(!journal.exists(), "the journal is still there");
    assert_eq!(migration_status(&src, "vm1")["status"], "completed");
    // `pagewise migrate` lost the daemon it asked: it ends with an error.
    let exit = migrate.wait().expect("wait for pagewise migrate");
    assert!(
        !exit.success(),
        "pagewise migrate succeeded without its daemon"
    );
}
