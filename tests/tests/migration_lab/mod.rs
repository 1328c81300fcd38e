//! Two pagewise daemons in the two-host lab, a QEMU guest under the source one, and
//! `pagewise migrate` between them: what the migration tests (and their failure cases) share.
#![allow(dead_code)] // each test file uses a different subset

pub mod pki;
pub mod pushing;
mod status;

#[allow(unused_imports)] // each test file uses a different subset
pub use status::{migration_status, wait_status};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::qemu_lab::{guest, pagewise_bin, qemu_args, wait_for_text, Proc, ShmFile};
use crate::twohost::TwoHost;

pub const SRC_IP: &str = "10.77.0.1";
pub const DST_IP: &str = "10.77.0.2";
pub const PORT: u16 = 7600;

/// `ip netns exec NS PROGRAM`.
pub fn in_ns(ns: &str, program: &Path) -> Command {
    // By absolute path: a test may give the command another PATH.
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip");
    let mut c = Command::new(ip);
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// One host's daemon: `pagewise serve` with a migration endpoint.
pub struct HostDaemon {
    pub proc: Proc,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub incoming: PathBuf,
    /// How it was started, for [`HostDaemon::restart`].
    started: Started,
}

#[derive(Clone)]
struct Started {
    ns: String,
    name: String,
    listen: String,
    key: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    runs: u32,
}

impl HostDaemon {
    pub fn start(ns: &str, name: &str, dir: &Path, ip: &str, key: &Path, extra: &[String]) -> Self {
        Self::start_on(ns, name, dir, &format!("{ip}:{PORT}"), key, extra, &[])
    }

    /// A daemon listening on `listen` with extra arguments and environment.
    pub fn start_on(
        ns: &str,
        name: &str,
        dir: &Path,
        listen: &str,
        key: &Path,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let incoming = PathBuf::from(format!(
            "/dev/shm/pagewise-test-in-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let started = Started {
            ns: ns.into(),
            name: name.into(),
            listen: listen.into(),
            key: key.into(),
            extra: extra.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runs: 0,
        };
        let (proc, socket) = Self::spawn(dir, &incoming, &started);
        HostDaemon {
            proc,
            socket,
            dir: dir.to_path_buf(),
            incoming,
            started,
        }
    }

    /// kill -9 of the daemon (`ip netns exec` execs `pagewise serve`: the child is it).
    pub fn kill9(&mut self) {
        let pid = i32::try_from(self.proc.child.id()).expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the daemon");
        let _ = self.proc.child.wait();
    }

    /// Start the daemon again as it was started (a new log file), after [`Self::kill9`].
    pub fn restart(&mut self) {
        self.started.runs += 1;
        let (proc, _) = Self::spawn(&self.dir, &self.incoming, &self.started);
        self.proc = proc;
    }

    fn spawn(dir: &Path, incoming: &Path, s: &Started) -> (Proc, PathBuf) {
        let (ns, name, listen, key, extra) = (&s.ns, &s.name, &s.listen, &s.key, &s.extra);
        let socket = dir.join("pager.sock");
        let mut cmd = in_ns(ns, &pagewise_bin());
        cmd.args(["serve", "-v", "--socket"])
            .arg(&socket)
            .arg("--swapdev-dir")
            .arg(dir)
            .arg("--migrate-listen")
            .arg(listen)
            .arg("--psk-file")
            .arg(key)
            .arg("--migrate-dir")
            .arg(incoming)
            .arg("--host-id")
            .arg(name)
            .args(extra)
            .env("PAGEWISE_PRELOAD", crate::qemu_lab::preload_lib());
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        let log = match s.runs {
            0 => format!("serve-{name}"),
            n => format!("serve-{name}-{}", n + 1),
        };
        let mut proc = Proc::spawn(&log, cmd, dir);
        let err = proc.stderr_path.clone();
        wait_for_text(&err, "listening on", Duration::from_secs(20), &mut proc);
        (proc, socket)
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.incoming);
    }
}

/// The lab, both daemons and a key.
pub struct MigrationLab {
    /// qemu-nbd on the store host serving the shared swap device (agile), if any.
    pub nbd: Option<Proc>,
    /// The shared swap device's spec (agile), if any.
    pub shared_spec: Option<String>,
    /// The source VM's attach socket (its own socket when it uses the shared device).
    pub vm_socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub src: HostDaemon,
    pub dst: HostDaemon,
    pub key: PathBuf,
    pub lab: TwoHost,
}

/// A guest under the source daemon.
pub struct SourceGuest {
    pub qemu: Proc,
    pub mem: ShmFile,
    pub serial: PathBuf,
    pub qmp: PathBuf,
}

impl MigrationLab {
    /// The lab a migration in `mode` needs at `rate` (agile: a shared swap device for
    /// "vm1" on the store host) and a verifying guest "vm1" under the source daemon, through
    /// its first memverify pass; for agile it is then evicted to `agile_rss`, agile's
    /// premise (its cold pages already sit in the shared device).
    pub fn with_verifying_guest(
        prefix: &str,
        rate: &str,
        mode: &str,
        ram_mib: u64,
        append: &str,
        agile_rss: &str,
    ) -> (Self, SourceGuest) {
        let lab = if mode == "agile" {
            Self::with_shared_device(prefix, rate, "vm1", ram_mib)
        } else {
            Self::up(prefix, rate)
        };
        let guest =
            lab.start_verifying_guest(ram_mib, append, (mode == "agile").then_some(agile_rss));
        (lab, guest)
    }

    /// The verifying guest "vm1" under the source daemon, through its first memverify
    /// pass, then evicted to `evict_to` if given.
    pub fn start_verifying_guest(
        &self,
        ram_mib: u64,
        append: &str,
        evict_to: Option<&str>,
    ) -> SourceGuest {
        let mut guest = self.start_guest("vm1", ram_mib, append);
        wait_for_text(
            &guest.serial,
            "memverify: pass 1 ",
            Duration::from_secs(180),
            &mut guest.qemu,
        );
        if let Some(rss) = evict_to {
            eprintln!("evicted before the migration: {}", self.evict("vm1", rss));
        }
        guest
    }

    /// `pagewise evict --target-rss RSS --json` of `vm` through the source daemon.
    pub fn evict(&self, vm: &str, rss: &str) -> String {
        crate::qemu_lab::pagewise_ok(&[
            "evict",
            "--socket",
            self.src.socket.to_str().unwrap(),
            "--vm",
            vm,
            "--target-rss",
            rss,
            "--json",
        ])
    }

    /// `pagewise swapdev SUBCOMMAND SPEC --json` of the shared swap device, from the
    /// source host: (exit success, its JSON).
    pub fn shared_device_json(&self, subcommand: &str) -> (bool, serde_json::Value) {
        let spec = self
            .shared_spec
            .as_deref()
            .expect("a lab with a shared device");
        let out = in_ns(&self.lab.ns("src"), &pagewise_bin())
            .args(["swapdev", subcommand, spec, "--json"])
            .output()
            .expect("run pagewise swapdev");
        let text = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "swapdev {subcommand} {spec}: {e}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.success(), json)
    }

    pub fn up(prefix: &str, rate: &str) -> Self {
        Self::build(prefix, rate, None, false, &[], &[], &[])
    }

    /// The lab with the destination daemon started with extra `serve` arguments.
    #[allow(dead_code)] // used by some of the test binaries that include this module
    pub fn with_destination_args(prefix: &str, rate: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        Self::build(prefix, rate, None, false, &[], &args, &[])
    }

    /// The lab with the destination daemon started with `env` (test hooks).
    pub fn with_destination_env(prefix: &str, rate: &str, env: &[(&str, &str)]) -> Self {
        Self::build(prefix, rate, None, false, env, &[], &[])
    }

    /// The lab with TLS on the migration link: each daemon a certificate for its address
    /// from one CA made here (`serve --tls-cert/--tls-key/--tls-ca`).
    pub fn with_tls(prefix: &str, rate: &str) -> Self {
        Self::build(prefix, rate, None, true, &[], &[], &[])
    }

    /// The lab with VM `vm`'s swap device (`ram_mib` of capacity) on an NBD export of the
    /// store host, which both hosts reach (agile migration).
    pub fn with_shared_device(prefix: &str, rate: &str, vm: &str, ram_mib: u64) -> Self {
        Self::build(prefix, rate, Some((vm, ram_mib)), false, &[], &[], &[])
    }

    /// [`Self::with_shared_device`] with the source daemon started with `src_env`.
    pub fn with_shared_device_and_source_env(
        prefix: &str,
        rate: &str,
        vm: &str,
        ram_mib: u64,
        src_env: &[(&str, &str)],
    ) -> Self {
        Self::build(prefix, rate, Some((vm, ram_mib)), false, &[], &[], src_env)
    }

    /// The lab with the source daemon started with `src_env` (test hooks) and the
    /// destination's with extra `serve` arguments.
    #[allow(dead_code)] // used by some of the test binaries that include this module
    pub fn with_source_env_and_destination_args(
        prefix: &str,
        rate: &str,
        src_env: &[(&str, &str)],
        dst_args: &[&str],
    ) -> Self {
        let args: Vec<String> = dst_args.iter().map(|a| a.to_string()).collect();
        Self::build(prefix, rate, None, false, &[], &args, src_env)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        prefix: &str,
        rate: &str,
        shared: Option<(&str, u64)>,
        tls: bool,
        dst_env: &[(&str, &str)],
        dst_args: &[String],
        src_env: &[(&str, &str)],
    ) -> Self {
        let lab = TwoHost::up(prefix, rate);
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("psk");
        std::fs::write(&key, b"a test key of the migration lab, 0123456789").unwrap();
        let src_dir = dir.path().join("src");
        let dst_dir = dir.path().join("dst");
        std::fs::create_dir_all(&src_dir).unwrap();
        std::fs::create_dir_all(&dst_dir).unwrap();
        let mut extra = Vec::new();
        let mut nbd = None;
        let mut shared_spec = None;
        let mut vm_socket = src_dir.join("pager.sock");
        if let Some((vm, ram_mib)) = shared {
            let (proc, spec) = shared_device(&lab, dir.path(), vm, ram_mib);
            nbd = Some(proc);
            vm_socket = src_dir.join(format!("{vm}.sock"));
            extra = vec![
                "--vm".into(),
                format!("{vm}={}:{spec}", vm_socket.display()),
            ];
            shared_spec = Some(spec);
        }
        let mut dst_extra = dst_args.to_vec();
        if tls {
            let pki = pki::Pki::new("migration lab CA");
            extra.extend(pki.host(dir.path(), "src", &[SRC_IP]).args());
            dst_extra.extend(pki.host(dir.path(), "dst", &[DST_IP]).args());
        }
        let src = HostDaemon::start_on(
            &lab.ns("src"),
            "src",
            &src_dir,
            &format!("{SRC_IP}:{PORT}"),
            &key,
            &extra,
            src_env,
        );
        let dst = HostDaemon::start_on(
            &lab.ns("dst"),
            "dst",
            &dst_dir,
            &format!("{DST_IP}:{PORT}"),
            &key,
            &dst_extra,
            dst_env,
        );
        MigrationLab {
            nbd,
            shared_spec,
            vm_socket,
            dir,
            src,
            dst,
            key,
            lab,
        }
    }

    /// Start the lab guest as VM `name` under the source daemon (its swap device created),
    /// with a QMP socket, kernel command line `append`.
    pub fn start_guest(&self, name: &str, ram_mib: u64, append: &str) -> SourceGuest {
        let device = self.src.dir.join(format!("{name}.swap"));
        if !device.exists() && self.nbd.is_none() {
            crate::qemu_lab::pagewise_ok(&[
                "swapdev",
                "create",
                device.to_str().unwrap(),
                "--size",
                &format!("{ram_mib}M"),
            ]);
        }
        let mem = ShmFile::new(name);
        let serial = self.src.dir.join(format!("{name}.serial"));
        let qmp = self.src.dir.join(format!("{name}.qmp"));
        let mut args = qemu_args(guest(), &mem.0, ram_mib, true, append, &serial);
        args.extend([
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
        let mut cmd = in_ns(&self.lab.ns("src"), &pagewise_bin());
        cmd.args(["vm", "run", "--socket"])
            .arg(&self.vm_socket)
            .args(["--name", name, "--", "qemu-system-x86_64"])
            .args(&args)
            .env("PAGEWISE_PRELOAD", crate::qemu_lab::preload_lib());
        let qemu = Proc::spawn(&format!("vm-run-{name}"), cmd, &self.src.dir);
        SourceGuest {
            qemu,
            mem,
            serial,
            qmp,
        }
    }

    /// `pagewise migrate --json` on the source host; (exit success, report, output).
    pub fn migrate(
        &self,
        vm: &str,
        mode: &str,
        extra: &[&str],
    ) -> (bool, serde_json::Value, String) {
        self.migrate_to(&format!("{DST_IP}:{PORT}"), vm, mode, extra)
    }

    /// `migrate` to the endpoint `to`.
    pub fn migrate_to(
        &self,
        to: &str,
        vm: &str,
        mode: &str,
        extra: &[&str],
    ) -> (bool, serde_json::Value, String) {
        run_migrate(self.migrate_command(to, vm, mode, extra))
    }

    /// `pagewise migrate --json` from the destination host back to the source host.
    pub fn migrate_back(&self, vm: &str, mode: &str) -> (bool, serde_json::Value, String) {
        run_migrate(migrate_command(
            &self.lab.ns("dst"),
            &self.dst.socket,
            &format!("{SRC_IP}:{PORT}"),
            vm,
            mode,
            &[],
        ))
    }

    /// The `pagewise migrate --json` command on the source host.
    pub fn migrate_command(&self, to: &str, vm: &str, mode: &str, extra: &[&str]) -> Command {
        migrate_command(&self.lab.ns("src"), &self.src.socket, to, vm, mode, extra)
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- source daemon:\n{}\n--- destination daemon:\n{}",
            self.src.proc.output(),
            self.dst.proc.output()
        )
    }
}

/// The destination path a report maps `source` to.
pub fn dest_path(report: &serde_json::Value, source: &Path) -> PathBuf {
    let key = source.display().to_string();
    PathBuf::from(
        report["dest_paths"][&key]
            .as_str()
            .unwrap_or_else(|| panic!("no dest_paths entry for {key}: {report}")),
    )
}

pub const STORE_IP: &str = "10.77.1.254";
pub const NBD_PORT: u16 = 10809;

/// qemu-nbd on the store host exporting a fresh file as `vm`, formatted as a swap device of
/// `ram_mib` from the source host. Returns the server and the device spec.
fn shared_device(lab: &TwoHost, dir: &Path, vm: &str, ram_mib: u64) -> (Proc, String) {
    let file = dir.join(format!("{vm}.shared"));
    let f = std::fs::File::create(&file).unwrap();
    f.set_len((ram_mib << 20) * 2 + (64 << 20)).unwrap();
    let mut cmd = in_ns(&lab.ns("store"), Path::new("qemu-nbd"));
    cmd.args([
        "-f",
        "raw",
        "-x",
        vm,
        "-b",
        STORE_IP,
        "-p",
        &NBD_PORT.to_string(),
    ])
    .args(["--persistent", "--shared=4", "--discard=unmap"])
    .arg(&file);
    let proc = Proc::spawn("qemu-nbd", cmd, dir);
    let spec = format!("nbd://{STORE_IP}:{NBD_PORT}/{vm}");
    let start = std::time::Instant::now();
    loop {
        let out = in_ns(&lab.ns("src"), &pagewise_bin())
            .args([
                "swapdev",
                "create",
                &spec,
                "--size",
                &format!("{ram_mib}M"),
                "--host-id",
                "src",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "creating the shared swap device failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (proc, spec)
}

/// `pagewise migrate --json` in namespace `ns` against the daemon at `socket`.
fn migrate_command(
    ns: &str,
    socket: &Path,
    to: &str,
    vm: &str,
    mode: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = in_ns(ns, &pagewise_bin());
    cmd.args(["migrate", "--socket"])
        .arg(socket)
        .args(["--vm", vm, "--to", to, "--mode", mode, "--json"])
        .args(extra);
    cmd
}

/// Run a `migrate --json` command: (exit success, its report, its output).
fn run_migrate(mut cmd: Command) -> (bool, serde_json::Value, String) {
    let out = cmd.output().expect("run pagewise migrate");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, format!("{stdout}\n{stderr}"))
}

/// Wait (up to `limit`) for memverify's DONE line in the console log `serial`; its text.
pub fn wait_done(serial: &Path, limit: Duration, logs: impl Fn() -> String) -> String {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains("memverify: DONE") {
            return text;
        }
        assert!(
            start.elapsed() < limit,
            "no memverify DONE in {}:\n{text}\n{}",
            serial.display(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
