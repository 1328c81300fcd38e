//! The control socket, server side: one thread per connection reads newline-delimited
//! [`Request`]s and answers each in order (wire format: [`super::protocol`]).
//!
//! A request is handled to completion before the next line is read, however long it takes;
//! only a connection idle between requests is closed ([`IDLE_TIMEOUT`](super::protocol::IDLE_TIMEOUT)). A malformed or
//! oversized line is answered with [`Response::Error`] naming the problem, and the
//! connection stays usable.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::error::render_chain;
use super::prepare::{PrepareError, SeedError};
use super::protocol::{
    ListedVm, ProtocolError, Request, Response, StateCounts, StatsReport, VmStats, VmStatus,
    MAX_REQUEST_BYTES, PROTOCOL_VERSION,
};
use super::Daemon;
use crate::evict::control::{EvictCommandError, EvictRegistry};
use crate::vm::Vm;

pub use super::client::{ControlClient, ControlError};
pub use super::protocol;

/// Longest a client may take to accept an answer before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a control request failed (sent as [`Response::Error`] with its chain rendered).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("no VM named {vm:?} is attached")]
    NoSuchVm { vm: String },
    #[error("eviction is not enabled in this daemon")]
    NoEviction,
    #[error(transparent)]
    Evict(#[from] EvictCommandError),
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Seed(#[from] SeedError),
    #[error("no VM named {vm:?} is prepared")]
    NotPrepared { vm: String },
    #[error(transparent)]
    Tracking(#[from] super::tracking::TrackingError),
    #[error("VM {vm:?} is not served from a swap device")]
    NoSwapdev { vm: String },
    #[error("this daemon has no migration endpoint (start it with --migrate-listen)")]
    NoMigration,
    #[error("migration of VM {vm:?}")]
    Migration {
        vm: String,
        #[source]
        source: crate::source::BoxError,
    },
    #[error("VM {vm:?} is being migrated; eviction waits for the migration to end")]
    Migrating { vm: String },
    #[error("releasing VM {vm:?}'s swap device")]
    Release {
        vm: String,
        #[source]
        source: swapdev::SwapError,
    },
}

/// Look up an attached VM by name.
pub fn require_vm(daemon: &Daemon, name: &str) -> Result<Arc<Vm>, CommandError> {
    daemon
        .vm(name)
        .ok_or_else(|| CommandError::NoSuchVm { vm: name.into() })
}

/// The statistics of one VM (without eviction figures).
pub fn vm_stats(vm: &Vm, flavour: &str, prefetch: &str) -> VmStats {
    let m = vm.metrics.snapshot();
    VmStats {
        vm: vm.name.clone(),
        flavour: flavour.into(),
        pid: vm.peer.pid,
        uid: vm.peer.uid,
        source: vm.source_description.clone(),
        prefetch: prefetch.into(),
        page_size: vm.page_size(),
        pages: vm.layout.pages(),
        wp_registered: vm.wp_registered,
        attached_secs: vm.attached_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        states: StateCounts::from_census(&vm.states.census()),
        dirty_pages: vm.dirty.count() as u64,
        fault_latency_p50_us: m.fault_latency.quantile_us(0.5),
        fault_latency_p99_us: m.fault_latency.quantile_us(0.99),
        fault_latency_mean_us: m.fault_latency.mean_us(),
        metrics: m,
        eviction: None,
        damaged: vm.damage.get(),
    }
}

/// `stats` of every VM or only `only`, with eviction figures where tracking runs.
pub fn all_stats(daemon: &Daemon, only: Option<&str>) -> Result<StatsReport, CommandError> {
    let mut vms: Vec<(Arc<Vm>, VmStats)> = daemon.with_entries(|entries| {
        entries
            .values()
            .filter(|e| only.is_none_or(|o| o == e.vm.name))
            .map(|e| (e.vm.clone(), vm_stats(&e.vm, e.flavour, &e.prefetch)))
            .collect()
    });
    if let (Some(name), true) = (only, vms.is_empty()) {
        return Err(CommandError::NoSuchVm { vm: name.into() });
    }
    vms.sort_by(|a, b| a.1.vm.cmp(&b.1.vm));
    if let Some(ev) = daemon.evictor() {
        for (vm, s) in &mut vms {
            s.eviction = ev.stats_of(daemon, vm);
        }
    }
    Ok(StatsReport {
        vms: vms.into_iter().map(|(_, s)| s).collect(),
        migrations: daemon.migration().map(|m| m.overview()).unwrap_or_default(),
    })
}

fn list(daemon: &Daemon) -> Vec<ListedVm> {
    let mut out: Vec<ListedVm> = daemon
        .vms()
        .iter()
        .map(|vm| ListedVm {
            vm: vm.name.clone(),
            status: VmStatus::Attached,
            pid: Some(vm.peer.pid),
            source: vm.source_description.clone(),
            pages: vm.layout.pages(),
        })
        .collect();
    out.extend(daemon.prepared_list());
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}

fn answer(daemon: &Daemon, request: Request) -> Result<Response, CommandError> {
    Ok(match request {
        Request::Ping => Response::Pong {
            version: PROTOCOL_VERSION,
        },
        Request::Commands => Response::Commands {
            ops: Request::OPS
                .iter()
                .filter(|op| daemon.evictor().is_some() || !is_eviction_op(op))
                .filter(|op| daemon.migration().is_some() || !op.starts_with("migrate"))
                .map(|s| s.to_string())
                .collect(),
        },
        Request::List => Response::List { vms: list(daemon) },
        Request::Stats { vm } => Response::Stats(all_stats(daemon, vm.as_deref())?),
        Request::Detach { vm } => {
            if !daemon.detach(&vm) {
                return Err(CommandError::NoSuchVm { vm });
            }
            Response::Detached { vm }
        }
        Request::Evict {
            vm,
            goal,
            batch_pages,
            wait,
        } => {
            if daemon.is_migrating(&vm) {
                return Err(CommandError::Migrating { vm });
            }
            evictor(daemon)?.start_eviction(daemon, &vm, goal, batch_pages, wait)?
        }
        Request::EvictStatus { vm } => evictor(daemon)?.status(daemon, &vm)?,
        Request::EvictCancel { vm } => evictor(daemon)?.cancel(daemon, &vm)?,
        Request::Wss { vm } => evictor(daemon)?.wss(daemon, vm.as_deref())?,
        Request::Prepare(spec) => daemon.prepare(spec)?,
        Request::Unprepare { vm } => {
            if !daemon.unprepare(&vm) {
                return Err(CommandError::NotPrepared { vm });
            }
            Response::Unprepared { vm }
        }
        Request::Seed { vm, states, routes } => {
            let target = require_vm(daemon, &vm)?;
            let (states_set, routes_set) = super::prepare::seed(&target, &states, &routes)?;
            Response::Seeded {
                vm,
                states_set,
                routes_set,
            }
        }
        Request::Census { vm, ranges } => {
            let target = require_vm(daemon, &vm)?;
            Response::Census(super::prepare::census(&target, ranges)?)
        }
        Request::DirtyStart {
            vm,
            consumer,
            placed_counts_as_written,
        } => {
            let target = require_vm(daemon, &vm)?;
            let pages = daemon
                .tracking()
                .start(target, &consumer, placed_counts_as_written)?;
            Response::DirtyStarted {
                vm,
                consumer,
                pages,
            }
        }
        Request::DirtyHarvest { vm, consumer } => {
            let target = require_vm(daemon, &vm)?;
            Response::DirtySet(daemon.tracking().harvest(&target, &consumer)?)
        }
        Request::SwapdevRelease { vm } => {
            let target = require_vm(daemon, &vm)?;
            let dev = target
                .swapdev
                .as_ref()
                .ok_or_else(|| CommandError::NoSwapdev { vm: vm.clone() })?;
            let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
            dev.release_ownership()
                .map_err(|source| CommandError::Release {
                    vm: vm.clone(),
                    source,
                })?;
            Response::SwapdevReleased {
                generation: dev.generation(),
                vm,
            }
        }
        Request::Migrate(request) => {
            let vm = request.vm.clone();
            let m = daemon.migration().ok_or(CommandError::NoMigration)?;
            Response::Migration(
                m.start(request)
                    .map_err(|source| CommandError::Migration { vm, source })?,
            )
        }
        Request::MigrateStatus { vm } => {
            let m = daemon.migration().ok_or(CommandError::NoMigration)?;
            Response::Migration(
                m.status(&vm)
                    .map_err(|source| CommandError::Migration { vm, source })?,
            )
        }
        Request::MigrateCancel { vm } => {
            let m = daemon.migration().ok_or(CommandError::NoMigration)?;
            Response::Migration(
                m.cancel(&vm)
                    .map_err(|source| CommandError::Migration { vm, source })?,
            )
        }
        Request::MigrateResume { vm } => {
            let m = daemon.migration().ok_or(CommandError::NoMigration)?;
            Response::Migration(
                m.resume(&vm)
                    .map_err(|source| CommandError::Migration { vm, source })?,
            )
        }
        Request::DirtyStop { vm, consumer } => {
            if !daemon.tracking().stop(&vm, &consumer) {
                return Err(super::tracking::TrackingError::NotTracking { vm, consumer }.into());
            }
            Response::DirtyStopped { vm, consumer }
        }
    })
}

fn evictor(daemon: &Daemon) -> Result<&Arc<EvictRegistry>, CommandError> {
    daemon.evictor().ok_or(CommandError::NoEviction)
}

fn is_eviction_op(op: &str) -> bool {
    matches!(op, "evict" | "evict_status" | "evict_cancel" | "wss")
}

/// Answer one request.
pub fn handle(daemon: &Daemon, request: Request) -> Response {
    answer(daemon, request).unwrap_or_else(|e| Response::Error {
        message: render_chain(&e),
    })
}

/// Answer one line of the wire format (malformed lines get an error response).
pub fn handle_line(daemon: &Daemon, line: &[u8]) -> Response {
    match Request::decode(line) {
        Ok(r) => handle(daemon, r),
        Err(e) => Response::Error {
            message: render_chain(&e),
        },
    }
}

/// What reading the next request line found.
enum Line {
    Complete(Vec<u8>),
    /// Longer than the limit; the rest of it was read and dropped.
    TooLarge,
    Eof,
}

/// Read one line of at most `limit` bytes (an overlong line is consumed to its end).
fn read_line(reader: &mut impl BufRead, limit: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let mut overflow = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            // EOF: a final line without a newline still counts.
            return Ok(match (overflow, buf.is_empty()) {
                (true, _) => Line::TooLarge,
                (false, true) => Line::Eof,
                (false, false) => Line::Complete(buf),
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !overflow {
            if buf.len() + take > limit + 1 {
                overflow = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(&chunk[..take]);
            }
        }
        reader.consume(take);
        if done {
            return Ok(if overflow {
                Line::TooLarge
            } else {
                Line::Complete(buf)
            });
        }
    }
}

/// Wait until `stream` is readable; false on idle timeout
/// ([`super::DaemonConfig::control_idle_timeout`], default [`IDLE_TIMEOUT`](super::protocol::IDLE_TIMEOUT)) or shutdown.
fn wait_for_request(daemon: &Daemon, stream: &UnixStream) -> bool {
    let idle = daemon.config().control_idle_timeout;
    let timeout = PollTimeout::try_from(idle).unwrap_or(PollTimeout::MAX);
    loop {
        let mut fds = [
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            PollFd::new(daemon.stop_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(0) => {
                tracing::debug!("control connection idle; closing it");
                return false;
            }
            Ok(_) => return fds[1].revents().is_none_or(|r| r.is_empty()),
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::warn!(%e, "poll on a control connection failed");
                return false;
            }
        }
    }
}

/// Serve one control connection until the client closes it (or it idles out).
pub fn serve_connection(daemon: &Daemon, mut stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if let Err(e) = daemon.config().access.admit(&stream) {
        let why = render_chain(&e);
        tracing::warn!("refused control connection: {why}");
        let refusal = Response::Error {
            message: format!("refused: {why}"),
        };
        let _ = stream.write_all(refusal.encode().as_bytes());
        // Stay until the client closes (briefly), so its request is written, not reset,
        // and it reads why; what it sends is thrown away.
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = std::io::copy(&mut (&stream).take(64 * 1024), &mut std::io::sink());
        return;
    }
    let Ok(mut writer) = stream.try_clone() else {
        tracing::warn!("could not duplicate a control connection");
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        if reader.buffer().is_empty() && !wait_for_request(daemon, reader.get_ref()) {
            return;
        }
        let response = match read_line(&mut reader, MAX_REQUEST_BYTES) {
            Ok(Line::Eof) => return,
            Ok(Line::Complete(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Line::Complete(line)) => handle_line(daemon, &line),
            Ok(Line::TooLarge) => Response::Error {
                message: ProtocolError::TooLarge.to_string(),
            },
            Err(e) => {
                tracing::debug!(%e, "reading a control request failed");
                return;
            }
        };
        if let Err(e) = writer.write_all(response.encode().as_bytes()) {
            tracing::debug!(%e, "control client went away");
            return;
        }
    }
}

/// Serve the control socket until the daemon shuts down.
pub fn serve_control(daemon: &Arc<Daemon>, listener: UnixListener) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(%e, "control socket set_nonblocking failed");
        return;
    }
    while daemon.wait_readable(listener.as_fd(), "control socket") {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(%e, "control accept failed");
                continue;
            }
        };
        let daemon = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("pw-control".into())
            .spawn(move || serve_connection(&daemon, stream));
        if let Err(e) = spawned {
            tracing::warn!(%e, "could not start a control connection thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_overlong_ones_skipped() {
        let input = b"{\"a\":1}\n0123456789abcdef\nlast".to_vec();
        let mut r = std::io::BufReader::with_capacity(4, &input[..]);
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Complete(l) if l == b"{\"a\":1}\n"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::TooLarge));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Complete(l) if l == b"last"));
        assert!(matches!(read_line(&mut r, 10).unwrap(), Line::Eof));
    }
}
