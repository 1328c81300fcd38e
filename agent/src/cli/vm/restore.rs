//! `pagewise vm restore --ram-image IMG --state STATE [--name N] [--socket S] -- qemu ...`
//!
//! The QEMU command line is the saved guest's (same machine, same memory size) with guest
//! RAM in a new, empty shared file (checked as `vm run` checks it). Before QEMU starts: the
//! state file's header is checked against the image (size, sampled fingerprint) and the
//! memory backend's size; the VM is `prepare`d in the daemon with the image as its page
//! source (`raw:IMG`: read-only, its size checked again at attach). Then QEMU starts under
//! the attach library with `-incoming defer` and a private QMP socket; `x-ignore-shared`,
//! `migrate-incoming` from the state file, and `cont` once the device state is loaded
//! (unless `--paused`). Every RAM page the guest touches is served by the pager from the
//! image, the rest pushed in the background. QEMU's exit status is the command's.

use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use agent::migrate::qmp::Qmp;
use agent::qemu::cmdline::{self as qemu_cmdline, option_values, ram_page_size};
use agent::qemu::saved::SavedState;
use anyhow::{bail, Context};
use pager::route::Route;
use pager::server::protocol::{LayoutSpec, PrepareSpec, RegionSpec, Request, RouteRange};
use pager::server::ControlClient;
use serde_json::json;

use super::{check_modes, env_path, find_preload, DEFAULT_PAGER_SOCKET};

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The raw RAM image (`pagewise vm save --ram-image`); served read-only, never written.
    #[arg(long)]
    ram_image: PathBuf,
    /// The state file (`pagewise vm save --state`).
    #[arg(long)]
    state: PathBuf,
    /// VM name in the pager; default: the mem-path file name.
    #[arg(long)]
    name: Option<String>,
    /// The pager's attach socket (`pagewise serve --socket`) [default: $PAGEWISE_SOCKET, else
    /// /run/pagewise/pager.sock]; its control socket is SOCKET.stats.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The attach library [default: $PAGEWISE_PRELOAD, else next to the pagewise binary].
    #[arg(long)]
    preload: Option<PathBuf>,
    /// userfaultfd registration modes (comma separated: missing, wp, minor).
    #[arg(long, default_value = "missing,wp")]
    modes: String,
    /// Leave the guest paused once its device state is loaded (QMP `cont` runs it).
    #[arg(long)]
    paused: bool,
    /// Print the restore report as one JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// Longest wait for QEMU to start and load the device state, in seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_secs: u64,
    /// The QEMU command line, after `--` (no -incoming: the restore adds -incoming defer).
    #[arg(last = true, required = true, value_name = "QEMU_COMMAND")]
    command: Vec<String>,
}

/// QEMU started for the restore: killed (and the VM unprepared) unless the restore got as
/// far as running the guest.
struct Started {
    child: Child,
    control: PathBuf,
    vm: String,
    armed: bool,
}

impl Drop for Started {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.child.kill();
            let _ = self.child.wait();
            unprepare(&self.control, &self.vm);
        }
    }
}

fn unprepare(control: &Path, vm: &str) {
    // A VM that attached is no longer prepared; the daemon forgets it when QEMU exits.
    if let Ok(mut c) = ControlClient::connect(control) {
        let _ = c.call(&Request::Unprepare { vm: vm.into() });
    }
}

fn backend_bytes(size: Option<&str>) -> anyhow::Result<u64> {
    let size = size.context(
        "the memory-backend-file has no size=: give it the saved guest's size (e.g. size=512M)",
    )?;
    pager::conventions::parse_size(size).with_context(|| format!("memory-backend-file size={size}"))
}

/// The RAM file QEMU will map must be new: a file that holds data would be used as it is.
fn check_ram_file(mem_path: &Path, image: &Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::metadata(mem_path) else {
        return Ok(());
    };
    if let (Ok(a), Ok(b)) = (
        std::fs::canonicalize(mem_path),
        std::fs::canonicalize(image),
    ) {
        if a == b {
            bail!(
                "mem-path={} is the RAM image itself: QEMU would write the guest's memory into \
                 it; give QEMU a new file (e.g. /dev/shm/NAME) and the image as --ram-image",
                mem_path.display()
            );
        }
    }
    use std::os::unix::fs::MetadataExt;
    if meta.blocks() > 0 {
        bail!(
            "mem-path={} already holds {} KiB: a restored guest needs a new, empty RAM file \
             (remove it first)",
            mem_path.display(),
            meta.blocks() / 2
        );
    }
    Ok(())
}

/// Start `argv` with the attach library's environment; it gets SIGTERM when we die.
fn spawn_qemu(argv: &[String], env: &[(&str, String)]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_remove("PAGEWISE_SWAPDEV");
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", argv[0]))
}

/// Connect to QEMU's QMP socket while it starts; fail at once if QEMU exits.
fn connect_qmp(child: &mut Child, path: &Path, limit: Duration) -> anyhow::Result<Qmp> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("QEMU exited ({status}) before its QMP socket answered (see its output above)");
        }
        match Qmp::connect(path, Duration::from_millis(100)) {
            Ok(q) => return Ok(q),
            Err(e) if start.elapsed() > limit => {
                return Err(e).context(format!("QEMU did not answer QMP within {limit:?}"))
            }
            Err(_) => {}
        }
    }
}

pub fn run(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let ram = qemu_cmdline::check(&args.command)?;
    if let Some((option, _)) = option_values(&args.command[1..], &["incoming"]).first() {
        bail!("{option}: vm restore adds -incoming defer itself; remove it");
    }
    check_modes(&args.modes)?;
    let ram_bytes = backend_bytes(ram.size.as_deref())?;
    let page_size = ram_page_size(&ram.mem_path)?;
    let saved = SavedState::open(&args.state)?;
    let image = std::fs::canonicalize(&args.ram_image)
        .with_context(|| format!("the RAM image {}", args.ram_image.display()))?;
    saved.check_image(&image, ram_bytes)?;
    if !ram_bytes.is_multiple_of(page_size) {
        bail!("the guest's {ram_bytes} bytes are not a whole number of {page_size}-byte pages");
    }
    check_ram_file(&ram.mem_path, &image)?;
    let preload = find_preload(
        args.preload
            .clone()
            .or_else(|| env_path("PAGEWISE_PRELOAD")),
    )?;
    let socket = args
        .socket
        .clone()
        .or_else(|| env_path("PAGEWISE_SOCKET"))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PAGER_SOCKET));
    let control = pager::conventions::default_stats_socket(&socket);
    let name = match &args.name {
        Some(n) => n.clone(),
        None => ram
            .mem_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("mem-path has no file name")?,
    };
    let spec = PrepareSpec {
        vm: name.clone(),
        layout: LayoutSpec {
            page_size,
            regions: vec![RegionSpec {
                offset: 0,
                size: ram_bytes,
            }],
        },
        swapdev: Some(format!("raw:{}", image.display())),
        states: Vec::new(),
        // A prepared VM keeps its routes: every page to the image (the `local` source).
        routes: vec![RouteRange {
            first_page: 0,
            count: ram_bytes / page_size,
            route: Route::Local,
        }],
    };
    ControlClient::connect(&control)
        .and_then(|mut c| c.call(&Request::Prepare(spec)))
        .with_context(|| {
            format!(
                "preparing VM {name:?} in the pager (control socket {})",
                control.display()
            )
        })?;

    let runtime = tempfile::Builder::new()
        .prefix("pagewise-restore-")
        .tempdir()
        .context("creating a directory for the QMP socket")?;
    let qmp_path = runtime.path().join("qmp.sock");
    let mut argv = args.command.clone();
    argv.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp_path.display()),
        "-incoming".to_string(),
        "defer".to_string(),
    ]);
    let ld_preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", preload.display()),
        _ => preload.display().to_string(),
    };
    let env = [
        ("LD_PRELOAD", ld_preload),
        ("PAGEWISE_MEM_PATH", ram.mem_path.display().to_string()),
        ("PAGEWISE_SOCKET", socket.display().to_string()),
        ("PAGEWISE_VM", name.clone()),
        ("PAGEWISE_MODES", args.modes.clone()),
    ];
    let child = match spawn_qemu(&argv, &env) {
        Ok(c) => c,
        Err(e) => {
            unprepare(&control, &name);
            return Err(e);
        }
    };
    let mut qemu = Started {
        child,
        control: control.clone(),
        vm: name.clone(),
        armed: true,
    };
    let limit = Duration::from_secs(args.timeout_secs);
    let mut qmp = connect_qmp(&mut qemu.child, &qmp_path, limit)?;
    let qemu_ready_ms = started.elapsed().as_millis() as u64;
    qmp.set_capabilities(&[("x-ignore-shared", true)])?;
    let load_start = Instant::now();
    qmp.execute("migrate-incoming", json!({ "uri": saved.incoming_uri() }))?;
    qmp.wait_status(&["completed"], limit)
        .with_context(|| format!("loading the device state from {}", args.state.display()))?;
    let load_ms = load_start.elapsed().as_millis() as u64;
    let status = qmp.execute("query-status", json!({}))?;
    let run_state = status["status"].as_str().unwrap_or("?").to_string();
    if !args.paused && run_state != "running" {
        qmp.execute("cont", json!({}))?;
    }
    let running_ms = started.elapsed().as_millis() as u64;
    qemu.armed = false;
    let report = json!({
        "vm": name,
        "ram_image": image,
        "state": args.state,
        "ram_bytes": ram_bytes,
        "device_state_bytes": saved.header.stream_bytes,
        "qemu_ready_ms": qemu_ready_ms,
        "load_ms": load_ms,
        "running_ms": if args.paused { None } else { Some(running_ms) },
        "pid": qemu.child.id(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "restored VM {name} from {} ({} MiB, served lazily): QEMU up in {qemu_ready_ms} ms, \
             {} bytes of device state loaded in {load_ms} ms, guest {} {running_ms} ms after \
             start",
            image.display(),
            ram_bytes >> 20,
            saved.header.stream_bytes,
            if args.paused { "paused" } else { "running" },
        );
    }
    let _ = std::io::stdout().flush();
    drop(qmp);
    let status = qemu.child.wait().context("waiting for QEMU")?;
    drop(runtime);
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code.clamp(0, 255) as u8),
        (None, Some(sig)) => ExitCode::from((128 + sig).clamp(0, 255) as u8),
        _ => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_size_is_required_and_parsed() {
        assert_eq!(backend_bytes(Some("512M")).unwrap(), 512 << 20);
        let e = backend_bytes(None).unwrap_err().to_string();
        assert!(e.contains("size="), "{e}");
        assert!(backend_bytes(Some("lots")).is_err());
    }

    #[test]
    fn the_ram_file_must_be_new_and_not_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        std::fs::write(&image, [1u8; 8192]).unwrap();
        let e = check_ram_file(&image, &image).unwrap_err().to_string();
        assert!(e.contains("is the RAM image itself"), "{e}");
        let used = dir.path().join("used");
        std::fs::write(&used, [1u8; 8192]).unwrap();
        let e = check_ram_file(&used, &image).unwrap_err().to_string();
        assert!(e.contains("already holds"), "{e}");
        let empty = dir.path().join("empty");
        std::fs::File::create(&empty)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        check_ram_file(&empty, &image).unwrap();
        check_ram_file(&dir.path().join("new"), &image).unwrap();
    }
}
