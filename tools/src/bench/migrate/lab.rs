//! The two-host lab of the bench (`tools/lab/twohost.sh`): up once per run with one shaped
//! link, down on drop; commands inside its hosts; the pagewise daemons and the NBD store of
//! a row, each a guard.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::guest::procs::{run_checked, tail, ChildGuard};

pub const SRC_IP: &str = "10.77.0.1";
pub const DST_IP: &str = "10.77.0.2";
pub const STORE_IP: &str = "10.77.1.254";
/// pagewise's migration endpoint on both hosts.
pub const PAGEWISE_PORT: u16 = 7600;
/// The destination QEMU's `-incoming tcp:` port (QEMU rows).
pub const QEMU_PORT: u16 = 4444;
pub const NBD_PORT: u16 = 10809;

fn ip_program() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

/// `ip netns exec NS PROGRAM` (ip execs PROGRAM in place, so a guard's pid is PROGRAM's).
pub fn in_ns(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(ip_program());
    c.args(["netns", "exec", ns]).arg(program);
    c
}

/// A process this bench started indirectly (the destination QEMU a daemon started): killed
/// on drop if it is still the same process.
pub struct PidGuard {
    pid: u32,
    start_time: Option<String>,
}

fn proc_start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime), after the parenthesised command name.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19).map(str::to_string)
}

impl PidGuard {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            start_time: proc_start_time(pid),
        }
    }

    pub fn alive(&self) -> bool {
        let now = proc_start_time(self.pid);
        now.is_some() && now == self.start_time && !is_zombie(self.pid)
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        if self.alive() {
            // SAFETY: kill(2) on a pid checked just above to be the process we were given.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }
}

/// The lab: up on creation, and on drop every process left in its namespaces (all started
/// by this bench) killed, then down.
pub struct Lab {
    pub prefix: String,
    script: PathBuf,
}

impl Lab {
    pub fn up(script: PathBuf, prefix: &str, rate: &str) -> anyhow::Result<Self> {
        let lab = Lab {
            prefix: prefix.to_string(),
            script,
        };
        // Down first: the guard exists before `up` so a half-made lab is removed too.
        run_checked(
            Command::new("bash")
                .arg(&lab.script)
                .args(["up", "--prefix", prefix, "--rate", rate]),
        )
        .context("tools/lab/twohost.sh up (needs root, ip, tc)")?;
        Ok(lab)
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Bytes through the migration link so far (both directions, counted at the source end).
    pub fn link_bytes(&self) -> u64 {
        let dev = format!("{}-m0", self.prefix);
        ["tx_bytes", "rx_bytes"]
            .iter()
            .map(|f| {
                in_ns(&self.ns("src"), "cat")
                    .arg(format!("/sys/class/net/{dev}/statistics/{f}"))
                    .output()
                    .ok()
                    .and_then(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Kill what still runs inside the lab's namespaces (our QEMUs, daemons, qemu-nbd).
    pub fn kill_leftovers(&self) {
        for host in ["src", "dst", "store"] {
            let Ok(out) = Command::new(ip_program())
                .args(["netns", "pids", &self.ns(host)])
                .output()
            else {
                continue;
            };
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process inside a namespace this bench created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_leftovers();
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("bash")
            .arg(&self.script)
            .args(["down", "--prefix", &self.prefix])
            .output();
    }
}

/// Wait until `log` contains `needle`, the process exits or `limit` passes.
pub fn wait_log(
    proc: &mut ChildGuard,
    log: &Path,
    needle: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
    {
        proc.check_alive(log)?;
        if Instant::now() > deadline {
            bail!(
                "'{needle}' not in {} within {limit:?}: {}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One host's `pagewise serve` with a migration endpoint.
pub struct Daemon {
    _proc: ChildGuard,
    pub socket: PathBuf,
    pub incoming: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.incoming);
    }
}

pub struct DaemonSpec<'a> {
    pub pagewise: &'a Path,
    pub ns: String,
    pub name: &'static str,
    pub dir: &'a Path,
    pub listen_ip: &'a str,
    pub key: &'a Path,
    pub extra: Vec<String>,
}

impl Daemon {
    pub fn start(s: DaemonSpec) -> anyhow::Result<Self> {
        let socket = s.dir.join("pager.sock");
        let log = s.dir.join(format!("serve-{}.log", s.name));
        let incoming = PathBuf::from(format!(
            "/dev/shm/pagewise-bench-migrate-in-{}-{}-{}",
            std::process::id(),
            s.name,
            rand::random::<u32>()
        ));
        let mut cmd = in_ns(&s.ns, s.pagewise);
        cmd.args(["serve", "-v", "--socket"])
            .arg(&socket)
            .arg("--swapdev-dir")
            .arg(s.dir)
            .arg("--migrate-listen")
            .arg(format!("{}:{PAGEWISE_PORT}", s.listen_ip))
            .arg("--psk-file")
            .arg(s.key)
            .arg("--migrate-dir")
            .arg(&incoming)
            .args(["--host-id", s.name])
            .args(&s.extra);
        let name = if s.name == "src" {
            "pagewise serve (source)"
        } else {
            "pagewise serve (destination)"
        };
        let mut proc = ChildGuard::spawn(name, &mut cmd, &log)?;
        wait_log(&mut proc, &log, "listening on", Duration::from_secs(20))?;
        Ok(Daemon {
            _proc: proc,
            socket,
            incoming,
        })
    }
}

/// qemu-nbd on the store host exporting a fresh file as `vm`, formatted as a swap device of
/// `ram_mib` (owned by the source host). Returns the server guard and the device spec.
pub fn shared_device(
    lab: &Lab,
    pagewise: &Path,
    dir: &Path,
    vm: &str,
    ram_mib: u64,
) -> anyhow::Result<(ChildGuard, String)> {
    let file = dir.join(format!("{vm}.shared"));
    std::fs::File::create(&file)?.set_len((ram_mib << 20) * 2 + (64 << 20))?;
    let mut cmd = in_ns(&lab.ns("store"), "qemu-nbd");
    cmd.args(["-f", "raw", "-x", vm, "-b", STORE_IP, "-p"])
        .arg(NBD_PORT.to_string())
        .args(["--persistent", "--shared=4", "--discard=unmap"])
        .arg(&file);
    let mut nbd = ChildGuard::spawn("qemu-nbd", &mut cmd, &dir.join("qemu-nbd.log"))?;
    let spec = format!("nbd://{STORE_IP}:{NBD_PORT}/{vm}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = in_ns(&lab.ns("src"), pagewise)
            .args(["swapdev", "create", &spec, "--size", &format!("{ram_mib}M")])
            .args(["--host-id", "src"])
            .output()?;
        if out.status.success() {
            return Ok((nbd, spec));
        }
        nbd.check_alive(&dir.join("qemu-nbd.log"))?;
        if Instant::now() > deadline {
            bail!(
                "creating the shared swap device on {spec} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
