//! A destination daemon killed after the switchover, started again. The guest's QEMU lives
//! on (this daemon started it, it is not part of it) and its attach library waits for a
//! pager (the daemon told it a re-attach could serve it once the journal was written);
//! faults on pages still absent wait meanwhile. At its start the daemon reads each
//! destination journal ([`super::journal`]) and, before it accepts any attach:
//!
//! 1. checks the journal's QEMU (pid and start time) still runs (else the guest is gone:
//!    the journal is removed);
//! 2. prepares the VM for that QEMU's re-attach with the journal's routes: its page states
//!    are rebuilt from the memory file and its own swap device when it attaches, so a page
//!    placed before the kill is present and every absent one goes where the journal says
//!    (the source, the shared swap device, zero);
//! 3. registers the migration as paused under its first session id, so the source, which
//!    dials again every second since the link broke, is taken back (`Resume`): this host
//!    tells it every page it holds, the source sends the rest, and faults waiting on the
//!    source's pages are asked again;
//!
//! then, in a thread of its own, waits for the re-attach, takes the shared swap device back
//! (agile: this host owns it since the hand-off), waits for the source and completes as a
//! live destination would. The journal is removed once the migration is over either way.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::server::protocol::{LayoutSpec, PrepareSpec, RegionSpec, RouteRange};
use pager::server::Daemon;

use super::journal::{self, Journal};
use super::{Incoming, IncomingError};
use crate::migrate::message::{Mode, Setup};
use crate::migrate::qmp::Qmp;
use crate::migrate::session::engine::{Engine, Job, StartError};
use crate::migrate::session::journal::{dir_of, session_hex};
use crate::migrate::session::status::{Phase, Role};
use crate::qemu::cmdline::started_at;

/// How long a restarted destination waits for its QEMU to attach again (the attach library
/// tries every 200 ms for `PAGEWISE_PAGER_WAIT_SECS`, 60 s unless set).
const REATTACH_WITHIN: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("its QEMU (pid {pid}) is gone: the guest ended while no pager served it")]
    QemuGone { pid: i32 },
    #[error("the journal")]
    Journal(#[source] journal::JournalError),
    #[error("preparing the VM for its QEMU's re-attach")]
    Prepare(#[source] pager::server::prepare::PrepareError),
    #[error("registering the migration")]
    Claim(#[source] StartError),
    #[error("its QEMU (pid {pid}) did not attach again within {} s", REATTACH_WITHIN.as_secs())]
    NoReattach { pid: i32 },
    #[error("opening the memory file {path}")]
    Memory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning its thread")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Incoming(#[from] IncomingError),
}

/// Prepare every VM a destination journal of this host describes (at the daemon's start,
/// before attaches are accepted) and go on with its migration in the background.
pub(in crate::migrate::session) fn resume_journaled(engine: &Arc<Engine>) {
    let Some(daemon) = engine.daemon.upgrade() else {
        return;
    };
    let dir = dir_of(&engine.config.swapdev_dir);
    for (path, read) in journal::scan(&dir) {
        let journal = match read {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %pager::error_chain(&e),
                    "an incoming migration's journal cannot be read: left in place; the VM \
                     it describes cannot be taken back here");
                continue;
            }
        };
        let vm = journal.header.vm.clone();
        match restart(engine, &daemon, journal) {
            Ok(()) => tracing::warn!(vm, journal = %path.display(),
                "this daemon died after the switchover of an incoming migration: waiting for \
                 the VM's QEMU to attach again and for the source to reconnect"),
            Err(e) => {
                tracing::error!(vm, error = %pager::error_chain(&e),
                    "an incoming migration this daemon was running when it died cannot go on");
                remove_journal_of(engine, &vm);
            }
        }
    }
}

/// Steps 1-3 of the module's list, and the thread that does the rest.
fn restart(engine: &Arc<Engine>, daemon: &Arc<Daemon>, j: Journal) -> Result<(), RestartError> {
    let h = &j.header;
    let pid = h.qemu_pid;
    if started_at(pid) != Some(h.qemu_start) {
        return Err(RestartError::QemuGone { pid });
    }
    let mode = j.mode().map_err(RestartError::Journal)?;
    let routes = j
        .runs()
        .into_iter()
        .map(|(first_page, count, route)| RouteRange {
            first_page,
            count,
            route,
        })
        .collect();
    daemon
        .prepare_reattach(PrepareSpec {
            vm: h.vm.clone(),
            layout: LayoutSpec {
                page_size: u64::from(h.page_size),
                regions: vec![RegionSpec {
                    offset: 0,
                    // (`decode` bounded both: at most 2^30 pages of at most 1 GiB.)
                    size: h.pages * u64::from(h.page_size),
                }],
            },
            swapdev: Some(h.swapdev.clone()),
            states: vec![],
            routes,
        })
        .map_err(RestartError::Prepare)?;
    let job = Job::new(&h.vm, Role::Destination, Some(mode), "(restarted)".into());
    job.recovery.set_session(j.session());
    job.update(|s| {
        s.status = Phase::PostcopyPaused;
        s.restarted = true;
        s.dest_qemu_pid = u64::try_from(pid).ok();
        s.dest_paths = h.dest_paths.clone();
    });
    if let Err(e) = engine.claim(&h.vm, job.clone()) {
        daemon.unprepare(&h.vm);
        return Err(RestartError::Claim(e));
    }
    let vm = h.vm.clone();
    let (e, d, jb) = (engine.clone(), daemon.clone(), job.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("migrate-in-{vm}-restarted"))
        .spawn(move || run(&e, &d, j, mode, &jb));
    if let Err(e) = spawned {
        daemon.unprepare(&vm);
        job.finish(Phase::Failed, Some(format!("spawning its thread: {e}")));
        return Err(RestartError::Thread(e));
    }
    Ok(())
}

/// The rest of the migration; the journal goes once it is over, either way.
fn run(engine: &Arc<Engine>, daemon: &Arc<Daemon>, j: Journal, mode: Mode, job: &Arc<Job>) {
    let vm = j.header.vm.clone();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        go_on(engine, daemon, &j, mode, job)
    }));
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(pager::error_chain(&e)),
        Err(_) => Some("the migration thread panicked".to_string()),
    };
    match error {
        None => {
            tracing::info!(
                vm,
                "the incoming migration the restarted daemon went on with is complete"
            );
            job.finish(Phase::Completed, None);
        }
        Some(text) => {
            tracing::error!(
                vm,
                "the incoming migration the restarted daemon went on with failed: {text}"
            );
            // A VM whose QEMU never came back is no one's.
            if daemon.vm(&vm).is_none() {
                daemon.unprepare(&vm);
            }
            job.finish(Phase::Failed, Some(text));
            // (A completed migration removed it in `complete`.)
            remove_journal_of(engine, &vm);
        }
    }
}

fn go_on(
    engine: &Arc<Engine>,
    daemon: &Arc<Daemon>,
    j: &Journal,
    mode: Mode,
    job: &Arc<Job>,
) -> Result<(), RestartError> {
    let h = &j.header;
    let paused = Instant::now();
    let controller = loop {
        if let Some(c) = daemon.controller(&h.vm) {
            break c;
        }
        if started_at(h.qemu_pid) != Some(h.qemu_start) {
            return Err(RestartError::QemuGone { pid: h.qemu_pid });
        }
        if paused.elapsed() > REATTACH_WITHIN {
            return Err(RestartError::NoReattach { pid: h.qemu_pid });
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    tracing::info!(vm = %h.vm, waited_ms = paused.elapsed().as_millis() as u64,
        "the VM's QEMU attached again; its page states were rebuilt, its routes are the journal's");
    let memory = File::options()
        .read(true)
        .write(true)
        .open(&h.memory_file)
        .map_err(|source| RestartError::Memory {
            path: h.memory_file.display().to_string(),
            source,
        })?;
    let setup = Setup {
        vm: h.vm.clone(),
        mode,
        page_size: h.page_size,
        pages: h.pages,
        qemu_argv: Vec::new(),
        swapdev: h.shared.clone(),
    };
    let mut incoming = Incoming::new(
        engine.clone(),
        daemon.clone(),
        setup,
        job.clone(),
        String::new(),
    );
    incoming.memory = Some(memory);
    incoming.ready = true;
    incoming.mem_path = h.memory_file.clone();
    incoming.qmp_path = h.qmp.clone();
    incoming.device = h.swapdev.clone().into();
    if h.shared.is_some() {
        incoming.acquire_shared()?;
    }
    // (It counts the recovery and logs the pause, as after a cut link.)
    let mut bulk = incoming.wait_for_source(paused, h.wire_version, &controller)?;
    let received = incoming.receive_pushed(&mut bulk, h.wire_version, &controller)?;
    incoming.complete(&mut bulk, received, &controller)?;
    Ok(())
}

impl Incoming {
    /// The journal a restarted destination would go on from: the routes of every page now.
    pub(super) fn write_journal(&self, version: u16) -> Result<(), IncomingError> {
        let began = Instant::now();
        let vm = self.daemon.vm(&self.setup.vm).ok_or(IncomingError::Gone)?;
        let pid = self.qemu.as_ref().map(|q| q.pid() as i32).unwrap_or(0);
        let map = (0..self.pages())
            .map(|p| vm.routes.get(p).unwrap_or(pager::route::Route::Remote) as u8)
            .collect();
        let journal = Journal {
            header: journal::Header {
                vm: self.setup.vm.clone(),
                session: session_hex(&self.job.recovery.session().unwrap_or_default()),
                wire_version: version,
                mode: self.setup.mode.name().into(),
                page_size: self.setup.page_size,
                pages: self.pages(),
                memory_file: self.mem_path.clone(),
                swapdev: self.device.display().to_string(),
                shared: self.setup.swapdev.clone().filter(|_| self.acquired),
                qmp: self.qmp_path.clone(),
                qemu_pid: pid,
                qemu_start: started_at(pid).unwrap_or(0),
                dest_paths: self.job.snapshot().dest_paths,
            },
            map,
        };
        journal::write(&dir_of(&self.engine.config.swapdev_dir), &journal)
            .map_err(IncomingError::Journal)?;
        tracing::info!(vm = %self.setup.vm, journal_ms = began.elapsed().as_millis() as u64,
            "incoming migration journaled before Ready");
        Ok(())
    }

    pub(super) fn remove_journal(&self) {
        remove_journal_of(&self.engine, &self.setup.vm);
    }

    /// Whether the VM's QEMU runs, asked over its QMP socket (a restarted destination did
    /// not start it).
    pub(super) fn running_by_qmp(&self) -> Option<bool> {
        let mut qmp = Qmp::connect(&self.qmp_path, Duration::from_secs(5)).ok()?;
        let status = qmp.execute("query-status", serde_json::json!({})).ok()?;
        Some(status["status"] == "running")
    }
}

fn remove_journal_of(engine: &Engine, vm: &str) {
    crate::migrate::session::journal::remove_logged::<journal::Header>(
        &engine.config.swapdev_dir,
        vm,
    );
}
