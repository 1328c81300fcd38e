//! The destination QEMU: started by the destination daemon from the source's rewritten
//! command line (`agent::qemu::dest`) under the attach library, the way `pagewise vm run`
//! starts one, and supervised by it (a reaper thread logs its exit; it outlives the
//! migration, which only kills it when the migration fails before the switchover).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pager::server::Daemon;
use serde_json::json;

use super::engine::EngineConfig;
use crate::migrate::qmp::{Qmp, QmpError};
use crate::qemu::dest::DestCmdline;

#[derive(Debug, thiserror::Error)]
pub enum DestQemuError {
    #[error("starting {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) before it was ready; its output ends: {tail}")]
    Exited { status: String, tail: String },
    #[error("QEMU did not attach to the pager within {0:?}")]
    NoAttach(Duration),
    #[error("QMP of the destination QEMU")]
    Qmp(#[from] QmpError),
    #[error("finding a free port for QEMU's incoming migration on {ip}")]
    Port {
        ip: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination QEMU is {0:?}, not running")]
    NotRunning(String),
}

pub struct DestQemu {
    child: Arc<Mutex<Child>>,
    pid: u32,
    qmp: Qmp,
    output: PathBuf,
}

fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(600);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim().to_string()
}

impl DestQemu {
    /// Start QEMU for VM `vm` and wait until it attached to this daemon and answers QMP.
    pub fn start(
        cfg: &EngineConfig,
        vm: &str,
        dest: &DestCmdline,
        daemon: &Arc<Daemon>,
    ) -> Result<Self, DestQemuError> {
        let program = dest.argv[0].clone();
        let output = cfg.dir.join(format!("{vm}.qemu.out"));
        let out = std::fs::File::create(&output).map_err(|source| DestQemuError::Spawn {
            program: program.clone(),
            source,
        })?;
        let err = out.try_clone().map_err(|source| DestQemuError::Spawn {
            program: program.clone(),
            source,
        })?;
        let mut cmd = Command::new(&program);
        cmd.args(&dest.argv[1..])
            .env("LD_PRELOAD", &cfg.preload)
            .env("PAGEWISE_MEM_PATH", &dest.mem_path)
            .env("PAGEWISE_SOCKET", &cfg.attach_socket)
            .env("PAGEWISE_VM", vm)
            .env("PAGEWISE_MODES", "missing,wp")
            .env_remove("PAGEWISE_SWAPDEV")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().map_err(|source| DestQemuError::Spawn {
            program: program.clone(),
            source,
        })?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        spawn_reaper(vm.to_string(), child.clone());
        tracing::info!(vm, pid, "destination QEMU started");
        let exited = || -> Option<DestQemuError> {
            let status = child.lock().ok()?.try_wait().ok()??;
            Some(DestQemuError::Exited {
                status: status.to_string(),
                tail: tail_of(&output),
            })
        };
        let fail = |e: DestQemuError| {
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
                let _ = c.wait();
            }
            e
        };
        let start = Instant::now();
        while daemon.vm(vm).is_none() {
            if let Some(e) = exited() {
                return Err(e);
            }
            if start.elapsed() > cfg.qemu_start_timeout {
                return Err(fail(DestQemuError::NoAttach(cfg.qemu_start_timeout)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let qmp_path = dest.qmp.clone().unwrap_or_default();
        let qmp = loop {
            match Qmp::connect(&qmp_path, Duration::from_millis(500)) {
                Ok(q) => break q,
                Err(e) => {
                    if let Some(e) = exited() {
                        return Err(e);
                    }
                    if start.elapsed() > cfg.qemu_start_timeout {
                        return Err(fail(e.into()));
                    }
                }
            }
        };
        Ok(Self {
            child,
            pid,
            qmp,
            output,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Ready QEMU for the device state: `x-ignore-shared`, `migrate-incoming` on a free port
    /// of `ip`; returns the URI the source QEMU migrates to.
    pub fn listen_incoming(&mut self, ip: &str) -> Result<String, DestQemuError> {
        self.qmp.set_capabilities(&[
            ("x-ignore-shared", true),
            ("pause-before-switchover", false),
        ])?;
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| DestQemuError::Port {
                ip: ip.into(),
                source,
            })?
            .port();
        let uri = format!("tcp:{ip}:{port}");
        self.qmp
            .execute("migrate-incoming", json!({ "uri": uri }))?;
        Ok(uri)
    }

    /// Wait until the guest runs here (QEMU loaded the devices and started it).
    pub fn wait_running(&mut self, limit: Duration) -> Result<(), DestQemuError> {
        let start = Instant::now();
        loop {
            let status = self.qmp.execute("query-status", json!({}))?;
            let state = status["status"].as_str().unwrap_or("?").to_string();
            if state == "running" {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(DestQemuError::NotRunning(state));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop QEMU (a migration that failed before the switchover).
    pub fn kill(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
        tracing::info!(pid = self.pid, output = %self.output.display(), "destination QEMU stopped");
    }
}

/// Reap the QEMU process when it exits, logging how.
fn spawn_reaper(vm: String, child: Arc<Mutex<Child>>) {
    let _ = std::thread::Builder::new()
        .name(format!("qemu-{vm}"))
        .spawn(move || loop {
            let status = match child.lock() {
                Ok(mut c) => c.try_wait(),
                Err(_) => return,
            };
            match status {
                Ok(Some(s)) => {
                    tracing::info!(vm = %vm, status = %s, "destination QEMU exited");
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(500)),
                Err(e) => {
                    tracing::warn!(vm = %vm, %e, "waiting for the destination QEMU");
                    return;
                }
            }
        });
}
