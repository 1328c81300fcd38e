//! The source daemon is killed (kill -9) after the switchover, while post-copy pushes a
//! guest that was partly evicted to its swap device, and is started again: the restarted
//! daemon finds the migration's journal, dials the destination (paused, waiting for its
//! source), learns which pages it holds, pushes the rest from the guest's RAM file and the
//! swap device, and the migration completes. The guest must finish verifying on the
//! destination with 0 bad pages; the source host then keeps nothing of it.
//!
//! And the narrow window before it: killed with the journal written but `migrate-continue`
//! not sent, the restarted daemon finds the source QEMU alive and not switched over: the
//! journal goes, nothing else is touched, and the guest runs on at the source.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration_lab::pushing::{pushing, GUEST};
use migration_lab::{dest_path, migration_status, wait_status, MigrationLab};
use qemu_lab::assert_memverify_passed;

/// One lab at a time: two TCG guests on two cores would starve the timing these rely on.
static ONE_LAB: Mutex<()> = Mutex::new(());

#[test]
fn a_source_daemon_restarted_after_the_switchover_finishes_the_migration() {
    restart_mid_push("pwmrst", "postcopy", 1000);
}

/// Agile: the cold pages are in the shared device the destination reads; the restarted
/// source pushes the pages the guest wrote lately from its RAM file.
#[test]
fn a_source_daemon_restarted_after_an_agile_switchover_finishes_the_migration() {
    restart_mid_push("pwmrsa", "agile", 100);
}

/// Migrate a verifying guest evicted to 64M in `mode` on a 20 Mbit/s link, kill -9 the
/// source daemon once `pushed` pages were pushed, start it again.
fn restart_mid_push(prefix: &str, mode: &str, pushed: u64) {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, mut guest, mut migrate, pushing) = pushing(prefix, mode, pushed);
    let (src, dst) = (lab.src.socket.clone(), lab.dst.socket.clone());
    let journal = lab.src.dir.join("journal").join("vm1.journal");
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

fn wait_for_log(lab: &MigrationLab, needle: &str) {
    let start = Instant::now();
    while !lab.src.proc.output().contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no {needle:?} in the source log:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_source_daemon_killed_between_its_journal_and_the_switchover_keeps_the_guest() {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let mut lab = MigrationLab::with_source_env_and_destination_args(
        "pwmrsj",
        "200mbit",
        &[("PAGEWISE_TEST_HOLD", "journaled:60000")],
        &["--recover-timeout", "15"],
    );
    let guest = lab.start_verifying_guest(256, GUEST, None);
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let mut migrate = lab
        .migrate_command(&to, "vm1", "postcopy", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    wait_for_log(&lab, "holding at journaled");
    let journal = lab.src.dir.join("journal").join("vm1.journal");
    assert!(journal.exists(), "no journal at {}", journal.display());
    lab.src.kill9();
    lab.src.restart();
    // The QEMU, never told to go on, attaches again; its migration is cancelled.
    wait_for_log(&lab, "was cancelled at pre-switchover");
    let failed = wait_status(
        &lab.src.socket,
        "the journal refused",
        Duration::from_secs(60),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("the switchover never happened"), "{failed}");
    assert_eq!(failed["restarted"], true, "{failed}");
    assert!(!journal.exists(), "the journal is still there");
    assert!(guest.mem.0.exists(), "the source RAM file is gone");
    // memverify finishing on the source proves the guest runs on there, whole.
    let text = migration_lab::wait_done(&guest.serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&text);
    if let Some(line) = text.lines().find(|l| l.contains("memverify: DONE")) {
        eprintln!("source guest: {line}");
    }
    // The destination, which never got the guest's devices, gives up.
    wait_status(
        &lab.dst.socket,
        "destination gave up",
        Duration::from_secs(120),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    let exit = migrate.wait().expect("wait for pagewise migrate");
    assert!(
        !exit.success(),
        "pagewise migrate succeeded without its daemon"
    );
}
