//! QEMU under the real daemon: `pagewise serve` ([`PagerDaemon`]) and lab guests started by
//! `pagewise vm run` against it ([`QemuGuest`]); [`start_under_daemon`] sets up both in a
//! temp directory and returns one guard ([`DaemonVm`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{
    assert_memverify_passed, guest, pagewise_bin, pagewise_ok, preload_lib, qemu_args,
    vm_run_command, wait_for_text, Proc, ShmFile,
};

/// `pagewise serve --socket DIR/pager.sock --swapdev-dir DIR` as a child process (killed on
/// drop), started and waited for until it listens.
pub struct PagerDaemon {
    pub proc: Proc,
    pub socket: PathBuf,
    pub swapdev_dir: PathBuf,
}

impl PagerDaemon {
    pub fn start(dir: &Path) -> Self {
        Self::start_logged(dir, "pagewise-serve")
    }

    /// [`PagerDaemon::start`] with its log in `DIR/NAME.err` (a restarted daemon keeps the
    /// dead one's log).
    pub fn start_logged(dir: &Path, name: &str) -> Self {
        let socket = dir.join("pager.sock");
        let mut cmd = Command::new(pagewise_bin());
        cmd.args(["serve", "-v", "--socket"])
            .arg(&socket)
            .arg("--swapdev-dir")
            .arg(dir);
        let mut proc = Proc::spawn(name, cmd, dir);
        let err = proc.stderr_path.clone();
        wait_for_text(&err, "listening on", Duration::from_secs(20), &mut proc);
        PagerDaemon {
            proc,
            socket,
            swapdev_dir: dir.to_path_buf(),
        }
    }

    /// Create an empty swap device for VM `name` of `bytes` capacity.
    pub fn create_swapdev(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.swapdev_dir.join(format!("{name}.swap"));
        pagewise_ok(&[
            "swapdev",
            "create",
            path.to_str().unwrap(),
            "--size",
            &bytes.to_string(),
        ]);
        path
    }

    /// `pagewise evict --socket SOCKET --vm VM GOAL...` (e.g. `["--target-rss", "48M"]`,
    /// `["--auto", "--json"]`); returns its stdout.
    pub fn evict(&self, vm: &str, goal: &[&str]) -> String {
        let mut args = vec![
            "evict",
            "--socket",
            self.socket.to_str().unwrap(),
            "--vm",
            vm,
        ];
        args.extend_from_slice(goal);
        pagewise_ok(&args)
    }

    /// Start the lab guest as VM `name` under `pagewise vm run` against this daemon: RAM
    /// (`ram_mib`, share=on) in a fresh /dev/shm file, kernel command line `append`, `extra`
    /// QEMU arguments, serial console to `DIR/NAME.serial`. The VM's swap device
    /// `DIR/NAME.swap` is created (RAM-sized) unless it exists (e.g. imported).
    pub fn start_guest(
        &self,
        name: &str,
        ram_mib: u64,
        append: &str,
        extra: &[String],
    ) -> QemuGuest {
        let device = self.swapdev_dir.join(format!("{name}.swap"));
        if !device.exists() {
            self.create_swapdev(name, ram_mib << 20);
        }
        let mem = ShmFile::new(name);
        let serial = self.swapdev_dir.join(format!("{name}.serial"));
        let mut args = qemu_args(guest(), &mem.0, ram_mib, true, append, &serial);
        args.extend_from_slice(extra);
        let qemu = Proc::spawn(
            &format!("vm-run-{name}"),
            vm_run_command(&self.socket, name, &args),
            &self.swapdev_dir,
        );
        QemuGuest {
            name: name.to_string(),
            qemu,
            mem,
            serial,
            device,
        }
    }

    /// `pagewise stats --json` for VM `name` (None when it is not attached).
    pub fn vm_stats(&self, name: &str) -> Option<serde_json::Value> {
        let out = pagewise_ok(&["stats", "--json", "--socket", self.socket.to_str().unwrap()]);
        let all: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("pagewise stats --json printed non-JSON ({e}): {out}"));
        all.get("vms")?
            .as_array()?
            .iter()
            .find(|v| v.get("vm").and_then(|n| n.as_str()) == Some(name))
            .cloned()
    }
}

/// One lab guest under the daemon: QEMU (killed on drop), its RAM file (removed on drop), its
/// serial log and its swap device.
pub struct QemuGuest {
    pub name: String,
    pub qemu: Proc,
    pub mem: ShmFile,
    pub serial: PathBuf,
    pub device: PathBuf,
}

impl QemuGuest {
    /// Wait until the serial console shows `needle` (panics if QEMU exits first or `limit`
    /// passes); returns the console text.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        wait_for_text(&self.serial, needle, limit, &mut self.qemu)
    }

    /// The serial console so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Wait (at most `limit`) for QEMU to exit; it must succeed with memverify passed.
    /// Returns the serial console.
    pub fn finish(&mut self, limit: Duration) -> String {
        let status = self.qemu.wait(limit);
        let log = self.serial_text();
        assert!(status.success(), "{status}\n{}\n{log}", self.qemu.output());
        assert_memverify_passed(&log);
        log
    }
}

/// The daemon and one guest under it, in their own temp directory. Dropped in order: QEMU
/// and its RAM file, the daemon, the directory.
pub struct DaemonVm {
    pub guest: QemuGuest,
    pub daemon: PagerDaemon,
    pub dir: tempfile::TempDir,
}

impl DaemonVm {
    /// `pagewise stats --json` of the guest's VM (panics when it is not attached).
    pub fn stats(&self) -> serde_json::Value {
        self.daemon
            .vm_stats(&self.guest.name)
            .unwrap_or_else(|| panic!("VM {} is not attached", self.guest.name))
    }

    /// `pagewise evict` of the guest's VM towards `goal`; returns its stdout.
    pub fn evict(&self, goal: &[&str]) -> String {
        self.daemon.evict(&self.guest.name, goal)
    }
}

/// Build the guest image and the preload library, start `pagewise serve` in a temp directory
/// and the lab guest as VM `name` under `pagewise vm run` ([`PagerDaemon::start_guest`]).
pub fn start_under_daemon(name: &str, ram_mib: u64, append: &str, extra: &[String]) -> DaemonVm {
    guest();
    preload_lib();
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = PagerDaemon::start(dir.path());
    let guest = daemon.start_guest(name, ram_mib, append, extra);
    DaemonVm { guest, daemon, dir }
}

/// Counter `name` of a VM's `pagewise stats --json` object.
pub fn metric(stats: &serde_json::Value, name: &str) -> u64 {
    stats
        .get("metrics")
        .and_then(|m| m.get(name))
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no metric {name} in {stats}"))
}

/// Bytes of `path` allocated in /dev/shm (the guest RAM QEMU and the pager hold).
pub fn resident_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
