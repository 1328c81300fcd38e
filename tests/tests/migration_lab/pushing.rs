//! The start both restart tests share (a daemon killed after the switchover): a verifying
//! guest migrating on a slow link, caught while the source pushes.

use std::process::{Child, Stdio};
use std::time::Duration;

use super::{wait_status, MigrationLab, SourceGuest, DST_IP, PORT};

/// The guest: 96 MiB verified, a 16 MiB hot set rewritten at 4 MiB/s, for 150 s.
pub const GUEST: &str = "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                         memverify.verify_secs=4 memverify.duration_secs=150";

/// A 256 MiB verifying guest ([`GUEST`]; evicted to 64M first unless `mode` is agile, whose
/// lab evicts it) migrating to the destination in `mode` over 20 Mbit/s, `pagewise migrate`
/// running (its output dropped); returns once the source pushed more than `pushed` pages,
/// with the source's status then.
pub fn pushing(
    prefix: &str,
    mode: &str,
    pushed: u64,
) -> (MigrationLab, SourceGuest, Child, serde_json::Value) {
    let (lab, guest) =
        MigrationLab::with_verifying_guest(prefix, "20mbit", mode, 256, GUEST, "64M");
    if mode != "agile" {
        eprintln!("evicted before the migration: {}", lab.evict("vm1", "64M"));
    }
    let to = format!("{DST_IP}:{PORT}");
    let migrate = lab
        .migrate_command(&to, "vm1", mode, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    let status = wait_status(
        &lab.src.socket,
        "pushing",
        Duration::from_secs(120),
        || lab.logs(),
        |s| s["status"] == "postcopy-active" && s["pages_pushed"].as_u64().unwrap_or(0) > pushed,
    );
    (lab, guest, migrate, status)
}
