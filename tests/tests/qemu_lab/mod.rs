//! Shared pieces of the QEMU integration tests: prerequisites, the guest image, the
//! workspace artifacts (preload library, `pagewise` binary), a QEMU process guard and the
//! serial-log reader; QEMU under the real daemon is [`under_daemon`]. Each `qemu_*.rs` test
//! file includes this module.
#![allow(dead_code)] // each test file uses a different subset

pub mod qmp;
pub mod under_daemon;
pub mod zero_pager;

#[allow(unused_imports)] // as dead_code above: each test file uses a different subset
pub use under_daemon::{
    metric, resident_bytes, start_under_daemon, DaemonVm, PagerDaemon, QemuGuest,
};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Fail (never skip) when a tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} not found: run tools/lab/install-prereqs.sh");
}

/// Kernel and initramfs built by `tools/guest/build.sh` (cached in `lab/guest/`).
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest() -> &'static GuestImage {
    static GUEST: OnceLock<GuestImage> = OnceLock::new();
    GUEST.get_or_init(|| {
        require_tool("qemu-system-x86_64");
        require_tool("busybox");
        require_tool("cpio");
        let out = repo().join("lab/guest");
        let status = Command::new("bash")
            .arg(repo().join("tools/guest/build.sh"))
            .arg(&out)
            .status()
            .expect("run tools/guest/build.sh");
        assert!(status.success(), "tools/guest/build.sh failed: {status}");
        GuestImage {
            kernel: out.join("vmlinuz"),
            initrd: out.join("initrd.gz"),
        }
    })
}

/// `target/<profile>` of the running test binary (`.../target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Build `package` with the test's profile and target dir (a no-op when fresh, so a stale
/// artifact is never tested), once per test process; return `artifact`'s path.
fn workspace_artifact(package: &str, artifact: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = profile_dir();
    let path = dir.join(artifact);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|p| p == package) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo())
            .args(["build", "--quiet", "-p", package, "--target-dir"])
            .arg(dir.parent().expect("target dir"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
        built.push(package.to_string());
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// `libpagewise_preload.so` of this build.
pub fn preload_lib() -> PathBuf {
    workspace_artifact("pagewise-preload", "libpagewise_preload.so")
}

/// The `pagewise` binary of this build.
pub fn pagewise_bin() -> PathBuf {
    workspace_artifact("agent", "pagewise")
}

/// A unique guest memory file path in /dev/shm, removed on drop.
pub struct ShmFile(pub PathBuf);

impl ShmFile {
    pub fn new(tag: &str) -> Self {
        let path = PathBuf::from(format!(
            "/dev/shm/pagewise-test-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let _ = std::fs::remove_file(&path);
        ShmFile(path)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// QEMU command line for the lab guest: q35, TCG, RAM from `mem` (share=on unless told).
pub fn qemu_args(
    guest: &GuestImage,
    mem: &Path,
    ram_mib: u64,
    share: bool,
    append: &str,
    serial: &Path,
) -> Vec<String> {
    let share = if share { "on" } else { "off" };
    vec![
        "-accel".into(),
        "tcg".into(),
        "-m".into(),
        format!("{ram_mib}M"),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={ram_mib}M,mem-path={},share={share}",
            mem.display()
        ),
        "-machine".into(),
        "q35,memory-backend=mem".into(),
        "-kernel".into(),
        guest.kernel.display().to_string(),
        "-initrd".into(),
        guest.initrd.display().to_string(),
        "-append".into(),
        format!("console=ttyS0 quiet panic=-1 {append}"),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-no-reboot".into(),
    ]
}

/// A running process (QEMU, `pagewise vm run`, the daemon) killed on drop.
pub struct Proc {
    pub child: Child,
    pub stderr_path: PathBuf,
    pub name: String,
}

impl Proc {
    /// Spawn `cmd` with stdout/stderr to `<dir>/<name>.err`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Self {
        let stderr_path = dir.join(format!("{name}.err"));
        let err = std::fs::File::create(&stderr_path).expect("create stderr file");
        let out = err.try_clone().expect("clone stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}"));
        Proc {
            child,
            stderr_path,
            name: name.into(),
        }
    }

    /// Wait for exit within `limit`; panics (after killing) on timeout.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {limit:?}; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Wait until `path` contains `needle` (or `limit` passes); returns the file's text.
pub fn wait_for_text(path: &Path, needle: &str, limit: Duration, proc: &mut Proc) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if !proc.running() {
            std::thread::sleep(Duration::from_millis(200));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            panic!(
                "{} exited before {needle:?} appeared in {}:\n{text}\n--- {} output:\n{}",
                proc.name,
                path.display(),
                proc.name,
                proc.output()
            );
        }
        assert!(
            start.elapsed() < limit,
            "{needle:?} did not appear in {} within {limit:?}:\n{text}\n--- {} output:\n{}",
            path.display(),
            proc.name,
            proc.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// memverify's final line, checked: `RESULT=PASS` with `bad_pages=0`.
pub fn assert_memverify_passed(serial_text: &str) {
    let done = serial_text
        .lines()
        .find(|l| l.contains("memverify: DONE"))
        .unwrap_or_else(|| panic!("no memverify DONE line in the serial log:\n{serial_text}"));
    assert!(
        done.contains("bad_pages=0") && done.contains("RESULT=PASS"),
        "memverify found bad pages: {done}\n{serial_text}"
    );
    assert!(
        !serial_text.contains("BAD "),
        "bad pages reported:\n{serial_text}"
    );
}

/// Run `pagewise ARGS`, panicking with its output unless it succeeds; returns stdout.
pub fn pagewise_ok(args: &[&str]) -> String {
    let out = Command::new(pagewise_bin())
        .args(args)
        .output()
        .expect("run pagewise");
    assert!(
        out.status.success(),
        "pagewise {args:?} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `pagewise vm run --socket SOCKET --name NAME -- qemu-system-x86_64 ARGS`.
pub fn vm_run_command(socket: &Path, name: &str, qemu: &[String]) -> Command {
    let mut cmd = Command::new(pagewise_bin());
    cmd.args(["vm", "run", "--socket"])
        .arg(socket)
        .args(["--name", name, "--", "qemu-system-x86_64"])
        .args(qemu)
        .env_remove("PAGEWISE_PRELOAD")
        .env_remove("PAGEWISE_SOCKET");
    cmd
}
