//! The source side of one migration: connect and authenticate both channels, send the
//! setup, pre-copy by mode, pause QEMU at pre-switchover, send the final set, hand over the
//! swap device (agile), let QEMU move the devices, then push what the destination lacks
//! while answering its demand requests, and finally drop the VM's RAM here.
//!
//! Until `migrate-continue` every failure rolls back: the destination is told (`Abort`),
//! QEMU's migration is cancelled and the guest resumed if it was running. After it the
//! source keeps every page until the destination's report arrives.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::server::migration::MigrateRequest;
use pager::server::Daemon;
use pager::vm::Vm;
use serde_json::json;

use super::engine::{EngineConfig, Job};
use super::pages::SourcePages;
use super::status::Phase;
use super::throttle::{Throttle, CANCELLED};
use crate::migrate::auth::{open_client, AuthError};
use crate::migrate::bulk::BulkError;
use crate::migrate::frame::Command;
use crate::migrate::link::Link;
use crate::migrate::message::WireError;
use crate::migrate::message::{read_message, write_message, Channel, Message, Mode, Setup};
use crate::migrate::page_server::PageServerError;
use crate::migrate::precopy::{PrecopyError, StopRule};
use crate::migrate::qmp::{Qmp, QmpError};
use crate::migrate::tls::{server_name, TlsError};

mod after;
mod before;
pub mod journal;
mod push;
mod restarted;
mod resume;

pub(super) use restarted::resume_journaled;

/// Longest wait for the destination's answer to `Switchover`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for QEMU to reach pre-switchover and to finish moving the devices.
const QEMU_STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for the destination's report after the push.
const REPORT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading the VM's QEMU command line from /proc/{pid}/cmdline")]
    Cmdline {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM's QEMU command line cannot migrate")]
    Check(#[source] crate::qemu::cmdline::CmdlineError),
    #[error("the VM's QEMU has no -qmp unix:PATH socket; the migration drives QEMU through it")]
    NoQmp,
    #[error("QMP of the source QEMU")]
    Qmp(#[from] QmpError),
    #[error("connecting to the destination {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("authenticating with the destination {addr}")]
    Auth {
        addr: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("TLS with the destination {to}")]
    Tls {
        to: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the destination aborted the migration: {0}")]
    Aborted(String),
    #[error("the bulk channel")]
    Wire(#[from] WireError),
    #[error("pre-copy")]
    Precopy(#[from] PrecopyError),
    #[error("pushing pages after the switchover")]
    Push(#[from] BulkError),
    #[error("answering demand requests")]
    PageServer(#[from] PageServerError),
    #[error("the destination sent {got:?} where {expected} was expected")]
    Unexpected {
        got: Command,
        expected: &'static str,
    },
    #[error(
        "pre-copy did not converge ({rule:?} after {rounds} rounds); give --postcopy-after to \
         finish such a guest as post-copy"
    )]
    NotConverged { rule: StopRule, rounds: usize },
    #[error("tracking the VM's writes")]
    Dirty(#[from] pager::dirty::DirtyError),
    #[error("the VM's memory file")]
    Memory(#[source] std::io::Error),
    #[error("agile migration needs the VM served from a swap device both hosts reach")]
    NoSharedDevice,
    #[error("releasing the swap device to the destination")]
    Release(#[source] swapdev::SwapError),
    #[error("{CANCELLED}")]
    Cancelled,
    #[error(
        "the link to the destination broke after the switchover and {attempts} attempts over \
         {waited_s} s did not get it back; every page the destination lacks is still here \
         (the source QEMU is kept paused)"
    )]
    LinkLost { attempts: u64, waited_s: u64 },
    #[error("writing the journal a restarted source would resume the migration from")]
    Journal(#[source] journal::JournalError),
    #[error("the destination says it holds pages {first}+{count}, outside the VM's {pages} pages")]
    AckOutOfRange { first: u64, count: u64, pages: u64 },
}

pub(super) struct SourceRun {
    pub engine: Arc<super::engine::Engine>,
    /// The shared device an earlier agile migration handed to this host for the VM.
    pub handed_over: Option<(String, super::pages::SharedDevice)>,
    pub config: EngineConfig,
    pub daemon: Arc<Daemon>,
    pub vm: Arc<Vm>,
    pub request: MigrateRequest,
    pub mode: Mode,
    /// The order of pre-copy rounds.
    pub order: crate::migrate::order::Order,
    /// How pages are encoded on the bulk channel before the switchover.
    pub encoder: crate::migrate::delta::EncoderConfig,
    pub to: SocketAddr,
    pub job: Arc<Job>,
}

/// How the pages written during the last round reach the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Sent with the guest paused (pre-copy).
    Data,
    /// Announced stale, fetched after the switchover (post-copy behind it).
    Stale,
}

/// Which pages the destination holds a current copy of, counted for the status.
struct Held {
    bits: Vec<AtomicBool>,
    count: Arc<AtomicU64>,
}

impl Held {
    fn new(pages: u64, count: Arc<AtomicU64>) -> Self {
        Self {
            bits: (0..pages).map(|_| AtomicBool::new(false)).collect(),
            count,
        }
    }
    fn set(&self, p: u64, held: bool) {
        if let Some(b) = self.bits.get(p as usize) {
            if b.swap(held, Ordering::AcqRel) != held {
                if held {
                    self.count.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.count.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }
    fn get(&self, p: u64) -> bool {
        self.bits
            .get(p as usize)
            .is_some_and(|b| b.load(Ordering::Acquire))
    }
}

/// Longest wait for the destination's side of the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Dial the destination `to` (resolved: `addr`), over TLS when this daemon has a TLS
/// configuration: the destination's certificate must name `to`'s host.
fn connect(config: &EngineConfig, to: &str, addr: SocketAddr) -> Result<Link, SourceError> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|source| SourceError::Connect { addr, source })?;
    let Some(tls) = &config.tls else {
        let link = Link::plain(tcp);
        link.detect_dead_link(super::recovery::LINK_DEAD_AFTER)
            .map_err(|source| SourceError::Connect { addr, source })?;
        return Ok(link);
    };
    let failed = |source| SourceError::Tls {
        to: to.into(),
        source: Box::new(source),
    };
    let io = |source| SourceError::Connect { addr, source };
    let name = server_name(to).map_err(failed)?;
    tcp.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT))
        .map_err(io)?;
    let link = Link::connect_tls(tcp, tls, name).map_err(failed)?;
    link.set_read_timeout(None).map_err(io)?;
    link.detect_dead_link(super::recovery::LINK_DEAD_AFTER)
        .map_err(io)?;
    Ok(link)
}

/// The QEMU command line of process `pid`.
fn cmdline_of(pid: i32) -> Result<Vec<String>, SourceError> {
    crate::qemu::cmdline::of_process(pid).map_err(|source| SourceError::Cmdline { pid, source })
}

/// `path` as process `pid` names it, absolute (a relative one is under its working
/// directory).
fn absolute_in(pid: i32, path: &std::path::Path) -> std::path::PathBuf {
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd.join(path),
        Err(_) => path.to_path_buf(),
    }
}

/// Runs of consecutive pages in sorted `pages`.
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

impl SourceRun {
    pub fn run(self) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.migrate()));
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(vm = %self.request.vm, "migration completed");
                self.job.finish(Phase::Completed, None);
            }
            Ok(Err(e)) => {
                let text = pager::error_chain(&e);
                tracing::warn!(vm = %self.request.vm, "migration failed: {text}");
                let phase = if matches!(e, SourceError::Cancelled) {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                self.job.finish(phase, Some(text));
            }
            Err(_) => self
                .job
                .finish(Phase::Failed, Some("the migration thread panicked".into())),
        }
    }

    fn cancelled(&self, e: SourceError) -> SourceError {
        if self.job.cancel.load(Ordering::Acquire) {
            SourceError::Cancelled
        } else {
            e
        }
    }

    fn migrate(&self) -> Result<(), SourceError> {
        let argv = cmdline_of(self.vm.peer.pid)?;
        let ram = crate::qemu::cmdline::check(&argv).map_err(SourceError::Check)?;
        let qmp_path = crate::qemu::dest::qmp_socket(&argv).ok_or(SourceError::NoQmp)?;
        let mut qmp = Qmp::connect(&qmp_path, Duration::from_secs(5))?;
        let was_running = qmp.execute("query-status", json!({}))?["running"]
            .as_bool()
            .unwrap_or(false);
        let swapdev = match self.mode {
            Mode::Agile => Some(self.shared_spec()?),
            _ => None,
        };
        let session: [u8; 16] = rand::random();
        let addr = self.to;
        let mut urgent = connect(&self.config, &self.request.to, addr)?;
        let opened = open_client(&mut urgent, &self.config.psk, Channel::Urgent, session)
            .map_err(|source| SourceError::Auth { addr, source })?;
        let mut bulk = connect(&self.config, &self.request.to, addr)?;
        open_client(&mut bulk, &self.config.psk, Channel::Bulk, session)
            .map_err(|source| SourceError::Auth { addr, source })?;
        let version = opened.version;
        let pages = self.vm.layout.pages();
        let ps = self.vm.layout.page_size();
        self.job.update(|s| s.ram.total = pages * ps as u64);
        write_message(
            &mut bulk,
            &Message::Setup(Setup {
                vm: self.request.vm.clone(),
                mode: self.mode,
                page_size: ps as u32,
                pages,
                qemu_argv: argv.clone(),
                swapdev,
            }),
        )?;
        bulk.set_read_timeout(Some(
            self.config.qemu_start_timeout + Duration::from_secs(10),
        ))
        .map_err(WireError::Io)?;
        let (dest_pid, incoming) = match read_message(&mut bulk, Some(version))? {
            Message::SetupOk { qemu_pid, incoming } => (qemu_pid, incoming),
            Message::Refuse(r) => return Err(SourceError::Refused(r)),
            Message::Abort(r) => return Err(SourceError::Aborted(r)),
            other => {
                return Err(SourceError::Unexpected {
                    got: other.command(),
                    expected: "SetupOk",
                })
            }
        };
        self.job.update(|s| {
            s.dest_qemu_pid = Some(dest_pid);
            s.setup_time = self.job.started.elapsed().as_millis() as u64;
            s.status = Phase::Active;
        });
        self.job.pages.store(pages, Ordering::Relaxed);
        let _timeline =
            super::timeline::sample_source(self.job.clone(), self.job.dirty_probe.clone());
        let held = Arc::new(Held::new(pages, self.job.held.clone()));
        let shared = match self.mode {
            Mode::Agile => Some(self.shared_device()?),
            _ => None,
        };
        let source = Arc::new(
            SourcePages::new(
                self.vm.clone(),
                self.handed_over.as_ref().map(|(_, d)| d.clone()),
                shared,
            )
            .map_err(SourceError::Memory)?,
        );
        let mut migrate_started = false;
        let mem_path = absolute_in(self.vm.peer.pid, &ram.mem_path);
        let journal = |source: &SourcePages| {
            self.write_journal(session, version, source, &mem_path, &qmp_path)
        };
        let before = self.before_switchover(
            &mut qmp,
            &bulk,
            &incoming,
            version,
            &source,
            &held,
            &mut migrate_started,
            &journal,
        );
        // The write tracking ends with the pre-copy: the timeline must not keep it alive.
        self.job.dirty_probe.set(None);
        if let Err(e) = before {
            let e = self.cancelled(e);
            self.roll_back(&mut qmp, &mut bulk, migrate_started, was_running, &e);
            self.remove_journal();
            return Err(e);
        }
        let after = self.after_switchover(urgent, bulk, version, session, source, held);
        if !matches!(after, Err(SourceError::LinkLost { .. })) {
            // (A destination still waiting can be resumed by a restart of this daemon.)
            self.remove_journal();
        }
        after?;
        // The source keeps nothing of the VM: its RAM file goes, its QEMU quits.
        let _ = qmp.execute("quit", json!({}));
        let _ = std::fs::remove_file(&ram.mem_path);
        self.engine.forget_handed_over(&self.request.vm);
        let quit = Instant::now();
        while self.daemon.vm(&self.request.vm).is_some() && quit.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The shared swap device's spec (agile): the one an earlier agile migration handed to
    /// this host, else the VM's own (it must be one both hosts reach).
    fn shared_spec(&self) -> Result<String, SourceError> {
        if let Some((spec, _)) = &self.handed_over {
            return Ok(spec.clone());
        }
        if self.vm.swapdev.is_none() {
            return Err(SourceError::NoSharedDevice);
        }
        self.vm
            .source_description
            .strip_prefix("swapdev ")
            .map(str::to_string)
            .ok_or(SourceError::NoSharedDevice)
    }

    /// The shared device itself (what agile releases to the destination).
    pub(super) fn shared_device(&self) -> Result<super::pages::SharedDevice, SourceError> {
        match &self.handed_over {
            Some((_, d)) => Ok(d.clone()),
            None => self.vm.swapdev.clone().ok_or(SourceError::NoSharedDevice),
        }
    }

    fn throttled(
        &self,
        bulk: &Link,
        cancel: Arc<AtomicBool>,
    ) -> Result<Throttle<Link>, SourceError> {
        push::throttled(
            &self.job,
            bulk,
            self.request.max_bandwidth.unwrap_or(0),
            cancel,
        )
    }
}
