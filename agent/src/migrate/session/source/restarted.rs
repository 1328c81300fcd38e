//! A source daemon killed after a switchover, started again: the guest runs on the
//! destination, which pauses its post-copy and waits for this host (its
//! `--recover-timeout`). The journal the dead daemon wrote before `migrate-continue`
//! (`journal.rs`) says where each page is on this host; a job per journal dials the
//! destination with `Resume`, learns what it holds, and pushes the rest while answering its
//! demand requests, reading the guest's RAM file and (read-only) its swap devices. The
//! source QEMU is gone by then (told at the switchover not to attach to a restarted daemon).
//!
//! Nothing is removed before the destination's report: then the RAM file is punched and
//! removed, and the journal goes. A destination that refuses the session (it never switched
//! over, or it gave up) gets nothing, and nothing is touched here but the journal.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use swapdev::{PageData, SwapDevice};

use super::journal::{self, Journal, Where};
use super::push::Pusher;
use super::{Held, SourceError, SourceRun};
use crate::migrate::bulk::SourcePage;
use crate::migrate::qmp::Qmp;
use crate::migrate::session::engine::{Engine, Job};
use crate::migrate::session::pages::{PushSource, SourcePages};
use crate::migrate::session::status::{Phase, Role};
use crate::qemu::cmdline::started_at;

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("opening the guest's RAM file {path}, which the journal names")]
    Memory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the guest's RAM file {path} is {len} bytes; the journal's {pages} pages of {page_size} \
         bytes need {need}"
    )]
    MemoryTooSmall {
        path: PathBuf,
        len: u64,
        pages: u64,
        page_size: u32,
        need: u64,
    },
    #[error("the journal places pages in the {what} swap device but names none")]
    NoDevice { what: &'static str },
    #[error("opening swap device {spec} read-only")]
    Device {
        spec: String,
        #[source]
        source: swapdev::SwapError,
    },
    #[error(
        "the switchover never happened: the source QEMU (pid {pid}) still runs and its \
         migration is {status:?}; the guest is this host's"
    )]
    NotSwitchedOver { pid: i32, status: String },
    #[error(
        "the source QEMU (pid {pid}) still runs and does not answer on QMP: whether the \
         switchover happened is unknown"
    )]
    QemuUnreachable {
        pid: i32,
        #[source]
        source: crate::migrate::qmp::QmpError,
    },
    #[error(
        "the destination finished, but says its QEMU does not run: the guest's RAM file stays \
         here ({report})"
    )]
    DestinationNotRunning { report: String },
    #[error("the push")]
    Source(#[from] SourceError),
}

/// Whether the guest left this host: a source QEMU that still lives says so itself (its
/// migration `completed`); one that is gone ended with its daemon after the switchover was
/// set in motion (the destination then decides: it refuses a session it does not run).
fn switchover_happened(h: &journal::Header) -> Result<(), RestartError> {
    let (Some(pid), Some(start)) = (h.qemu_pid, h.qemu_start) else {
        return Ok(());
    };
    if started_at(pid) != Some(start) {
        return Ok(());
    }
    let asked = h
        .qmp
        .as_deref()
        .ok_or(crate::migrate::qmp::QmpError::Closed)
        .and_then(|path| Qmp::connect(path, Duration::from_secs(5)))
        .and_then(|mut qmp| qmp.execute("query-migrate", json!({})));
    let info = asked.map_err(|source| RestartError::QemuUnreachable { pid, source })?;
    let status = info["status"].as_str().unwrap_or("none").to_string();
    if status != "completed" {
        return Err(RestartError::NotSwitchedOver { pid, status });
    }
    Ok(())
}

/// Where a restarted source reads pages: the map the journal holds.
struct JournaledPages {
    map: Vec<u8>,
    page_size: usize,
    memory: File,
    own: Option<Mutex<SwapDevice>>,
    handed_over: Option<Mutex<SwapDevice>>,
}

fn read_device(dev: &Mutex<SwapDevice>, p: u64, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
    match dev.read_page(p).map_err(std::io::Error::other)? {
        PageData::Data(data) => {
            buf.copy_from_slice(data.as_slice());
            Ok(true)
        }
        PageData::Zero | PageData::NotStored => Ok(false),
    }
}

impl PushSource for JournaledPages {
    fn read_for_push(&self, p: u64, buf: &mut [u8]) -> std::io::Result<SourcePage> {
        let place = usize::try_from(p)
            .ok()
            .and_then(|i| self.map.get(i))
            .and_then(|b| Where::from_byte(*b))
            .ok_or_else(|| std::io::Error::other(format!("page {p} is not in the journal")))?;
        let data = match place {
            Where::Memory => {
                self.memory.read_exact_at(buf, p * self.page_size as u64)?;
                true
            }
            Where::OwnDevice | Where::HandedOver => {
                let dev = if place == Where::OwnDevice {
                    &self.own
                } else {
                    &self.handed_over
                };
                // (`open` opened every device the map names.)
                match dev {
                    Some(dev) => read_device(dev, p, buf)?,
                    None => return Err(std::io::Error::other("no device for the page")),
                }
            }
            Where::Freed => return Ok(SourcePage::Freed),
            Where::Zero => false,
            Where::Shared => {
                return Err(std::io::Error::other(format!(
                    "page {p} is in the shared swap device the destination reads itself"
                )))
            }
        };
        Ok(if data && !swapdev::is_zero_page(buf) {
            SourcePage::Data
        } else {
            SourcePage::Zero
        })
    }

    fn memory(&self) -> &File {
        &self.memory
    }
}

fn open_device(
    spec: Option<&str>,
    what: &'static str,
    host: &str,
) -> Result<Mutex<SwapDevice>, RestartError> {
    let spec = spec.ok_or(RestartError::NoDevice { what })?;
    let failed = |source| RestartError::Device {
        spec: spec.into(),
        source,
    };
    let options = swapdev::backend::spec::SpecOptions {
        read_only: true,
        ..Default::default()
    };
    let backend =
        swapdev::backend::spec::open_backend(spec, &options).map_err(|e| failed(e.into()))?;
    let dev = SwapDevice::open(backend, swapdev::OpenOptions::read_only(host)).map_err(failed)?;
    Ok(Mutex::new(dev))
}

impl JournaledPages {
    fn open(journal: &Journal, host: &str) -> Result<Self, RestartError> {
        let h = &journal.header;
        let path = &h.memory_file;
        let memory = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| RestartError::Memory {
                path: path.clone(),
                source,
            })?;
        let len = memory
            .metadata()
            .map_err(|source| RestartError::Memory {
                path: path.clone(),
                source,
            })?
            .len();
        // (`decode` bounded both factors.)
        let need = h.pages * u64::from(h.page_size);
        if len < need {
            return Err(RestartError::MemoryTooSmall {
                path: path.clone(),
                len,
                pages: h.pages,
                page_size: h.page_size,
                need,
            });
        }
        let uses = |w: Where| journal.map.contains(&(w as u8));
        let own = match uses(Where::OwnDevice) {
            true => Some(open_device(h.own_device.as_deref(), "VM's own", host)?),
            false => None,
        };
        let handed_over = match uses(Where::HandedOver) {
            true => Some(open_device(
                h.handed_over_device.as_deref(),
                "handed-over",
                host,
            )?),
            false => None,
        };
        Ok(Self {
            map: journal.map.clone(),
            page_size: h.page_size as usize,
            memory,
            own,
            handed_over,
        })
    }
}

/// Start a job for every journal this host's migrations left (at the daemon's start).
pub(in crate::migrate::session) fn resume_journaled(engine: &Arc<Engine>) {
    let dir = journal::dir_of(&engine.config.swapdev_dir);
    for (path, read) in journal::scan(&dir) {
        let journal = match read {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %pager::error_chain(&e),
                    "a migration journal cannot be read: left in place; the migration it \
                     describes cannot be resumed from here");
                continue;
            }
        };
        let vm = journal.header.vm.clone();
        // (`decode` checked the mode.)
        let mode = journal.mode().ok();
        let job = Job::new(&vm, Role::Source, mode, journal.header.to.clone());
        if let Err(e) = engine.claim(&vm, job.clone()) {
            tracing::error!(vm, error = %e, "resuming a journaled migration");
            continue;
        }
        let run = Restarted {
            engine: engine.clone(),
            job,
            journal,
            path,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{vm}-restarted"))
            .spawn(move || run.run());
        if let Err(e) = spawned {
            tracing::error!(vm, %e, "spawning the thread of a journaled migration");
        }
    }
}

struct Restarted {
    engine: Arc<Engine>,
    job: Arc<Job>,
    journal: Journal,
    path: PathBuf,
}

impl Restarted {
    fn run(self) {
        let vm = self.journal.header.vm.clone();
        tracing::warn!(vm, journal = %self.path.display(), to = %self.journal.header.to,
            "this daemon died after the switchover of a migration: resuming its push");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.resume()));
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(vm, "migration completed (resumed by a restarted daemon)");
                self.job.finish(Phase::Completed, None);
            }
            Ok(Err(e)) => {
                let text = pager::error_chain(&e);
                if matches!(
                    e,
                    RestartError::Source(SourceError::Refused(_))
                        | RestartError::NotSwitchedOver { .. }
                        | RestartError::DestinationNotRunning { .. }
                ) {
                    // Not a migration to resume: nothing here is touched.
                    tracing::warn!(vm, "{text}: the journal is removed, nothing else");
                    self.forget();
                } else {
                    tracing::error!(
                        vm,
                        "resuming the migration failed: {text}; the guest's \
                        RAM file and the journal stay"
                    );
                }
                self.job.finish(Phase::Failed, Some(text));
            }
            Err(_) => self
                .job
                .finish(Phase::Failed, Some("the migration thread panicked".into())),
        }
    }

    fn forget(&self) {
        remove_journal_of(&self.engine.config.swapdev_dir, &self.journal.header.vm);
    }

    fn resume(&self) -> Result<(), RestartError> {
        let h = &self.journal.header;
        let pages = h.pages;
        self.job
            .pages
            .store(pages, std::sync::atomic::Ordering::Relaxed);
        self.job.update(|s| {
            s.ram.total = pages * u64::from(h.page_size);
            s.restarted = true;
            s.status = Phase::PostcopyPaused;
        });
        switchover_happened(h)?;
        let source: Arc<dyn PushSource> = Arc::new(JournaledPages::open(
            &self.journal,
            &self.engine.config.host_id,
        )?);
        let held = Arc::new(Held::new(pages, self.job.held.clone()));
        let pusher = Pusher {
            config: self.engine.config.clone(),
            job: self.job.clone(),
            vm: h.vm.clone(),
            to: h.to.clone(),
            addr: h.addr,
            max_bandwidth: h.max_bandwidth,
            pages,
            page_size: h.page_size as usize,
        };
        let report = pusher.push_until_report(
            None,
            h.wire_version,
            self.journal.session(),
            source.clone(),
            held,
        )?;
        if report.get("qemu_running") == Some(&serde_json::Value::Bool(false)) {
            return Err(RestartError::DestinationNotRunning {
                report: report.to_string(),
            });
        }
        pusher.release(&*source, report)?;
        // The source keeps nothing of the VM: its RAM file goes, a QEMU left over quits.
        if let Some(qmp) = &h.qmp {
            if let Ok(mut qmp) = Qmp::connect(qmp, Duration::from_millis(500)) {
                let _ = qmp.execute("quit", json!({}));
            }
        }
        let _ = std::fs::remove_file(&h.memory_file);
        self.forget();
        Ok(())
    }
}

impl SourceRun {
    /// Write the journal a restarted daemon resumes this migration from (right before
    /// `migrate-continue`). A RAM file that is not a file of its own (QEMU unlinks the one it
    /// makes in a `mem-path` directory) cannot be read after this daemon: then there is none.
    pub(super) fn write_journal(
        &self,
        session: [u8; 16],
        version: u16,
        source: &SourcePages,
        mem_path: &Path,
        qmp: &Path,
    ) -> Result<(), SourceError> {
        if !std::fs::metadata(mem_path).is_ok_and(|m| m.is_file()) {
            tracing::warn!(vm = %self.request.vm, path = %mem_path.display(),
                "the guest's RAM is not a file of its own: a daemon restarted after the \
                 switchover could not resume this migration");
            return Ok(());
        }
        let own_device = match self.vm.swapdev.is_some() {
            true => self
                .vm
                .source_description
                .strip_prefix("swapdev ")
                .map(str::to_string),
            false => None,
        };
        let journal = Journal {
            header: journal::Header {
                vm: self.request.vm.clone(),
                session: journal::session_hex(&session),
                to: self.request.to.clone(),
                addr: self.to,
                wire_version: version,
                mode: self.request.mode.clone(),
                page_size: self.vm.layout.page_size() as u32,
                pages: self.vm.layout.pages(),
                memory_file: mem_path.to_path_buf(),
                own_device,
                handed_over_device: self.handed_over.as_ref().map(|(spec, _)| spec.clone()),
                max_bandwidth: self.request.max_bandwidth.unwrap_or(0),
                qmp: Some(qmp.to_path_buf()),
                qemu_pid: Some(self.vm.peer.pid),
                qemu_start: started_at(self.vm.peer.pid),
            },
            map: source.snapshot_map().map_err(SourceError::Memory)?,
        };
        let dir = journal::dir_of(&self.config.swapdev_dir);
        journal::write(&dir, &journal).map_err(SourceError::Journal)?;
        Ok(())
    }

    /// The migration is over (or will not be resumed): its journal goes.
    pub(super) fn remove_journal(&self) {
        remove_journal_of(&self.config.swapdev_dir, &self.request.vm);
    }
}

/// Remove `vm`'s source journal from this host's `swapdev_dir` (a failure is logged: a
/// journal left behind is refused by the destination when a restart tries it).
fn remove_journal_of(swapdev_dir: &Path, vm: &str) {
    crate::migrate::session::journal::remove_logged::<journal::Header>(swapdev_dir, vm);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_without_a_live_qemu_leaves_the_choice_to_the_destination() {
        let header = |pid, start| journal::Header {
            vm: "vm1".into(),
            session: "00".repeat(16),
            to: "127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            wire_version: 1,
            mode: "postcopy".into(),
            page_size: 4096,
            pages: 1,
            memory_file: "/nonexistent".into(),
            own_device: None,
            handed_over_device: None,
            max_bandwidth: 0,
            qmp: Some("/nonexistent.qmp".into()),
            qemu_pid: pid,
            qemu_start: start,
        };
        assert!(switchover_happened(&header(None, None)).is_ok());
        assert!(switchover_happened(&header(Some(i32::MAX), Some(1))).is_ok());
        // This process "is" the QEMU, alive, with a start time that does not match: another
        // process took the pid.
        let me = i32::try_from(std::process::id()).unwrap();
        let start = started_at(me).unwrap();
        assert!(switchover_happened(&header(Some(me), Some(start + 1))).is_ok());
        // Alive, and its QMP socket does not answer: unknown, not resumed.
        let e = switchover_happened(&header(Some(me), Some(start))).unwrap_err();
        assert!(
            matches!(e, RestartError::QemuUnreachable { pid, .. } if pid == me),
            "{e}"
        );
    }

    #[test]
    fn a_journaled_page_is_read_from_where_the_journal_says() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[..4096].fill(7);
        bytes[4096..8192].fill(9);
        std::fs::write(&path, &bytes).unwrap();
        let pages = JournaledPages {
            // Memory (data), Memory (its bytes are ignored: freed), Zero, Shared.
            map: vec![0, 3, 4, 5],
            page_size: 4096,
            memory: File::open(&path).unwrap(),
            own: None,
            handed_over: None,
        };
        let mut buf = vec![0u8; 4096];
        assert!(matches!(
            pages.read_for_push(0, &mut buf).unwrap(),
            SourcePage::Data
        ));
        assert!(buf.iter().all(|b| *b == 7));
        assert!(matches!(
            pages.read_for_push(1, &mut buf).unwrap(),
            SourcePage::Freed
        ));
        assert!(matches!(
            pages.read_for_push(2, &mut buf).unwrap(),
            SourcePage::Zero
        ));
        assert!(pages.read_for_push(3, &mut buf).is_err(), "shared");
        assert!(pages.read_for_push(4, &mut buf).is_err(), "beyond the map");
    }
}
