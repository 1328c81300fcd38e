//! Server side of one attach connection: read the handshake (either flavour) under a
//! timeout, check it, and turn it into the parts of a VM (uffd, layout, memory file, name).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use uffd::Uffd;

use super::protocol::{recv_handshake, send_reply, AttachReply, Handshake, HandshakeError};
use crate::vm::{GuestLayout, LayoutError, PeerInfo};

/// How the socket a connection arrived on names its VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Naming {
    /// Every VM attaching here is this VM (`--vm NAME=SOCKET:..` or single-VM `--swapdev`).
    /// A pagewise request naming another VM is refused.
    Fixed(String),
    /// Pagewise requests name the VM; Firecracker connections (no name) are refused.
    FromRequest,
    /// Pagewise requests name the VM; Firecracker connections get this name (single-VM
    /// `--swapdev` mode).
    Default(String),
}

/// A checked attach request, ready to become a VM.
#[derive(Debug)]
pub struct AttachedVm {
    pub name: String,
    pub uffd: Uffd,
    pub layout: GuestLayout,
    pub memory_file: Option<OwnedFd>,
    pub peer: PeerInfo,
    /// The VMM registered WP too (pagewise clients say so; Firecracker registers MISSING only).
    pub wp_registered: bool,
    /// "firecracker" or "pagewise".
    pub flavour: &'static str,
    /// True for pagewise clients, which expect an [`AttachReply`].
    pub wants_reply: bool,
    /// The VMM attaches again after its pager went away ([`super::protocol::AttachRequest::reattach`]).
    pub reattach: bool,
    /// On a re-attach: the swap device the gone pager served it from.
    pub served_by: Option<String>,
}

/// Why an attach was refused.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(
        "invalid VM name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ - not starting with '.'"
    )]
    BadName(String),
    #[error("this socket serves VM {socket_vm:?}, but the request names {requested:?}")]
    WrongVm {
        socket_vm: String,
        requested: String,
    },
    #[error("Firecracker handshakes carry no VM name; with --swapdev-dir give each Firecracker VM its own socket (--vm NAME=SOCKET:SWAPDEV)")]
    Unnamed,
    #[error("unknown registration mode {0:?} (expected missing, wp, minor)")]
    BadMode(String),
    #[error("the fd sent as the userfaultfd is not one (it is {0})")]
    NotUserfaultfd(String),
    #[error("the guest memory file {what} is {size} bytes but the regions end at {needed} bytes")]
    MemoryFileTooSmall {
        what: String,
        size: u64,
        needed: u64,
    },
    #[error("the guest memory file {0} is not a regular file (memfd, tmpfs, hugetlbfs)")]
    BadMemoryFile(String),
    #[error("examining the guest memory file")]
    MemoryFileStat(#[source] nix::Error),
    #[error("setting up the received uffd")]
    Uffd(#[source] nix::Error),
}

/// Whether `name` is acceptable as a VM name (it becomes a file name under --swapdev-dir).
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The peer's pid/uid (SO_PEERCRED).
pub fn peer_info(stream: &UnixStream) -> PeerInfo {
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => PeerInfo {
            pid: c.pid(),
            uid: c.uid(),
        },
        Err(e) => {
            tracing::warn!(%e, "SO_PEERCRED failed");
            PeerInfo::default()
        }
    }
}

/// Read and check one handshake from `stream`, waiting at most `timeout` for it.
/// On error the caller logs it and (for pagewise clients) replies with it.
pub fn accept_vm(
    stream: &UnixStream,
    naming: &Naming,
    timeout: Duration,
) -> Result<AttachedVm, (AttachError, bool)> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| (AttachError::Handshake(e.into()), false))?;
    let peer = peer_info(stream);
    let handshake = recv_handshake(stream).map_err(|e| (e.into(), false))?;
    let wants_reply = matches!(handshake, Handshake::Pagewise { .. });
    build(handshake, naming, peer).map_err(|e| (e, wants_reply))
}

fn build(handshake: Handshake, naming: &Naming, peer: PeerInfo) -> Result<AttachedVm, AttachError> {
    let (requested, regions, uffd, memory_file, modes, flavour, reattach, served_by) =
        match handshake {
            Handshake::Firecracker { regions, uffd } => (
                None,
                regions,
                uffd,
                None::<OwnedFd>,
                Vec::<String>::new(),
                "firecracker",
                false,
                None,
            ),
            Handshake::Pagewise {
                request,
                uffd,
                memory_file,
            } => (
                Some(request.vm),
                request.regions,
                uffd,
                memory_file,
                request.modes,
                "pagewise",
                request.reattach,
                request.served_by,
            ),
        };
    let name = match (naming, requested) {
        (Naming::Fixed(fixed), Some(req)) if !req.is_empty() && req != *fixed => {
            return Err(AttachError::WrongVm {
                socket_vm: fixed.clone(),
                requested: req,
            })
        }
        (Naming::Fixed(fixed), _) => fixed.clone(),
        (Naming::FromRequest | Naming::Default(_), Some(req)) => req,
        (Naming::Default(name), None) => name.clone(),
        (Naming::FromRequest, None) => return Err(AttachError::Unnamed),
    };
    if !valid_vm_name(&name) {
        return Err(AttachError::BadName(name));
    }
    let mut wp_registered = false;
    for m in &modes {
        match uffd::RegisterMode::from_name(m) {
            Some(uffd::RegisterMode::WP) => wp_registered = true,
            Some(_) => {}
            None => return Err(AttachError::BadMode(m.clone())),
        }
    }
    let layout = GuestLayout::from_mappings(&regions)?;
    match uffd::is_userfaultfd(uffd.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            let what = uffd::describe_fd(uffd.as_fd()).unwrap_or_else(|e| e.to_string());
            return Err(AttachError::NotUserfaultfd(what));
        }
        Err(e) => return Err(AttachError::NotUserfaultfd(format!("unidentifiable: {e}"))),
    }
    if let Some(file) = &memory_file {
        check_memory_file(file, &layout)?;
    }
    // The loop polls the uffd and drains it until EAGAIN: it must be non-blocking.
    let flags = fcntl(uffd.as_fd(), FcntlArg::F_GETFL).map_err(AttachError::Uffd)?;
    fcntl(
        uffd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(AttachError::Uffd)?;
    Ok(AttachedVm {
        name,
        uffd: Uffd::from(uffd),
        layout,
        memory_file,
        peer,
        wp_registered,
        flavour,
        wants_reply: flavour == "pagewise",
        reattach,
        served_by,
    })
}

/// The memory file must be a regular file (memfd, tmpfs, hugetlbfs) covering every region.
fn check_memory_file(file: &OwnedFd, layout: &GuestLayout) -> Result<(), AttachError> {
    let st = nix::sys::stat::fstat(file.as_fd()).map_err(AttachError::MemoryFileStat)?;
    let what = uffd::describe_fd(file.as_fd()).unwrap_or_else(|_| "(unnamed)".into());
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(AttachError::BadMemoryFile(what));
    }
    let size = st.st_size as u64;
    if size < layout.span_bytes() {
        return Err(AttachError::MemoryFileTooSmall {
            what,
            size,
            needed: layout.span_bytes(),
        });
    }
    Ok(())
}

/// Why an attach was refused, and whether trying again may pass ([`AttachReply::retry`]).
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub why: &'a str,
    pub retry: bool,
}

/// Answer a pagewise client (logged, never fatal: the client may be gone): the swap device
/// and whether a re-attach could serve the VM, or the refusal.
pub fn reply(stream: &UnixStream, result: Result<(&str, bool), Refusal<'_>>) {
    let reply = match result {
        Ok((swapdev, reattach)) => AttachReply {
            ok: true,
            error: None,
            swapdev: Some(swapdev.to_string()),
            reattach,
            retry: false,
        },
        Err(r) => AttachReply {
            ok: false,
            error: Some(r.why.to_string()),
            swapdev: None,
            reattach: false,
            retry: r.retry,
        },
    };
    if let Err(e) = send_reply(stream, &reply) {
        tracing::warn!(%e, "could not send the attach reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::protocol::{
        send_firecracker, send_request, AttachRequest, GuestRegionUffdMapping,
    };
    use std::os::fd::AsRawFd;
    use uffd::UffdFlags;

    fn region() -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: 0x7000_0000,
            size: 1 << 20,
            offset: 0,
            page_size: 4096,
            page_size_kib: 0,
        }
    }

    #[test]
    fn names_and_flavours() {
        let u = Uffd::new(UffdFlags::default()).unwrap();
        let t = Duration::from_secs(2);

        let (a, b) = UnixStream::pair().unwrap();
        send_firecracker(&a, &[region()], u.as_raw_fd()).unwrap();
        let vm = accept_vm(&b, &Naming::Fixed("fc1".into()), t).unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.flavour, vm.wants_reply),
            ("fc1", "firecracker", false)
        );
        assert_eq!(vm.peer.pid, std::process::id() as i32);
        let fl = fcntl(vm.uffd.as_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(OFlag::from_bits_retain(fl).contains(OFlag::O_NONBLOCK));

        let (a, b) = UnixStream::pair().unwrap();
        send_firecracker(&a, &[region()], u.as_raw_fd()).unwrap();
        assert!(matches!(
            accept_vm(&b, &Naming::FromRequest, t),
            Err((AttachError::Unnamed, false))
        ));

        let req = |vm: &str, modes: &[&str]| AttachRequest {
            vm: vm.into(),
            regions: vec![region()],
            memory_file: false,
            uffd_features: 0,
            modes: modes.iter().map(|s| s.to_string()).collect(),
            reattach: false,
            served_by: None,
        };
        let (a, b) = UnixStream::pair().unwrap();
        send_request(&a, &req("vm-2", &["missing", "wp"]), u.as_raw_fd(), None).unwrap();
        let vm = accept_vm(&b, &Naming::FromRequest, t).unwrap();
        assert_eq!(vm.name, "vm-2");
        assert!(vm.wp_registered);

        for (name, naming) in [
            ("../etc", Naming::FromRequest),
            ("other", Naming::Fixed("mine".into())),
        ] {
            let (a, b) = UnixStream::pair().unwrap();
            send_request(&a, &req(name, &["missing"]), u.as_raw_fd(), None).unwrap();
            assert!(
                matches!(accept_vm(&b, &naming, t), Err((_, true))),
                "{name}"
            );
        }
    }

    #[test]
    fn refuses_non_uffd_and_short_memory_files() {
        let t = Duration::from_secs(2);
        let req = |memory_file| AttachRequest {
            vm: "m".into(),
            regions: vec![region()],
            memory_file,
            uffd_features: 0,
            modes: vec!["missing".into()],
            reattach: false,
            served_by: None,
        };
        let zero = std::fs::File::open("/dev/zero").unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_request(&a, &req(false), zero.as_raw_fd(), None).unwrap();
        match accept_vm(&b, &Naming::FromRequest, t) {
            Err((AttachError::NotUserfaultfd(what), true)) => assert_eq!(what, "/dev/zero"),
            other => panic!("expected NotUserfaultfd, got {other:?}"),
        }

        let u = Uffd::new(UffdFlags::default()).unwrap();
        let small = tempfile::tempfile().unwrap();
        small.set_len(4096).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        send_request(&a, &req(true), u.as_raw_fd(), Some(small.as_raw_fd())).unwrap();
        match accept_vm(&b, &Naming::FromRequest, t) {
            Err((AttachError::MemoryFileTooSmall { size, needed, .. }, true)) => {
                assert_eq!((size, needed), (4096, 1 << 20))
            }
            other => panic!("expected MemoryFileTooSmall, got {other:?}"),
        }

        let (a, b) = UnixStream::pair().unwrap();
        send_request(&a, &req(true), u.as_raw_fd(), Some(zero.as_raw_fd())).unwrap();
        assert!(matches!(
            accept_vm(&b, &Naming::FromRequest, t),
            Err((AttachError::BadMemoryFile(_), true))
        ));
    }

    #[test]
    fn silent_peer_times_out() {
        let (_a, b) = UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        assert!(accept_vm(&b, &Naming::FromRequest, Duration::from_millis(100)).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
