//! Wire formats of the two attach handshakes.
//!
//! * **Firecracker**: the VMM sends one JSON array (no length prefix) of
//!   [`GuestRegionUffdMapping`] in a single `sendmsg`, with the uffd as `SCM_RIGHTS`.
//! * **pagewise** (versioned): the client sends `b"PWHS"`, a little-endian `u32` version, a
//!   little-endian `u32` body length, then a JSON [`AttachRequest`] body; fds ride as
//!   `SCM_RIGHTS` on the same `sendmsg`: `[uffd]` or `[uffd, memory_file]`. The pager answers
//!   with the same framing (magic `b"PWHR"`) and a JSON [`AttachReply`].
//!
//! The first byte tells them apart: `[` (Firecracker) or `P` (pagewise).

use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Magic opening a pagewise attach request.
pub const REQUEST_MAGIC: &[u8; 4] = b"PWHS";
/// Magic opening a pagewise attach reply.
pub const REPLY_MAGIC: &[u8; 4] = b"PWHR";
/// The handshake version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest handshake body accepted (either flavour). Anything longer is refused.
pub const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// Most fds a handshake may carry.
pub const MAX_FDS: usize = 4;

/// One guest memory region, exactly as Firecracker sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Host virtual address where the region is mapped in the VMM.
    pub base_host_virt_addr: u64,
    /// Region size in bytes.
    pub size: usize,
    /// Byte offset of the region in the guest memory file / swap device.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: usize,
    /// Deprecated by Firecracker; also holds bytes. Accepted when `page_size` is absent.
    #[serde(default)]
    pub page_size_kib: usize,
}

/// The pagewise attach request (JSON body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    /// VM name: selects the swap device the pager serves this VM from.
    pub vm: String,
    /// Guest memory regions; `offset` is the byte offset in the memory file and swap device.
    pub regions: Vec<GuestRegionUffdMapping>,
    /// True when a second fd (the guest memory file, shmem/hugetlbfs) follows the uffd.
    pub memory_file: bool,
    /// uffd features the client negotiated with UFFDIO_API (bit mask), for the pager to check.
    pub uffd_features: u64,
    /// Registration modes used: "missing", "wp", "minor".
    pub modes: Vec<String>,
    /// The same VMM attaching the same uffd and memory file again after its pager went away
    /// (killed, restarted): the pager rebuilds the pages' states from the memory file and the
    /// swap device instead of starting from "nothing present", and wakes every fault the
    /// gone pager had read but not answered.
    #[serde(default)]
    pub reattach: bool,
    /// On a re-attach: the swap device the gone pager named in its reply. A pager that would
    /// serve the VM from another one refuses (the pages stored there would read as missing).
    #[serde(default)]
    pub served_by: Option<String>,
}

/// The pager's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachReply {
    pub ok: bool,
    /// On failure: what was wrong, in words an operator can act on.
    #[serde(default)]
    pub error: Option<String>,
    /// On success: the swap device serving this VM.
    #[serde(default)]
    pub swapdev: Option<String>,
    /// Whether the VMM may re-attach ([`AttachRequest::reattach`]) if this connection ends
    /// without a word from the pager: true for a VM whose every page is in its memory file or
    /// its swap device, false while some are elsewhere (a migration's other host). The pager
    /// sends a new reply frame on the same connection when that changes, and a last one with
    /// `ok: false` and the reason when it tears the VM down on purpose.
    #[serde(default)]
    pub reattach: bool,
    /// On a refused re-attach: the refusal may pass (the VM's swap device is owned by
    /// another host that may hand it back, e.g. a migration's destination rolling back), so
    /// the VMM tries again while it waits. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

/// Why a handshake was refused. The refusal reaches the VMM and the log as one line, so the
/// I/O and JSON causes are printed inline (and therefore not also chained as `source`).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake I/O failed: {0}")]
    Io(std::io::Error),
    #[error("peer closed the connection before a complete handshake ({0} bytes received)")]
    Truncated(usize),
    #[error("handshake larger than {MAX_HANDSHAKE_BYTES} bytes")]
    Oversized,
    #[error("unknown handshake: first bytes {0:02x?} are neither a Firecracker JSON array nor pagewise magic PWHS")]
    UnknownFlavour(Vec<u8>),
    #[error("unsupported pagewise handshake version {got} (this pager speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: u32 },
    #[error("malformed handshake JSON: {0}")]
    Json(serde_json::Error),
    #[error("handshake carried {got} fds, expected {expected}")]
    FdCount { got: usize, expected: &'static str },
    #[error("invalid region {index}: {why}")]
    BadRegion { index: usize, why: String },
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<serde_json::Error> for HandshakeError {
    fn from(e: serde_json::Error) -> Self {
        Self::Json(e)
    }
}

/// A received, not yet validated, handshake.
#[derive(Debug)]
pub enum Handshake {
    Firecracker {
        regions: Vec<GuestRegionUffdMapping>,
        uffd: OwnedFd,
    },
    Pagewise {
        request: AttachRequest,
        uffd: OwnedFd,
        memory_file: Option<OwnedFd>,
    },
}

impl GuestRegionUffdMapping {
    /// The page size, falling back to the deprecated field.
    pub fn effective_page_size(&self) -> usize {
        if self.page_size != 0 {
            self.page_size
        } else {
            self.page_size_kib
        }
    }
}

/// Check regions: non-empty, page sizes 4 KiB or 2 MiB, sizes/addresses/offsets aligned,
/// neither address + size nor offset + size overflowing u64, no overlaps in address space.
/// (Overlapping file offsets and the fit in the swap device are checked by
/// [`crate::layout::GuestLayout`].)
pub fn validate_regions(regions: &[GuestRegionUffdMapping]) -> Result<(), HandshakeError> {
    if regions.is_empty() {
        return Err(HandshakeError::BadRegion {
            index: 0,
            why: "no regions".into(),
        });
    }
    for (i, r) in regions.iter().enumerate() {
        let ps = r.effective_page_size();
        let bad = |why: String| HandshakeError::BadRegion { index: i, why };
        if ps != 4096 && ps != 2 << 20 {
            return Err(bad(format!("page size {ps} is neither 4096 nor 2097152")));
        }
        if r.size == 0 || r.size % ps != 0 {
            return Err(bad(format!(
                "size {} is not a positive multiple of page size {ps}",
                r.size
            )));
        }
        if r.base_host_virt_addr % ps as u64 != 0 || r.offset % ps as u64 != 0 {
            return Err(bad(format!(
                "address {:#x} or offset {:#x} not aligned to page size {ps}",
                r.base_host_virt_addr, r.offset
            )));
        }
        if r.base_host_virt_addr.checked_add(r.size as u64).is_none() {
            return Err(bad(format!(
                "address {:#x} + size {:#x} overflows u64",
                r.base_host_virt_addr, r.size
            )));
        }
        if r.offset.checked_add(r.size as u64).is_none() {
            return Err(bad(format!(
                "offset {:#x} + size {:#x} overflows u64",
                r.offset, r.size
            )));
        }
        for (j, o) in regions.iter().enumerate().take(i) {
            let (a0, a1) = (r.base_host_virt_addr, r.base_host_virt_addr + r.size as u64);
            let (b0, b1) = (o.base_host_virt_addr, o.base_host_virt_addr + o.size as u64);
            if a0 < b1 && b0 < a1 {
                return Err(bad(format!("overlaps region {j}")));
            }
        }
    }
    Ok(())
}

fn frame(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(magic);
    msg.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<(), HandshakeError> {
    let iov = [IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    if sent < bytes.len() {
        // The fds went with the first chunk; send the rest plainly.
        send_all(sock, &bytes[sent..])?;
    }
    Ok(())
}

fn send_all(sock: RawFd, mut bytes: &[u8]) -> Result<(), HandshakeError> {
    while !bytes.is_empty() {
        let n = nix::sys::socket::send(sock, bytes, MsgFlags::MSG_NOSIGNAL)
            .map_err(std::io::Error::from)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Client side: send a pagewise attach request with `[uffd]` or `[uffd, memory_file]`.
pub fn send_request(
    sock: &impl AsRawFd,
    req: &AttachRequest,
    uffd: RawFd,
    memory_file: Option<RawFd>,
) -> Result<(), HandshakeError> {
    let body = serde_json::to_vec(req)?;
    let mut fds = vec![uffd];
    fds.extend(memory_file);
    send_with_fds(sock.as_raw_fd(), &frame(REQUEST_MAGIC, &body), &fds)
}

/// Client side (and tests): send a Firecracker-style handshake.
pub fn send_firecracker(
    sock: &impl AsRawFd,
    regions: &[GuestRegionUffdMapping],
    uffd: RawFd,
) -> Result<(), HandshakeError> {
    let body = serde_json::to_vec(regions)?;
    send_with_fds(sock.as_raw_fd(), &body, &[uffd])
}

/// Server side: send the reply to a pagewise client.
pub fn send_reply(sock: &impl AsRawFd, reply: &AttachReply) -> Result<(), HandshakeError> {
    let body = serde_json::to_vec(reply)?;
    send_all(sock.as_raw_fd(), &frame(REPLY_MAGIC, &body))
}

/// Client side: read the pager's reply (blocking).
pub fn recv_reply(sock: &impl AsRawFd) -> Result<AttachReply, HandshakeError> {
    let mut head = [0u8; 12];
    read_exact(sock.as_raw_fd(), &mut head)?;
    if &head[..4] != REPLY_MAGIC {
        return Err(HandshakeError::UnknownFlavour(head[..4].to_vec()));
    }
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_HANDSHAKE_BYTES {
        return Err(HandshakeError::Oversized);
    }
    let mut body = vec![0u8; len];
    read_exact(sock.as_raw_fd(), &mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

fn read_exact(sock: RawFd, buf: &mut [u8]) -> Result<(), HandshakeError> {
    let mut done = 0;
    while done < buf.len() {
        let n = nix::sys::socket::recv(sock, &mut buf[done..], MsgFlags::empty())
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(HandshakeError::Truncated(done));
        }
        done += n;
    }
    Ok(())
}

/// Where a handshake's bytes and fds come from: a connected socket for [`recv_handshake`];
/// anything else for [`read_handshake`] (tests, fuzzing).
pub trait ChunkSource {
    /// Read at most `buf.len()` bytes (0: the peer closed) and the fds that came with them.
    fn recv_chunk(&mut self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), HandshakeError>;
}

/// A connected socket, read with `recvmsg`.
struct Socket(RawFd);

impl ChunkSource for Socket {
    fn recv_chunk(&mut self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), HandshakeError> {
        recv_chunk(self.0, buf)
    }
}

/// Receive one chunk plus any fds. Returns (bytes read, fds).
fn recv_chunk(sock: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), HandshakeError> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed this fd in our table for us; we own it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// Server side: read one handshake of either flavour from a connected socket (blocking; set a
/// read timeout on the socket to bound a silent peer). Validates framing, size, version, JSON
/// and fd count; region validation is [`validate_regions`].
pub fn recv_handshake(sock: &impl AsRawFd) -> Result<Handshake, HandshakeError> {
    read_handshake(&mut Socket(sock.as_raw_fd()))
}

/// [`recv_handshake`] from any source of chunks: the same parsing and checks, whatever the
/// chunks' sizes and wherever their fds come.
pub fn read_handshake(src: &mut impl ChunkSource) -> Result<Handshake, HandshakeError> {
    let mut buf = vec![0u8; MAX_HANDSHAKE_BYTES + 1];
    let (n, mut fds) = src.recv_chunk(&mut buf)?;
    if n == 0 {
        return Err(HandshakeError::Truncated(0));
    }
    let mut have = n;
    if buf[0] == b'[' {
        // Firecracker: the whole array arrives in one sendmsg; keep reading only while the
        // JSON is incomplete (a stream socket may split it).
        loop {
            match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(&buf[..have]) {
                Ok(regions) => {
                    if fds.len() != 1 {
                        return Err(HandshakeError::FdCount {
                            got: fds.len(),
                            expected: "1 (uffd)",
                        });
                    }
                    let uffd = fds.pop().expect("one fd");
                    return Ok(Handshake::Firecracker { regions, uffd });
                }
                Err(e) if e.is_eof() && have < MAX_HANDSHAKE_BYTES => {
                    let (m, more) = src.recv_chunk(&mut buf[have..])?;
                    if m == 0 {
                        return Err(HandshakeError::Json(e));
                    }
                    fds.extend(more);
                    have += m;
                }
                Err(e) if e.is_eof() => return Err(HandshakeError::Oversized),
                Err(e) => return Err(HandshakeError::Json(e)),
            }
        }
    }
    if buf[0] != b'P' {
        return Err(HandshakeError::UnknownFlavour(buf[..n.min(8)].to_vec()));
    }
    while have < 12 {
        let (m, more) = src.recv_chunk(&mut buf[have..])?;
        if m == 0 {
            return Err(HandshakeError::Truncated(have));
        }
        fds.extend(more);
        have += m;
    }
    if &buf[..4] != REQUEST_MAGIC {
        return Err(HandshakeError::UnknownFlavour(buf[..4].to_vec()));
    }
    let version = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        return Err(HandshakeError::UnsupportedVersion { got: version });
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
    if len > MAX_HANDSHAKE_BYTES - 12 {
        return Err(HandshakeError::Oversized);
    }
    while have < 12 + len {
        let (m, more) = src.recv_chunk(&mut buf[have..12 + len])?;
        if m == 0 {
            return Err(HandshakeError::Truncated(have));
        }
        fds.extend(more);
        have += m;
    }
    let request: AttachRequest = serde_json::from_slice(&buf[12..12 + len])?;
    let expected = if request.memory_file { 2 } else { 1 };
    if fds.len() != expected {
        return Err(HandshakeError::FdCount {
            got: fds.len(),
            expected: if request.memory_file {
                "2 (uffd, memory file)"
            } else {
                "1 (uffd)"
            },
        });
    }
    let memory_file = if request.memory_file { fds.pop() } else { None };
    let uffd = fds.pop().expect("uffd");
    Ok(Handshake::Pagewise {
        request,
        uffd,
        memory_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn region(addr: u64, size: usize, offset: u64) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: addr,
            size,
            offset,
            page_size: 4096,
            page_size_kib: 4096,
        }
    }

    #[test]
    fn firecracker_roundtrip() {
        let (a, b) = UnixStream::pair().unwrap();
        let dummy = std::fs::File::open("/dev/null").unwrap();
        let regions = vec![
            region(0x7000_0000, 1 << 20, 0),
            region(0x8000_0000, 1 << 20, 1 << 20),
        ];
        send_firecracker(&a, &regions, dummy.as_raw_fd()).unwrap();
        match recv_handshake(&b).unwrap() {
            Handshake::Firecracker { regions: got, .. } => assert_eq!(got, regions),
            other => panic!("wrong flavour {other:?}"),
        }
    }

    #[test]
    fn pagewise_roundtrip_and_reply() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/dev/zero").unwrap();
        let req = AttachRequest {
            vm: "vm1".into(),
            regions: vec![region(0x7000_0000, 1 << 20, 0)],
            memory_file: true,
            uffd_features: 0,
            modes: vec!["missing".into(), "wp".into()],
            reattach: false,
            served_by: None,
        };
        send_request(&a, &req, f1.as_raw_fd(), Some(f2.as_raw_fd())).unwrap();
        match recv_handshake(&b).unwrap() {
            Handshake::Pagewise {
                request,
                memory_file,
                ..
            } => {
                assert_eq!(request, req);
                assert!(memory_file.is_some());
            }
            other => panic!("wrong flavour {other:?}"),
        }
        let reply = AttachReply {
            ok: false,
            error: Some("no such vm".into()),
            swapdev: None,
            reattach: false,
            retry: true,
        };
        send_reply(&b, &reply).unwrap();
        assert_eq!(recv_reply(&a).unwrap(), reply);
    }

    #[test]
    fn bad_version_and_garbage_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut msg = frame(REQUEST_MAGIC, b"{}");
        msg[4] = 9;
        nix::sys::socket::send(a.as_raw_fd(), &msg, MsgFlags::empty()).unwrap();
        assert!(matches!(
            recv_handshake(&b),
            Err(HandshakeError::UnsupportedVersion { got: 9 })
        ));

        let (a, b) = UnixStream::pair().unwrap();
        nix::sys::socket::send(a.as_raw_fd(), b"GET / HTTP/1.0\r\n", MsgFlags::empty()).unwrap();
        assert!(matches!(
            recv_handshake(&b),
            Err(HandshakeError::UnknownFlavour(_))
        ));

        let (a, b) = UnixStream::pair().unwrap();
        nix::sys::socket::send(
            a.as_raw_fd(),
            b"[{\"base_host_virt_addr\": 1",
            MsgFlags::empty(),
        )
        .unwrap();
        drop(a);
        assert!(matches!(recv_handshake(&b), Err(HandshakeError::Json(_))));
    }

    #[test]
    fn reply_frames_pinned() {
        let refused = AttachReply {
            ok: false,
            error: Some("owned by dst".into()),
            swapdev: None,
            reattach: false,
            retry: true,
        };
        let body =
            br#"{"ok":false,"error":"owned by dst","swapdev":null,"reattach":false,"retry":true}"#;
        let mut want = b"PWHR\x01\x00\x00\x00".to_vec();
        want.extend_from_slice(&(body.len() as u32).to_le_bytes());
        want.extend_from_slice(body);
        assert_eq!(
            frame(REPLY_MAGIC, &serde_json::to_vec(&refused).unwrap()),
            want
        );
        // `retry` is left out when false: the bytes older pagers sent.
        let accepted = AttachReply {
            ok: true,
            error: None,
            swapdev: Some("swapdev /d".into()),
            reattach: true,
            retry: false,
        };
        assert_eq!(
            serde_json::to_string(&accepted).unwrap(),
            r#"{"ok":true,"error":null,"swapdev":"swapdev /d","reattach":true}"#
        );
        let old: AttachReply = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert!(!old.retry && !old.reattach);
    }

    #[test]
    fn region_validation() {
        assert!(validate_regions(&[region(0x1000, 8192, 0)]).is_ok());
        assert!(validate_regions(&[]).is_err());
        assert!(validate_regions(&[region(0x1001, 8192, 0)]).is_err());
        assert!(validate_regions(&[region(0x1000, 8192, 0), region(0x2000, 4096, 8192)]).is_err());
        let mut r = region(0x1000, 8192, 0);
        r.page_size = 512;
        r.page_size_kib = 0;
        assert!(validate_regions(&[r]).is_err());
    }

    #[test]
    fn regions_whose_arithmetic_overflows_are_refused_naming_the_region() {
        // offset + size past u64::MAX (the end would wrap to 0x1000).
        let top = u64::MAX - 0xfff;
        let err =
            validate_regions(&[region(0x1000, 4096, 0), region(0x10_0000, 8192, top)]).unwrap_err();
        assert!(
            matches!(err, HandshakeError::BadRegion { index: 1, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("region 1") && msg.contains("offset"), "{msg}");
        // Ending exactly at 2^64 does not fit either.
        assert!(validate_regions(&[region(0x1000, 4096, top)]).is_err());
        // host address + size past u64::MAX.
        let err = validate_regions(&[region(top, 8192, 0)]).unwrap_err();
        assert!(
            matches!(err, HandshakeError::BadRegion { index: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("address"), "{err}");
    }
}
