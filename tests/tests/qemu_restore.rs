//! Lazy restore of an unmodified QEMU guest (real QEMU, TCG): a guest running memverify
//! under `pagewise serve` is saved with `pagewise vm save` (device state only, RAM file ->
//! raw image), then started again with `pagewise vm restore`: device state loaded by
//! `-incoming defer` + `migrate-incoming`, every RAM page served by the daemon from the raw
//! image (`raw:`), never written. memverify must go on where it stopped (no boot) and find
//! 0 bad pages; the image must be byte-identical afterwards. Refusals (wrong sizes, missing
//! files, a state that does not match its image) are checked before any QEMU starts.
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_restore -- --nocapture`

mod qemu_lab;

use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use qemu_lab::*;

const RAM_MIB: u64 = 512;
const APPEND: &str = "memverify.mib=128 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                      memverify.verify_secs=3 memverify.duration_secs=25";

/// Content hash, length and mtime of a file.
fn identity(path: &Path) -> (u64, u64, SystemTime) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    let meta = std::fs::metadata(path).unwrap();
    (h.finish(), meta.len(), meta.modified().unwrap())
}

fn restore_command(
    socket: &Path,
    name: &str,
    image: &Path,
    state: &Path,
    qemu: &[String],
) -> Command {
    let mut cmd = Command::new(pagewise_bin());
    cmd.args(["vm", "restore", "--json", "--socket"])
        .arg(socket)
        .args(["--name", name, "--ram-image"])
        .arg(image)
        .arg("--state")
        .arg(state)
        .args(["--", "qemu-system-x86_64"])
        .args(qemu)
        .env_remove("PAGEWISE_PRELOAD")
        .env_remove("PAGEWISE_SOCKET");
    cmd
}

/// A restore that must be refused before QEMU starts, with `want` in its error.
fn refused(daemon: &PagerDaemon, image: &Path, state: &Path, ram_mib: u64, want: &str) {
    let mem = ShmFile::new("refused");
    let serial = daemon.swapdev_dir.join("refused.serial");
    let args = qemu_args(guest(), &mem.0, ram_mib, true, APPEND, &serial);
    let out = restore_command(&daemon.socket, "refused", image, state, &args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restore was not refused: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(
        !mem.0.exists(),
        "QEMU started (it created its RAM file): {err}"
    );
    assert!(
        daemon.vm_stats("refused").is_none(),
        "a refused VM is attached"
    );
}

#[test]
fn qemu_guest_saved_and_restored_lazily_from_its_raw_image() {
    let qmp_arg = |path: &Path| {
        vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", path.display()),
        ]
    };
    // 1. The original guest runs under the pager until memverify has verified once.
    let tmp = tempfile::tempdir().unwrap();
    let qmp_a = tmp.path().join("origin.qmp");
    let mut vm = start_under_daemon("origin", RAM_MIB, APPEND, &qmp_arg(&qmp_a));
    let dir: PathBuf = vm.dir.path().to_path_buf();
    vm.guest
        .wait_for("memverify: pass 1 ", Duration::from_secs(120));

    // 2. Save: the daemon is asked that every page is in the RAM file; QEMU quits.
    let image = dir.join("origin.img");
    let state = dir.join("origin.state");
    let saved = pagewise_ok(&[
        "vm",
        "save",
        "--qmp",
        qmp_a.to_str().unwrap(),
        "--ram-file",
        vm.guest.mem.0.to_str().unwrap(),
        "--ram-image",
        image.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        "--socket",
        vm.daemon.socket.to_str().unwrap(),
        "--name",
        "origin",
    ]);
    assert!(saved.contains("saved VM origin"), "{saved}");
    vm.guest.qemu.wait(Duration::from_secs(30));
    let state_bytes = std::fs::metadata(&state).unwrap().len();
    assert!(
        state_bytes < 16 << 20,
        "state file is {state_bytes} bytes: RAM went into it"
    );
    let before = identity(&image);
    assert_eq!(before.1, RAM_MIB << 20);
    let DaemonVm {
        guest: origin,
        daemon,
        dir: _dir,
    } = vm;
    drop(origin);

    // 3. Refusals, each before QEMU starts.
    let none = dir.join("none");
    refused(&daemon, &none, &state, RAM_MIB, "none");
    refused(&daemon, &image, &none, RAM_MIB, "none");
    let short = dir.join("short.img");
    std::fs::File::create(&short)
        .unwrap()
        .set_len((RAM_MIB << 20) - 4096)
        .unwrap();
    refused(&daemon, &short, &state, RAM_MIB, "536866816 bytes");
    let other = dir.join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(RAM_MIB << 20)
        .unwrap();
    refused(&daemon, &other, &state, RAM_MIB, "does not match");
    refused(&daemon, &image, &state, 256, "size=536870912");
    let raw_stream = dir.join("raw.stream");
    std::fs::write(&raw_stream, b"QEVM\0\0\0\x03").unwrap();
    refused(
        &daemon,
        &image,
        &raw_stream,
        RAM_MIB,
        "not a pagewise state file",
    );

    // 4. Restore lazily: a new QEMU with an empty RAM file, RAM served from the image.
    let mem = ShmFile::new("restored");
    let serial = dir.join("restored.serial");
    let args = qemu_args(guest(), &mem.0, RAM_MIB, true, APPEND, &serial);
    let mut restore = Proc::spawn(
        "vm-restore",
        restore_command(&daemon.socket, "restored", &image, &state, &args),
        &dir,
    );
    wait_for_text(
        &serial,
        "memverify: pass",
        Duration::from_secs(120),
        &mut restore,
    );
    let running = daemon
        .vm_stats("restored")
        .expect("the restored VM is attached");
    let source = running["source"].as_str().unwrap_or_default().to_string();
    assert!(source.starts_with("raw "), "served from {source}");
    let from_image = metric(&running, "faults_to_source");
    assert!(from_image > 0, "no fault reached the image: {running}");
    let log = wait_for_text(
        &serial,
        "memverify: DONE",
        Duration::from_secs(120),
        &mut restore,
    );
    let status = restore.wait(Duration::from_secs(60));
    let output = restore.output();
    assert!(status.success(), "vm restore: {status}\n{output}");
    assert_memverify_passed(&log);
    assert!(
        !log.contains("memverify: config"),
        "the guest booted again instead of going on:\n{log}"
    );
    let report: serde_json::Value = output
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report from vm restore:\n{output}"));
    let device_state = report["device_state_bytes"].as_u64().unwrap();
    assert!(device_state > 0 && device_state < state_bytes, "{report}");
    assert!(report["running_ms"].as_u64().is_some(), "{report}");

    // 5. The image was never written.
    let after = identity(&image);
    assert_eq!(before, after, "the RAM image changed during the restore");
    eprintln!(
        "saved: {saved}restore report: {report}; faults served from the image by the first \
         pass: {from_image}"
    );
}
