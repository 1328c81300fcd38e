//! Control-socket commands of eviction and working-set tracking (typed: the
//! `Request::Evict`, `Request::EvictStatus`, `Request::EvictCancel` and `Request::Wss`
//! requests of [`crate::server::protocol`]; the control socket calls the methods of
//! [`EvictRegistry`]).
//!
//! - `evict` starts an eviction toward its goal in the background and answers
//!   [`Response::EvictStarted`]; with `"wait":true` the answer is the final
//!   [`Response::EvictStatus`], sent when the eviction has finished (however long it takes).
//!   An eviction already running is an error.
//! - `evict_status`: the current or last eviction (`running`, `progress`, `report`, `error`,
//!   `elapsed_ms`).
//! - `evict_cancel`: ask the running eviction to stop after its batch.
//! - `wss`: page counts, working-set estimate, refault rate, history (tracking starts for the
//!   VM on its first eviction command, or here).
//! - `stats` gains an `eviction` object per VM with tracking ([`EvictRegistry::stats_of`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::service::{EvictConfig, EvictStats, VmEviction};
use super::store::SwapdevStore;
use super::{EvictError, EvictGoal, EvictProgress, EvictReport, PageStore};
use crate::server::control::{require_vm, CommandError};
use crate::server::protocol::{self, EvictJobStatus, EvictTarget, Response};
use crate::server::Daemon;
use crate::vm::Vm;

/// Why an eviction command failed.
#[derive(Debug, thiserror::Error)]
pub enum EvictCommandError {
    #[error(
        "VM {vm:?} is served from {source_name}, not a swap device; eviction stores pages in \
         the VM's swap device"
    )]
    NotSwapdev { vm: String, source_name: String },
    #[error("setting up eviction of VM {vm:?}")]
    Service {
        vm: String,
        #[source]
        source: EvictError,
    },
    #[error("starting the working-set sampler of VM {vm:?}")]
    Sampler {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("an eviction of VM {vm:?} is already running ({done} of {planned} pages done)")]
    AlreadyRunning { vm: String, done: u64, planned: u64 },
    #[error("no eviction has run for VM {vm:?}")]
    NeverRun { vm: String },
    #[error("starting the eviction thread")]
    Spawn(#[source] std::io::Error),
    #[error("invalid eviction goal: {0}")]
    InvalidGoal(String),
}

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

type SvcJob = (Arc<VmEviction>, Arc<Mutex<Job>>);

impl EvictRegistry {
    pub fn new(config: EvictConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            vms: Mutex::new(HashMap::new()),
        })
    }

    /// The VM's store: its swap device.
    fn store_for(vm: &Vm) -> Result<Arc<dyn PageStore>, EvictCommandError> {
        match &vm.swapdev {
            Some(dev) => Ok(Arc::new(SwapdevStore::new(dev.clone()))),
            None => Err(EvictCommandError::NotSwapdev {
                vm: vm.name.clone(),
                source_name: vm.source_description.clone(),
            }),
        }
    }

    /// The service of `vm`, created (and its sampler started) if needed. An entry for an
    /// older VM of the same name (detached, re-attached) is replaced.
    fn entry(&self, vm: Arc<Vm>) -> Result<SvcJob, EvictCommandError> {
        let mut vms = lock(&self.vms);
        if let Some(e) = vms.get(&vm.name) {
            if Arc::ptr_eq(e.svc.vm(), &vm) {
                return Ok((e.svc.clone(), e.job.clone()));
            }
        }
        let store = Self::store_for(&vm)?;
        let svc = Arc::new(
            VmEviction::new(vm.clone(), store, self.config).map_err(|source| {
                EvictCommandError::Service {
                    vm: vm.name.clone(),
                    source,
                }
            })?,
        );
        svc.start_sampler()
            .map_err(|source| EvictCommandError::Sampler {
                vm: vm.name.clone(),
                source,
            })?;
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

    fn existing(&self, name: &str) -> Option<SvcJob> {
        lock(&self.vms)
            .get(name)
            .map(|e| (e.svc.clone(), e.job.clone()))
    }

    /// Pages of VM `name` its working-set tracker saw accessed within the last `within`
    /// (see [`crate::wss::WorkingSetTracker::accessed_within`]); `None` when the VM is not tracked.
    pub fn accessed_within(&self, name: &str, within: Duration) -> Option<Vec<u64>> {
        let (svc, _) = self.existing(name)?;
        Some(svc.tracker().accessed_within(within, Instant::now()))
    }

    /// Eviction figures of `vm` when it is tracked (for `stats`).
    pub fn stats_of(&self, daemon: &Daemon, vm: &Arc<Vm>) -> Option<EvictStats> {
        self.prune(daemon);
        self.existing(&vm.name)
            .filter(|(svc, _)| Arc::ptr_eq(svc.vm(), vm))
            .map(|(svc, _)| svc.stats())
    }

    /// `evict_status`: the current or last eviction of `name`.
    pub fn status(&self, daemon: &Daemon, name: &str) -> Result<Response, CommandError> {
        let (vm, job) = self.job_of(daemon, name)?;
        let st = status(&vm.name, &lock(&job));
        Ok(Response::EvictStatus(st))
    }

    /// `evict_cancel`: ask the running eviction of `name` to stop after its batch.
    pub fn cancel(&self, daemon: &Daemon, name: &str) -> Result<Response, CommandError> {
        let (_, job) = self.job_of(daemon, name)?;
        let j = lock(&job);
        j.cancel.store(true, Ordering::Relaxed);
        Ok(Response::EvictCancelled {
            cancelling: j.running,
        })
    }

    /// `evict`: start an eviction of `name` toward `target` (and wait for it with `wait`).
    pub fn start_eviction(
        &self,
        daemon: &Daemon,
        name: &str,
        target: EvictTarget,
        batch_pages: Option<u64>,
        wait: bool,
    ) -> Result<Response, CommandError> {
        self.prune(daemon);
        let vm = require_vm(daemon, name)?;
        let goal = goal_of(target, vm.page_size())?;
        let batch = batch_pages.map(|b| b.clamp(1, 65536) as usize);
        let (svc, job) = self.entry(vm.clone())?;
        let cancel = {
            let mut j = lock(&job);
            if j.running {
                return Err(EvictCommandError::AlreadyRunning {
                    vm: vm.name.clone(),
                    done: j.progress.done,
                    planned: j.progress.planned,
                }
                .into());
            }
            *j = Job {
                running: true,
                started: Some(Instant::now()),
                goal: Some(goal),
                ..Job::default()
            };
            j.cancel.clone()
        };
        if wait {
            // The answer waits for the eviction; other connections see its progress.
            run_job(&svc, &job, goal, batch, &cancel);
            let st = status(&vm.name, &lock(&job));
            return Ok(Response::EvictStatus(st));
        }
        let job2 = job.clone();
        std::thread::Builder::new()
            .name("pw-evict".into())
            .spawn(move || run_job(&svc, &job2, goal, batch, &cancel))
            .map_err(|e| {
                lock(&job).running = false;
                EvictCommandError::Spawn(e)
            })?;
        Ok(Response::EvictStarted {
            vm: vm.name.clone(),
            goal,
        })
    }

    fn job_of(
        &self,
        daemon: &Daemon,
        name: &str,
    ) -> Result<(Arc<Vm>, Arc<Mutex<Job>>), CommandError> {
        let vm = require_vm(daemon, name)?;
        let job = self
            .existing(&vm.name)
            .filter(|(svc, _)| Arc::ptr_eq(svc.vm(), &vm))
            .map(|(_, job)| job)
            .ok_or_else(|| EvictCommandError::NeverRun {
                vm: vm.name.clone(),
            })?;
        Ok((vm, job))
    }

    /// `wss`: working-set figures of one VM (tracking starts) or of every tracked VM.
    pub fn wss(&self, daemon: &Daemon, vm: Option<&str>) -> Result<Response, CommandError> {
        self.prune(daemon);
        let vms = match vm {
            Some(name) => {
                let vm = require_vm(daemon, name)?;
                let name = vm.name.clone();
                let (svc, _) = self.entry(vm)?;
                vec![protocol::VmEviction {
                    vm: name,
                    eviction: svc.stats(),
                }]
            }
            None => {
                let mut v: Vec<protocol::VmEviction> = lock(&self.vms)
                    .iter()
                    .map(|(name, e)| protocol::VmEviction {
                        vm: name.clone(),
                        eviction: e.svc.stats(),
                    })
                    .collect();
                v.sort_by(|a, b| a.vm.cmp(&b.vm));
                v
            }
        };
        Ok(Response::Wss { vms })
    }
}

/// Run one eviction, recording its progress and outcome in `job`.
fn run_job(
    svc: &VmEviction,
    job: &Mutex<Job>,
    goal: EvictGoal,
    batch: Option<usize>,
    cancel: &AtomicBool,
) {
    let result = svc.evict(goal, batch, cancel, &mut |p| lock(job).progress = *p);
    // What the batches staged is free now but would stay resident in this thread's arena.
    super::heap::release_freed_memory();
    let mut j = lock(job);
    j.running = false;
    j.finished_ms = j.started.map(|t| t.elapsed().as_millis() as u64);
    match result {
        Ok(r) => {
            j.progress = r.progress;
            j.report = Some(r);
        }
        Err(e) => j.error = Some(crate::server::error::render_chain(&e)),
    }
}

/// The [`EvictGoal`] of a request's target.
pub fn goal_of(target: EvictTarget, page_size: u64) -> Result<EvictGoal, EvictCommandError> {
    Ok(match target {
        EvictTarget::TargetRssBytes(b) => EvictGoal::TargetResidentPages(b / page_size.max(1)),
        EvictTarget::ColdForSecs(s) => {
            if !(s.is_finite() && s >= 0.0) {
                return Err(EvictCommandError::InvalidGoal(format!(
                    "cold_for_secs must be a non-negative number, got {s}"
                )));
            }
            EvictGoal::ColdForMs((s * 1000.0) as u64)
        }
        EvictTarget::Auto {
            margin_percent,
            min_margin_pages,
        } => {
            let EvictGoal::Auto {
                margin_percent: m,
                min_margin_pages: p,
            } = EvictGoal::auto()
            else {
                unreachable!("EvictGoal::auto() is Auto")
            };
            EvictGoal::Auto {
                margin_percent: margin_percent.unwrap_or(m),
                min_margin_pages: min_margin_pages.unwrap_or(p),
            }
        }
    })
}

fn status(vm: &str, job: &Job) -> EvictJobStatus {
    EvictJobStatus {
        vm: vm.into(),
        running: job.running,
        goal: job.goal,
        progress: job.progress,
        report: job.report.clone(),
        error: job.error.clone(),
        elapsed_ms: job
            .finished_ms
            .or_else(|| job.started.map(|t| t.elapsed().as_millis() as u64)),
    }
}

/// Register the eviction commands with the daemon and start tracking every attached VM that
/// can be evicted (memory file, WP registration, swap device) as soon as it attaches, so
/// `--cold-for` and `--auto` have history. The watcher thread ends when the daemon shuts down.
pub fn start(daemon: &Arc<Daemon>, config: EvictConfig) -> std::io::Result<Arc<EvictRegistry>> {
    let reg = EvictRegistry::new(config);
    daemon.set_evictor(reg.clone());
    let (d, r) = (daemon.clone(), reg.clone());
    std::thread::Builder::new()
        .name("pw-evict-watch".into())
        .spawn(move || watch_attachments(&d, &r))?;
    Ok(reg)
}

/// Register the eviction commands without the watcher (tracking starts on first use).
pub fn register(daemon: &Daemon, config: EvictConfig) -> Arc<EvictRegistry> {
    let reg = EvictRegistry::new(config);
    daemon.set_evictor(reg.clone());
    reg
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
                Err(e) => {
                    let why = crate::server::error::render_chain(&e);
                    tracing::info!(vm = %vm.name, %why, "VM not tracked (eviction unavailable)");
                    skipped.push(Arc::downgrade(&vm));
                }
            }
        }
    }
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
    use crate::server::protocol::Request;
    use serde_json::json;

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
    fn goals_convert_and_bad_ones_are_errors() {
        assert_eq!(
            goal_of(EvictTarget::TargetRssBytes(8192 * 3), 4096).unwrap(),
            EvictGoal::TargetResidentPages(6)
        );
        assert_eq!(
            goal_of(EvictTarget::ColdForSecs(1.5), 4096).unwrap(),
            EvictGoal::ColdForMs(1500)
        );
        assert_eq!(
            goal_of(
                EvictTarget::Auto {
                    margin_percent: Some(5),
                    min_margin_pages: None
                },
                4096
            )
            .unwrap(),
            EvictGoal::Auto {
                margin_percent: 5,
                min_margin_pages: 256
            }
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(goal_of(EvictTarget::ColdForSecs(bad), 4096)
                .unwrap_err()
                .to_string()
                .contains("non-negative"));
        }
        // Exactly one goal: the wire type cannot carry two.
        let two = r#"{"v":1,"op":"evict","vm":"a","goal":{"auto":{},"cold_for_secs":3}}"#;
        assert!(Request::decode(two.as_bytes()).is_err());
    }
}
