//! The source side of one migration: connect and authenticate both channels, send the
//! setup, pre-copy by mode, pause QEMU at pre-switchover, send the final set, hand over the
//! swap device (agile), let QEMU move the devices, then push what the destination lacks
//! while answering its demand requests, and finally drop the VM's RAM here.
//!
//! Until `migrate-continue` every failure rolls back: the destination is told (`Abort`),
//! QEMU's migration is cancelled and the guest resumed if it was running. After it the
//! source keeps every page until the destination's report arrives.

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::dirty::{SubscribeOptions, Subscription};
use pager::server::migration::MigrateRequest;
use pager::server::Daemon;
use pager::vm::Vm;
use serde_json::{json, Value};

use super::engine::{EngineConfig, Job};
use super::pages::SourcePages;
use super::status::Phase;
use super::throttle::{Throttle, CANCELLED};
use crate::migrate::auth::{open_client, AuthError};
use crate::migrate::bulk::{push_pages, BulkError, PushOrder, SentPages, SourcePage};
use crate::migrate::frame::Command;
use crate::migrate::message::WireError;
use crate::migrate::message::{read_message, write_message, Channel, Message, Mode, Setup};
use crate::migrate::page_server::{serve_page_requests_with, PageServerError};
use crate::migrate::precopy::{run_rounds, send_round, PrecopyError, PrecopyLimits, StopRule};
use crate::migrate::qmp::{Qmp, QmpError};

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

fn connect(addr: SocketAddr) -> Result<TcpStream, SourceError> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|source| SourceError::Connect { addr, source })
}

/// The QEMU command line of process `pid`.
fn cmdline_of(pid: i32) -> Result<Vec<String>, SourceError> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|source| SourceError::Cmdline { pid, source })?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
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
        let mut urgent = connect(addr)?;
        let opened = open_client(&mut urgent, &self.config.psk, Channel::Urgent, session)
            .map_err(|source| SourceError::Auth { addr, source })?;
        let mut bulk = connect(addr)?;
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
        let before = self.before_switchover(
            &mut qmp,
            &bulk,
            &incoming,
            version,
            &source,
            &held,
            &mut migrate_started,
        );
        if let Err(e) = before {
            let e = self.cancelled(e);
            self.roll_back(&mut qmp, &mut bulk, migrate_started, was_running, &e);
            return Err(e);
        }
        self.after_switchover(urgent, bulk, version, source, held)?;
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
    fn shared_device(&self) -> Result<super::pages::SharedDevice, SourceError> {
        match &self.handed_over {
            Some((_, d)) => Ok(d.clone()),
            None => self.vm.swapdev.clone().ok_or(SourceError::NoSharedDevice),
        }
    }

    fn throttled(
        &self,
        bulk: &TcpStream,
        cancel: Arc<AtomicBool>,
    ) -> Result<Throttle<TcpStream>, SourceError> {
        let counter = self.job.transferred.clone();
        let stream = bulk.try_clone().map_err(WireError::Io)?;
        Ok(Throttle::new(
            stream,
            self.request.max_bandwidth.unwrap_or(0),
            cancel,
            counter,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn before_switchover(
        &self,
        qmp: &mut Qmp,
        bulk: &TcpStream,
        incoming: &str,
        version: u16,
        source: &Arc<SourcePages>,
        held: &Arc<Held>,
        migrate_started: &mut bool,
    ) -> Result<(), SourceError> {
        qmp.set_capabilities(&[("x-ignore-shared", true), ("pause-before-switchover", true)])?;
        let writes = self.vm.dirty.subscribe(SubscribeOptions {
            placed_counts_as_written: true,
        })?;
        let mut out =
            BufWriter::with_capacity(256 * 1024, self.throttled(bulk, self.job.cancel.clone())?);
        let (finish, syncs) = self.precopy(&writes, &mut out, source, held)?;
        if self.mode == Mode::Agile {
            // Hand the swap device over while the guest still runs (it is only read here
            // from now on: evictions wait for the migration), so the destination opens it
            // outside the downtime.
            let dev = self
                .vm
                .swapdev
                .as_ref()
                .ok_or(SourceError::NoSharedDevice)?;
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .release_ownership()
                .map_err(SourceError::Release)?;
            write_message(&mut out, &Message::Released)?;
        }
        out.flush().map_err(WireError::Io)?;
        self.wait_acks(bulk, version, syncs + u64::from(self.mode == Mode::Agile))?;
        if self.job.cancel.load(Ordering::Acquire) {
            return Err(SourceError::Cancelled);
        }
        // QEMU moves the devices; it pauses the guest at pre-switchover.
        qmp.execute("migrate", json!({ "uri": incoming }))?;
        *migrate_started = true;
        qmp.wait_status(&["pre-switchover"], QEMU_STEP_TIMEOUT)?;
        let paused = Instant::now();
        self.job.update(|s| s.status = Phase::PreSwitchover);
        // Placements already under way land (and count as written) before the last harvest.
        let settle = Instant::now();
        while source.in_flight() > 0 && settle.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let settled = paused.elapsed();
        let mut last = writes.harvest();
        last.sort_unstable();
        match finish {
            Finish::Data => {
                let mut read = self.reader(source, held, self.mode == Mode::Agile);
                send_round(&self.vm, &last, &mut out, &mut read)?;
            }
            Finish::Stale => {
                let stale: Vec<u64> = last.iter().copied().filter(|&p| held.get(p)).collect();
                for (first, count) in runs(&stale) {
                    write_message(&mut out, &Message::StalePages { first, count })?;
                }
                for &p in &stale {
                    held.set(p, false);
                }
                self.job.update(|s| s.pages_stale = stale.len() as u64);
            }
        }
        self.job
            .update(|s| s.ram.dirty_sync_count = s.rounds.len() as u64);
        let final_sent = paused.elapsed();
        write_message(&mut out, &Message::Switchover)?;
        out.flush().map_err(WireError::Io)?;
        drop(out);
        let mut reader = bulk.try_clone().map_err(WireError::Io)?;
        reader
            .set_read_timeout(Some(READY_TIMEOUT))
            .map_err(WireError::Io)?;
        match read_message(&mut reader, Some(version))? {
            Message::Ready => {}
            Message::Abort(r) => return Err(SourceError::Aborted(r)),
            other => {
                return Err(SourceError::Unexpected {
                    got: other.command(),
                    expected: "Ready",
                })
            }
        }
        let ready = paused.elapsed();
        // From here on the destination runs the guest: no roll-back.
        qmp.execute("migrate-continue", json!({ "state": "pre-switchover" }))?;
        let info = qmp.wait_status(&["completed"], QEMU_STEP_TIMEOUT)?;
        let downtime = paused.elapsed().as_millis() as u64;
        tracing::info!(
            vm = %self.request.vm,
            settled_ms = settled.as_millis() as u64,
            final_set = last.len(),
            final_sent_ms = final_sent.as_millis() as u64,
            ready_ms = ready.as_millis() as u64,
            downtime_ms = downtime,
            "switchover"
        );
        self.job.update(|s| {
            s.downtime = Some(downtime);
            s.qemu_downtime_ms = info.get("downtime").and_then(Value::as_u64);
            s.status = Phase::PostcopyActive;
        });
        Ok(())
    }

    /// A page reader for sends: records what the destination now holds.
    fn reader<'a>(
        &'a self,
        source: &'a SourcePages,
        held: &'a Held,
        stored_ok: bool,
    ) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<SourcePage> + 'a {
        move |p, buf| {
            let kind = source.read(p, buf, stored_ok)?;
            held.set(p, true);
            let job = &self.job;
            match kind {
                SourcePage::Data => job.normal.fetch_add(1, Ordering::Relaxed),
                SourcePage::Zero => job.duplicate.fetch_add(1, Ordering::Relaxed),
                SourcePage::Freed => job.freed.fetch_add(1, Ordering::Relaxed),
                SourcePage::Stored => job.stored.fetch_add(1, Ordering::Relaxed),
            };
            Ok(kind)
        }
    }

    /// Read `count` acknowledgements (of rounds, of the release): the destination has taken
    /// in everything sent so far.
    fn wait_acks(&self, bulk: &TcpStream, version: u16, count: u64) -> Result<(), SourceError> {
        let mut reader = bulk.try_clone().map_err(WireError::Io)?;
        reader
            .set_read_timeout(Some(READY_TIMEOUT))
            .map_err(WireError::Io)?;
        for _ in 0..count {
            match read_message(&mut reader, Some(version))? {
                Message::Ack { .. } => {}
                Message::Abort(r) => return Err(SourceError::Aborted(r)),
                other => {
                    return Err(SourceError::Unexpected {
                        got: other.command(),
                        expected: "Ack",
                    })
                }
            }
        }
        Ok(())
    }

    /// The pre-copy part of each mode; says how the last dirty set goes, and how many
    /// rounds the destination acknowledges.
    fn precopy(
        &self,
        writes: &Subscription,
        out: &mut impl Write,
        source: &SourcePages,
        held: &Held,
    ) -> Result<(Finish, u64), SourceError> {
        let downtime = Duration::from_millis(self.request.downtime_limit_ms.unwrap_or(300));
        let postcopy_after = self.request.postcopy_after_ms.map(Duration::from_millis);
        let limits = match self.mode {
            Mode::Postcopy => {
                self.announce_absent(out, source, held)?;
                write_message(
                    out,
                    &Message::RoundEnd {
                        round: 0,
                        sent: 0,
                        dirty: 0,
                    },
                )?;
                return Ok((Finish::Stale, 1));
            }
            // A guest that still dirties more than the link moves after 10 rounds will not
            // converge with more of them: they only cost bandwidth.
            Mode::Precopy => PrecopyLimits {
                downtime_limit: downtime,
                max_rounds: 10,
                max_time: postcopy_after.unwrap_or(Duration::from_secs(60)),
            },
            // One pass over what is not in the swap device; more only while it converges.
            Mode::Agile => PrecopyLimits {
                downtime_limit: downtime,
                max_rounds: 3,
                max_time: postcopy_after.unwrap_or(Duration::from_secs(30)),
            },
        };
        let read = self.reader(source, held, self.mode == Mode::Agile);
        let outcome = run_rounds(&self.vm, writes, &mut *out, limits, read)?;
        let (rule, rounds) = (outcome.stop, outcome.rounds.len());
        self.job.update(|s| {
            s.stop_rule = Some(outcome.stop);
            s.rounds = outcome.rounds;
        });
        let finish = match (self.mode, rule) {
            (Mode::Precopy, StopRule::Converged) => Finish::Data,
            (Mode::Precopy, _) if postcopy_after.is_some() => Finish::Stale,
            (Mode::Precopy, rule) => return Err(SourceError::NotConverged { rule, rounds }),
            _ => Finish::Stale,
        };
        Ok((finish, rounds as u64))
    }

    /// Post-copy's only pre-copy: which pages are zero or freed (never sent), as runs.
    fn announce_absent(
        &self,
        out: &mut impl Write,
        source: &SourcePages,
        held: &Held,
    ) -> Result<(), SourceError> {
        use pager::page_state::PageState;
        let mut zero = Vec::new();
        let mut freed = Vec::new();
        for p in 0..self.vm.layout.pages() {
            match self.vm.states.get(p) {
                PageState::Removed => freed.push(p),
                PageState::Missing | PageState::Zero if !source.in_a_store(p) => zero.push(p),
                _ => {}
            }
        }
        for (first, count) in runs(&zero) {
            write_message(out, &Message::ZeroPages { first, count })?;
        }
        for (first, count) in runs(&freed) {
            write_message(out, &Message::FreedPages { first, count })?;
        }
        for &p in zero.iter().chain(&freed) {
            held.set(p, true);
        }
        self.job
            .duplicate
            .fetch_add(zero.len() as u64, Ordering::Relaxed);
        self.job
            .freed
            .fetch_add(freed.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn after_switchover(
        &self,
        urgent: TcpStream,
        bulk: TcpStream,
        version: u16,
        source: Arc<SourcePages>,
        held: Arc<Held>,
    ) -> Result<(), SourceError> {
        let pages = self.vm.layout.pages();
        let ps = self.vm.layout.page_size();
        let sent = Arc::new(SentPages::new(pages));
        let (faults_tx, faults_rx) = crossbeam_channel::unbounded();
        let server = {
            let (sent, source, job) = (sent.clone(), source.clone(), self.job.clone());
            std::thread::Builder::new()
                .name(format!("migrate-{}-urgent", self.request.vm))
                .spawn(move || {
                    serve_page_requests_with(
                        urgent,
                        ps,
                        pages,
                        version,
                        Some(&sent),
                        |p| {
                            job.requests.fetch_add(1, Ordering::Relaxed);
                            let _ = faults_tx.send(p);
                        },
                        |p, buf| match source.read(p, buf, false)? {
                            SourcePage::Data => Ok(()),
                            _ => {
                                buf.fill(0);
                                Ok(())
                            }
                        },
                    )
                })
                .map_err(|e| SourceError::Memory(std::io::Error::other(e)))?
        };
        let never = Arc::new(AtomicBool::new(false));
        let mut order = {
            let held = held.clone();
            PushOrder::new(sent, move |p| held.get(p))
        };
        let out = self.throttled(&bulk, never.clone())?;
        let (data, zero) = push_pages(out, &mut order, ps, &faults_rx, &never, |p, buf| {
            source.read(p, buf, false)
        })?;
        self.job.update(|s| s.pages_pushed = data + zero);
        let mut reader = bulk;
        reader
            .set_read_timeout(Some(REPORT_TIMEOUT))
            .map_err(WireError::Io)?;
        let report = match read_message(&mut reader, Some(version))? {
            Message::Report(text) => serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
            Message::Abort(r) => return Err(SourceError::Aborted(r)),
            other => {
                return Err(SourceError::Unexpected {
                    got: other.command(),
                    expected: "Report",
                })
            }
        };
        drop(reader);
        let served = server
            .join()
            .map_err(|_| SourceError::Aborted("the urgent channel's thread panicked".into()))?;
        if let Err(e) = served {
            tracing::warn!(vm = %self.request.vm, "urgent channel: {}", pager::error_chain(&e));
        }
        // Every page is on the destination: drop the source's copy.
        let memory = source.memory();
        let len = pages * ps as u64;
        nix::fcntl::fallocate(
            memory.as_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            len as i64,
        )
        .map_err(|e| SourceError::Memory(e.into()))?;
        let released = self.job.started.elapsed().as_millis() as u64;
        self.job.update(|s| {
            s.source_released_ms = Some(released);
            if let Some(paths) = report.get("dest_paths").and_then(Value::as_object) {
                s.dest_paths = paths
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect();
            }
            s.destination = Some(report);
        });
        Ok(())
    }

    /// Undo a migration that failed before the switchover: the guest runs on here.
    fn roll_back(
        &self,
        qmp: &mut Qmp,
        bulk: &mut TcpStream,
        migrate_started: bool,
        was_running: bool,
        why: &SourceError,
    ) {
        let _ = write_message(bulk, &Message::Abort(pager::error_chain(why)));
        let _ = bulk.flush();
        // The destination closes the connection once it removed what it made: wait for
        // that, so a failed or cancelled migration is over on both hosts when it is reported.
        let _ = bulk.shutdown(std::net::Shutdown::Write);
        let _ = bulk.set_read_timeout(Some(Duration::from_secs(2)));
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match read_message(bulk, None) {
                Ok(_) => {}
                Err(WireError::TimedOut) => {}
                Err(_) => break,
            }
        }
        if migrate_started {
            let _ = qmp.execute("migrate_cancel", json!({}));
            let _ = qmp.wait_status(&["cancelled", "failed"], Duration::from_secs(10));
        }
        let running = qmp
            .execute("query-status", json!({}))
            .ok()
            .and_then(|s| s["running"].as_bool());
        if was_running && running == Some(false) {
            let _ = qmp.execute("cont", json!({}));
        }
        let released = self
            .vm
            .swapdev
            .as_ref()
            .is_some_and(|d| d.lock().unwrap_or_else(|e| e.into_inner()).is_released());
        if released {
            tracing::warn!(
                vm = %self.request.vm,
                "the guest runs on here, reading its released swap device: evictions of it \
                 are refused until the VM is attached again (nothing is lost)"
            );
        }
    }
}
