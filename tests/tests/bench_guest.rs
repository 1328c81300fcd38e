//! `pagewise bench guest` in a small configuration (64 MiB verified, 8 MiB hot set, two TCG
//! guests, ~40 s): the bench runs all three phases, the eviction really moves the guest's
//! cold memory to the swap device, the pass after it faults pages back from the device, and
//! memverify finds no bad page (the bench fails otherwise).
//!
//! Run: `cargo test -p pagewise-tests --release --test bench_guest`

mod qemu_lab;

use std::process::Command;
use std::time::Duration;

use qemu_lab::*;

/// The numbers of the table row starting with `label`.
fn row_numbers(out: &str, label: &str) -> Vec<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{out}"));
    line[label.len()..]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn bench_guest_small_run_reports_all_phases_and_refaults_from_the_device() {
    let image = guest();
    let pagewise = pagewise_bin();
    preload_lib();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(&pagewise);
    cmd.args([
        "bench",
        "guest",
        "--mib",
        "64",
        "--hot-mib",
        "8",
        "--verify-secs",
        "4",
        "--duration-secs",
        "10",
        "--ram-mib",
        "256",
        "--evict",
        "16M",
        "--guest-dir",
    ])
    .arg(image.kernel.parent().expect("guest dir"))
    .arg("--dir")
    .arg(dir.path());
    let mut bench = Proc::spawn("bench-guest", cmd, dir.path());
    let status = bench.wait(Duration::from_secs(240));
    let out = bench.output();
    assert!(status.success(), "bench failed ({status}):\n{out}");

    for label in [
        "(a) plain QEMU, no pager",
        "(b) pager, nothing evicted",
        "(c) pager, evicted: first pass after",
    ] {
        let n = row_numbers(&out, label);
        // hot ms, ratio, full ms, ratio (samples "h/f" is not a number)
        assert!(n.len() >= 4, "row {label}: {n:?}\n{out}");
        assert!(
            n[0] > 0.0 && n[2] > 0.0,
            "row {label} has no times: {n:?}\n{out}"
        );
    }
    let a = row_numbers(&out, "(a) plain QEMU, no pager");
    assert_eq!((a[1], a[3]), (1.0, 1.0), "the baseline's ratios\n{out}");

    let evicted: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("eviction (16M): "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no eviction line:\n{out}"));
    assert!(
        evicted > 4096,
        "the guest's cold memory (>48 MiB) was evicted\n{out}"
    );
    let after = row_numbers(&out, "(c) eviction end .. guest done");
    // Pages read back from the device: on demand ("from device") or, with the adaptive
    // default, ahead of the faults ("prefetched").
    assert!(
        after[2] + after[3] > 1000.0,
        "the full pass after the eviction read pages back from the device\n{out}"
    );
}
