//! Live migration of an unmodified QEMU guest between the two lab hosts, pagewise moving
//! the RAM and QEMU moving only device state: each mode migrates a memverify guest that
//! keeps rewriting a hot set; the guest must go on verifying on the destination with 0 bad
//! pages, the source QEMU must be gone and the source must hold none of the VM's RAM.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::time::Duration;

use migration_lab::{dest_path, MigrationLab};
use qemu_lab::assert_memverify_passed;

const RAM_MIB: u64 = 256;
const GUEST: &str = "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                     memverify.verify_secs=4 memverify.duration_secs=40";

fn migrate_a_verifying_guest(prefix: &str, mode: &str) -> serde_json::Value {
    migrate_a_verifying_guest_and_back(prefix, mode, None)
}

/// Migrate in `mode`; with `back`, migrate the guest back to the source host in that mode
/// right after (its pages then live in the destination's memory file, its own new swap
/// device and, after agile, the shared device handed over to it).
fn migrate_a_verifying_guest_and_back(
    prefix: &str,
    mode: &str,
    back: Option<&str>,
) -> serde_json::Value {
    let (lab, mut guest) =
        MigrationLab::with_verifying_guest(prefix, "800mbit", mode, RAM_MIB, GUEST, "40M");
    let (ok, report, text) = lab.migrate("vm1", mode, &[]);
    assert!(
        ok,
        "pagewise migrate --mode {mode} failed:\n{text}\n{}",
        lab.logs()
    );
    assert_eq!(report["status"], "completed", "{report}");
    // The guest goes on on the destination and finishes its verification there.
    let mut serial = dest_path(&report, &guest.serial);
    if let Some(back_mode) = back {
        let (ok, back_report, text) = lab.migrate_back("vm1", back_mode);
        assert!(
            ok,
            "migrating back ({back_mode}) failed:\n{text}\n{}",
            lab.logs()
        );
        eprintln!("back ({back_mode}): {back_report}");
        serial = dest_path(&back_report, &serial);
    }
    let text = migration_lab::wait_done(&serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&text);
    // The source QEMU quit and its RAM file is gone.
    let status = guest.qemu.wait(Duration::from_secs(20));
    eprintln!("source QEMU exited: {status}");
    assert!(!guest.mem.0.exists(), "the source RAM file is still there");
    assert!(report["source_released_ms"].as_u64().is_some(), "{report}");
    for line in lab.logs().lines().filter(|l| l.contains("switchover")) {
        eprintln!("{line}");
    }
    eprintln!("{mode}: {report}");
    report
}

#[test]
fn precopy_moves_a_verifying_qemu_guest() {
    let r = migrate_a_verifying_guest("pwmpre", "precopy");
    assert_eq!(r["stop_rule"], "converged", "{r}");
}

#[test]
fn postcopy_moves_a_verifying_qemu_guest() {
    let r = migrate_a_verifying_guest("pwmpost", "postcopy");
    assert!(r["pages_pushed"].as_u64().unwrap() > 0, "{r}");
}

#[test]
fn agile_moves_a_verifying_qemu_guest_leaving_cold_pages_in_the_shared_device_and_back() {
    let r = migrate_a_verifying_guest_and_back("pwmagile", "agile", Some("postcopy"));
    // 96 MiB filled, at most ~40 MiB resident: the rest stayed in the swap device.
    assert!(r["pages_stored"].as_u64().unwrap() > 8192, "{r}");
    assert!(r["ram"]["transferred"].as_u64().unwrap() < 100 << 20, "{r}");
}

#[test]
fn a_postcopy_goes_on_when_its_migrate_client_is_killed() {
    let (lab, guest) =
        MigrationLab::with_verifying_guest("pwmcli", "240mbit", "postcopy", RAM_MIB, GUEST, "");
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let mut client = lab
        .migrate_command(&to, "vm1", "postcopy", &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    migration_lab::wait_status(
        &lab.src.socket,
        "migrating",
        Duration::from_secs(60),
        || lab.logs(),
        |s| s["ram"]["transferred"].as_u64().unwrap_or(0) > 1 << 20,
    );
    // kill -9 of `pagewise migrate` (`ip netns exec` execs it): the migration runs in the
    // daemons, not in the client, and finishes without it.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(client.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = client.wait();
    let done = migration_lab::wait_status(
        &lab.src.socket,
        "completed without its client",
        Duration::from_secs(180),
        || lab.logs(),
        |s| s["status"] == "completed" || s["status"] == "failed",
    );
    assert_eq!(done["status"], "completed", "{done}\n{}", lab.logs());
    let serial = dest_path(&done, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&text);
}
