//! Running the real `pagewise` binary from tests and benchmarks: find it, run one-shot
//! subcommands, and keep a `pagewise serve` daemon alive for the life of a guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A binary of this workspace next to the running executable: `target/<profile>/NAME`, seen
/// from `target/<profile>/` (a binary) or `target/<profile>/deps/` (a test executable).
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "binary {name:?} not found near {}: run `cargo build --workspace` (same profile) first",
        exe.display()
    )
}

/// Run a one-shot command; fail naming it, its status and its stderr if it fails.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A running daemon, stopped when dropped: SIGTERM (it shuts down cleanly, releasing its
/// swap devices), SIGKILL if it is still there after [`STOP_GRACE`].
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Start `binary args...` with stdout and stderr to `log`, and wait until `socket`
    /// exists (or the process dies, or `timeout` passes). `socket` must not exist yet.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let logf = std::fs::File::create(log)
            .with_context(|| format!("creating daemon log {}", log.display()))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .with_context(|| format!("starting {} {}", binary.display(), args.join(" ")))?;
        let mut d = Self {
            child,
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {}: {}",
                    binary.display(),
                    socket.display(),
                    d.log_text()
                );
            }
            // The socket file appears at bind(), right before listen(); probing with a
            // connection would show up in the daemon's logs as a refused handshake.
            if wait_for_socket(socket, Duration::ZERO).is_ok() {
                std::thread::sleep(Duration::from_millis(20));
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} within {timeout:?}: {}",
                    binary.display(),
                    socket.display(),
                    d.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the daemon wrote so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// How long a dropped daemon gets to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    /// Stop the daemon (SIGTERM, then SIGKILL after [`STOP_GRACE`]) and reap it.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Arguments of `pagewise swapdev import` turning a raw RAM image into a swap device.
pub fn import_args(image: &Path, device: &Path) -> Vec<String> {
    vec![
        "swapdev".into(),
        "import".into(),
        image.display().to_string(),
        device.display().to_string(),
    ]
}

/// One VM a `pagewise serve` serves: its name, attach socket and swap device.
#[derive(Debug, Clone)]
pub struct ServedVm<'a> {
    pub name: &'a str,
    pub socket: &'a Path,
    pub device: &'a Path,
}

/// Arguments of `pagewise serve` serving `vms` (one attach socket each, VM named by the
/// socket), with its main attach socket at `main_socket` (pagewise handshakes naming one of
/// `vms`), its stats/control socket at `stats_socket` and prefetch policy `prefetch` (empty:
/// no `--prefetch`, the daemon's default).
pub fn serve_args(
    main_socket: &Path,
    vms: &[ServedVm<'_>],
    stats_socket: &Path,
    prefetch: &str,
) -> Vec<String> {
    let mut args = vec![
        "serve".to_string(),
        "--socket".into(),
        main_socket.display().to_string(),
    ];
    for vm in vms {
        args.push("--vm".into());
        args.push(format!(
            "{}={}:{}",
            vm.name,
            vm.socket.display(),
            vm.device.display()
        ));
    }
    args.extend(["--stats-socket".into(), stats_socket.display().to_string()]);
    if !prefetch.is_empty() {
        args.extend(["--prefetch".into(), prefetch.into()]);
    }
    args
}

/// Wait until `path` is a socket (a daemon bound it), up to `timeout`.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let is_socket = std::fs::symlink_metadata(path)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if is_socket {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
