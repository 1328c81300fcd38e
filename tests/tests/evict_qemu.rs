//! Eviction of a running, unmodified QEMU guest (TCG, Linux, memverify workload) served by
//! `pagewise serve` through `pagewise vm run` (MISSING|WP on the shared RAM file): evict with
//! `--auto` and `--target-rss` while memverify keeps rewriting its hot set and verifying every
//! page; memverify must finish with no bad page, and the evicted pages must have come back
//! through the fault loop (refaults counted by the working-set tracker).
//!
//! Run: `cargo test -p pagewise-tests --release --test evict_qemu`

mod qemu_lab;

use std::time::Duration;

use qemu_lab::*;

const RAM_MIB: u64 = 512;

fn evict(vm: &DaemonVm, goal: &[&str]) -> serde_json::Value {
    let out = vm.evict(&[goal, &["--json"]].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("evict --json printed {out:?}: {e}"))
}

/// The number of the last memverify pass printed so far.
fn last_pass(serial: &std::path::Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("memverify: pass ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn out_pages(report: &serde_json::Value) -> u64 {
    report["progress"]["evicted"].as_u64().unwrap() + report["progress"]["zero"].as_u64().unwrap()
}

#[test]
fn qemu_guest_keeps_verifying_while_its_cold_memory_is_evicted() {
    let mut vm = start_under_daemon(
        "ev",
        RAM_MIB,
        "memverify.mib=128 memverify.hot_mib=8 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=5 memverify.duration_secs=30",
        &[],
    );
    vm.guest
        .wait_for("memverify: pass 1 ", Duration::from_secs(180));
    // A few working-set samples after the fill.
    std::thread::sleep(Duration::from_secs(3));

    let auto = evict(&vm, &["--auto"]);
    eprintln!("--auto: {auto}");
    // memverify filled 128 MiB (32768 pages) and only rewrites 8 MiB of it.
    assert!(out_pages(&auto) > 16384, "{auto}");
    assert_eq!(auto["progress"]["abandoned"], 0, "{auto}");

    // The next full verification pass (printed when it ends) reads everything back through
    // the pager.
    let next = last_pass(&vm.guest.serial) + 2;
    vm.guest.wait_for(
        &format!("memverify: pass {next} "),
        Duration::from_secs(120),
    );
    // Pages the daemon read back from the device for the guest: its demand faults and the
    // prefetches around them (the counters move at once; the working-set refault figure
    // only at the next sample).
    let refaults = |stats: serde_json::Value| -> u64 {
        let m = &stats["metrics"];
        m["faults_to_source"].as_u64().unwrap_or(0) + m["pages_prefetched"].as_u64().unwrap_or(0)
    };
    let refaults_before = refaults(vm.stats());
    let target = evict(&vm, &["--target-rss", "96M"]);
    let refaulted = refaults(vm.stats()).saturating_sub(refaults_before);
    eprintln!("--target-rss 96M: {target}; refaulted meanwhile: {refaulted}");
    // The guest's verify passes keep reading while the eviction runs, and demand faults no
    // longer wait behind the evictor: pages it pulls back during the run count against the
    // target, nothing else may.
    assert!(
        target["progress"]["resident"].as_u64().unwrap() <= (96 << 20) / 4096 + 64 + refaulted,
        "{target}"
    );

    let stats = vm.stats();
    let e = &stats["eviction"];
    eprintln!("eviction stats: {e}");
    assert!(
        e["wss"]["refaults_total"].as_u64().unwrap() > 8192,
        "verification passes did not refault evicted pages: {e}"
    );

    vm.guest.finish(Duration::from_secs(240));
}
