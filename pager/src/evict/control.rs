//! Control-socket commands of eviction and working-set tracking.
//!
//! - `{"cmd":"evict","vm":N, GOAL, "batch_pages":n?}` with exactly one GOAL:
//!   `"target_rss_bytes":B` | `"cold_for_secs":S` | `"auto":true` (optional
//!   `"margin_percent"`, `"min_margin_pages"`). Starts the eviction in the background and
//!   answers `{"started":true,...}`; an eviction already running is an error.
//! - `{"cmd":"evict_status","vm":N}`: `{"running", "progress", "report", "error",
//!   "elapsed_ms"}` of the current or last eviction.
//! - `{"cmd":"evict_cancel","vm":N}`: ask the running eviction to stop after its batch.
//! - `{"cmd":"wss","vm":N|null}`: page counts, working-set estimate, refault rate, history
//!   (tracking starts for the VM on its first eviction command, or here).
//! - `stats` is wrapped: each VM object gains an `"eviction"` object for VMs with tracking.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};

use super::service::{EvictConfig, VmEviction};
use super::store::SwapdevStore;
use super::{EvictGoal, EvictProgress, EvictReport, PageStore};
use crate::server::control::{all_stats, require_vm, vm_field, CommandRegistry};
use crate::server::Daemon;
use crate::vm::Vm;

#[derive(Default)]
struct Job {
    running: bool,
    started: Option<Instant>,
    finished_ms: Option<u64>,
    goal: Option<EvictGoal>,
    progress: EvictProgress,
    report: Option<EvictReport>,
    error: Option<String>,
    cancel: Arc<AtomicBool>,
}

struct Entry {
    svc: Arc<VmEviction>,
    job: Arc<Mutex<Job>>,
}

/// Per-VM eviction services of one daemon, created on first use.
pub struct EvictRegistry {
    config: EvictConfig,
    vms: Mutex<HashMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EvictRegistry {
    pub fn new(config: EvictConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The VM's store: its swap device.
    fn store_for(vm: &Vm) -> Result<Arc<dyn PageStore>, String> {
        match &vm.swapdev {
            Some(dev) => Ok(Arc::new(SwapdevStore::new(dev.clone()))),
            None => Err(format!(
                "VM {:?} is served from {}, not a swap device; eviction stores pages in the \
                 VM's swap device",
                vm.name, vm.source_description
            )),
        }
    }

    /// The service of `vm`, created (and its sampler started) if needed. An entry for an
    /// older VM of the same name (detached, re-attached) is replaced.
    fn entry(&self, vm: Arc<Vm>) -> Result<(Arc<VmEviction>, Arc<Mutex<Job>>), String> {
        let mut vms = lock(&self.vms);
        if let Some(e) = vms.get(&vm.name) {
            if Arc::ptr_eq(e.svc.vm(), &vm) {
                return Ok((e.svc.clone(), e.job.clone()));
            }
        }
        let store = Self::store_for(&vm)?;
        let svc =
            Arc::new(VmEviction::new(vm.clone(), store, self.config).map_err(|e| e.to_string())?);
        svc.start_sampler()
            .map_err(|e| format!("starting the working-set sampler: {e}"))?;
        let job = Arc::new(Mutex::new(Job::default()));
        vms.insert(
            vm.name.clone(),
            Entry {
                svc: svc.clone(),
                job: job.clone(),
            },
        );
        Ok((svc, job))
    }

    /// Drop services of VMs no longer attached (their sampler threads stop).
    fn prune(&self, daemon: &Daemon) {
        lock(&self.vms).retain(|name, e| {
            daemon
                .vm(name)
                .is_some_and(|vm| Arc::ptr_eq(&vm, e.svc.vm()))
        });
    }

    fn existing(&self, name: &str) -> Option<(Arc<VmEviction>, Arc<Mutex<Job>>)> {
        lock(&self.vms)
            .get(name)
            .map(|e| (e.svc.clone(), e.job.clone()))
    }
}

fn u64_field(req: &Value, key: &str) -> Result<Option<u64>, String> {
    match req.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("\"{key}\" must be a non-negative integer, got {v}")),
    }
}

/// The goal a request names (exactly one of the goal fields).
pub fn parse_goal(req: &Value, page_size: u64) -> Result<EvictGoal, String> {
    let mut goals = Vec::new();
    if let Some(b) = u64_field(req, "target_rss_bytes")? {
        goals.push(EvictGoal::TargetResidentPages(b / page_size.max(1)));
    }
    match req.get("cold_for_secs") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let s = v
                .as_f64()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    format!("\"cold_for_secs\" must be a non-negative number, got {v}")
                })?;
            goals.push(EvictGoal::ColdForMs((s * 1000.0) as u64));
        }
    }
    match req.get("auto") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            let EvictGoal::Auto {
                margin_percent,
                min_margin_pages,
            } = EvictGoal::auto()
            else {
                unreachable!("EvictGoal::auto() is Auto")
            };
            let margin_percent = match u64_field(req, "margin_percent")? {
                Some(m) => u32::try_from(m).map_err(|_| format!("margin_percent {m} too large"))?,
                None => margin_percent,
            };
            goals.push(EvictGoal::Auto {
                margin_percent,
                min_margin_pages: u64_field(req, "min_margin_pages")?.unwrap_or(min_margin_pages),
            });
        }
        Some(v) => return Err(format!("\"auto\" must be true or false, got {v}")),
    }
    match goals.len() {
        1 => Ok(goals[0]),
        0 => {
            Err("evict needs one goal: \"target_rss_bytes\", \"cold_for_secs\" or \"auto\"".into())
        }
        _ => Err(
            "evict takes exactly one goal: \"target_rss_bytes\", \"cold_for_secs\" or \"auto\""
                .into(),
        ),
    }
}

fn status(job: &Job) -> Value {
    json!({
        "running": job.running,
        "goal": job.goal,
        "progress": job.progress,
        "report": job.report,
        "error": job.error,
        "elapsed_ms": job.finished_ms.or_else(|| job.started.map(|t| t.elapsed().as_millis() as u64)),
    })
}

fn start_eviction(reg: &EvictRegistry, daemon: &Daemon, req: &Value) -> Result<Value, String> {
    reg.prune(daemon);
    let vm = require_vm(daemon, req)?;
    let goal = parse_goal(req, vm.page_size())?;
    let batch = u64_field(req, "batch_pages")?.map(|b| b.clamp(1, 65536) as usize);
    let (svc, job) = reg.entry(vm.clone())?;
    let cancel = {
        let mut j = lock(&job);
        if j.running {
            return Err(format!(
                "an eviction of VM {:?} is already running ({} of {} pages done)",
                vm.name, j.progress.done, j.progress.planned
            ));
        }
        *j = Job {
            running: true,
            started: Some(Instant::now()),
            goal: Some(goal),
            ..Job::default()
        };
        j.cancel.clone()
    };
    let job2 = job.clone();
    std::thread::Builder::new()
        .name("pw-evict".into())
        .spawn(move || {
            let result = svc.evict(goal, batch, &cancel, &mut |p| lock(&job2).progress = *p);
            let mut j = lock(&job2);
            j.running = false;
            j.finished_ms = j.started.map(|t| t.elapsed().as_millis() as u64);
            match result {
                Ok(r) => {
                    j.progress = r.progress;
                    j.report = Some(r);
                }
                Err(e) => j.error = Some(e.to_string()),
            }
        })
        .map_err(|e| {
            lock(&job).running = false;
            format!("starting the eviction thread: {e}")
        })?;
    Ok(json!({"started": true, "vm": vm.name, "goal": goal}))
}

fn job_of(reg: &EvictRegistry, daemon: &Daemon, req: &Value) -> Result<Arc<Mutex<Job>>, String> {
    let vm = require_vm(daemon, req)?;
    reg.existing(&vm.name)
        .filter(|(svc, _)| Arc::ptr_eq(svc.vm(), &vm))
        .map(|(_, job)| job)
        .ok_or_else(|| format!("no eviction has run for VM {:?}", vm.name))
}

fn wss(reg: &EvictRegistry, daemon: &Daemon, req: &Value) -> Result<Value, String> {
    reg.prune(daemon);
    match vm_field(req)? {
        Some(_) => {
            let vm = require_vm(daemon, req)?;
            let name = vm.name.clone();
            let (svc, _) = reg.entry(vm)?;
            Ok(json!({ "vms": [ { "vm": name, "eviction": svc.stats() } ] }))
        }
        None => {
            let vms: Vec<Value> = lock(&reg.vms)
                .iter()
                .map(|(name, e)| json!({"vm": name, "eviction": e.svc.stats()}))
                .collect();
            Ok(json!({ "vms": vms }))
        }
    }
}

/// `stats` plus an `"eviction"` object per VM that has eviction/tracking running.
fn stats_with_eviction(reg: &EvictRegistry, daemon: &Daemon, req: &Value) -> Result<Value, String> {
    reg.prune(daemon);
    let mut stats = all_stats(daemon, vm_field(req)?)?;
    if let Some(vms) = stats.get_mut("vms").and_then(Value::as_array_mut) {
        for v in vms {
            let Some(name) = v.get("vm").and_then(Value::as_str).map(str::to_string) else {
                continue;
            };
            let current = daemon.vm(&name);
            if let Some((svc, _)) = reg
                .existing(&name)
                .filter(|(s, _)| current.as_ref().is_some_and(|vm| Arc::ptr_eq(s.vm(), vm)))
            {
                v["eviction"] = json!(svc.stats());
            }
        }
    }
    Ok(stats)
}

/// Register the commands and start tracking every attached VM that can be evicted (memory
/// file, WP registration, swap device) as soon as it attaches, so `--cold-for` and `--auto`
/// have history. The watcher thread ends when the daemon shuts down.
pub fn start(daemon: &Arc<Daemon>, config: EvictConfig) -> std::io::Result<Arc<EvictRegistry>> {
    let reg = register(daemon.commands(), config);
    let (d, r) = (daemon.clone(), reg.clone());
    std::thread::Builder::new()
        .name("pw-evict-watch".into())
        .spawn(move || watch_attachments(&d, &r))?;
    Ok(reg)
}

fn watch_attachments(daemon: &Daemon, reg: &EvictRegistry) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // VMs that cannot be tracked, so they are not retried (and logged) every round.
    let mut skipped: Vec<std::sync::Weak<Vm>> = Vec::new();
    loop {
        let mut fds = [PollFd::new(daemon.stop_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(0) | Err(nix::Error::EINTR) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(%e, "eviction watcher: poll failed; VMs are tracked on demand");
                return;
            }
        }
        reg.prune(daemon);
        skipped.retain(|w| w.strong_count() > 0);
        for vm in daemon.vms() {
            let known = reg
                .existing(&vm.name)
                .is_some_and(|(svc, _)| Arc::ptr_eq(svc.vm(), &vm));
            let skip = skipped
                .iter()
                .any(|w| w.upgrade().is_some_and(|s| Arc::ptr_eq(&s, &vm)));
            if known || skip {
                continue;
            }
            match reg.entry(vm.clone()) {
                Ok(_) => tracing::info!(vm = %vm.name, "working-set tracking started"),
                Err(why) => {
                    tracing::info!(vm = %vm.name, %why, "VM not tracked (eviction unavailable)");
                    skipped.push(Arc::downgrade(&vm));
                }
            }
        }
    }
}

/// Register `evict`, `evict_status`, `evict_cancel`, `wss` and the extended `stats`.
pub fn register(commands: &CommandRegistry, config: EvictConfig) -> Arc<EvictRegistry> {
    let reg = EvictRegistry::new(config);
    let r = reg.clone();
    commands.register("evict", move |d, req| start_eviction(&r, d, req));
    let r = reg.clone();
    commands.register("evict_status", move |d, req| {
        let job = job_of(&r, d, req)?;
        let j = lock(&job);
        Ok(status(&j))
    });
    let r = reg.clone();
    commands.register("evict_cancel", move |d, req| {
        let job = job_of(&r, d, req)?;
        let j = lock(&job);
        j.cancel.store(true, Ordering::Relaxed);
        Ok(json!({"cancelling": j.running}))
    });
    let r = reg.clone();
    commands.register("wss", move |d, req| wss(&r, d, req));
    let r = reg.clone();
    commands.register("stats", move |d, req| stats_with_eviction(&r, d, req));
    reg
}

/// Human lines for the `"eviction"` object of a VM's stats (used by `pagewise stats`).
pub fn render_eviction(e: &Value) -> String {
    let u = |k: &str| e.get(k).and_then(Value::as_u64).unwrap_or(0);
    let ps = u("page_size").max(1);
    let mib = |pages: u64| (pages * ps) as f64 / (1u64 << 20) as f64;
    let w = e.get("wss").cloned().unwrap_or(Value::Null);
    let wu = |k: &str| w.get(k).and_then(Value::as_u64).unwrap_or(0);
    let wss = w
        .get("wss_pages")
        .and_then(Value::as_u64)
        .map_or("- (no sample yet)".to_string(), |p| {
            format!("{p} pages ({:.1} MiB)", mib(p))
        });
    let mut out = format!(
        "  memory: resident {} ({:.1} MiB), evicted {} ({:.1} MiB), zero {}, removed {}, \
         missing {}\n",
        u("resident_pages"),
        mib(u("resident_pages")),
        u("evicted_pages"),
        mib(u("evicted_pages")),
        u("zero_pages"),
        u("removed_pages"),
        u("missing_pages"),
    );
    out.push_str(&format!(
        "  working set: {wss} over {} intervals; refaults {:.1}/s ({} total); {} pages evicted \
         in all; tracking {} for {:.1} s\n",
        wu("window_intervals"),
        w.get("refault_rate_per_s")
            .and_then(Value::as_f64)
            .unwrap_or(0.0),
        wu("refaults_total"),
        wu("evictions_total"),
        if e.get("sampler_running").and_then(Value::as_bool) == Some(true) {
            "running"
        } else {
            "stopped"
        },
        wu("tracking_for_ms") as f64 / 1000.0,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eviction_stats_render() {
        let e = json!({"resident_pages": 256, "evicted_pages": 512, "zero_pages": 3,
            "removed_pages": 0, "missing_pages": 1, "page_size": 4096, "sampler_running": true,
            "wss": {"wss_pages": 128, "window_intervals": 4, "refault_rate_per_s": 2.5,
                "refaults_total": 10, "evictions_total": 600, "tracking_for_ms": 12000}});
        let text = render_eviction(&e);
        assert!(
            text.contains("resident 256 (1.0 MiB), evicted 512 (2.0 MiB)"),
            "{text}"
        );
        assert!(
            text.contains("working set: 128 pages (0.5 MiB) over 4 intervals"),
            "{text}"
        );
        assert!(text.contains("refaults 2.5/s (10 total)"), "{text}");
    }

    #[test]
    fn goals_parse_and_conflicts_are_errors() {
        assert_eq!(
            parse_goal(&json!({"target_rss_bytes": 8192 * 3}), 4096),
            Ok(EvictGoal::TargetResidentPages(6))
        );
        assert_eq!(
            parse_goal(&json!({"cold_for_secs": 1.5}), 4096),
            Ok(EvictGoal::ColdForMs(1500))
        );
        assert_eq!(
            parse_goal(&json!({"auto": true, "margin_percent": 5}), 4096),
            Ok(EvictGoal::Auto {
                margin_percent: 5,
                min_margin_pages: 256
            })
        );
        assert!(parse_goal(&json!({}), 4096)
            .unwrap_err()
            .contains("needs one goal"));
        assert!(parse_goal(&json!({"auto": true, "cold_for_secs": 3}), 4096)
            .unwrap_err()
            .contains("exactly one"));
        assert!(parse_goal(&json!({"cold_for_secs": -1}), 4096)
            .unwrap_err()
            .contains("non-negative"));
        assert!(parse_goal(&json!({"target_rss_bytes": "1G"}), 4096)
            .unwrap_err()
            .contains("integer"));
    }
}
