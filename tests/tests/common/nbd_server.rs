//! A real `qemu-nbd` serving a file, started by a test and killed when dropped.
//!
//! Use from a test file with:
//! `#[path = "common/nbd_server.rs"] mod nbd_server;`
//!
//! `NbdServer::unix(..)` / `NbdServer::tcp(..)` start `qemu-nbd -f raw -x EXPORT --persistent
//! --shared=4 --discard=unmap FILE` on a Unix socket or on 127.0.0.1 with a free port and wait
//! until it accepts connections. A missing or too old qemu-nbd makes the test FAIL with a hint
//! to run `tools/lab/install-prereqs.sh`.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "run tools/lab/install-prereqs.sh (installs qemu-utils with qemu-nbd)";

/// Where a started server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running qemu-nbd process.
pub struct NbdServer {
    child: Option<Child>,
    pub listen: Listen,
    pub export: String,
}

/// Panic (failing the test) unless `qemu-nbd --version` reports 7.x or later. Returns the
/// version line.
pub fn require_qemu_nbd() -> String {
    let out = match Command::new("qemu-nbd").arg("--version").output() {
        Ok(out) => out,
        Err(e) => panic!("qemu-nbd is not runnable ({e}); {INSTALL_HINT}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let first = text.lines().next().unwrap_or("").to_string();
    let major: u32 = first
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse qemu-nbd version from {first:?}; {INSTALL_HINT}"));
    assert!(
        major >= 7,
        "qemu-nbd {first:?} is older than 7.x; {INSTALL_HINT}"
    );
    first
}

impl NbdServer {
    /// Serve `file` as `export` on the Unix socket `socket`. `extra` adds qemu-nbd options
    /// (e.g. `["-r"]` for read-only).
    pub fn unix(file: &Path, socket: &Path, export: &str, extra: &[&str]) -> Self {
        let sock = socket.to_str().expect("utf-8 socket path");
        let child = spawn(file, export, &["-k", sock], extra);
        let mut server = Self {
            child: Some(child),
            listen: Listen::Unix(socket.to_path_buf()),
            export: export.to_string(),
        };
        server.wait_ready();
        server
    }

    /// Serve `file` as `export` on 127.0.0.1 with a free port.
    pub fn tcp(file: &Path, export: &str, extra: &[&str]) -> Self {
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let port_s = port.to_string();
            let child = spawn(file, export, &["-b", "127.0.0.1", "-p", &port_s], extra);
            let mut server = Self {
                child: Some(child),
                listen: Listen::Tcp(port),
                export: export.to_string(),
            };
            match server.try_wait_ready() {
                Ok(()) => return server,
                Err(e) => last_err = e, // Port taken meanwhile: try another one.
            }
        }
        panic!("qemu-nbd did not start on TCP: {last_err}");
    }

    /// The spec string (qemu URI syntax) for this server's export.
    pub fn spec(&self) -> String {
        match &self.listen {
            Listen::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{}", self.export),
        }
    }

    fn wait_ready(&mut self) {
        if let Err(e) = self.try_wait_ready() {
            panic!("{e}");
        }
    }

    fn try_wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let connected = match &self.listen {
                Listen::Unix(p) => UnixStream::connect(p).is_ok(),
                Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if connected {
                return Ok(());
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                self.child = None;
                return Err(format!("qemu-nbd exited ({status}): {}", err.trim()));
            }
            if Instant::now() > deadline {
                return Err("qemu-nbd did not accept connections within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn spawn(file: &Path, export: &str, listen: &[&str], extra: &[&str]) -> Child {
    require_qemu_nbd();
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["-f", "raw", "-x", export])
        .args(listen)
        .args(["--persistent", "--shared=4", "--discard=unmap"])
        .args(extra)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start qemu-nbd ({e}); {INSTALL_HINT}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}
