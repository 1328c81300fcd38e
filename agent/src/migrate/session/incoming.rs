//! One incoming VM on the destination: prepared in the daemon, its QEMU started under the
//! pager with `-incoming defer`, pre-copied pages written into its memory file, the
//! switchover applied (routes, the remote source, the shared swap device), pushed pages
//! placed, and a report for the source.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pager::page_state::PageState;
use pager::route::Route;
use pager::server::Daemon;
use serde_json::{json, Value};

use super::dest_qemu::{DestQemu, DestQemuError};
use super::engine::{Engine, Job};
use super::status::Phase;
use crate::migrate::bulk::{BulkError, Received};
use crate::migrate::frame::Command;
use crate::migrate::link::Link;
use crate::migrate::message::{write_message, Message, Mode, Setup, WireError};
use crate::migrate::remote::{RemoteError, RemoteSource};

pub mod journal;
mod receive;
mod recover;
mod restarted;

pub(super) use restarted::resume_journaled;

/// Longest silence on the bulk channel before the switchover.
const PRECOPY_IDLE: Duration = Duration::from_secs(300);
/// Largest guest accepted (bytes).
const MAX_GUEST_BYTES: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("invalid VM name {0:?}")]
    BadName(String),
    #[error("VM {0:?} is already served here")]
    Exists(String),
    #[error("a guest of {pages} pages of {page_size} bytes is larger than this host accepts")]
    TooLarge { pages: u64, page_size: u32 },
    #[error("the source's QEMU command line")]
    Cmdline(#[from] crate::qemu::dest::DestCmdlineError),
    #[error("the source's QEMU command line has no -qmp unix: socket")]
    NoQmp,
    #[error("creating {what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {path} for the VM's swap device")]
    SwapdevBackend {
        path: String,
        #[source]
        source: swapdev::backend::BackendError,
    },
    #[error("creating the VM's swap device {path}")]
    Swapdev {
        path: String,
        #[source]
        source: swapdev::SwapError,
    },
    #[error("opening the shared swap device {spec}")]
    Shared {
        spec: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("agile migration without a shared swap device")]
    NoSharedDevice,
    #[error("preparing the VM in the daemon")]
    Prepare(#[from] pager::server::prepare::PrepareError),
    #[error("the destination QEMU")]
    Qemu(#[from] DestQemuError),
    #[error("the bulk channel")]
    Wire(#[from] WireError),
    #[error("the source sent {got:?} while the destination was {state}")]
    OutOfOrder { got: Command, state: &'static str },
    #[error("the source sent pages {first}+{count}, outside the VM's {pages} pages")]
    OutOfRange { first: u64, count: u64, pages: u64 },
    #[error("the source sent a {got}-byte page; the VM's pages have {want} bytes")]
    WrongPageSize { got: usize, want: usize },
    #[error("reading page {page} of the memory file")]
    Read {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the source sent page {page} as a delta, but this host holds no copy of it")]
    DeltaWithoutBase { page: u64 },
    #[error("page {page} does not decode against this host's copy")]
    Decode {
        page: u64,
        #[source]
        source: crate::migrate::delta::DecodeError,
    },
    #[error("writing page {page} into the memory file")]
    Write {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the source aborted: {0}")]
    Aborted(String),
    #[error("the remote page source")]
    Remote(#[from] RemoteError),
    #[error("the VM's fault loop refused an order")]
    Order(#[from] pager::fault_loop::OrderError),
    #[error("placing pushed pages")]
    Push(#[from] BulkError),
    #[error("the VM left the daemon")]
    Gone,
    #[error("writing the journal a restarted destination would go on from")]
    Journal(#[source] journal::JournalError),
    #[error(
        "the link to the source broke and it did not come back within {waited_s} s: {missing} \
         pages only the source holds are lost (the first: {first:?})"
    )]
    SourceLost {
        waited_s: u64,
        missing: u64,
        first: Vec<u64>,
    },
}

/// One incoming VM.
pub(super) struct Incoming {
    engine: Arc<Engine>,
    /// This host's address on the link (where the source QEMU reaches ours).
    local_ip: String,
    daemon: Arc<Daemon>,
    setup: Setup,
    job: Arc<Job>,
    qemu: Option<DestQemu>,
    memory: Option<File>,
    /// Files made here (removed if the migration fails before the switchover).
    made: Vec<std::path::PathBuf>,
    /// `Ready` was sent: the guest is (about to be) running here.
    ready: bool,
    /// Agile: the shared swap device is acquired and installed.
    acquired: bool,
    /// The VM was prepared in the daemon by this migration.
    prepared: bool,
    /// An earlier swap device of the VM's name, renamed aside (and its original path).
    set_aside: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The guest's memory file, its QEMU's QMP socket and its own swap device here.
    mem_path: std::path::PathBuf,
    qmp_path: std::path::PathBuf,
    device: std::path::PathBuf,
}

impl Incoming {
    fn pages(&self) -> u64 {
        self.setup.pages
    }
    fn page_size(&self) -> usize {
        self.setup.page_size as usize
    }

    pub fn run(
        &mut self,
        urgent: Link,
        bulk: &mut Link,
        version: u16,
    ) -> Result<(), IncomingError> {
        let incoming_uri = self.prepare()?;
        let pid = self.qemu.as_ref().map(|q| q.pid()).unwrap_or(0);
        write_message(
            bulk,
            &Message::SetupOk {
                qemu_pid: pid as u64,
                incoming: incoming_uri,
            },
        )?;
        self.job.update(|s| {
            s.status = Phase::Active;
            s.dest_qemu_pid = Some(pid as u64);
        });
        let _ = bulk.set_read_timeout(Some(PRECOPY_IDLE));
        let _timeline = self
            .daemon
            .vm(&self.setup.vm)
            .and_then(|vm| super::timeline::sample_destination(self.job.clone(), vm));
        self.receive_precopy(bulk, version)?;
        self.switch_over(urgent, version)?;
        // From here a pager restarted on this host goes on with the migration (the journal
        // says where each absent page is), so the VM's QEMU waits for one if this one dies.
        self.write_journal(version)?;
        self.daemon.set_reattach(&self.setup.vm, true);
        write_message(bulk, &Message::Ready)?;
        self.ready = true;
        self.job.update(|s| s.status = Phase::PostcopyActive);
        let _ = bulk.set_read_timeout(None);
        let controller = self
            .daemon
            .controller(&self.setup.vm)
            .ok_or(IncomingError::Gone)?;
        let received = self.receive_pushed(bulk, version, &controller)?;
        self.complete(bulk, received, &controller)
    }

    /// Every page is here: the source's pages need no route any more, the journal goes, and
    /// the source gets the report.
    fn complete(
        &mut self,
        bulk: &mut Link,
        received: Received,
        controller: &pager::fault_loop::LoopController,
    ) -> Result<(), IncomingError> {
        let _ = controller.remove_source(Route::Remote);
        self.daemon.set_reattach(&self.setup.vm, true);
        self.remove_journal();
        let report = self.report(received);
        write_message(bulk, &Message::Report(report.to_string()))?;
        self.job.update(|s| s.destination = Some(report));
        Ok(())
    }

    /// Check the setup, make the VM's files, prepare it and start its QEMU.
    fn prepare(&mut self) -> Result<String, IncomingError> {
        let s = self.setup.clone();
        let vm = s.vm.clone();
        if !pager::attach::server::valid_vm_name(&vm) {
            return Err(IncomingError::BadName(vm));
        }
        if self.daemon.vm(&vm).is_some() || self.daemon.prepared_list().iter().any(|p| p.vm == vm) {
            return Err(IncomingError::Exists(vm));
        }
        let bytes = s
            .pages
            .checked_mul(s.page_size as u64)
            .filter(|b| *b > 0 && *b <= MAX_GUEST_BYTES)
            .ok_or(IncomingError::TooLarge {
                pages: s.pages,
                page_size: s.page_size,
            })?;
        if s.mode == Mode::Agile && s.swapdev.is_none() {
            return Err(IncomingError::NoSharedDevice);
        }
        let engine = self.engine.clone();
        let cfg = &engine.config;
        let dest = crate::qemu::dest::rewrite(&s.qemu_argv, &vm, &cfg.dir)?;
        let qmp = dest.qmp.clone().ok_or(IncomingError::NoQmp)?;
        let file_err = |what, path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| IncomingError::File { what, path, source }
        };
        // Leftovers of an earlier migration of this name (no VM of it runs here).
        let _ = std::fs::remove_file(&dest.mem_path);
        let _ = std::fs::remove_file(&qmp);
        let memory = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dest.mem_path)
            .map_err(file_err("the memory file", &dest.mem_path))?;
        self.mem_path = dest.mem_path.clone();
        self.qmp_path = qmp.clone();
        self.made.push(dest.mem_path.clone());
        memory
            .set_len(bytes)
            .map_err(file_err("the memory file", &dest.mem_path))?;
        self.memory = Some(memory);
        let device = cfg.swapdev_dir.join(format!("{vm}.swap"));
        self.create_swapdev(&device)?;
        self.device = device.clone();
        self.prepared = true;
        self.daemon.prepare(pager::server::protocol::PrepareSpec {
            vm: vm.clone(),
            layout: pager::server::protocol::LayoutSpec {
                page_size: s.page_size as u64,
                regions: vec![pager::server::protocol::RegionSpec {
                    offset: 0,
                    size: bytes,
                }],
            },
            swapdev: Some(device.display().to_string()),
            states: vec![],
            routes: vec![pager::server::protocol::RouteRange {
                first_page: 0,
                count: s.pages,
                route: Route::Remote,
            }],
        })?;
        // QEMU's own files (its output, serial log, sockets) go too if the migration fails.
        self.made.push(cfg.dir.join(format!("{vm}.qemu.out")));
        self.made.extend(
            dest.dest_paths
                .iter()
                .map(|(_, to)| std::path::PathBuf::from(to)),
        );
        let mut qemu = DestQemu::start(cfg, &vm, &dest, &self.daemon)?;
        let uri = qemu.listen_incoming(&self.local_ip)?;
        self.job.update(|st| {
            st.dest_paths = dest.dest_paths.iter().cloned().collect();
        });
        self.qemu = Some(qemu);
        Ok(uri)
    }

    fn create_swapdev(&mut self, path: &std::path::Path) -> Result<(), IncomingError> {
        let cfg = &self.engine.config;
        let err = |source| IncomingError::Swapdev {
            path: path.display().to_string(),
            source,
        };
        // A device of that name left here (the VM ran here before, or another VM of that name
        // stopped) is kept aside, never overwritten.
        if path.exists() {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let aside = path.with_extension(format!("swap.before-{stamp}"));
            std::fs::rename(path, &aside).map_err(|source| IncomingError::File {
                what: "the swap device left by an earlier VM of this name",
                path: path.display().to_string(),
                source,
            })?;
            tracing::warn!(vm = %self.setup.vm, kept = %aside.display(), "an earlier swap device of this VM name was kept aside");
            self.set_aside = Some((aside, path.to_path_buf()));
        }
        let spec = path.display().to_string();
        let opts = swapdev::backend::spec::SpecOptions {
            create: true,
            ..Default::default()
        };
        let backend = swapdev::backend::spec::open_backend(&spec, &opts).map_err(|e| {
            IncomingError::SwapdevBackend {
                path: spec.clone(),
                source: e,
            }
        })?;
        self.made.push(path.to_path_buf());
        let dev = swapdev::SwapDevice::create(
            backend,
            swapdev::CreateOptions {
                vm_uuid: swapdev::Uuid::new_v4(),
                page_size: self.setup.page_size,
                capacity_pages: self.setup.pages,
                host_id: cfg.host_id.clone(),
                codec: swapdev::CodecPolicy::Lz4,
                checksum: swapdev::ChecksumKind::Crc32c,
                force: true,
            },
        )
        .map_err(err)?;
        dev.close().map_err(err)?;
        Ok(())
    }
}

/// Pages `first..first+count` when they lie inside a guest of `pages` pages.
fn checked(first: u64, count: u64, pages: u64) -> Result<std::ops::Range<u64>, IncomingError> {
    match first.checked_add(count) {
        Some(end) if end <= pages => Ok(first..end),
        _ => Err(IncomingError::OutOfRange {
            first,
            count,
            pages,
        }),
    }
}

impl Incoming {
    pub fn new(
        engine: Arc<Engine>,
        daemon: Arc<Daemon>,
        setup: Setup,
        job: Arc<Job>,
        local_ip: String,
    ) -> Self {
        Self {
            engine,
            local_ip,
            daemon,
            setup,
            job,
            qemu: None,
            memory: None,
            made: Vec::new(),
            ready: false,
            acquired: false,
            prepared: false,
            set_aside: None,
            mem_path: Default::default(),
            qmp_path: Default::default(),
            device: Default::default(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    pub fn vm_name(&self) -> &str {
        &self.setup.vm
    }

    fn memory(&self) -> &File {
        self.memory
            .as_ref()
            .expect("the memory file is made before pages arrive")
    }

    /// Drop `range` from the memory file: its pages read absent (they fault again).
    fn punch(&self, range: &std::ops::Range<u64>) -> Result<(), IncomingError> {
        let ps = self.page_size() as u64;
        crate::migrate::precopy::punch(
            self.memory(),
            range.start * ps,
            (range.end - range.start) * ps,
        )
        .map_err(|source| IncomingError::Write {
            page: range.start,
            source,
        })
    }

    /// Mark `range` absent (a page the file held goes back to Missing) and route it.
    fn absent(&self, range: std::ops::Range<u64>, route: Route) -> Result<(), IncomingError> {
        let vm = self.daemon.vm(&self.setup.vm).ok_or(IncomingError::Gone)?;
        self.punch(&range)?;
        for p in range.clone() {
            let _ = vm
                .states
                .transition(p, PageState::Present, PageState::Missing);
        }
        vm.routes
            .set_range(range.clone(), route)
            .map_err(|_| IncomingError::OutOfRange {
                first: range.start,
                count: range.end - range.start,
                pages: self.pages(),
            })?;
        Ok(())
    }

    /// Agile: the source released the shared swap device; acquire it (generation fencing)
    /// and serve the pages routed to it (`Route::Local` on a destination) from it.
    fn acquire_shared(&mut self) -> Result<(), IncomingError> {
        let controller = self
            .daemon
            .controller(&self.setup.vm)
            .ok_or(IncomingError::Gone)?;
        let spec = self
            .setup
            .swapdev
            .clone()
            .ok_or(IncomingError::NoSharedDevice)?;
        let shared = |source: Box<dyn std::error::Error + Send + Sync>| IncomingError::Shared {
            spec: spec.clone(),
            source,
        };
        let backend = swapdev::backend::spec::open_backend(&spec, &Default::default())
            .map_err(|e| shared(Box::new(e)))?;
        let device = swapdev::SwapDevice::open(
            backend,
            swapdev::OpenOptions::read_write(&self.engine.config.host_id, true, false),
        )
        .map_err(|e| shared(Box::new(e)))?;
        let device = Arc::new(Mutex::new(device));
        let source =
            pager::source::SwapdevSource::new(device.clone(), format!("shared swapdev {spec}"))
                .map_err(|e| shared(Box::new(e)))?;
        controller.install_source(Route::Local, Box::new(source))?;
        self.engine
            .set_handed_over(&self.setup.vm, spec.clone(), device);
        self.acquired = true;
        Ok(())
    }

    /// The source is paused: the pages still on it are served through the urgent channel.
    fn switch_over(&mut self, urgent: Link, version: u16) -> Result<(), IncomingError> {
        if self.setup.mode == Mode::Agile && !self.acquired {
            return Err(IncomingError::OutOfOrder {
                got: Command::Switchover,
                state: "waiting for the shared swap device to be released",
            });
        }
        let controller = self
            .daemon
            .controller(&self.setup.vm)
            .ok_or(IncomingError::Gone)?;
        let remote = RemoteSource::new(urgent, self.page_size(), self.pages(), version)?;
        controller.install_source(Route::Remote, Box::new(remote))?;
        Ok(())
    }

    /// The destination's figures for the source's report.
    pub(super) fn report(&mut self, received: Received) -> Value {
        let vm = self.daemon.vm(&self.setup.vm);
        let m = vm.as_ref().map(|v| v.metrics.snapshot());
        let routed = vm.as_ref().map(|v| v.routes.census());
        let running = match self.qemu.as_mut() {
            Some(q) => Some(q.wait_running(Duration::from_secs(30)).is_ok()),
            // A restarted destination asks the QEMU its predecessor started.
            None => self.running_by_qmp(),
        };
        json!({
            "qemu_pid": self.qemu.as_ref().map(|q| q.pid()).or(self.job.snapshot().dest_qemu_pid.map(|p| p as u32)),
            "qemu_running": running,
            "dest_paths": self.job.snapshot().dest_paths,
            "pages_pushed_placed": received.placed,
            "pages_resent": self.job.resent.load(std::sync::atomic::Ordering::Relaxed),
            "timeline": self.job.snapshot().dest_timeline,
            "pages_pushed_already_present": received.already_present,
            "pages_routed_to_swapdev": routed.map(|r| r[Route::Local as usize]),
            "demand_faults": m.as_ref().map(|m| m.faults_to_source),
            "faults": m.as_ref().map(|m| m.faults),
            "fault_latency_p50_us": m.as_ref().and_then(|m| m.fault_latency.quantile_us(0.5)),
            "fault_latency_p99_us": m.as_ref().and_then(|m| m.fault_latency.quantile_us(0.99)),
            "fault_latency_buckets": m.as_ref().map(|m| m.fault_latency.buckets.clone()),
            "blocktime_ms": m.as_ref().map(|m| m.blocktime_ns / 1_000_000),
            "faults_parked": m.as_ref().map(|m| m.faults_parked),
        })
    }

    /// Remove what was made for a migration that failed before the switchover.
    pub fn clean_up(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            q.kill();
        }
        // Only what this migration made: a VM of the same name served here is not ours.
        if self.prepared {
            let vm = &self.setup.vm;
            self.daemon.detach(vm);
            self.daemon.unprepare(vm);
        }
        for f in self.made.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        // Written right before `Ready`: a failure after it leaves nothing to go on with.
        self.remove_journal();
        if self.acquired {
            // The shared device came to this host for a VM that is not here after all: hand
            // it back (unowned; this host wrote nothing to it) and forget it.
            if let Some((spec, dev)) = self.engine.handed_over(&self.setup.vm) {
                let released = dev
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .release_ownership();
                if let Err(e) = released {
                    tracing::warn!(vm = %self.setup.vm, spec, "releasing the shared swap device after the failed migration: {}", pager::error_chain(&e));
                }
            }
            self.engine.forget_handed_over(&self.setup.vm);
            self.acquired = false;
        }
        if let Some((aside, original)) = self.set_aside.take() {
            let _ = std::fs::rename(aside, original);
        }
    }
}
