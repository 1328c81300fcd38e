//! Load (issue 10): one daemon serving four verifying QEMU guests at once in the two-host
//! lab. vma is migrated (post-copy) to the destination daemon, vmb is evicted to a small
//! target again and again, vmc and vmd are evicted to a tiny one again and again so their
//! memverify passes keep faulting pages back from their swap devices. Every guest must end
//! with memverify's own 0-bad-pages report and a kernel that powered off cleanly; no VM
//! that faulted may see a demand-fault p99 >= 10x another's (the daemon's per-VM
//! histograms over the load window); the daemon's anonymous memory (see
//! `load_lab::ProcMemory` for why RssAnon) must stay <= 0.5% of the guests' RAM + 32 MiB.
//!
//! Run: `cargo test --release -p pagewise-tests --test load_four_vms -- --ignored --nocapture`

mod load_lab;
mod migration_lab;
mod qemu_lab;
mod twohost;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use load_lab::{evict_once, evict_until, fault_histograms, pagewise_pid, window, PeakMemory};
use migration_lab::{dest_path, wait_done, MigrationLab, SourceGuest};
use pager::metrics::HistogramSnapshot;
use qemu_lab::{assert_memverify_passed, wait_for_text};

const NAME: &str = "load_four_vms";
const RAM_MIB: u64 = 160;
const VMS: [&str; 4] = ["vma", "vmb", "vmc", "vmd"];
/// Each guest verifies for this long after its fill, then prints its DONE line and powers
/// off: longer than boot skew + the load window.
const GUEST: &str = "memverify.mib=64 memverify.hot_mib=8 memverify.hot_rate_mibs=2 \
                     memverify.verify_secs=2 memverify.duration_secs=200";
/// How long the evictions (and the migration) go on once every guest has verified once.
const LOAD: Duration = Duration::from_secs(90);
/// vma faults under the load this long before it is migrated.
const MIGRATE_AFTER: Duration = Duration::from_secs(20);
/// A VM counts as having faulted with at least this many demand faults in the window.
const MIN_FAULTS: u64 = 200;

/// Kills the destination QEMU of a migrated guest if it is still running at the end (it
/// powers off by itself when memverify is done; this covers a failed test).
struct DestQemu(Option<u32>);

impl Drop for DestQemu {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.starts_with("qemu") {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn p(h: &HistogramSnapshot, q: f64) -> String {
    h.quantile_us(q).map_or("-".into(), |v| format!("<={v}"))
}

/// A guest's console after memverify finished: its own report, and no sign of a dead
/// kernel.
fn assert_guest_ended_well(serial: &std::path::Path, text: &str) {
    assert_memverify_passed(text);
    for bad in ["Kernel panic", "Oops", "general protection", "BUG:"] {
        assert!(
            !text.contains(bad),
            "{bad:?} in {}:\n{text}",
            serial.display()
        );
    }
}

#[test]
#[ignore = "long: tools/run-tests.sh --long"]
fn one_daemon_serves_four_guests_migrating_evicting_and_faulting() {
    let started = Instant::now();
    let lab = MigrationLab::up("pwload", "800mbit");
    let daemon = pagewise_pid(lab.src.proc.child.id());
    let socket = lab.src.socket.clone();
    let mut guests: Vec<SourceGuest> = VMS
        .iter()
        .map(|vm| lab.start_guest(vm, RAM_MIB, GUEST))
        .collect();
    for g in &mut guests {
        wait_for_text(
            &g.serial,
            "memverify: pass 1 ",
            Duration::from_secs(420),
            &mut g.qemu,
        );
    }
    let booted = started.elapsed();
    // vma is evicted once so that it too faults under the load before it moves.
    let before = evict_once(&socket, "vma", "40M");
    eprintln!("{NAME}: vma evicted to 40M before the load: {before}");

    let stop = AtomicBool::new(false);
    let start_hist = fault_histograms(&socket);
    let mut peak = PeakMemory::default();
    let mut last_seen: BTreeMap<String, HistogramSnapshot> = start_hist.clone();
    let load_start = Instant::now();
    let (loops, migration) = std::thread::scope(|s| {
        let evictors: Vec<_> = [("vmb", "48M"), ("vmc", "16M"), ("vmd", "16M")]
            .into_iter()
            .map(|(vm, target)| {
                let (socket, stop) = (&socket, &stop);
                s.spawn(move || {
                    (
                        vm,
                        evict_until(socket, vm, target, Duration::from_secs(2), stop),
                    )
                })
            })
            .collect();
        let migrator = s.spawn(|| {
            std::thread::sleep(MIGRATE_AFTER);
            lab.migrate("vma", "postcopy", &[])
        });
        while load_start.elapsed() < LOAD {
            peak.sample(daemon);
            // The last histograms of every VM still attached (vma's until it leaves).
            last_seen.extend(fault_histograms(&socket));
            std::thread::sleep(Duration::from_millis(500));
        }
        stop.store(true, Ordering::Relaxed);
        let loops: Vec<_> = evictors.into_iter().map(|h| h.join().unwrap()).collect();
        (loops, migrator.join().unwrap())
    });
    peak.sample(daemon);
    last_seen.extend(fault_histograms(&socket));
    let load_time = load_start.elapsed();

    let (ok, report, text) = migration;
    assert!(ok, "migrating vma failed:\n{text}\n{}", lab.logs());
    assert_eq!(report["status"], "completed", "{report}");
    let _dest_qemu = DestQemu(report["destination"]["qemu_pid"].as_u64().map(|p| p as u32));
    for (vm, l) in &loops {
        eprintln!("{NAME}: {vm}: {l:?}");
        assert!(
            l.runs >= 3 && l.pages_out > 0,
            "{vm} was hardly evicted: {l:?}"
        );
    }

    // Every guest finishes verifying (vma on the destination host) and powers off.
    let vma_serial = dest_path(&report, &guests[0].serial);
    let text = wait_done(&vma_serial, Duration::from_secs(400), || lab.logs());
    assert_guest_ended_well(&vma_serial, &text);
    for g in &mut guests[1..] {
        let status = g.qemu.wait(Duration::from_secs(400));
        let text = std::fs::read_to_string(&g.serial).unwrap_or_default();
        assert!(status.success(), "{status}: {}\n{text}", g.qemu.output());
        assert_guest_ended_well(&g.serial, &text);
    }

    // The figures.
    let windows: BTreeMap<&str, HistogramSnapshot> = VMS
        .iter()
        .map(|vm| (*vm, window(&start_hist[*vm], &last_seen[*vm])))
        .collect();
    let total_ram_kib = VMS.len() as u64 * RAM_MIB * 1024;
    let limit_kib = total_ram_kib / 200 + 32 * 1024;
    let m = peak.peak;
    eprintln!(
        "{NAME}: 4 guests x {RAM_MIB} MiB ({} MiB), booted in {:.0} s, load window {:.0} s, \
         whole test {:.0} s",
        total_ram_kib / 1024,
        booted.as_secs_f64(),
        load_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    eprintln!("{NAME}: | vm | role | faults in window | p50 us | p99 us | mean us |");
    let roles = [
        "migrated (post-copy)",
        "evicted to 48M",
        "faulting (16M)",
        "faulting (16M)",
    ];
    for (vm, role) in VMS.iter().zip(roles) {
        let w = &windows[vm];
        eprintln!(
            "{NAME}: | {vm} | {role} | {} | {} | {} | {:.0} |",
            w.count(),
            p(w, 0.5),
            p(w, 0.99),
            w.mean_us().unwrap_or(0.0)
        );
    }
    let d = &report["destination"];
    eprintln!(
        "{NAME}: | vma on the destination | remote faults | {} | <={} | <={} | - |",
        d["demand_faults"], d["fault_latency_p50_us"], d["fault_latency_p99_us"]
    );
    eprintln!(
        "{NAME}: daemon peak over {} samples: RssAnon {} KiB (limit {limit_kib} KiB = 0.5% of \
         {} MiB + 32 MiB), VmRSS {} KiB, VmHWM {} KiB, RssFile {} KiB, RssShmem {} KiB \
         (guest RAM mapped by it)",
        peak.samples,
        m.rss_anon,
        total_ram_kib / 1024,
        m.vm_rss,
        m.vm_hwm,
        m.rss_file,
        m.rss_shmem
    );
    eprintln!(
        "{NAME}: migration of vma: {} ms, downtime {} ms",
        report["total-time"], report["downtime"]
    );

    // No starvation among the VMs that faulted; the three the test made fault did.
    let faulted: Vec<(&str, u64)> = windows
        .iter()
        .filter(|(_, w)| w.count() >= MIN_FAULTS)
        .map(|(vm, w)| (*vm, w.quantile_us(0.99).unwrap()))
        .collect();
    for vm in ["vmb", "vmc", "vmd"] {
        assert!(
            faulted.iter().any(|(v, _)| *v == vm),
            "{vm} faulted fewer than {MIN_FAULTS} times in the window: {:?}",
            windows[vm]
        );
    }
    let (lo, hi) = (
        faulted.iter().min_by_key(|f| f.1).unwrap(),
        faulted.iter().max_by_key(|f| f.1).unwrap(),
    );
    assert!(
        hi.1 < 10 * lo.1,
        "starvation: {} p99 <= {} us vs {} p99 <= {} us ({faulted:?})",
        hi.0,
        hi.1,
        lo.0,
        lo.1
    );
    assert!(
        m.rss_anon <= limit_kib,
        "the daemon held {} KiB of anonymous memory, over {limit_kib} KiB",
        m.rss_anon
    );
}
