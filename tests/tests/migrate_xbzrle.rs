//! Pre-copy of an unmodified QEMU guest with XBZRLE deltas and wire lz4, between the two lab
//! hosts: the guest (memverify rewriting a few words of each hot page, as databases do)
//! must go on verifying on the destination with 0 bad pages, although the destination
//! spoils its copy of every 5th page before applying that page's delta (the test hook
//! `PAGEWISE_TEST_SPOIL_DELTA_EVERY`): those deltas fail their checksum, the destination asks
//! for the pages again, and they come whole.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::time::Duration;

use migration_lab::{dest_path, MigrationLab};
use qemu_lab::assert_memverify_passed;

const RAM_MIB: u64 = 256;
const GUEST: &str = "memverify.mib=96 memverify.hot_mib=24 memverify.hot_rate_mibs=8 \
                     memverify.sparse_words=4 memverify.verify_secs=4 memverify.duration_secs=45";

#[test]
fn xbzrle_precopy_with_spoiled_deltas_moves_a_verifying_guest_with_no_bad_page() {
    let lab = MigrationLab::with_destination_env(
        "pwmxbz",
        "400mbit",
        &[("PAGEWISE_TEST_SPOIL_DELTA_EVERY", "5")],
    );
    let mut guest = lab.start_guest("vm1", RAM_MIB, GUEST);
    qemu_lab::wait_for_text(
        &guest.serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut guest.qemu,
    );
    let (ok, report, text) = lab.migrate(
        "vm1",
        "precopy",
        &["--xbzrle", "--xbzrle-cache", "256M", "--compress"],
    );
    assert!(ok, "pagewise migrate failed:\n{text}\n{}", lab.logs());
    assert_eq!(report["status"], "completed", "{report}");
    let serial = dest_path(&report, &guest.serial);
    let done = migration_lab::wait_done(&serial, Duration::from_secs(240), || lab.logs());
    assert_memverify_passed(&done);
    let x = &report["xbzrle-cache"];
    let deltas = x["pages"].as_u64().unwrap();
    assert!(deltas > 0, "no page went as a delta: {report}");
    assert!(
        x["bytes"].as_u64().unwrap() < deltas * 512,
        "deltas are not small: {report}"
    );
    let resent = report["pages_resent"].as_u64().unwrap();
    assert!(resent > 0, "no spoiled delta was asked for again: {report}");
    assert!(resent <= deltas, "{report}");
    let dest_resent = report["destination"]["pages_resent"].as_u64();
    assert_eq!(dest_resent, Some(resent), "{report}");
    assert!(report["compression"].is_object(), "{report}");
    let _ = guest.qemu.wait(Duration::from_secs(20));
    eprintln!("{report}");
}
