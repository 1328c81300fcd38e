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

fn evict(daemon: &PagerDaemon, goal: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "evict",
        "--vm",
        "ev",
        "--socket",
        daemon.socket.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(goal);
    let out = pagewise_ok(&args);
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
    let guest = guest();
    preload_lib();
    let dir = tempfile::tempdir().unwrap();
    let daemon = PagerDaemon::start(dir.path());
    daemon.create_swapdev("ev", RAM_MIB << 20);
    let mem = ShmFile::new("evict");
    let serial = dir.path().join("serial.log");
    let args = qemu_args(
        guest,
        &mem.0,
        RAM_MIB,
        true,
        "memverify.mib=128 memverify.hot_mib=8 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=5 memverify.duration_secs=30",
        &serial,
    );
    let mut qemu = Proc::spawn(
        "vm-run",
        vm_run_command(&daemon.socket, "ev", &args),
        dir.path(),
    );
    wait_for_text(
        &serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut qemu,
    );
    // A few working-set samples after the fill.
    std::thread::sleep(Duration::from_secs(3));

    let auto = evict(&daemon, &["--auto"]);
    eprintln!("--auto: {auto}");
    // memverify filled 128 MiB (32768 pages) and only rewrites 8 MiB of it.
    assert!(out_pages(&auto) > 16384, "{auto}");
    assert_eq!(auto["progress"]["abandoned"], 0, "{auto}");

    // The next full verification pass (printed when it ends) reads everything back through
    // the pager.
    let next = last_pass(&serial) + 2;
    wait_for_text(
        &serial,
        &format!("memverify: pass {next} "),
        Duration::from_secs(120),
        &mut qemu,
    );
    let target = evict(&daemon, &["--target-rss", "96M"]);
    eprintln!("--target-rss 96M: {target}");
    assert!(
        target["progress"]["resident"].as_u64().unwrap() <= (96 << 20) / 4096 + 64,
        "{target}"
    );

    let stats = daemon.vm_stats("ev").expect("VM ev attached");
    let e = &stats["eviction"];
    eprintln!("eviction stats: {e}");
    assert!(
        e["wss"]["refaults_total"].as_u64().unwrap() > 8192,
        "verification passes did not refault evicted pages: {e}"
    );

    let status = qemu.wait(Duration::from_secs(240));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(status.success(), "{status}\n{}\n{log}", qemu.output());
    assert_memverify_passed(&log);
}
