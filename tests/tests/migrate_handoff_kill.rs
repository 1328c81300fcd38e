//! kill -9 of a daemon at agile's hand-off of the shared swap device (issue 10): the source
//! released the device (the guest still runs on it) and the destination acquired it, then
//! one of the two daemons dies. The migration fails, the guest runs on at the source with 0
//! bad pages, the source host owns the device again (its evictions go on), and fsck finds it
//! clean. A test hook holds the source right after the release so the kill lands there.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use migration_lab::{wait_done, wait_status, MigrationLab, SourceGuest};
use qemu_lab::assert_memverify_passed;

const RAM_MIB: u64 = 256;
const GUEST: &str = "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                     memverify.verify_secs=4 memverify.duration_secs=100";
const HOLD_ENV: &str = "PAGEWISE_TEST_HOLD";

/// One lab at a time: two TCG guests on two cores would starve the timing these rely on.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// A lab with the shared device, a guest evicted to 40M, and an agile migration under way,
/// the source held at `hold` (`STAGE:MS`: `released`, right after the hand-off, or
/// `paused`, at pre-switchover); the destination has acquired the device.
fn held_at(prefix: &str, hold: &str) -> (MigrationLab, SourceGuest, Child) {
    let lab = MigrationLab::with_shared_device_and_source_env(
        prefix,
        "800mbit",
        "vm1",
        RAM_MIB,
        &[(HOLD_ENV, hold)],
    );
    let guest = lab.start_verifying_guest(RAM_MIB, GUEST, Some("40M"));
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let migrate = lab
        .migrate_command(&to, "vm1", "agile", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    let stage = hold.split(':').next().unwrap();
    wait_for_log(&lab, &format!("holding at {stage}"), |l| {
        l.src.proc.output()
    });
    // The destination acquires it once it read `Released`.
    let start = Instant::now();
    loop {
        let (_, info) = lab.shared_device_json("inspect");
        if info["owner"] == "dst" && info["owned"] == true {
            eprintln!(
                "the destination acquired the device: generation {}",
                info["generation"]
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the destination did not acquire the device: {info}\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (lab, guest, migrate)
}

fn wait_for_log(lab: &MigrationLab, needle: &str, log: impl Fn(&MigrationLab) -> String) {
    let start = Instant::now();
    while !log(lab).contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no {needle:?} in the log:\n{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After the failed migration: the source host owns the device, fsck finds it clean, an
/// eviction through the source daemon works, and the guest finishes with 0 bad pages.
fn the_source_has_it_all_back(lab: &MigrationLab, guest: &SourceGuest, migrate: &mut Child) {
    let (_, info) = lab.shared_device_json("inspect");
    assert_eq!(info["owner"], "src", "{info}\n{}", lab.logs());
    assert_eq!(info["owned"], true, "{info}");
    let (clean, fsck) = lab.shared_device_json("fsck");
    assert!(clean, "fsck of the shared device: {fsck}");
    assert_eq!(fsck["errors"].as_array().map(Vec::len), Some(0), "{fsck}");
    eprintln!(
        "device: owner {} generation {}; fsck: {} pages checked, 0 errors",
        info["owner"], info["generation"], fsck["pages_checked"]
    );
    // Its evictions go on (they write to the device).
    let out = lab.evict("vm1", "32M");
    eprintln!("evicted after the failed migration: {out}");
    let text = wait_done(&guest.serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&text);
    if let Some(done) = text.lines().find(|l| l.contains("memverify: DONE")) {
        eprintln!("{done}");
    }
    let exit = migrate.wait().expect("wait for pagewise migrate");
    assert!(!exit.success(), "the migration cannot have succeeded");
}

#[test]
fn source_daemon_killed_at_the_hand_off_comes_back_and_takes_its_device_and_guest_back() {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, guest, mut migrate) = held_at("pwhks", "released:60000");
    lab.src.kill9();
    // The destination sees its source gone before the switchover: it removes what it made
    // and hands the device back (unowned).
    let failed = wait_status(
        &lab.dst.socket,
        "destination rolled back",
        Duration::from_secs(60),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    eprintln!("destination: {}", failed["error"]);
    // The QEMU waited for its pager; the restarted one takes the VM back.
    lab.src.restart();
    wait_for_log(&lab, "re-attach: page states rebuilt", |l| {
        l.src.proc.output()
    });
    let qemu_log = guest.qemu.output();
    assert!(
        qemu_log.contains("attached again to the pager"),
        "QEMU's preload did not attach again:\n{qemu_log}\n{}",
        lab.logs()
    );
    the_source_has_it_all_back(&lab, &guest, &mut migrate);
}

#[test]
fn source_daemon_back_before_the_destination_let_go_waits_for_the_device() {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, guest, mut migrate) = held_at("pwhkw", "released:60000");
    // The destination stops answering (its daemon frozen), so it holds the device while
    // the source daemon dies and comes back: the re-attach is refused for now and retried.
    let dst = nix::unistd::Pid::from_raw(i32::try_from(lab.dst.proc.child.id()).unwrap());
    nix::sys::signal::kill(dst, nix::sys::signal::Signal::SIGSTOP).unwrap();
    lab.src.kill9();
    lab.src.restart();
    wait_for_log(&lab, "attach refused", |l| l.src.proc.output());
    let log = lab.src.proc.output();
    assert!(
        log.contains("owned by host dst") && log.contains("retry=true"),
        "{log}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !guest.qemu.output().contains("attached again"),
        "attached while the destination owned the device"
    );
    nix::sys::signal::kill(dst, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for_log(&lab, "re-attach: page states rebuilt", |l| {
        l.src.proc.output()
    });
    the_source_has_it_all_back(&lab, &guest, &mut migrate);
}

#[test]
fn destination_daemon_killed_after_acquiring_leaves_the_device_to_the_source() {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, guest, mut migrate) = held_at("pwhkd", "released:5000");
    let dest_qemu = migration_lab::migration_status(&lab.src.socket, "vm1")["dest_qemu_pid"]
        .as_u64()
        .map(|p| nix::unistd::Pid::from_raw(p as i32));
    lab.dst.kill9();
    // The source's hold ends, the destination is gone: it rolls back and takes the device
    // back from the host that acquired it and wrote nothing.
    let failed = wait_status(
        &lab.src.socket,
        "source rolled back",
        Duration::from_secs(120),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    assert_eq!(
        failed["swapdev_reclaimed"],
        true,
        "{failed}\n{}",
        lab.logs()
    );
    assert!(
        lab.src
            .proc
            .output()
            .contains("this host owns the shared swap device again"),
        "{}",
        lab.logs()
    );
    the_source_has_it_all_back(&lab, &guest, &mut migrate);
    // The QEMU the dead destination daemon started for the incoming guest.
    if let Some(pid) = dest_qemu {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

#[test]
fn source_daemon_killed_at_pre_switchover_comes_back_and_the_guest_runs_on() {
    let _one = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
    let (mut lab, guest, mut migrate) = held_at("pwhkp", "paused:60000");
    let status = migration_lab::migration_status(&lab.src.socket, "vm1");
    assert_eq!(status["status"], "pre-switchover", "{status}");
    // The guest is paused, its QEMU waits for a migrate-continue only this daemon would send.
    lab.src.kill9();
    wait_status(
        &lab.dst.socket,
        "destination rolled back",
        Duration::from_secs(60),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    lab.src.restart();
    wait_for_log(&lab, "re-attach: page states rebuilt", |l| {
        l.src.proc.output()
    });
    wait_for_log(&lab, "was cancelled at pre-switchover", |l| {
        l.src.proc.output()
    });
    let log = lab.src.proc.output();
    let settled = log
        .lines()
        .find(|l| l.contains("was cancelled at pre-switchover"))
        .unwrap();
    eprintln!("{settled}");
    assert!(settled.contains("running=true"), "{log}");
    // memverify finishing proves the guest runs again.
    the_source_has_it_all_back(&lab, &guest, &mut migrate);
}
