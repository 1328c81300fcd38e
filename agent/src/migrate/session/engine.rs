//! The migration engine inside `pagewise serve`: the daemon's [`MigrationService`] (the
//! `migrate*` control requests start, watch and cancel source-side migrations) and the
//! migration endpoint (`--migrate-listen`) that receives VMs ([`super::destination`]).
//! One [`Job`] per VM name, on either side; its status is what `migrate_status` and
//! `stats` show.

use std::collections::HashMap;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pager::server::migration::{MigrateRequest, MigrationService};
use pager::server::Daemon;
use pager::source::BoxError;
use serde_json::Value;

use super::status::{MigrationStatus, Phase, Role};
use crate::migrate::auth::Psk;
use crate::migrate::message::Mode;
use crate::migrate::tls::TlsConfig;

/// How the engine runs migrations on this host.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub psk: Psk,
    /// TLS for every migration connection, both ways (`--tls-cert/--tls-key/--tls-ca`):
    /// the endpoint then refuses peers without it.
    pub tls: Option<TlsConfig>,
    /// Where incoming VMs' files go (guest RAM, QMP socket, logs): tmpfs or hugetlbfs.
    pub dir: PathBuf,
    /// The attach library destination QEMUs run under.
    pub preload: PathBuf,
    /// This daemon's attach socket (destination QEMUs attach there).
    pub attach_socket: PathBuf,
    /// Where an incoming VM's own swap device is created (`DIR/NAME.swap`).
    pub swapdev_dir: PathBuf,
    pub host_id: String,
    /// Longest wait for a destination QEMU to attach and answer QMP.
    pub qemu_start_timeout: Duration,
    /// How long a post-copy whose link broke tries to get it back (the source dialling,
    /// the destination waiting) before it gives up.
    pub recover_timeout: Duration,
}

/// One migration of one VM.
pub struct Job {
    pub status: Mutex<MigrationStatus>,
    pub cancel: Arc<AtomicBool>,
    pub started: Instant,
    /// Live counters, folded into the status when it is read.
    pub transferred: Arc<AtomicU64>,
    pub normal: AtomicU64,
    pub duplicate: AtomicU64,
    pub freed: AtomicU64,
    pub stored: AtomicU64,
    pub requests: AtomicU64,
    /// Pages that did not decode at the destination and were asked for again.
    pub resent: AtomicU64,
    /// Where the timeline reads the migration's write tracking from, while it runs.
    pub dirty_probe: Arc<super::timeline::DirtyProbe>,
    /// Guest pages, and how many the destination holds a current copy of.
    pub pages: AtomicU64,
    pub held: Arc<AtomicU64>,
    /// Where a post-copy that lost its link and its way back meet.
    pub recovery: super::recovery::Recovery,
}

impl Job {
    pub fn new(vm: &str, role: Role, mode: Option<Mode>, peer: String) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(MigrationStatus {
                vm: vm.into(),
                role,
                mode,
                peer,
                started_at_ms: super::timeline::now_ms(),
                ..Default::default()
            }),
            cancel: Arc::new(AtomicBool::new(false)),
            started: Instant::now(),
            transferred: Arc::new(AtomicU64::new(0)),
            normal: AtomicU64::new(0),
            duplicate: AtomicU64::new(0),
            freed: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            dirty_probe: Default::default(),
            pages: AtomicU64::new(0),
            held: Arc::new(AtomicU64::new(0)),
            recovery: Default::default(),
        })
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s);
        if !s.status.is_over() {
            s.total_time = self.started.elapsed().as_millis() as u64;
        }
    }

    pub fn snapshot(&self) -> MigrationStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !s.status.is_over() {
            s.total_time = self.started.elapsed().as_millis() as u64;
        }
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        // Both roles count the pages by kind (sent here, received there).
        s.ram.normal = get(&self.normal);
        s.ram.duplicate = get(&self.duplicate);
        s.pages_stored = get(&self.stored);
        if s.role == Role::Destination {
            s.pages_resent = get(&self.resent);
        }
        if s.role == Role::Source {
            s.ram.transferred = get(&self.transferred);
            s.ram.postcopy_requests = get(&self.requests);
            s.pages_freed = get(&self.freed);
            if s.total_time > 0 {
                s.ram.mbps = s.ram.transferred as f64 * 8.0 / 1e3 / s.total_time as f64;
            }
            let page = s.ram.total / self.pages.load(Ordering::Relaxed).max(1);
            let held = self.held.load(Ordering::Relaxed);
            s.ram.remaining = if s.status == Phase::Completed {
                0
            } else {
                s.ram.total.saturating_sub(held * page)
            };
        }
        s
    }

    pub fn phase(&self) -> Phase {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).status
    }

    /// End the job in `phase` (failed/cancelled carry `error`).
    pub fn finish(&self, phase: Phase, error: Option<String>) {
        self.update(|s| {
            s.total_time = self.started.elapsed().as_millis() as u64;
            s.status = phase;
            s.error = error;
        });
    }
}

/// A `migrate` request the engine refuses.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("unknown mode {0:?} (precopy, postcopy or agile)")]
    Mode(String),
    #[error(transparent)]
    Order(#[from] crate::migrate::order::UnknownOrder),
    #[error("an XBZRLE cache of {0} bytes is outside 1 page..=64 GiB")]
    XbzrleCache(u64),
    #[error("no VM named {0:?} is attached")]
    NoSuchVm(String),
    #[error("VM {0:?} is already being migrated")]
    Busy(String),
    #[error("VM {0:?} is being evicted; migrate it when the eviction is over")]
    Evicting(String),
    #[error("the destination {0:?} is not HOST:PORT")]
    BadAddress(String),
    #[error("no migration of VM {0:?} is known here")]
    Unknown(String),
    #[error("the daemon is shutting down")]
    Gone,
    #[error("the migration of VM {vm:?} is {phase}: only a paused post-copy resumes")]
    NotPaused { vm: String, phase: String },
    #[error("starting the migration thread")]
    Thread(#[source] std::io::Error),
}

pub struct Engine {
    pub(super) config: EngineConfig,
    pub(super) daemon: Weak<Daemon>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    self_ref: Weak<Engine>,
    pub(super) pending: Mutex<super::destination::PendingHalves>,
    /// Shared swap devices handed over to this host by agile migrations, per VM (spec, device):
    /// a later migration of the VM reads its `Route::Local` pages there.
    handed_over: Mutex<HashMap<String, (String, super::pages::SharedDevice)>>,
}

impl Mode {
    /// The name `pagewise migrate --mode` takes (and the JSON one); [`mode_of`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Precopy => "precopy",
            Mode::Postcopy => "postcopy",
            Mode::Agile => "agile",
        }
    }
}

pub(super) fn mode_of(name: &str) -> Option<Mode> {
    match name {
        "precopy" => Some(Mode::Precopy),
        "postcopy" => Some(Mode::Postcopy),
        "agile" => Some(Mode::Agile),
        _ => None,
    }
}

impl Engine {
    /// An engine for `daemon`, installed as its migration service.
    pub fn install(config: EngineConfig, daemon: &Arc<Daemon>) -> Arc<Self> {
        let engine = Arc::new_cyclic(|me| Self {
            config,
            daemon: Arc::downgrade(daemon),
            jobs: Mutex::new(HashMap::new()),
            self_ref: me.clone(),
            pending: Mutex::new(Default::default()),
            handed_over: Mutex::new(HashMap::new()),
        });
        daemon.set_migration(engine.clone());
        super::source::resume_journaled(&engine);
        super::incoming::resume_journaled(&engine);
        engine
    }

    /// Accept migrations on `listener` (a thread per connection) until the daemon stops.
    pub fn listen(self: &Arc<Self>, listener: TcpListener) -> std::thread::JoinHandle<()> {
        let engine = self.clone();
        std::thread::spawn(move || super::destination::accept_loop(&engine, listener))
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the shared swap device an agile migration handed over for `vm`.
    pub(super) fn set_handed_over(
        &self,
        vm: &str,
        spec: String,
        device: super::pages::SharedDevice,
    ) {
        self.handed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vm.into(), (spec, device));
    }

    /// The shared swap device handed over to this host for `vm`, if any.
    pub(super) fn handed_over(&self, vm: &str) -> Option<(String, super::pages::SharedDevice)> {
        self.handed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vm)
            .cloned()
    }

    /// Forget `vm`'s handed-over device (it left this host).
    pub(super) fn forget_handed_over(&self, vm: &str) {
        self.handed_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vm);
    }

    /// Register a job for `vm` unless one is running.
    pub(super) fn claim(&self, vm: &str, job: Arc<Job>) -> Result<(), StartError> {
        let mut jobs = self.jobs();
        if jobs.get(vm).is_some_and(|j| !j.phase().is_over()) {
            return Err(StartError::Busy(vm.into()));
        }
        jobs.insert(vm.into(), job);
        Ok(())
    }

    pub(super) fn job(&self, vm: &str) -> Result<Arc<Job>, StartError> {
        self.jobs()
            .get(vm)
            .cloned()
            .ok_or_else(|| StartError::Unknown(vm.into()))
    }

    fn start_source(&self, request: MigrateRequest) -> Result<Value, StartError> {
        let mode = mode_of(&request.mode).ok_or_else(|| StartError::Mode(request.mode.clone()))?;
        let order = match &request.order {
            Some(o) => o.parse()?,
            None => Default::default(),
        };
        if let Some(b) = request
            .xbzrle_cache
            .filter(|b| !(4096..=1 << 36).contains(b))
        {
            return Err(StartError::XbzrleCache(b));
        }
        let encoder = crate::migrate::delta::EncoderConfig {
            xbzrle_cache: request.xbzrle_cache,
            compress: request.compress,
        };
        let daemon = self.daemon.upgrade().ok_or(StartError::Gone)?;
        let vm = daemon
            .vm(&request.vm)
            .ok_or_else(|| StartError::NoSuchVm(request.vm.clone()))?;
        let to = request
            .to
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| StartError::BadAddress(request.to.clone()))?;
        let job = Job::new(&request.vm, Role::Source, Some(mode), request.to.clone());
        self.claim(&request.vm, job.clone())?;
        if let Some(ev) = daemon.evictor() {
            if matches!(
                ev.status(&daemon, &request.vm),
                Ok(pager::server::protocol::Response::EvictStatus(ref s)) if s.running
            ) {
                job.finish(Phase::Failed, Some("an eviction was running".into()));
                return Err(StartError::Evicting(request.vm));
            }
        }
        let run = super::source::SourceRun {
            handed_over: self.handed_over(&request.vm),
            engine: self.self_ref.upgrade().ok_or(StartError::Gone)?,
            config: self.config.clone(),
            daemon,
            vm,
            request,
            mode,
            order,
            encoder,
            to,
            job: job.clone(),
        };
        std::thread::Builder::new()
            .name(format!("migrate-{}", run.request.vm))
            .spawn(move || run.run())
            .map_err(StartError::Thread)?;
        Ok(status_json(&job))
    }
}

pub(super) fn status_json(job: &Job) -> Value {
    serde_json::to_value(job.snapshot()).unwrap_or(Value::Null)
}

impl MigrationService for Engine {
    fn start(&self, request: MigrateRequest) -> Result<Value, BoxError> {
        Ok(self.start_source(request)?)
    }

    fn status(&self, vm: &str) -> Result<Value, BoxError> {
        Ok(status_json(&*self.job(vm)?))
    }

    fn cancel(&self, vm: &str) -> Result<Value, BoxError> {
        let job = self.job(vm)?;
        job.cancel.store(true, Ordering::Release);
        Ok(status_json(&job))
    }

    fn resume(&self, vm: &str) -> Result<Value, BoxError> {
        let job = self.job(vm)?;
        let phase = job.phase();
        if !matches!(phase, Phase::PostcopyPaused | Phase::PostcopyRecover) {
            return Err(StartError::NotPaused {
                vm: vm.into(),
                phase: phase.name().into(),
            }
            .into());
        }
        job.recovery.nudge();
        Ok(status_json(&job))
    }

    fn is_migrating(&self, vm: &str) -> bool {
        self.jobs().get(vm).is_some_and(|j| !j.phase().is_over())
    }

    fn reattached(&self, vm: &str, vmm_pid: i32) {
        super::interrupted::settle_in_background(vm.to_string(), vmm_pid);
    }

    fn overview(&self) -> Vec<Value> {
        let mut jobs: Vec<_> = self.jobs().values().cloned().collect();
        jobs.sort_by_key(|j| j.started);
        jobs.iter().map(|j| status_json(j)).collect()
    }
}
