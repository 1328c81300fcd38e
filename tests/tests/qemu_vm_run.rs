//! `pagewise vm run`: command-line checks and starting QEMU under the preload library
//! (served here by the in-test zero-page pager; the daemon runs are in `qemu_pager.rs`).
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_vm_run`

mod qemu_lab;

use std::process::Command;
use std::time::Duration;

use qemu_lab::zero_pager::ZeroPager;
use qemu_lab::*;

fn vm_run(socket: &std::path::Path, extra: &[&str], qemu: &[String]) -> Command {
    let mut cmd = Command::new(pagewise_bin());
    cmd.args(["vm", "run", "--socket"])
        .arg(socket)
        .args(extra)
        .arg("--")
        .arg("qemu-system-x86_64")
        .args(qemu)
        .env_remove("PAGEWISE_PRELOAD")
        .env_remove("PAGEWISE_SOCKET");
    cmd
}

#[test]
fn vm_run_refuses_commands_without_shared_file_ram() {
    let guest = guest();
    preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let pager = ZeroPager::start(&dir.path().join("pager.sock"), None);
    let serial = dir.path().join("serial.log");

    let mem = ShmFile::new("vmrun-private");
    let args = qemu_args(guest, &mem.0, 256, false, "", &serial);
    let mut run = Proc::spawn(
        "vm-run-share-off",
        vm_run(&pager.socket, &[], &args),
        dir.path(),
    );
    let status = run.wait(Duration::from_secs(20));
    assert!(!status.success());
    let err = run.output();
    assert!(err.contains("share=on missing"), "{err}");
    assert!(!mem.0.exists(), "QEMU was started");

    // No memory backend at all: anonymous guest RAM.
    let plain: Vec<String> = ["-accel", "tcg", "-m", "256M", "-display", "none", "-kernel"]
        .iter()
        .map(|s| s.to_string())
        .chain([guest.kernel.display().to_string()])
        .collect();
    let mut run = Proc::spawn(
        "vm-run-anon",
        vm_run(&pager.socket, &[], &plain),
        dir.path(),
    );
    let status = run.wait(Duration::from_secs(20));
    assert!(!status.success());
    let err = run.output();
    assert!(
        err.contains("-object memory-backend-file ... share=on missing: the pager can only serve guest RAM mapped from a shared file"),
        "{err}"
    );
    assert_eq!(
        pager.requests.lock().unwrap().len(),
        0,
        "nothing may attach"
    );
}

#[test]
fn vm_run_starts_qemu_under_the_pager() {
    let guest = guest();
    preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let pager = ZeroPager::start(&dir.path().join("pager.sock"), None);
    let serial = dir.path().join("serial.log");

    // The pager answers with another swap device than the operator asked for: QEMU stops.
    let mem = ShmFile::new("vmrun-swapdev");
    let args = qemu_args(guest, &mem.0, 256, true, "", &serial);
    let cmd = vm_run(&pager.socket, &["--swapdev", "/nonexistent/vm.swap"], &args);
    let mut run = Proc::spawn("vm-run-wrong-swapdev", cmd, dir.path());
    let status = run.wait(Duration::from_secs(30));
    assert!(!status.success());
    let err = run.output();
    assert!(err.contains("not /nonexistent/vm.swap"), "{err}");
    drop(mem);

    let mem = ShmFile::new("vmrun-boot");
    let args = qemu_args(
        guest,
        &mem.0,
        256,
        true,
        "memverify.mib=64 memverify.hot_mib=8 memverify.verify_secs=2 memverify.duration_secs=4",
        &serial,
    );
    let cmd = vm_run(&pager.socket, &["--name", "vmrun-test"], &args);
    let mut run = Proc::spawn("vm-run", cmd, dir.path());
    let status = run.wait(Duration::from_secs(120));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(status.success(), "{status}\n{}\n{log}", run.output());
    assert_memverify_passed(&log);
    let requests = pager.requests.lock().unwrap().clone();
    let last = requests.last().expect("an attach");
    assert_eq!(last.vm, "vmrun-test");
    assert_eq!(last.regions[0].size, 256 << 20);
    let errors = pager.counters.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "{errors:?}");
}

#[test]
fn vm_run_dry_run_shows_the_environment_it_sets() {
    let guest = guest();
    let lib = preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let mem = ShmFile::new("vmrun-dry");
    let serial = dir.path().join("serial.log");
    let args = qemu_args(guest, &mem.0, 256, true, "", &serial);
    let socket = dir.path().join("pager.sock");
    let out = vm_run(
        &socket,
        &[
            "--dry-run",
            "--swapdev",
            "/srv/vm.swap",
            "--modes",
            "missing",
        ],
        &args,
    )
    .env("LD_PRELOAD", "/opt/other.so")
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let expect = [
        format!("LD_PRELOAD={}:/opt/other.so", lib.display()),
        format!("PAGEWISE_MEM_PATH={}", mem.0.display()),
        format!("PAGEWISE_SOCKET={}", socket.display()),
        format!(
            "PAGEWISE_VM={}",
            mem.0.file_name().unwrap().to_string_lossy()
        ),
        "PAGEWISE_MODES=missing".to_string(),
        "PAGEWISE_SWAPDEV=/srv/vm.swap".to_string(),
    ];
    for line in expect {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in:\n{text}"
        );
    }
    assert!(text.contains("qemu-system-x86_64 -accel tcg"), "{text}");
    assert!(!mem.0.exists(), "a dry run must not start QEMU");
}
