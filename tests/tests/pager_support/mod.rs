//! Shared set-up for the pager end-to-end tests: the real `pagewise`, `memhog` and
//! `kvm_guest` binaries (built by `cargo build --workspace`), verifiable images turned into
//! swap devices with `pagewise swapdev import`, and `pagewise serve` daemons.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pagewise_tools::daemon::{self, Daemon, ServedVm};

pub const SEED: u64 = 77;
pub const ZERO_EVERY: u64 = 16;

/// A temp directory with binaries, images, devices and sockets.
pub struct Lab {
    pub dir: tempfile::TempDir,
    pub pagewise: PathBuf,
    pub memhog: PathBuf,
    pub kvm_guest: PathBuf,
}

impl Lab {
    pub fn new() -> Self {
        let find = |name: &str| daemon::workspace_binary(name).unwrap_or_else(|e| panic!("{e:#}"));
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            pagewise: find("pagewise"),
            memhog: find("memhog"),
            kvm_guest: find("kvm_guest"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A swap device holding a `pages`-page verifiable image (seed [`SEED`]).
    pub fn device(&self, name: &str, pages: u64) -> PathBuf {
        let image = self.path(&format!("{name}.img"));
        let device = self.path(&format!("{name}.swap"));
        daemon::run_checked(Command::new(&self.memhog).args([
            "gen-image",
            "--pages",
            &pages.to_string(),
            "--seed",
            &SEED.to_string(),
            "--zero-every",
            &ZERO_EVERY.to_string(),
            "--out",
            image.to_str().unwrap(),
        ]))
        .unwrap_or_else(|e| panic!("{e:#}"));
        daemon::run_checked(
            Command::new(&self.pagewise).args(daemon::import_args(&image, &device)),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        device
    }

    pub fn socket(&self, vm: &str) -> PathBuf {
        self.path(&format!("{vm}.sock"))
    }

    /// `pagewise serve` for `vms` (name, device), each on `<name>.sock`.
    pub fn serve(&self, vms: &[(&str, &Path)], prefetch: &str) -> Daemon {
        let sockets: Vec<PathBuf> = vms.iter().map(|(n, _)| self.socket(n)).collect();
        // A previous daemon's socket files would look like this one is already listening.
        for s in &sockets {
            let _ = std::fs::remove_file(s);
        }
        let served: Vec<ServedVm<'_>> = vms
            .iter()
            .zip(&sockets)
            .map(|((name, device), socket)| ServedVm {
                name,
                socket,
                device,
            })
            .collect();
        let args = daemon::serve_args(
            &self.path("main.sock"),
            &served,
            &self.path("stats.sock"),
            prefetch,
        );
        let d = Daemon::spawn(
            &self.pagewise,
            &args,
            &sockets[0],
            &self.path("serve.log"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        for s in &sockets[1..] {
            daemon::wait_for_socket(s, Duration::from_secs(10)).unwrap();
        }
        d
    }

    /// memhog run against VM `vm` with extra arguments; `--json` is added.
    pub fn memhog_cmd(&self, vm: &str, pages: u64, extra: &[&str]) -> Command {
        let mut c = Command::new(&self.memhog);
        c.args(["run", "--pages", &pages.to_string(), "--socket"])
            .arg(self.socket(vm))
            .args([
                "--seed",
                &SEED.to_string(),
                "--zero-every",
                &ZERO_EVERY.to_string(),
            ])
            .args(["--vm", vm, "--json"])
            .args(extra);
        c
    }

    /// Run memhog. A VM that just detached may still be registered until the daemon sees
    /// the hang-up, so a refusal saying "already attached" is retried for a few seconds.
    pub fn memhog(&self, vm: &str, pages: u64, extra: &[&str]) -> Output {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let out = self
                .memhog_cmd(vm, pages, extra)
                .output()
                .expect("running memhog");
            let busy = String::from_utf8_lossy(&out.stderr).contains("already attached");
            if !busy || std::time::Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// memhog's JSON report; panics with its stderr and the daemon log if it failed.
pub fn verified(out: &Output, daemon: &Daemon) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "memhog failed ({}): {}\nstdout: {stdout}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("memhog JSON");
    assert_eq!(r["mismatches"], 0);
    r
}
