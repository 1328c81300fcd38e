//! Attaching memory to a pager the way a VMM does: create a uffd, negotiate, register the
//! range, send the handshake (Firecracker's or pagewise's) with the fds.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context};
use pager::attach::protocol::{self, AttachRequest, GuestRegionUffdMapping};
use uffd::{Features, RegisterMode, Uffd, UffdFlags};

use super::memory::{Backing, GuestMemory};
use crate::image::PAGE_SIZE;

/// Which handshake to speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeKind {
    /// A JSON array of regions + the uffd; no reply (Firecracker's UFFD handler protocol).
    Firecracker,
    /// The versioned pagewise request (+ memory-file fd for shared memory), then a reply.
    Pagewise { vm: String },
}

/// What attaching produced. Keep `socket` open while the memory is in use: the pager
/// treats a hang-up as the VMM's exit.
#[derive(Debug)]
pub struct Attached {
    pub socket: UnixStream,
    /// Features the kernel offers (full mask).
    pub kernel_features: Features,
    /// The swap device the pager named in its reply (pagewise handshake only).
    pub swapdev: Option<String>,
}

/// The uffd features a VMM asks for: EVENT_REMOVE always (balloon / madvise), the shmem
/// ones on shared memory, and the WP ones with `wp`.
pub fn wanted_features(backing: &Backing, wp: bool) -> Features {
    let mut f = Features::EVENT_REMOVE.bits();
    let shared = *backing != Backing::Anon;
    if shared {
        f |= Features::MISSING_SHMEM.bits();
    }
    if wp {
        f |= Features::WP_UNPOPULATED.bits();
        if shared {
            f |= Features::WP_HUGETLBFS_SHMEM.bits();
        }
    }
    Features(f)
}

/// Create and register a uffd over all of `mem` (MISSING, plus WP with `wp`). The uffd
/// reports kernel-mode faults too (no UFFD_USER_MODE_ONLY), as KVM guests need.
pub fn register(mem: &GuestMemory, wp: bool) -> anyhow::Result<(Uffd, Features)> {
    let uffd = Uffd::new(UffdFlags {
        nonblocking: true,
        cloexec: true,
        user_mode_only: false,
    })
    .context("creating the userfaultfd")?;
    let available = uffd
        .api(wanted_features(mem.backing(), wp))
        .context("UFFDIO_API")?;
    let mut mode = RegisterMode::MISSING.bits();
    if wp {
        mode |= RegisterMode::WP.bits();
    }
    uffd.register(mem.addr(), mem.len() as u64, RegisterMode(mode))
        .context("UFFDIO_REGISTER")?;
    Ok((uffd, available))
}

/// The one region describing all of `mem` (offset 0 in the memory file / swap device).
pub fn region_of(mem: &GuestMemory) -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: mem.addr(),
        size: mem.len(),
        offset: 0,
        page_size: PAGE_SIZE,
        page_size_kib: PAGE_SIZE,
    }
}

/// `mem` described as `n` regions of (nearly) equal size, back to back in the address space
/// and in the memory file, the way a VMM with several memory slots describes one guest.
pub fn regions_of(mem: &GuestMemory, n: u64) -> anyhow::Result<Vec<GuestRegionUffdMapping>> {
    if n == 0 || n > mem.pages() {
        bail!("{n} regions over {} pages: need 1..=pages", mem.pages());
    }
    let whole = region_of(mem);
    let per = mem.pages().div_ceil(n);
    let mut out = Vec::new();
    let mut first = 0;
    while first < mem.pages() {
        let pages = per.min(mem.pages() - first);
        let at = first * PAGE_SIZE as u64;
        out.push(GuestRegionUffdMapping {
            base_host_virt_addr: whole.base_host_virt_addr + at,
            size: pages as usize * PAGE_SIZE,
            offset: at,
            ..whole
        });
        first += pages;
    }
    Ok(out)
}

/// Register `mem` with a new uffd and hand it to the pager listening on `socket_path`.
pub fn attach(
    mem: &GuestMemory,
    socket_path: &Path,
    kind: &HandshakeKind,
    wp: bool,
) -> anyhow::Result<Attached> {
    attach_regions(mem, socket_path, kind, wp, 1)
}

/// [`attach`], describing `mem` as `regions` regions ([`regions_of`]).
pub fn attach_regions(
    mem: &GuestMemory,
    socket_path: &Path,
    kind: &HandshakeKind,
    wp: bool,
    regions: u64,
) -> anyhow::Result<Attached> {
    let regions = regions_of(mem, regions)?;
    let (uffd, kernel_features) = register(mem, wp)?;
    // The pager holds its own copy of the uffd afterwards; ours closes when this returns.
    send_handshake(mem, socket_path, kind, &uffd, kernel_features, wp, &regions)
}

/// Hand an already registered `uffd` over `mem` to the pager at `socket_path`.
pub fn handshake(
    mem: &GuestMemory,
    socket_path: &Path,
    kind: &HandshakeKind,
    uffd: &Uffd,
    kernel_features: Features,
    wp: bool,
) -> anyhow::Result<Attached> {
    let regions = [region_of(mem)];
    send_handshake(mem, socket_path, kind, uffd, kernel_features, wp, &regions)
}

fn send_handshake(
    mem: &GuestMemory,
    socket_path: &Path,
    kind: &HandshakeKind,
    uffd: &Uffd,
    kernel_features: Features,
    wp: bool,
    regions: &[GuestRegionUffdMapping],
) -> anyhow::Result<Attached> {
    let socket = UnixStream::connect(socket_path)
        .with_context(|| format!("connecting to the pager at {}", socket_path.display()))?;
    let swapdev = match kind {
        HandshakeKind::Firecracker => {
            protocol::send_firecracker(&socket, regions, uffd.as_raw_fd())
                .context("sending the Firecracker handshake")?;
            None
        }
        HandshakeKind::Pagewise { vm } => {
            let mut modes = vec!["missing".to_string()];
            if wp {
                modes.push("wp".into());
            }
            let request = AttachRequest {
                vm: vm.clone(),
                regions: regions.to_vec(),
                memory_file: mem.file().is_some(),
                uffd_features: wanted_features(mem.backing(), wp).bits(),
                modes,
                reattach: false,
                served_by: None,
            };
            protocol::send_request(
                &socket,
                &request,
                uffd.as_raw_fd(),
                mem.file().map(|f| f.as_raw_fd()),
            )
            .context("sending the pagewise handshake")?;
            let reply = protocol::recv_reply(&socket).context("reading the pager's reply")?;
            if !reply.ok {
                bail!(
                    "the pager refused VM {vm:?}: {}",
                    reply.error.as_deref().unwrap_or("no reason given")
                );
            }
            reply.swapdev
        }
    };
    Ok(Attached {
        socket,
        kernel_features,
        swapdev,
    })
}
