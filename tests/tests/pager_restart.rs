//! kill -9 of the pager daemon under a running, unmodified QEMU guest (TCG, Linux, memverify
//! verifying every page), with no migration running: the attach library inside QEMU keeps
//! the userfaultfd registered and waits; the restarted daemon takes the VM back
//! (`reattach`), rebuilds its page states from the RAM file and the swap device, wakes the
//! faults the dead daemon never answered, and the guest goes on. Killed once while idle
//! after an eviction and once in the middle of an eviction: the swap device must fsck clean
//! after each kill, and memverify must end with 0 bad pages (every evicted page came back
//! with its content). A third case: nobody restarts the daemon, and QEMU ends after
//! `PAGEWISE_PAGER_WAIT_SECS` with a message naming the cause.
//!
//! Run: `cargo test -p pagewise-tests --release --test pager_restart -- --nocapture`

mod qemu_lab;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_lab::*;

const RAM_MIB: u64 = 256;

/// `pagewise serve` in `dir` (the same socket and swap devices each time), its log in
/// `DIR/NAME.err`.
fn serve(dir: &Path, name: &str) -> PagerDaemon {
    PagerDaemon::start_logged(dir, name)
}

/// SIGKILL, and reap it.
fn kill9(daemon: &mut PagerDaemon) {
    daemon.proc.child.kill().expect("kill -9 the daemon");
    daemon.proc.child.wait().expect("reap the daemon");
}

fn fsck_clean(device: &Path) -> String {
    // Exit status 0 (pagewise_ok) and no error in the report.
    let out = pagewise_ok(&["swapdev", "fsck", device.to_str().unwrap()]);
    assert!(
        out.contains(" 0 errors"),
        "fsck of {} after kill -9: {out}",
        device.display()
    );
    out
}

/// Pages of VM "rs" in `state` (`pagewise stats`).
fn state(daemon: &PagerDaemon, state: &str) -> u64 {
    let st = daemon.vm_stats("rs").expect("VM rs attached");
    st["states"][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no state {state} in {st}"))
}

/// A figure of the daemon's "page states rebuilt" log line (`evicted=N`).
fn rebuilt(daemon: &PagerDaemon, field: &str) -> u64 {
    let log = daemon.proc.output();
    let line = log
        .lines()
        .find(|l| l.contains("page states rebuilt"))
        .unwrap_or_else(|| panic!("no rebuild line in:\n{log}"));
    let key = format!("{field}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// The number of memverify passes printed so far.
fn passes(serial: &Path) -> usize {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .matches("memverify: pass ")
        .count()
}

fn wait_more_passes(guest: &mut QemuGuest, more: usize, limit: Duration) {
    let want = passes(&guest.serial) + more;
    let began = Instant::now();
    while passes(&guest.serial) < want {
        assert!(guest.qemu.running(), "QEMU exited: {}", guest.qemu.output());
        assert!(
            began.elapsed() < limit,
            "memverify made no {more} more passes in {limit:?}:\n{}",
            guest.serial_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Restart the daemon and wait until QEMU's attach library says it attached again.
fn restart_and_reattach(dir: &Path, name: &str, guest: &mut QemuGuest, nth: usize) -> PagerDaemon {
    let daemon = serve(dir, name);
    let began = Instant::now();
    loop {
        let said = guest.qemu.output().matches("attached again").count();
        if said >= nth {
            break;
        }
        assert!(
            guest.qemu.running(),
            "QEMU exited instead of waiting: {}",
            guest.qemu.output()
        );
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "QEMU did not attach again to the restarted daemon:\n{}\n--- daemon:\n{}",
            guest.qemu.output(),
            daemon.proc.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.proc.output();
    assert!(
        log.contains("page states rebuilt"),
        "the daemon did not rebuild the VM's states:\n{log}"
    );
    assert!(
        daemon.vm_stats(&guest.name).is_some(),
        "VM not attached after the restart"
    );
    daemon
}

#[test]
fn qemu_guest_survives_kill_9_of_its_pager_idle_and_during_an_eviction() {
    guest();
    preload_lib();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = serve(dir.path(), "serve-1");
    let mut guest = daemon.start_guest(
        "rs",
        RAM_MIB,
        "memverify.mib=96 memverify.hot_mib=8 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=3 memverify.duration_secs=75",
        &[],
    );
    guest.wait_for("memverify: pass 1 ", Duration::from_secs(180));

    // 1. Evicted to 40 MiB, then killed while idle: most of the guest is in the device.
    let evicted = daemon.evict("rs", &["--target-rss", "40M", "--json"]);
    eprintln!("evicted: {evicted}");
    let before = (state(&daemon, "present"), state(&daemon, "evicted"));
    kill9(&mut daemon);
    std::thread::sleep(Duration::from_secs(2));
    assert!(guest.qemu.running(), "QEMU ended with its pager");
    eprintln!("fsck after kill 1: {}", fsck_clean(&guest.device));
    let mut daemon = restart_and_reattach(dir.path(), "serve-2", &mut guest, 1);
    // Nothing was served between the kill and the rebuild: it finds the pages in memory
    // and in the device where the dead daemon had them (up to the few the guest faulted
    // back between the last `stats` and the kill).
    let after = (rebuilt(&daemon, "present"), rebuilt(&daemon, "evicted"));
    eprintln!("(present, evicted) before the kill {before:?}, rebuilt {after:?}");
    let near = |a: u64, b: u64| a.abs_diff(b) <= 64 + b / 50;
    assert!(
        before.1 > 8192 && near(after.0, before.0) && near(after.1, before.1),
        "rebuilt (present, evicted) {after:?}, {before:?} before the kill"
    );
    // Every page again, through the restarted daemon.
    wait_more_passes(&mut guest, 2, Duration::from_secs(120));

    // 2. Killed in the middle of an eviction.
    let socket = daemon.socket.clone();
    let evicting = std::thread::spawn(move || {
        Command::new(pagewise_bin())
            .args(["evict", "--socket", socket.to_str().unwrap()])
            .args(["--vm", "rs", "--target-rss", "24M"])
            .output()
            .expect("run pagewise evict")
    });
    // Kill once it is moving pages.
    let before = state(&daemon, "evicted");
    let began = Instant::now();
    while state(&daemon, "evicting") == 0
        && state(&daemon, "evicted") < before + 512
        && began.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let at_kill = (state(&daemon, "evicting"), state(&daemon, "evicted"));
    kill9(&mut daemon);
    eprintln!(
        "killed during the eviction: (evicting, evicted) {at_kill:?}, {before} evicted before it"
    );
    let evict_out = evicting.join().unwrap();
    eprintln!(
        "evict cut by kill -9: {} {}",
        evict_out.status,
        String::from_utf8_lossy(&evict_out.stderr)
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(guest.qemu.running(), "QEMU ended with its pager");
    eprintln!("fsck after kill 2: {}", fsck_clean(&guest.device));
    let daemon = restart_and_reattach(dir.path(), "serve-3", &mut guest, 2);
    let stats = daemon.vm_stats("rs").unwrap();
    eprintln!("after the second restart: {}", stats["metrics"]);

    let log = guest.finish(Duration::from_secs(240));
    eprintln!(
        "memverify: {}",
        log.lines()
            .find(|l| l.contains("memverify: DONE"))
            .unwrap_or("")
    );
    drop(daemon);
}

#[test]
fn qemu_ends_with_a_reason_when_its_pager_does_not_come_back() {
    guest();
    preload_lib();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = serve(dir.path(), "serve-gone");
    daemon.create_swapdev("gone", RAM_MIB << 20);
    let mem = ShmFile::new("gone");
    let serial = dir.path().join("gone.serial");
    let args = qemu_args(
        guest(),
        &mem.0,
        RAM_MIB,
        true,
        "memverify.mib=64 memverify.duration_secs=120",
        &serial,
    );
    let mut cmd = vm_run_command(&daemon.socket, "gone", &args);
    cmd.env("PAGEWISE_PAGER_WAIT_SECS", "3");
    let mut qemu = Proc::spawn("vm-run-gone", cmd, dir.path());
    wait_for_text(
        &serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut qemu,
    );
    kill9(&mut daemon);
    let killed = Instant::now();
    let status = qemu.wait(Duration::from_secs(30));
    let waited = killed.elapsed();
    let err = qemu.output();
    assert!(!status.success(), "{err}");
    assert!(err.contains("waiting up to 3 s"), "{err}");
    assert!(
        err.contains("did not come back within 3 s") && err.contains("PAGEWISE_PAGER_WAIT_SECS"),
        "{err}"
    );
    assert!(
        waited >= Duration::from_secs(3),
        "QEMU ended after {waited:?}"
    );
}
