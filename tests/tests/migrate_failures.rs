//! Migrations that must fail before the switchover, leaving the source guest running and
//! verifying with nothing lost: a destination with another key, a destination that cannot
//! start QEMU, a cancelled migration, and a pre-copy that cannot converge (which with
//! `--postcopy-after` finishes as post-copy instead).

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::time::Duration;

use migration_lab::{dest_path, HostDaemon, MigrationLab, DST_IP};
use qemu_lab::{assert_memverify_passed, wait_for_text};

const RAM_MIB: u64 = 256;

#[test]
fn a_refused_or_failing_destination_leaves_the_source_guest_running() {
    let lab = MigrationLab::up("pwmfail", "800mbit");
    // A second destination daemon with another key, and a third that cannot run QEMU.
    let other_key = lab.dir.path().join("other-psk");
    std::fs::write(&other_key, b"not the key the source holds, 9876543210").unwrap();
    let dirs: Vec<_> = ["wrongkey", "noqemu"]
        .iter()
        .map(|n| {
            let d = lab.dir.path().join(n);
            std::fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();
    let wrong_key = HostDaemon::start_on(
        &lab.lab.ns("dst"),
        "wrongkey",
        &dirs[0],
        &format!("{DST_IP}:7601"),
        &other_key,
        &[],
        &[],
    );
    let no_qemu = HostDaemon::start_on(
        &lab.lab.ns("dst"),
        "noqemu",
        &dirs[1],
        &format!("{DST_IP}:7602"),
        &lab.key,
        &[],
        &[("PATH", "/nonexistent")],
    );
    let mut guest = lab.start_guest(
        "vm1",
        RAM_MIB,
        "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=4 memverify.duration_secs=35",
    );
    wait_for_text(
        &guest.serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut guest.qemu,
    );

    let (ok, report, text) = lab.migrate_to(&format!("{DST_IP}:7601"), "vm1", "postcopy", &[]);
    assert!(!ok, "a destination with another key accepted: {text}");
    assert_eq!(report["status"], "failed", "{report}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("authenticating with the destination"),
        "{report}"
    );
    assert!(
        wrong_key.proc.output().contains("refused migration peer"),
        "the destination did not log the refusal:\n{}",
        wrong_key.proc.output()
    );

    let (ok, report, text) = lab.migrate_to(&format!("{DST_IP}:7602"), "vm1", "precopy", &[]);
    assert!(!ok, "a destination without QEMU accepted: {text}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("the destination aborted") && error.contains("starting qemu-system-x86_64"),
        "{report}"
    );
    // The destination removed what it made for the VM.
    let leftovers: Vec<_> = std::fs::read_dir(&no_qemu.incoming)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert!(
        !dirs[1].join("vm1.swap").exists(),
        "the swap device made for the VM is still there"
    );

    // The guest never stopped: it finishes on the source with every page intact.
    assert!(guest.qemu.running(), "the source QEMU is gone");
    let text = migration_lab::wait_done(&guest.serial, Duration::from_secs(180), || lab.logs());
    assert_memverify_passed(&text);
}

#[test]
fn a_cancelled_or_non_converging_precopy_keeps_the_guest_and_postcopy_after_finishes_it() {
    // 5 MB/s against an 8 MiB hot set rewritten at up to 16 MiB/s, and a 1 ms downtime
    // limit: pre-copy cannot converge however slowly the (TCG) guest runs.
    let lab = MigrationLab::up("pwmconv", "40mbit");
    let mut guest = lab.start_guest(
        "vm1",
        RAM_MIB,
        "memverify.mib=48 memverify.hot_mib=8 memverify.hot_rate_mibs=16 \
         memverify.verify_secs=4 memverify.duration_secs=120",
    );
    wait_for_text(
        &guest.serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut guest.qemu,
    );
    let to = format!("{DST_IP}:{}", migration_lab::PORT);

    // Cancel one while its pre-copy runs.
    let child = lab
        .migrate_command(&to, "vm1", "precopy", &[])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let cancel = migration_lab::in_ns(&lab.lab.ns("src"), &qemu_lab::pagewise_bin())
        .args(["migrate", "--socket"])
        .arg(&lab.src.socket)
        .args(["--vm", "vm1", "--cancel"])
        .output()
        .unwrap();
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let out = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(report["status"], "cancelled", "{report}\n{}", lab.logs());
    assert!(
        guest.qemu.running(),
        "the source QEMU is gone after a cancel"
    );

    // Without --postcopy-after, the rounds end by their cap and the migration fails.
    let (ok, report, _) = lab.migrate("vm1", "precopy", &["--downtime-limit", "1"]);
    assert!(!ok, "{report}");
    assert_eq!(report["status"], "failed", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("did not converge"),
        "{report}"
    );
    assert!(
        guest.qemu.running(),
        "the source QEMU is gone after a failed pre-copy"
    );

    // With it, the same guest moves as post-copy once the time is up.
    let (ok, report, text) = lab.migrate(
        "vm1",
        "precopy",
        &["--downtime-limit", "1", "--postcopy-after", "3"],
    );
    assert!(ok, "{text}\n{}", lab.logs());
    assert_eq!(report["stop_rule"], "time_cap", "{report}");
    // The pages the guest rewrote went after the switchover: sent and then stale, or
    // skipped in the round they were rewritten before their turn.
    let skipped: u64 = report["rounds"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["skipped"].as_u64()).sum())
        .unwrap_or(0);
    assert!(
        report["pages_stale"].as_u64().unwrap() + skipped > 0,
        "{report}"
    );
    assert!(report["pages_pushed"].as_u64().unwrap() > 0, "{report}");
    let serial = dest_path(&report, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&text);
}
