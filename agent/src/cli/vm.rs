//! `pagewise vm run [--name N] [--swapdev DEV] [--socket PAGER_SOCK] -- qemu-system-x86_64 ...`
//!
//! Checks the QEMU command line (guest RAM from one shared file on tmpfs/hugetlbfs, see
//! `agent::qemu::cmdline`), then replaces itself with QEMU running under
//! `libpagewise_preload.so` configured through `PAGEWISE_*` variables, so the VM's guest RAM
//! is served by the pager from its first page. QEMU's exit status is the command's.
//!
//! `pagewise vm save` ([`save`]) writes a running guest's RAM image and state file;
//! `pagewise vm restore` ([`restore`]) starts a guest from them with its RAM served lazily.

mod restore;
mod save;

use agent::qemu::cmdline as qemu_cmdline;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

/// The pager socket used when neither `--socket` nor `PAGEWISE_SOCKET` says otherwise.
pub const DEFAULT_PAGER_SOCKET: &str = "/run/pagewise/pager.sock";
/// File name of the attach library.
pub const PRELOAD_FILE: &str = "libpagewise_preload.so";

#[derive(clap::Args, Debug)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(clap::Subcommand, Debug)]
enum VmCommand {
    /// Run an unmodified QEMU with its guest RAM served by the pager.
    Run(RunArgs),
    /// Save a running QEMU guest for a lazy restore: its RAM file as a raw image and its
    /// device state (QEMU's migration stream with x-ignore-shared: no RAM) as a state file.
    Save(save::SaveArgs),
    /// Start a QEMU guest from a saved RAM image and state file: the device state loaded by
    /// `-incoming defer` + `migrate-incoming`, every RAM page served lazily by the pager
    /// from the image (read-only), with its prefetch and background push.
    Restore(restore::RestoreArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// VM name sent to the pager (selects its swap device); default: the mem-path file name.
    #[arg(long)]
    name: Option<String>,
    /// Swap device the pager must serve this VM from: QEMU is stopped at attach time if the
    /// pager answers with another one.
    #[arg(long)]
    swapdev: Option<String>,
    /// The pager's attach socket (`pagewise serve --socket`) [default: $PAGEWISE_SOCKET, else
    /// /run/pagewise/pager.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The attach library [default: $PAGEWISE_PRELOAD, else libpagewise_preload.so next to the
    /// pagewise binary].
    #[arg(long)]
    preload: Option<PathBuf>,
    /// userfaultfd registration modes (comma separated: missing, wp, minor).
    #[arg(long, default_value = "missing,wp")]
    modes: String,
    /// Print the environment and command instead of running it.
    #[arg(long)]
    dry_run: bool,
    /// The QEMU command line, after `--`.
    #[arg(last = true, required = true, value_name = "QEMU_COMMAND")]
    command: Vec<String>,
}

pub fn run(args: VmArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        VmCommand::Run(run) => vm_run(run),
        VmCommand::Save(save) => save::run(save),
        VmCommand::Restore(restore) => restore::run(restore),
    }
}

pub(crate) fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `--preload`, `PAGEWISE_PRELOAD`, or the library next to this binary.
pub(crate) fn find_preload(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("attach library {} does not exist", path.display());
        }
        return std::fs::canonicalize(&path).with_context(|| path.display().to_string());
    }
    let exe = std::env::current_exe().context("locating the pagewise binary")?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidate = dir.join(PRELOAD_FILE);
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!(
        "{PRELOAD_FILE} not found next to the pagewise binary ({}): build it with `cargo build \
         -p pagewise-preload` (same profile as pagewise), or pass --preload PATH / set \
         PAGEWISE_PRELOAD",
        dir.display()
    )
}

pub(crate) fn check_modes(modes: &str) -> anyhow::Result<()> {
    let words: Vec<&str> = modes
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        bail!("--modes {modes:?} names no mode (known: missing, wp, minor)");
    }
    for w in words {
        if !matches!(w, "missing" | "wp" | "minor") {
            bail!("--modes: unknown mode {w:?} (known: missing, wp, minor)");
        }
    }
    Ok(())
}

/// How much of the guest RAM file is already populated (those pages never fault).
fn populated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

fn vm_run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let ram = qemu_cmdline::check(&args.command)?;
    check_modes(&args.modes)?;
    let preload = find_preload(args.preload.or_else(|| env_path("PAGEWISE_PRELOAD")))?;
    let socket = args
        .socket
        .or_else(|| env_path("PAGEWISE_SOCKET"))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PAGER_SOCKET));
    let name = match args.name {
        Some(n) => n,
        None => ram
            .mem_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("mem-path has no file name")?,
    };
    if let Some(bytes) = populated_bytes(&ram.mem_path).filter(|b| *b > 0) {
        tracing::warn!(
            "guest RAM file {} already holds {} MiB: those pages are used as they are, not \
             served by the pager",
            ram.mem_path.display(),
            bytes >> 20
        );
    }
    let ld_preload = match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", preload.display()),
        _ => preload.display().to_string(),
    };
    let mut env = vec![
        ("LD_PRELOAD", ld_preload),
        ("PAGEWISE_MEM_PATH", ram.mem_path.display().to_string()),
        ("PAGEWISE_SOCKET", socket.display().to_string()),
        ("PAGEWISE_VM", name.clone()),
        ("PAGEWISE_MODES", args.modes.clone()),
    ];
    if let Some(dev) = &args.swapdev {
        env.push(("PAGEWISE_SWAPDEV", dev.clone()));
    }
    if args.dry_run {
        for (k, v) in &env {
            println!("{k}={v}");
        }
        println!("{}", args.command.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(
        vm = %name,
        mem_path = %ram.mem_path.display(),
        socket = %socket.display(),
        "starting QEMU under the pager"
    );
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    if args.swapdev.is_none() {
        cmd.env_remove("PAGEWISE_SWAPDEV");
    }
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let err = cmd.exec();
    bail!("cannot start {}: {err}", args.command[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_checked() {
        assert!(check_modes("missing,wp").is_ok());
        assert!(check_modes("minor").is_ok());
        assert!(check_modes("missing,dirty")
            .unwrap_err()
            .to_string()
            .contains("dirty"));
        assert!(check_modes(",").is_err());
    }

    #[test]
    fn explicit_preload_must_exist() {
        let e = find_preload(Some(PathBuf::from("/nonexistent/lib.so"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/lib.so"), "{e}");
    }
}
