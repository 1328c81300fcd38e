//! Unmodified QEMU guests served by the real daemon (`pagewise serve`) through
//! `pagewise vm run`: a fresh VM from an empty RAM file (then evicted down to its hot set
//! while it keeps verifying), and a VM restored from a saved RAM
//! image (QEMU device state via migration to a file with x-ignore-shared; RAM imported into a
//! swap device and served lazily).
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_pager`

mod qemu_lab;

use std::time::{Duration, Instant};

use qemu_lab::qmp::Qmp;
use qemu_lab::*;
use serde_json::json;

const RAM_MIB: u64 = 512;

#[test]
fn qemu_guest_runs_under_daemon_from_empty_ram_file_and_survives_eviction() {
    let mut vm = start_under_daemon(
        "fresh",
        RAM_MIB,
        "memverify.mib=256 memverify.hot_mib=32 memverify.hot_rate_mibs=8 \
         memverify.verify_secs=4 memverify.duration_secs=30",
        &[],
    );
    vm.guest
        .wait_for("memverify: pass 1 ", Duration::from_secs(120));
    let stats = vm.stats();
    let faults = metric(&stats, "faults");
    // 256 MiB filled by memverify = 65536 pages, each a first touch the pager served.
    assert!(faults >= 65536, "only {faults} faults served: {stats}");
    let resident_before = resident_bytes(&vm.guest.mem.0);
    assert!(
        resident_before >= 256 << 20,
        "RAM file holds {resident_before} bytes"
    );

    // Evict down to the hot set (+16 MiB); memverify's next passes read every page back.
    // memverify keeps verifying during the eviction: pages it pulls back meanwhile (demand
    // faults and the prefetches around them) count against the target, nothing else may.
    let back =
        |s: serde_json::Value| metric(&s, "faults_to_source") + metric(&s, "pages_prefetched");
    let back_before = back(vm.stats());
    let report = vm.evict(&["--target-rss", "48M"]);
    let resident_after = resident_bytes(&vm.guest.mem.0);
    let refaulted = back(vm.stats()).saturating_sub(back_before);
    assert!(
        resident_after <= (64 << 20) + refaulted * 4096,
        "RAM file still holds {resident_after} bytes after evicting to 48M ({refaulted} pages \
         faulted back meanwhile): {report}"
    );
    let passes = vm.guest.serial_text().matches("memverify: pass ").count();
    vm.guest.wait_for(
        &format!("memverify: pass {} ", passes + 1),
        Duration::from_secs(90),
    );
    let after = vm.stats();
    let from_device = metric(&after, "faults_to_source");
    assert!(from_device > 0, "no evicted page faulted back: {after}");

    vm.guest.finish(Duration::from_secs(120));
    let vm_run_output = vm.guest.qemu.output();
    assert!(
        vm_run_output.contains("attached to the pager"),
        "{vm_run_output}"
    );
    assert!(
        vm.daemon.proc.output().contains("VM detached"),
        "{}",
        vm.daemon.proc.output()
    );
    eprintln!(
        "first-touch faults: {faults}; RAM file {} MiB -> {} MiB after eviction; faults served \
         from the swap device afterwards: {from_device}; evict: {report}",
        resident_before >> 20,
        resident_after >> 20
    );
}

#[test]
fn qemu_guest_restored_from_ram_image_served_lazily() {
    let append = "memverify.mib=128 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                  memverify.verify_secs=3 memverify.duration_secs=25";
    let qmp_arg = |path: &std::path::Path| {
        vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", path.display()),
        ]
    };

    // 1. The original VM runs under the pager until memverify has verified once.
    let tmp = tempfile::tempdir().unwrap();
    let qmp_a = tmp.path().join("origin.qmp");
    let mut vm = start_under_daemon("origin", RAM_MIB, append, &qmp_arg(&qmp_a));
    let dir = vm.dir.path().to_path_buf();
    let state = dir.join("device-state.bin");
    vm.guest
        .wait_for("memverify: pass 1 ", Duration::from_secs(120));

    // 2. Save: stop, device state to a file without RAM (x-ignore-shared), RAM file to a
    //    swap device.
    let mut qmp = Qmp::connect(&qmp_a, Duration::from_secs(10));
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    );
    qmp.execute("stop", json!({}));
    qmp.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", state.display())}),
    );
    let info = qmp.wait_migration(&["completed"], Duration::from_secs(60));
    let state_bytes = std::fs::metadata(&state).unwrap().len();
    assert!(
        state_bytes < 16 << 20,
        "device state is {state_bytes} bytes: RAM went into the stream ({info})"
    );
    let restored_dev = dir.join("restored.swap");
    pagewise_ok(&[
        "swapdev",
        "import",
        vm.guest.mem.0.to_str().unwrap(),
        restored_dev.to_str().unwrap(),
    ]);
    qmp.execute("quit", json!({}));
    vm.guest.qemu.wait(Duration::from_secs(30));
    // The original is gone: its RAM file too; the daemon stays.
    let DaemonVm {
        guest: origin,
        daemon,
        dir: _dir,
    } = vm;
    drop(origin);

    // 3. Restore: a new QEMU with an empty RAM file, RAM served lazily from the imported
    //    swap device, device state from the file.
    let qmp_b = tmp.path().join("restored.qmp");
    let mut restored = daemon.start_guest(
        "restored",
        RAM_MIB,
        append,
        &[qmp_arg(&qmp_b), vec!["-incoming".into(), "defer".into()]].concat(),
    );
    let mut qmp = Qmp::connect(&qmp_b, Duration::from_secs(20));
    qmp.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    );
    let started = Instant::now();
    qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("exec:cat {}", state.display())}),
    );
    qmp.wait_migration(&["completed"], Duration::from_secs(60));
    let loaded_in = started.elapsed();
    let before = daemon.vm_stats("restored").expect("restored VM attached");
    assert_eq!(qmp.run_state(), "paused", "the saved VM was stopped");
    qmp.execute("cont", json!({}));
    restored.wait_for("memverify: pass", Duration::from_secs(60));
    let running = daemon.vm_stats("restored").expect("restored VM attached");
    let from_device = metric(&running, "faults_to_source");
    assert!(
        from_device > 0,
        "no fault reached the imported swap device: {running}"
    );
    let log = restored.finish(Duration::from_secs(120));
    // The guest continued where it stopped: no boot, no fill, only passes and the end.
    assert!(
        !log.contains("memverify: config"),
        "the guest restarted:\n{log}"
    );
    let faults_before_cont = metric(&before, "faults");
    eprintln!(
        "device state {state_bytes} bytes loaded in {loaded_in:?}; faults before cont: \
         {faults_before_cont}; faults served from the swap device after: {from_device}"
    );
    // RAM was not copied up front: only what device loading touched had faulted in.
    assert!(
        faults_before_cont < 32768,
        "{faults_before_cont} pages faulted before the guest ran: RAM was not lazy"
    );
}
