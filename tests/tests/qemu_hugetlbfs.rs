//! A QEMU guest (TCG, Linux, memverify) whose RAM is a file on hugetlbfs (2 MiB pages),
//! served by `pagewise serve` from a 2 MiB-page swap device through `pagewise vm run`, with
//! cold huge pages evicted (`pagewise evict`) while memverify keeps verifying every page.
//!
//! The test reserves huge pages (`/proc/sys/vm/nr_hugepages` += what it needs, given back
//! after) and mounts hugetlbfs (`pagesize=2M`) in a temp dir (unmounted after). Needs root.
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_hugetlbfs`

mod qemu_lab;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use qemu_lab::*;

const RAM_MIB: u64 = 256;
const HUGE: u64 = 2 << 20;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

fn read_nr() -> u64 {
    std::fs::read_to_string(NR_HUGEPAGES)
        .unwrap_or_else(|e| panic!("read {NR_HUGEPAGES}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn free_huge() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `need` more 2 MiB pages in the pool while alive.
struct HugePageReservation {
    added: u64,
}

impl HugePageReservation {
    fn new(need: u64) -> Self {
        let before = read_nr();
        std::fs::write(NR_HUGEPAGES, (before + need).to_string())
            .unwrap_or_else(|e| panic!("write {NR_HUGEPAGES} (needs root): {e}"));
        let now = read_nr();
        let added = now.saturating_sub(before);
        let r = Self { added };
        assert!(
            free_huge() >= need,
            "asked for {need} more huge pages, the kernel gave {added} ({} free): memory too \
             fragmented?",
            free_huge()
        );
        r
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        let now = read_nr();
        let _ = std::fs::write(NR_HUGEPAGES, now.saturating_sub(self.added).to_string());
    }
}

/// hugetlbfs mounted (pagesize=2M) on a temp dir while alive.
struct HugetlbfsMount {
    dir: tempfile::TempDir,
}

impl HugetlbfsMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t hugetlbfs failed ({st}); needs root");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for HugetlbfsMount {
    fn drop(&mut self) {
        // Files first (frees their huge pages), then the mount.
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn evict(socket: &Path, goal: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "evict",
        "--vm",
        "hp",
        "--socket",
        socket.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(goal);
    let out = pagewise_ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("evict --json printed {out:?}: {e}"))
}

fn last_pass(serial: &Path) -> u64 {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("memverify: pass ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn hugetlbfs_guest_is_served_from_a_2m_device_and_its_cold_huge_pages_are_evicted() {
    let guest = guest();
    preload_lib();
    // The guest's RAM plus a little for QEMU's rounding.
    let _pool = HugePageReservation::new(RAM_MIB * (1 << 20) / HUGE + 8);
    let mount = HugetlbfsMount::new();
    let dir = tempfile::tempdir().unwrap();
    let daemon = PagerDaemon::start(dir.path());
    let dev = dir.path().join("hp.swap");
    pagewise_ok(&[
        "swapdev",
        "create",
        dev.to_str().unwrap(),
        "--size",
        &(RAM_MIB << 20).to_string(),
        "--page-size",
        &HUGE.to_string(),
    ]);
    let mem = mount.path("hp-ram");
    let serial = dir.path().join("serial.log");
    let args = qemu_args(
        guest,
        &mem,
        RAM_MIB,
        true,
        "memverify.mib=96 memverify.hot_mib=8 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=5 memverify.duration_secs=30",
        &serial,
    );
    let mut qemu = Proc::spawn(
        "vm-run",
        vm_run_command(&daemon.socket, "hp", &args),
        dir.path(),
    );
    wait_for_text(
        &serial,
        "memverify: pass 1 ",
        Duration::from_secs(240),
        &mut qemu,
    );
    std::thread::sleep(Duration::from_secs(3));
    let stats = daemon.vm_stats("hp").expect("VM hp attached");
    eprintln!("stats before eviction: {stats}");

    // Pages the daemon read back from the device for the guest (demand faults and the
    // prefetches around them).
    let read_back = |stats: &serde_json::Value| -> u64 {
        let m = &stats["metrics"];
        m["faults_to_source"].as_u64().unwrap_or(0) + m["pages_prefetched"].as_u64().unwrap_or(0)
    };
    let read_back_before = read_back(&stats);

    // Cold huge pages out: memverify filled 96 MiB (48 huge pages) and rewrites 8 MiB of it.
    let target = evict(&daemon.socket, &["--target-rss", "48M"]);
    eprintln!("--target-rss 48M: {target}");
    let after = daemon.vm_stats("hp").expect("VM hp attached");
    let read_back_meanwhile = read_back(&after).saturating_sub(read_back_before);
    let p = &target["progress"];
    let out = p["evicted"].as_u64().unwrap() + p["zero"].as_u64().unwrap();
    assert!(out >= 24, "too few huge pages evicted: {target}");
    assert_eq!(p["abandoned"], 0, "{target}");
    // The guest keeps faulting its hot set back in while the evictor works (and the pager
    // prefetches around those faults): those pages count against the target, nothing else.
    assert!(
        p["resident"].as_u64().unwrap() * HUGE <= (48 << 20) + (8 + read_back_meanwhile) * HUGE,
        "{target}; read back meanwhile: {read_back_meanwhile}"
    );

    // The next full verification pass reads every page back, through the pager for the
    // evicted ones.
    let next = last_pass(&serial) + 2;
    wait_for_text(
        &serial,
        &format!("memverify: pass {next} "),
        Duration::from_secs(180),
        &mut qemu,
    );
    let stats = daemon.vm_stats("hp").expect("VM hp attached");
    eprintln!("stats after: {stats}");
    let e = &stats["eviction"];
    assert_eq!(e["page_size"], HUGE, "{e}");
    assert!(
        e["wss"]["refaults_total"].as_u64().unwrap() > 0,
        "verification did not bring evicted huge pages back through the pager: {e}"
    );
    let status = qemu.wait(Duration::from_secs(300));
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(status.success(), "{status}\n{}\n{log}", qemu.output());
    assert_memverify_passed(&log);
    drop(daemon);
}
