//! What happens when the VMM maps the guest memory file: register a userfaultfd on the
//! mapping and hand it, with the file, to the pager.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use uffd::{Features, RegisterMode, Uffd, UffdFlags};

use crate::config::Config;
use crate::sys;
use crate::watch::OnPagerExit;
use crate::wire::{self, Region, Request, Verdict};

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// A mapping now served by the pager.
#[derive(Debug)]
pub struct Attached {
    pub region: Region,
    pub swapdev: Option<String>,
    pub features: u64,
}

/// uffd features for the chosen modes: REMOVE events (balloon / discard), MISSING on
/// shmem and hugetlbfs, and for `wp` write-protect on shmem incl. never-touched pages.
pub fn features_for(modes: RegisterMode) -> Features {
    let mut f = Features::EVENT_REMOVE | Features::MISSING_SHMEM | Features::MISSING_HUGETLBFS;
    if modes.contains(RegisterMode::WP) {
        f |= Features::WP_HUGETLBFS_SHMEM | Features::WP_UNPOPULATED;
    }
    if modes.contains(RegisterMode::MINOR) {
        f |= Features::MINOR_SHMEM | Features::MINOR_HUGETLBFS;
    }
    f
}

/// Page size of the memory file's filesystem; refuses anything but tmpfs and hugetlbfs.
fn page_size_of(fd: RawFd, path: &Path) -> Result<u64, String> {
    let (fs_type, block) = sys::fstatfs(fd)
        .map_err(|e| format!("fstatfs on the memory file {}: {e}", path.display()))?;
    match fs_type {
        TMPFS_MAGIC => Ok(4096),
        HUGETLBFS_MAGIC => Ok(block as u64),
        other => Err(format!(
            "the memory file {} is on a filesystem of type {other:#x}, not tmpfs (/dev/shm) or \
             hugetlbfs: userfaultfd cannot serve guest RAM there",
            path.display()
        )),
    }
}

/// What attaching (and re-attaching) hands the pager: the registered uffd and a duplicate of
/// the memory file's fd, both kept open by the library for the life of the process.
pub struct Link {
    uffd: RawFd,
    memory_file: OwnedFd,
    pub region: Region,
    pub features: u64,
}

/// Why a handshake did not end in an accepted attach.
#[derive(Debug)]
pub enum HandshakeFailure {
    /// Nobody listens on the socket (yet), or the exchange broke off (the pager went away
    /// again): worth trying again while waiting for a restart.
    Unreachable(String),
    /// The pager answered and refused, or named another swap device: final.
    Refused(String),
    /// The pager refused for now and said it may pass (another host holds the VM's swap
    /// device and may hand it back): worth trying again while waiting.
    NotYet(String),
}

impl HandshakeFailure {
    pub fn message(self) -> String {
        match self {
            Self::Unreachable(m) | Self::Refused(m) | Self::NotYet(m) => m,
        }
    }
}

/// Register `[addr, addr+len)` (file offset `offset` of `fd`) and attach it to the pager.
/// On success the uffd and the connection stay open for the life of the process: the pager
/// sees the VMM's exit as a hang-up, and if the pager dies the guest can never read zero
/// pages instead of its own (our uffd reference keeps the range registered); the watch
/// thread (`watch.rs`) then waits for a restarted pager and attaches again, or ends the
/// process (see [`OnPagerExit`]).
pub fn attach(
    cfg: &Config,
    fd: RawFd,
    addr: u64,
    len: u64,
    offset: u64,
) -> Result<Attached, String> {
    let path = cfg.mem_path.as_path();
    let page_size = page_size_of(fd, path)?;
    let aligned = |v: u64| v.is_multiple_of(page_size);
    if !aligned(addr) || !aligned(len) || !aligned(offset) || len == 0 {
        return Err(format!(
            "mapping of {} at {addr:#x} (+{len:#x}, file offset {offset:#x}) is not aligned to \
             the page size {page_size}",
            path.display()
        ));
    }
    let uffd = Uffd::new(UffdFlags {
        nonblocking: true,
        cloexec: true,
        user_mode_only: false,
    })
    .map_err(|e| format!("{e} (is /dev/userfaultfd accessible to this user?)"))?;
    let features = features_for(cfg.modes);
    uffd.api(features).map_err(|e| e.to_string())?;
    uffd.register(addr, len, cfg.modes).map_err(|e| {
        format!(
            "registering guest RAM of {} ({}): {e}",
            path.display(),
            cfg.mode_names.join(",")
        )
    })?;
    let memory_file =
        sys::dup_cloexec(fd).map_err(|e| format!("dup of the memory file fd: {e}"))?;
    let link = Link {
        uffd: uffd.as_raw_fd(),
        memory_file,
        region: Region {
            host_addr: addr,
            size: len,
            file_offset: offset,
            page_size,
        },
        features: features.bits(),
    };
    let (stream, swapdev, reattach) =
        handshake(cfg, &link, None).map_err(HandshakeFailure::message)?;
    // Kept open on purpose, see above.
    let _ = uffd.into_raw();
    let region = link.region;
    match cfg.on_pager_exit {
        OnPagerExit::Wait | OnPagerExit::Exit => crate::watch::start(
            stream,
            cfg.clone(),
            link,
            crate::watch::Served {
                swapdev: swapdev.clone(),
                reattach,
            },
            format!("VM {:?} ({})", cfg.vm, path.display()),
        )?,
        OnPagerExit::Hang => {
            std::mem::forget(stream);
            std::mem::forget(link);
        }
    }
    Ok(Attached {
        region,
        swapdev,
        features: features.bits(),
    })
}

/// Connect, send the handshake with `[uffd, memory file]`, read the verdict. `again`: a
/// re-attach, with the swap device the gone pager named (if it named one). Returns the
/// connection, the swap device the pager named and whether it allows a re-attach.
pub fn handshake(
    cfg: &Config,
    link: &Link,
    again: Option<Option<&str>>,
) -> Result<(UnixStream, Option<String>, bool), HandshakeFailure> {
    let mut stream = connect(cfg).map_err(HandshakeFailure::Unreachable)?;
    let body = wire::request_body(&Request {
        vm: &cfg.vm,
        region: link.region,
        uffd_features: link.features,
        modes: &cfg.mode_names,
        reattach: again.is_some(),
        served_by: again.flatten(),
    });
    sys::send_with_fds(
        &stream,
        &wire::frame(body.as_bytes()),
        &[link.uffd, link.memory_file.as_raw_fd()],
    )
    .map_err(|e| {
        HandshakeFailure::Unreachable(format!(
            "sending the handshake to the pager at {}: {e}",
            cfg.socket.display()
        ))
    })?;
    match wire::read_reply(&mut stream).map_err(HandshakeFailure::Unreachable)? {
        Verdict::Accepted { swapdev, reattach } => {
            check_swapdev(cfg, swapdev.as_deref()).map_err(HandshakeFailure::Refused)?;
            Ok((stream, swapdev, reattach))
        }
        Verdict::Refused { error, retry } => {
            let why = format!(
                "the pager at {} refused VM {:?}: {error}",
                cfg.socket.display(),
                cfg.vm
            );
            Err(if retry {
                HandshakeFailure::NotYet(why)
            } else {
                HandshakeFailure::Refused(why)
            })
        }
    }
}

/// The swap device the pager answered with must be the one the operator named, if any.
fn check_swapdev(cfg: &Config, swapdev: Option<&str>) -> Result<(), String> {
    let Some(expected) = &cfg.expected_swapdev else {
        return Ok(());
    };
    match swapdev {
        Some(got) if crate::config::same_swapdev(expected, got) => Ok(()),
        got => Err(format!(
            "the pager at {} serves VM {:?} from swap device {}, not {expected} \
             (PAGEWISE_SWAPDEV / --swapdev)",
            cfg.socket.display(),
            cfg.vm,
            got.unwrap_or("(unnamed)")
        )),
    }
}

fn connect(cfg: &Config) -> Result<UnixStream, String> {
    let stream = UnixStream::connect(&cfg.socket).map_err(|e| {
        format!(
            "cannot connect to the pager at {}: {e}: start `pagewise serve --socket {}` first",
            cfg.socket.display(),
            cfg.socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(cfg.timeout))
        .and_then(|_| stream.set_write_timeout(Some(cfg.timeout)))
        .map_err(|e| format!("socket timeout: {e}"))?;
    Ok(stream)
}

/// Load-time check: userfaultfd can be created and the pager's socket accepts connections.
/// (The probe connection is closed without a word; the pager sees an empty connection.)
pub fn probe(cfg: &Config) -> Result<(), String> {
    Uffd::new(UffdFlags::default())
        .map_err(|e| format!("{e} (is /dev/userfaultfd accessible to this user?)"))?;
    drop(connect(cfg)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_modes() {
        let f = features_for(RegisterMode::MISSING);
        assert!(f.contains(Features::EVENT_REMOVE) && f.contains(Features::MISSING_SHMEM));
        assert!(!f.contains(Features::WP_UNPOPULATED));
        let f = features_for(RegisterMode::MISSING | RegisterMode::WP);
        assert!(f.contains(Features::WP_UNPOPULATED) && f.contains(Features::WP_HUGETLBFS_SHMEM));
        assert!(
            !f.contains(Features::WP_ASYNC),
            "eviction needs synchronous WP"
        );
    }

    #[test]
    fn refuses_files_outside_tmpfs_and_hugetlbfs() {
        let proc_file = Path::new("/proc/self/status");
        let f = std::fs::File::open(proc_file).unwrap();
        let e = page_size_of(f.as_raw_fd(), proc_file).unwrap_err();
        assert!(
            e.contains("not tmpfs") && e.contains("/proc/self/status"),
            "{e}"
        );
        let shm = Path::new("/dev/shm").join(format!("pw-preload-test-{}", std::process::id()));
        std::fs::write(&shm, b"x").unwrap();
        let f = std::fs::File::open(&shm).unwrap();
        let size = page_size_of(f.as_raw_fd(), &shm);
        std::fs::remove_file(&shm).unwrap();
        assert_eq!(size, Ok(4096));
    }
}
