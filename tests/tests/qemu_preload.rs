//! The LD_PRELOAD attach library under real QEMU with a real guest (TCG), served by a minimal
//! in-test zero-page pager (`qemu_lab::zero_pager`) that parses the handshake with the
//! pager's own protocol code. The daemon-backed runs are in `qemu_pager.rs`.
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_preload`

mod qemu_lab;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use qemu_lab::zero_pager::ZeroPager;
use qemu_lab::*;

fn qemu_command(env: &[(&str, String)], args: &[String]) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(args).env("LD_PRELOAD", preload_lib());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn qemu_boots_under_preload_and_memverify_passes() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let mem = ShmFile::new("preload-boot");
    let pager = ZeroPager::start(&dir.path().join("pager.sock"), None);
    let serial = dir.path().join("serial.log");
    let args = qemu_args(
        guest,
        &mem.0,
        512,
        true,
        "memverify.mib=192 memverify.hot_mib=32 memverify.hot_rate_mibs=8 \
         memverify.verify_secs=4 memverify.duration_secs=10",
        &serial,
    );
    let env = [
        ("PAGEWISE_MEM_PATH", mem.0.display().to_string()),
        ("PAGEWISE_SOCKET", pager.socket.display().to_string()),
        ("PAGEWISE_VM", "boot-test".to_string()),
    ];
    let mut qemu = Proc::spawn("qemu", qemu_command(&env, &args), dir.path());
    let status = qemu.wait(Duration::from_secs(150));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        status.success(),
        "qemu failed: {status}\n{}\n{log}",
        qemu.output()
    );
    assert_memverify_passed(&log);
    assert!(
        qemu.output().contains("attached to the pager"),
        "no attach line from the library:\n{}",
        qemu.output()
    );
    let errors = pager.counters.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "pager saw: {errors:?}");
    let requests = pager.requests.lock().unwrap().clone();
    assert_eq!(
        requests.len(),
        1,
        "one attach per guest RAM mapping: {requests:?}"
    );
    let req = &requests[0];
    assert_eq!(req.vm, "boot-test");
    assert_eq!(req.modes, ["missing", "wp"]);
    assert_eq!(req.regions.len(), 1);
    assert_eq!(req.regions[0].size, 512 << 20);
    assert_eq!(req.regions[0].offset, 0);
    assert!(req.memory_file);
    let faults = pager.counters.faults.load(Ordering::Relaxed);
    let zeros = pager.counters.zero_pages.load(Ordering::Relaxed);
    // memverify alone touches 192 MiB = 49152 pages; every one is a MISSING fault.
    assert!(
        zeros >= 49152,
        "only {zeros} zero pages served ({faults} faults)"
    );
    assert!(
        pager.counters.probes.load(Ordering::Relaxed) >= 1,
        "no load-time probe seen"
    );
    eprintln!("faults={faults} zero_pages={zeros}");
}

#[test]
fn preload_without_pager_refuses_to_start_qemu() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let mem = ShmFile::new("preload-nopager");
    let serial = dir.path().join("serial.log");
    let args = qemu_args(guest, &mem.0, 256, true, "", &serial);
    let socket = dir.path().join("nobody-listens.sock");
    let env = [
        ("PAGEWISE_MEM_PATH", mem.0.display().to_string()),
        ("PAGEWISE_SOCKET", socket.display().to_string()),
    ];
    let mut qemu = Proc::spawn("qemu", qemu_command(&env, &args), dir.path());
    let status = qemu.wait(Duration::from_secs(20));
    assert!(!status.success(), "qemu ran without a pager");
    let err = qemu.output();
    assert!(err.contains("cannot connect to the pager"), "{err}");
    assert!(err.contains(&socket.display().to_string()), "{err}");
    assert!(!mem.0.exists(), "QEMU got as far as creating guest RAM");
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(!log.contains("guest:"), "the guest ran: {log}");
}

#[test]
fn preload_refuses_private_mapping_and_pager_refusal() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");

    // share=off: QEMU maps the file MAP_PRIVATE; the pager could never see the guest's writes.
    let mem = ShmFile::new("preload-private");
    let pager = ZeroPager::start(&dir.path().join("pager.sock"), None);
    let env = [
        ("PAGEWISE_MEM_PATH", mem.0.display().to_string()),
        ("PAGEWISE_SOCKET", pager.socket.display().to_string()),
    ];
    let args = qemu_args(guest, &mem.0, 256, false, "", &serial);
    let mut qemu = Proc::spawn("qemu-private", qemu_command(&env, &args), dir.path());
    let status = qemu.wait(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        qemu.output().contains("was mapped MAP_PRIVATE"),
        "{}",
        qemu.output()
    );
    drop(pager);

    // The pager answers with an error: QEMU must stop, showing the pager's reason.
    let mem = ShmFile::new("preload-refused");
    let reason = "no swap device for this VM (test refusal)".to_string();
    let pager = ZeroPager::start(&dir.path().join("pager2.sock"), Some(reason.clone()));
    let env = [
        ("PAGEWISE_MEM_PATH", mem.0.display().to_string()),
        ("PAGEWISE_SOCKET", pager.socket.display().to_string()),
    ];
    let args = qemu_args(guest, &mem.0, 256, true, "", &serial);
    let mut qemu = Proc::spawn("qemu-refused", qemu_command(&env, &args), dir.path());
    let status = qemu.wait(Duration::from_secs(20));
    assert!(!status.success());
    let err = qemu.output();
    assert!(err.contains("refused") && err.contains(&reason), "{err}");
    assert_eq!(pager.requests.lock().unwrap().len(), 1);
}

#[test]
fn qemu_exits_when_its_pager_goes_away() {
    let guest = guest();
    let dir = tempfile::tempdir().unwrap();
    let mem = ShmFile::new("preload-pager-gone");
    let pager = ZeroPager::start_dropping_after(&dir.path().join("pager.sock"), 3000);
    let serial = dir.path().join("serial.log");
    let args = qemu_args(
        guest,
        &mem.0,
        256,
        true,
        "memverify.mib=64 memverify.duration_secs=60",
        &serial,
    );
    let env = [
        ("PAGEWISE_MEM_PATH", mem.0.display().to_string()),
        ("PAGEWISE_SOCKET", pager.socket.display().to_string()),
    ];
    let mut qemu = Proc::spawn("qemu", qemu_command(&env, &args), dir.path());
    // Without the watch, QEMU would hang in its next missing page (and ignore SIGTERM).
    let status = qemu.wait(Duration::from_secs(60));
    assert!(!status.success(), "QEMU kept running without its pager");
    let err = qemu.output();
    assert!(err.contains("closed the connection"), "{err}");
    assert!(err.contains("nobody can serve"), "{err}");
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        !log.contains("memverify: DONE"),
        "the guest finished: {log}"
    );
}
