//! Processes and files of a guest run, cleaned up on every exit path.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process (QEMU, `pagewise serve`) killed and reaped on drop, whatever the exit path.
pub struct ChildGuard {
    child: Child,
    name: &'static str,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Killed with the bench even when the bench itself is killed (no Drop then).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name} ({cmd:?})"))?;
        Ok(Self { child, name })
    }

    /// Fails when the process has exited (with its log's tail), else Ok.
    pub fn check_alive(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status}): {}", self.name, tail(log));
        }
        Ok(())
    }

    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

const SHM_PREFIX: &str = "pagewise-bench-guest-";

/// The guest's RAM file in /dev/shm, removed on drop.
pub struct ShmFile(pub PathBuf);

impl ShmFile {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!("/dev/shm/{SHM_PREFIX}{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    /// Resident bytes (allocated blocks) of the RAM file.
    pub fn resident_bytes(&self) -> u64 {
        std::fs::metadata(&self.0).map_or(0, |m| m.blocks() * 512)
    }
}

/// Remove RAM files left by benches that were killed (no `Drop` ran): their pid is gone.
pub fn remove_stale_shm_files() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(SHM_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
