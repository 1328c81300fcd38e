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

fn metric(stats: &serde_json::Value, name: &str) -> u64 {
    stats
        .get("metrics")
        .and_then(|m| m.get(name))
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no metric {name} in {stats}"))
}

/// Bytes of `path` resident in the page cache (allocated blocks of the shmem file).
fn resident_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[test]
fn qemu_guest_runs_under_daemon_from_empty_ram_file_and_survives_eviction() {
    let guest = guest();
    preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let daemon = PagerDaemon::start(dir.path());
    daemon.create_swapdev("fresh", RAM_MIB << 20);
    let mem = ShmFile::new("daemon-fresh");
    let serial = dir.path().join("serial.log");
    let args = qemu_args(
        guest,
        &mem.0,
        RAM_MIB,
        true,
        "memverify.mib=256 memverify.hot_mib=32 memverify.hot_rate_mibs=8 \
         memverify.verify_secs=4 memverify.duration_secs=30",
        &serial,
    );
    let mut qemu = Proc::spawn(
        "vm-run",
        vm_run_command(&daemon.socket, "fresh", &args),
        dir.path(),
    );
    wait_for_text(
        &serial,
        "memverify: pass 1 ",
        Duration::from_secs(120),
        &mut qemu,
    );
    let stats = daemon.vm_stats("fresh").expect("VM fresh attached");
    let faults = metric(&stats, "faults");
    // 256 MiB filled by memverify = 65536 pages, each a first touch the pager served.
    assert!(faults >= 65536, "only {faults} faults served: {stats}");
    let resident_before = resident_bytes(&mem.0);
    assert!(
        resident_before >= 256 << 20,
        "RAM file holds {resident_before} bytes"
    );

    // Evict down to the hot set (+16 MiB); memverify's next passes read every page back.
    let report = pagewise_ok(&[
        "evict",
        "--socket",
        daemon.socket.to_str().unwrap(),
        "--vm",
        "fresh",
        "--target-rss",
        "48M",
    ]);
    let resident_after = resident_bytes(&mem.0);
    assert!(
        resident_after <= 64 << 20,
        "RAM file still holds {resident_after} bytes after evicting to 48M: {report}"
    );
    let text = std::fs::read_to_string(&serial).unwrap();
    let passes = text.matches("memverify: pass ").count();
    wait_for_text(
        &serial,
        &format!("memverify: pass {} ", passes + 1),
        Duration::from_secs(90),
        &mut qemu,
    );
    let after = daemon.vm_stats("fresh").expect("VM fresh attached");
    let from_device = metric(&after, "faults_to_source");
    assert!(from_device > 0, "no evicted page faulted back: {after}");

    let status = qemu.wait(Duration::from_secs(120));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(status.success(), "{status}\n{}\n{log}", qemu.output());
    assert_memverify_passed(&log);
    assert!(
        qemu.output().contains("attached to the pager"),
        "{}",
        qemu.output()
    );
    assert!(
        daemon.proc.output().contains("VM detached"),
        "{}",
        daemon.proc.output()
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
    let guest = guest();
    preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let daemon = PagerDaemon::start(dir.path());
    let state = dir.path().join("device-state.bin");
    let append = "memverify.mib=128 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                  memverify.verify_secs=3 memverify.duration_secs=25";

    // 1. The original VM runs under the pager until memverify has verified once.
    daemon.create_swapdev("origin", RAM_MIB << 20);
    let mem_a = ShmFile::new("restore-origin");
    let serial_a = dir.path().join("serial-origin.log");
    let qmp_a = dir.path().join("origin.qmp");
    let mut args = qemu_args(guest, &mem_a.0, RAM_MIB, true, append, &serial_a);
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_a.display()),
    ]);
    let mut origin = Proc::spawn(
        "vm-origin",
        vm_run_command(&daemon.socket, "origin", &args),
        dir.path(),
    );
    wait_for_text(
        &serial_a,
        "memverify: pass 1 ",
        Duration::from_secs(120),
        &mut origin,
    );

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
    let restored_dev = dir.path().join("restored.swap");
    pagewise_ok(&[
        "swapdev",
        "import",
        mem_a.0.to_str().unwrap(),
        restored_dev.to_str().unwrap(),
    ]);
    qmp.execute("quit", json!({}));
    origin.wait(Duration::from_secs(30));
    drop(mem_a);

    // 3. Restore: a new QEMU with an empty RAM file, RAM served lazily from the imported
    //    swap device, device state from the file.
    let mem_b = ShmFile::new("restore-target");
    let serial_b = dir.path().join("serial-restored.log");
    let qmp_b = dir.path().join("restored.qmp");
    let mut args = qemu_args(guest, &mem_b.0, RAM_MIB, true, append, &serial_b);
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_b.display()),
        "-incoming".into(),
        "defer".into(),
    ]);
    let mut restored = Proc::spawn(
        "vm-restored",
        vm_run_command(&daemon.socket, "restored", &args),
        dir.path(),
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
    wait_for_text(
        &serial_b,
        "memverify: pass",
        Duration::from_secs(60),
        &mut restored,
    );
    let running = daemon.vm_stats("restored").expect("restored VM attached");
    let from_device = metric(&running, "faults_to_source");
    assert!(
        from_device > 0,
        "no fault reached the imported swap device: {running}"
    );
    let status = restored.wait(Duration::from_secs(120));
    let log = std::fs::read_to_string(&serial_b).unwrap_or_default();
    assert!(status.success(), "{status}\n{}\n{log}", restored.output());
    // The guest continued where it stopped: no boot, no fill, only passes and the end.
    assert!(
        !log.contains("memverify: config"),
        "the guest restarted:\n{log}"
    );
    assert_memverify_passed(&log);
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
