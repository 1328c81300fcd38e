//! Long suite (`tools/run-tests.sh --long`): one verifying QEMU guest per mode migrated 20
//! times in a row between the two lab hosts, there and back, each hop in that mode. After
//! every hop the guest must go on verifying on the host it reached (a new memverify pass,
//! every pass with 0 bad pages, no kernel panic), and the host it left must hold none of its
//! RAM. Issue 8: "20 migrations per mode in a row: 0 bad pages, 0 guest crashes".

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use migration_lab::{dest_path, MigrationLab};

const RAM_MIB: u64 = 256;
const HOPS: usize = 20;
/// `duration_secs=0`: memverify verifies until the guest is stopped.
const GUEST: &str = "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                     memverify.verify_secs=2 memverify.duration_secs=0";

/// The memverify pass lines in the console log `serial`.
fn passes(serial: &Path) -> Vec<String> {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("memverify: pass "))
        .map(str::to_string)
        .collect()
}

/// Wait for a memverify pass on the host the guest reached; every pass there must be clean.
fn assert_verifies(serial: &Path, hop: usize, logs: impl Fn() -> String) {
    let start = Instant::now();
    while passes(serial).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hop {hop}: no memverify pass in {} after the migration:\n{}\n{}",
            serial.display(),
            std::fs::read_to_string(serial).unwrap_or_default(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(serial).unwrap_or_default();
    for bad in ["BAD ", "Kernel panic", "Oops", "general protection"] {
        assert!(
            !text.contains(bad),
            "hop {hop}: {bad:?} in the guest's console:\n{text}"
        );
    }
    for line in passes(serial) {
        assert!(line.contains(" bad=0 "), "hop {hop}: {line}");
    }
}

fn migrate_in_a_row(prefix: &str, mode: &str) {
    let (lab, mut guest) =
        MigrationLab::with_verifying_guest(prefix, "800mbit", mode, RAM_MIB, GUEST, "40M");
    let mut serial: PathBuf = guest.serial.clone();
    let mut totals = Vec::new();
    for hop in 1..=HOPS {
        let (ok, report, text) = if hop % 2 == 1 {
            lab.migrate("vm1", mode, &[])
        } else {
            lab.migrate_back("vm1", mode)
        };
        assert!(ok, "hop {hop} ({mode}) failed:\n{text}\n{}", lab.logs());
        assert_eq!(report["status"], "completed", "hop {hop}: {report}");
        assert!(
            report["source_released_ms"].as_u64().is_some(),
            "hop {hop}: {report}"
        );
        serial = dest_path(&report, &serial);
        assert_verifies(&serial, hop, || lab.logs());
        totals.push(report["total-time"].as_u64().unwrap_or(0));
        eprintln!(
            "{mode} hop {hop}: {} ms, downtime {} ms, {} bytes",
            report["total-time"], report["downtime"], report["ram"]["transferred"]
        );
    }
    // The first source QEMU quit after the first hop.
    let status = guest.qemu.wait(Duration::from_secs(20));
    eprintln!("{mode}: {HOPS} hops, total-time ms {totals:?}; first QEMU {status}");
}

#[test]
#[ignore = "long: tools/run-tests.sh --long"]
fn precopy_twenty_times_in_a_row() {
    migrate_in_a_row("pwrpre", "precopy");
}

#[test]
#[ignore = "long: tools/run-tests.sh --long"]
fn postcopy_twenty_times_in_a_row() {
    migrate_in_a_row("pwrpost", "postcopy");
}

#[test]
#[ignore = "long: tools/run-tests.sh --long"]
fn agile_twenty_times_in_a_row() {
    migrate_in_a_row("pwragile", "agile");
}
