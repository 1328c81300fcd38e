//! A real NFS-Ganesha (userspace NFSv3 server, VFS FSAL) exporting a temp directory, started
//! by a test and stopped when dropped; rpcbind too, when none is running.
//!
//! Use from a test file with:
//! `#[path = "common/nfs_server.rs"] mod nfs_server;`
//!
//! NFSv3 registers with the machine's one rpcbind, and Ganesha listens on the fixed NFS port
//! 2049, so only one server can run at a time on a machine: `NfsServer::start` holds a
//! process-wide mutex and an `flock` on /tmp/pagewise-nfs-server.lock (for other test
//! binaries run in parallel) until the server is dropped. Tests of one binary that each start
//! a server therefore run one after another.
//!
//! If the tools are missing the test FAILS with a hint to run `tools/lab/install-prereqs.sh`.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str =
    "run tools/lab/install-prereqs.sh (installs nfs-ganesha, nfs-ganesha-vfs, rpcbind)";
const LOCK_PATH: &str = "/tmp/pagewise-nfs-server.lock";

static IN_PROCESS: Mutex<()> = Mutex::new(());

/// A running Ganesha exporting `export_dir` (NFSv3 over TCP, RW, no root squash).
pub struct NfsServer {
    ganesha: Option<Child>,
    rpcbind: Option<Child>,
    /// The exported directory (also the NFSv3 export path).
    pub export_dir: PathBuf,
    work: tempfile::TempDir,
    _lock: File,
    _guard: MutexGuard<'static, ()>,
}

fn require(cmd: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(found, "{cmd} is not installed; {INSTALL_HINT}");
}

/// Is something answering on 127.0.0.1:`port` (TCP)?
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

fn lock_file() -> File {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .unwrap_or_else(|e| panic!("open {LOCK_PATH}: {e}"));
    // SAFETY: flock on a descriptor we own; blocks until the other holder releases it.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock {LOCK_PATH}: {}",
        std::io::Error::last_os_error()
    );
    f
}

impl NfsServer {
    /// Start rpcbind (if none is running) and Ganesha exporting a fresh temp directory
    /// (under /var/tmp: a disk filesystem, like a real filer's).
    pub fn start() -> Self {
        let guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
        require("ganesha.nfsd");
        require("rpcbind");
        let lock = lock_file();
        let work = tempfile::Builder::new()
            .prefix("pw-nfs-")
            .tempdir_in("/var/tmp")
            .expect("temp dir");
        let export_dir = work.path().join("export");
        std::fs::create_dir(&export_dir).expect("export dir");
        let mut server = Self {
            ganesha: None,
            rpcbind: None,
            export_dir,
            work,
            _lock: lock,
            _guard: guard,
        };
        assert!(
            !listening(2049),
            "something already listens on the NFS port 2049 (another NFS server?); stop it first"
        );
        if !listening(111) {
            let child = Command::new("rpcbind")
                .args(["-f", "-w"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start rpcbind ({e}); {INSTALL_HINT}"));
            server.rpcbind = Some(child);
            wait_for("rpcbind on port 111", Duration::from_secs(10), || {
                listening(111)
            });
        }
        server.spawn_ganesha();
        server
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    fn spawn_ganesha(&mut self) {
        let conf = self.path("ganesha.conf");
        let log = self.path("ganesha.log");
        let _ = std::fs::remove_file(&log);
        let mut f = File::create(&conf).expect("write ganesha.conf");
        write!(
            f,
            "NFS_CORE_PARAM {{ Protocols = 3; Enable_NLM = false; Enable_RQUOTA = false; }}\n\
             NFSV4 {{ Graceless = true; }}\n\
             EXPORT {{ Export_Id = 1; Path = {dir}; Pseudo = /export; Access_Type = RW; \
             Squash = No_Root_Squash; SecType = sys; Transports = TCP; FSAL {{ Name = VFS; }} }}\n",
            dir = self.export_dir.display()
        )
        .expect("write ganesha.conf");
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&conf)
            .arg("-L")
            .arg(&log)
            .arg("-p")
            .arg(self.path("ganesha.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ganesha.nfsd ({e}); {INSTALL_HINT}"));
        self.ganesha = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("NFS SERVER INITIALIZED") && listening(2049) {
                return;
            }
            if let Ok(Some(status)) = self.ganesha.as_mut().unwrap().try_wait() {
                self.ganesha = None;
                panic!("ganesha.nfsd exited ({status}); its log:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "ganesha.nfsd not ready within 30 s; its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 Ganesha (the export's files stay), e.g. to test a server crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.ganesha.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait_for("port 2049 to close", Duration::from_secs(10), || {
            !listening(2049)
        });
    }

    /// Stop rpcbind if this helper started it (true); a system rpcbind is left alone (false).
    pub fn kill_rpcbind(&mut self) -> bool {
        let Some(mut c) = self.rpcbind.take() else {
            return false;
        };
        let _ = c.kill();
        let _ = c.wait();
        wait_for("port 111 to close", Duration::from_secs(10), || {
            !listening(111)
        });
        true
    }

    /// Start Ganesha again on the same export after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_ganesha();
    }

    /// The `nfs://` spec of `name` in the export.
    pub fn spec(&self, name: &str) -> String {
        format!("nfs://127.0.0.1{}/{name}", self.export_dir.display())
    }

    /// The server-side path of `name` in the export (to check what landed).
    pub fn file(&self, name: &str) -> PathBuf {
        self.export_dir.join(name)
    }

    pub fn export_path(&self) -> &Path {
        &self.export_dir
    }
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.ganesha.take() {
            // SIGTERM lets Ganesha unregister from rpcbind; SIGKILL if it takes too long.
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.rpcbind.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
