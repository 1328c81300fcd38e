//! `pagewise vm save --qmp SOCK --ram-file FILE --ram-image IMG --state STATE [--socket S]`
//!
//! Through the guest's QMP socket: `stop`, `x-ignore-shared` on, `migrate` to a temporary
//! file (QEMU writes the device state only: the RAM is a named shared file), then the RAM
//! file copied into the raw image (holes kept, read-only) and the state file written (a
//! header tying it to the image, then QEMU's stream; `agent::qemu::saved`). Then `quit`
//! (or `cont` with `--keep-running`). A failure before the files are in place resumes a
//! guest that was running and leaves no file behind.
//!
//! A guest under the pager (`--socket`) may have pages that are not in its RAM file (evicted
//! to the swap device, or not yet served by a lazy restore): the save asks the daemon and
//! refuses then, since the image would hold zeros where those pages are.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::migrate::qmp::{Qmp, QmpError};
use agent::qemu::cmdline::ram_page_size;
use agent::qemu::ram_image::{partial_path, refuse_existing, write_image, write_state};
use agent::qemu::saved::{save_uri, StateHeader, FINGERPRINT_SAMPLES, MAX_STREAM_BYTES};
use anyhow::{bail, Context};
use pager::server::protocol::StateCounts;
use pager::server::ControlClient;
use serde_json::json;

use super::env_path;

#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// The guest's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long)]
    qmp: PathBuf,
    /// The guest RAM file (QEMU's `mem-path=` of its memory-backend-file with share=on).
    #[arg(long)]
    ram_file: PathBuf,
    /// The raw RAM image to write (must not exist; written read-only).
    #[arg(long)]
    ram_image: PathBuf,
    /// The state file to write (must not exist).
    #[arg(long)]
    state: PathBuf,
    /// The pager's attach socket when the guest runs under `pagewise vm run`: the daemon is
    /// asked whether every page is in the RAM file [default: $PAGEWISE_SOCKET; without
    /// either the guest is taken to be plain QEMU].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The VM's name in the pager [default: the RAM file's name].
    #[arg(long)]
    name: Option<String>,
    /// Resume the guest after the save instead of quitting QEMU.
    #[arg(long)]
    keep_running: bool,
    /// Longest wait for QEMU's device-state migration, in seconds.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout_secs: u64,
}

/// Pages of the VM that the RAM file does not hold, by the daemon's stats; None when all
/// are there.
fn pages_elsewhere(s: &StateCounts, source: &str) -> Option<String> {
    let moving = s.evicted + s.evicting + s.inflight;
    if moving > 0 {
        return Some(format!(
            "{moving} pages are evicted to (or moving from) {source}: bring them back first \
             (stop evicting; the next full pass of the guest faults them in)"
        ));
    }
    if s.missing > 0 && source.starts_with("raw ") {
        return Some(format!(
            "{} pages were never served from {source} (a lazy restore still in progress): wait \
             until the background push has placed them (pagewise stats: missing 0)",
            s.missing
        ));
    }
    None
}

fn check_with_pager(socket: &Path, vm: &str) -> anyhow::Result<()> {
    let control = pager::conventions::default_stats_socket(socket);
    let stats = ControlClient::connect(&control)
        .and_then(|mut c| c.stats(Some(vm)))
        .with_context(|| format!("asking the pager ({}) about VM {vm:?}", control.display()))?;
    let Some(vm_stats) = stats.vms.iter().find(|v| v.vm == vm) else {
        bail!(
            "VM {vm:?} is not attached to the pager at {}: pass its --name (or no --socket for \
             a guest that is not under the pager)",
            socket.display()
        );
    };
    if let Some(why) = pages_elsewhere(&vm_stats.states, &vm_stats.source) {
        bail!("VM {vm:?} cannot be saved from its RAM file: {why}");
    }
    Ok(())
}

/// Stop the guest, save its device state into `stream`; on any failure resume a guest that
/// was running.
fn save_device_state(
    qmp: &mut Qmp,
    stream: &Path,
    args: &SaveArgs,
    pager: Option<(&Path, &str)>,
) -> anyhow::Result<bool> {
    let status = qmp
        .execute("query-status", json!({}))
        .context("QMP query-status")?;
    let was_running = status["status"].as_str() == Some("running");
    if was_running {
        qmp.execute("stop", json!({})).context("QMP stop")?;
    }
    let result = (|| {
        if let Some((socket, vm)) = pager {
            check_with_pager(socket, vm)?;
        }
        qmp.set_capabilities(&[("x-ignore-shared", true)])
            .context("QMP migrate-set-capabilities x-ignore-shared")?;
        qmp.execute("migrate", json!({ "uri": save_uri(stream) }))
            .context("QMP migrate")?;
        qmp.wait_status(&["completed"], Duration::from_secs(args.timeout_secs))
            .context("saving the device state")?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(stream);
        if was_running {
            let _ = qmp.execute("cont", json!({}));
        }
        return Err(e);
    }
    Ok(was_running)
}

pub fn run(args: SaveArgs) -> anyhow::Result<std::process::ExitCode> {
    let started = Instant::now();
    refuse_existing(&args.ram_image)?;
    refuse_existing(&args.state)?;
    let page_size = ram_page_size(&args.ram_file)?;
    let ram_bytes = std::fs::metadata(&args.ram_file)
        .with_context(|| format!("the RAM file {}", args.ram_file.display()))?
        .len();
    let socket = args.socket.clone().or_else(|| env_path("PAGEWISE_SOCKET"));
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .ram_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("--ram-file has no file name")?,
    };
    let mut qmp = Qmp::connect(&args.qmp, Duration::from_secs(10)).context("QMP connect")?;
    let stream = partial_path(&args.state).with_extension("stream");
    let _ = std::fs::remove_file(&stream);
    let pager = socket.as_deref().map(|s| (s, name.as_str()));
    let was_running = save_device_state(&mut qmp, &stream, &args, pager)?;
    let resume = |qmp: &mut Qmp| {
        if was_running {
            let _ = qmp.execute("cont", json!({}));
        }
    };
    let files = (|| {
        let stream_bytes = std::fs::metadata(&stream)?.len();
        if stream_bytes > MAX_STREAM_BYTES || stream_bytes > ram_bytes / 2 {
            bail!(
                "QEMU wrote {stream_bytes} bytes of device state for a {ram_bytes}-byte guest: \
                 the RAM went into the stream, so x-ignore-shared did not apply (the guest RAM \
                 must be -object memory-backend-file,...,share=on)"
            );
        }
        let image = write_image(&args.ram_file, &args.ram_image, page_size)?;
        let header = StateHeader {
            ram_bytes: image.ram_bytes,
            page_size,
            stream_bytes: 0,
            samples: FINGERPRINT_SAMPLES,
            fingerprint: image.fingerprint,
        };
        let header = write_state(&args.state, header, &stream).inspect_err(|_| {
            let _ = std::fs::remove_file(&args.ram_image);
        })?;
        Ok((image, header))
    })();
    let _ = std::fs::remove_file(&stream);
    let (image, header) = match files {
        Ok(f) => f,
        Err(e) => {
            resume(&mut qmp);
            return Err(e);
        }
    };
    if args.keep_running {
        resume(&mut qmp);
    } else {
        // QEMU may close the connection before its answer arrives.
        match qmp.execute("quit", json!({})) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(QmpError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(e).context("QMP quit"),
        }
    }
    println!(
        "saved VM {name}: RAM image {} ({} MiB, {} MiB of data), state {} ({} bytes of device \
         state) in {} ms; QEMU {}",
        args.ram_image.display(),
        image.ram_bytes >> 20,
        image.data_bytes >> 20,
        args.state.display(),
        header.stream_bytes,
        started.elapsed().as_millis(),
        if args.keep_running {
            if was_running {
                "running again"
            } else {
                "left paused"
            }
        } else {
            "quit"
        }
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_outside_the_ram_file_refuse_a_save() {
        let counts = |missing, evicted| StateCounts {
            missing,
            present: 10,
            inflight: 0,
            evicting: 0,
            evicted,
            removed: 0,
            zero: 0,
        };
        assert!(pages_elsewhere(&counts(90, 0), "swapdev /d/v.swap").is_none());
        let e = pages_elsewhere(&counts(0, 5), "swapdev /d/v.swap").unwrap();
        assert!(e.contains("5 pages are evicted"), "{e}");
        let e = pages_elsewhere(&counts(7, 0), "raw /i.img for v").unwrap();
        assert!(e.contains("7 pages were never served"), "{e}");
        assert!(pages_elsewhere(&counts(0, 0), "raw /i.img for v").is_none());
    }
}
