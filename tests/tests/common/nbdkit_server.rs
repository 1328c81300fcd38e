//! A real `nbdkit` (Debian 1.32) serving one export, started by a test and killed on drop:
//! the memory plugin (RAM disk of a given size) or the file plugin (a file), on a Unix socket
//! or on 127.0.0.1 with a free port, behind the exportname filter so the export has a name
//! and other names are refused (`exportname-strict=true`). Extra filters (e.g.
//! `blocksize-policy`, `error`) can be stacked in front.
//!
//! Use from a test file with:
//! `#[path = "common/nbdkit_server.rs"] mod nbdkit_server;`
//!
//! nbdkit runs with `-v`: its debug log (what the client negotiated, e.g. whether it asked
//! for structured replies) is kept in `log_text()`.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "run tools/lab/install-prereqs.sh (installs nbdkit)";

/// What nbdkit serves.
#[derive(Debug, Clone)]
pub enum Plugin {
    /// The memory plugin: a sparse RAM disk of this many bytes.
    Memory(u64),
    /// The file plugin serving this file (trim punches holes, flush is fdatasync).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

pub struct NbdkitServer {
    child: Option<Child>,
    pub listen: Listen,
    pub export: String,
    log: PathBuf,
}

pub struct Setup<'a> {
    pub plugin: Plugin,
    pub export: &'a str,
    /// Filters in front of the exportname filter, outermost first, with their parameters
    /// (e.g. `("blocksize-policy", &["blocksize-minimum=4096"])`).
    pub filters: &'a [(&'a str, &'a [&'a str])],
    /// `-r`: read-only.
    pub read_only: bool,
}

impl<'a> Setup<'a> {
    pub fn new(plugin: Plugin, export: &'a str) -> Self {
        Self {
            plugin,
            export,
            filters: &[],
            read_only: false,
        }
    }
}

pub fn require_nbdkit() -> String {
    let out = Command::new("nbdkit")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("nbdkit is not runnable ({e}); {INSTALL_HINT}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl NbdkitServer {
    /// Serve on a Unix socket at `socket`; `log` receives nbdkit's debug output.
    pub fn unix(setup: &Setup<'_>, socket: &Path, log: &Path) -> Self {
        let _ = std::fs::remove_file(socket);
        let sock = socket.to_str().expect("utf-8 socket path").to_string();
        let mut s = Self::spawn(setup, &["-U", &sock], log, Listen::Unix(socket.into()));
        s.wait_ready().unwrap_or_else(|e| panic!("{e}"));
        s
    }

    /// Serve on 127.0.0.1 with a free port.
    pub fn tcp(setup: &Setup<'_>, log: &Path) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let p = port.to_string();
            let args = ["-i", "127.0.0.1", "-p", &p];
            let mut s = Self::spawn(setup, &args, log, Listen::Tcp(port));
            match s.wait_ready() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("nbdkit did not start on TCP: {last}");
    }

    fn spawn(setup: &Setup<'_>, listen: &[&str], log: &Path, at: Listen) -> Self {
        require_nbdkit();
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-v", "--exit-with-parent"]).args(listen);
        if setup.read_only {
            cmd.arg("-r");
        }
        for (name, _) in setup.filters {
            cmd.arg(format!("--filter={name}"));
        }
        cmd.arg("--filter=exportname");
        match &setup.plugin {
            Plugin::Memory(size) => cmd.args(["memory", &size.to_string()]),
            Plugin::File(path) => cmd.arg("file").arg(path),
        };
        for (_, params) in setup.filters {
            cmd.args(*params);
        }
        cmd.args([
            "exportname-strict=true".to_string(),
            format!("exportname={}", setup.export),
        ]);
        let log_file = std::fs::File::create(log).expect("nbdkit log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nbdkit ({e}); {INSTALL_HINT}"));
        Self {
            child: Some(child),
            listen: at,
            export: setup.export.to_string(),
            log: log.to_path_buf(),
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = match &self.listen {
                Listen::Unix(p) => UnixStream::connect(p).is_ok(),
                Listen::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            };
            if up {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.as_mut().expect("running").try_wait() {
                self.child = None;
                return Err(format!("nbdkit exited ({status}): {}", self.log_text()));
            }
            if Instant::now() > deadline {
                return Err("nbdkit did not accept connections within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The spec string for this export.
    pub fn spec(&self) -> String {
        match &self.listen {
            Listen::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
            Listen::Tcp(port) => format!("nbd://127.0.0.1:{port}/{}", self.export),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9 the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NbdkitServer {
    fn drop(&mut self) {
        self.kill();
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}
