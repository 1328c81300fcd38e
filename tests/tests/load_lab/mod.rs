//! What the load test measures about one daemon serving several guests: its memory
//! (`/proc/PID/status`), each VM's demand-fault latency over a window (the daemon's own
//! histograms from `pagewise stats --json`), and the eviction loops that make guests fault.
#![allow(dead_code)] // the fields are printed through Debug by some callers only

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pager::metrics::HistogramSnapshot;

use crate::qemu_lab::pagewise_ok;

/// Memory figures of a process, in KiB, from `/proc/PID/status`.
///
/// `rss_anon` is what the daemon itself holds: its heap, stacks, buffers, tables. The guest
/// RAM files are shared memory (/dev/shm files, `share=on`) owned by the guests: the daemon
/// reaches them through file descriptors (pread/pwrite, UFFDIO_COPY into QEMU's mapping) and
/// does not map them, so none of their pages is in its RSS; a page of them it mapped would
/// count in `rss_shmem` (part of `vm_rss`), still not memory it holds (the file keeps it,
/// daemon or not). `rss_file` is the daemon's binary and libraries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcMemory {
    pub vm_rss: u64,
    pub vm_hwm: u64,
    pub rss_anon: u64,
    pub rss_file: u64,
    pub rss_shmem: u64,
}

impl ProcMemory {
    /// Parse the text of `/proc/PID/status`; `None` when a field is missing.
    pub fn parse(status: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let rest = line[name.len()..].trim_start_matches(':').trim();
            rest.strip_suffix("kB")?.trim().parse().ok()
        };
        Some(Self {
            vm_rss: field("VmRSS")?,
            vm_hwm: field("VmHWM")?,
            rss_anon: field("RssAnon")?,
            rss_file: field("RssFile")?,
            rss_shmem: field("RssShmem")?,
        })
    }

    /// The figures of process `pid` now.
    pub fn of(pid: u32) -> Self {
        let path = format!("/proc/{pid}/status");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Self::parse(&text).unwrap_or_else(|| panic!("{path} lacks a memory field:\n{text}"))
    }
}

/// The largest figures seen while sampling (each field its own maximum).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakMemory {
    pub peak: ProcMemory,
    pub samples: u64,
}

impl PeakMemory {
    pub fn sample(&mut self, pid: u32) {
        let m = ProcMemory::of(pid);
        let p = &mut self.peak;
        p.vm_rss = p.vm_rss.max(m.vm_rss);
        p.vm_hwm = p.vm_hwm.max(m.vm_hwm);
        p.rss_anon = p.rss_anon.max(m.rss_anon);
        p.rss_file = p.rss_file.max(m.rss_file);
        p.rss_shmem = p.rss_shmem.max(m.rss_shmem);
        self.samples += 1;
    }
}

/// The pid of the `pagewise` process a spawned command became (`ip netns exec` execs its
/// program in place, so it is the child itself; checked, not assumed).
pub fn pagewise_pid(child_pid: u32) -> u32 {
    let exe = std::fs::read_link(format!("/proc/{child_pid}/exe"))
        .unwrap_or_else(|e| panic!("/proc/{child_pid}/exe: {e}"));
    assert!(
        exe.file_name().is_some_and(|n| n == "pagewise"),
        "process {child_pid} runs {}, not the pagewise daemon",
        exe.display()
    );
    child_pid
}

/// `pagewise stats --json` of the daemon at `socket`: each attached VM's fault-latency
/// histogram, by name.
pub fn fault_histograms(socket: &Path) -> BTreeMap<String, HistogramSnapshot> {
    let out = pagewise_ok(&["stats", "--json", "--socket", socket.to_str().unwrap()]);
    let all: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("pagewise stats --json printed non-JSON ({e}): {out}"));
    let vms = all["vms"]
        .as_array()
        .unwrap_or_else(|| panic!("no vms in {all}"));
    vms.iter()
        .map(|v| {
            let name = v["vm"].as_str().expect("vm name").to_string();
            let h = serde_json::from_value(v["metrics"]["fault_latency"].clone())
                .unwrap_or_else(|e| panic!("fault_latency of {name}: {e}: {v}"));
            (name, h)
        })
        .collect()
}

/// The samples `later` holds beyond `earlier` (a window of the same histogram).
pub fn window(earlier: &HistogramSnapshot, later: &HistogramSnapshot) -> HistogramSnapshot {
    assert_eq!(earlier.buckets.len(), later.buckets.len());
    HistogramSnapshot {
        buckets: later
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(l, e)| {
                assert!(
                    l >= e,
                    "a histogram went backwards: {earlier:?} -> {later:?}"
                );
                l - e
            })
            .collect(),
        sum_ns: later.sum_ns - earlier.sum_ns,
    }
}

/// What one eviction loop did.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvictLoop {
    pub runs: u64,
    /// Pages written out or found zero and dropped, over every run.
    pub pages_out: u64,
    pub abandoned: u64,
}

/// One `pagewise evict --target-rss TARGET --json` of `vm`; its report.
pub fn evict_once(socket: &Path, vm: &str, target: &str) -> serde_json::Value {
    let out = pagewise_ok(&[
        "evict",
        "--socket",
        socket.to_str().unwrap(),
        "--vm",
        vm,
        "--target-rss",
        target,
        "--json",
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("evict --json printed {out:?}: {e}"))
}

/// Evict `vm` to `target` again and again, `pause` between runs (the guest faults its pages
/// back meanwhile), until `stop` is set.
pub fn evict_until(
    socket: &Path,
    vm: &str,
    target: &str,
    pause: Duration,
    stop: &AtomicBool,
) -> EvictLoop {
    let mut done = EvictLoop::default();
    while !stop.load(Ordering::Relaxed) {
        let r = evict_once(socket, vm, target);
        let p = &r["progress"];
        let n = |k: &str| p[k].as_u64().unwrap_or_else(|| panic!("no {k} in {r}"));
        done.runs += 1;
        done.pages_out += n("evicted") + n("zero");
        done.abandoned += n("abandoned");
        let until = Instant::now() + pause;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let text = "Name:\tpagewise\nVmHWM:\t   50000 kB\nVmRSS:\t   40000 kB\n\
                    RssAnon:\t    9000 kB\nRssFile:\t    7000 kB\nRssShmem:\t   24000 kB\n";
        let m = ProcMemory::parse(text).unwrap();
        assert_eq!(
            m,
            ProcMemory {
                vm_rss: 40000,
                vm_hwm: 50000,
                rss_anon: 9000,
                rss_file: 7000,
                rss_shmem: 24000
            }
        );
        assert_eq!(ProcMemory::parse("VmRSS:\t1 kB\n"), None);
    }

    #[test]
    fn a_window_holds_only_the_later_samples() {
        let mut a = HistogramSnapshot {
            buckets: vec![0; 32],
            sum_ns: 0,
        };
        a.buckets[4] = 100;
        a.sum_ns = 100 * 10_000;
        let mut b = a.clone();
        b.buckets[10] = 50; // 50 samples in [512, 1024) µs
        b.sum_ns += 50 * 600_000;
        let w = window(&a, &b);
        assert_eq!(w.count(), 50);
        assert_eq!(w.quantile_us(0.99), Some(1024));
        assert_eq!(b.quantile_us(0.5), Some(16));
    }
}
