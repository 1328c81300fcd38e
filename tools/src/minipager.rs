//! A minimal in-process fault handler: accepts one attach (either handshake) and answers
//! every fault with one UFFDIO_COPY, from a raw image file or from one static page.
//!
//! It is the *null handler* of `pagewise bench pager` (the floor a real pager's fault
//! latency is compared with) and lets memhog and the KVM guest be tested on their own.
//! It is not the pager: no swap device, no prefetch, no page states beyond "removed".

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pager::attach::protocol::{self, AttachReply, GuestRegionUffdMapping, Handshake};
use pager::layout::GuestLayout;
use uffd::{CopyError, Event, PlaceMode, Uffd};

use crate::image::PAGE_SIZE;

/// Where page content comes from.
#[derive(Debug)]
pub enum MiniSource {
    /// Every fault gets this page.
    Static(Box<[u8; PAGE_SIZE]>),
    /// Page at memory-file offset `o` is bytes `o..o+4096` of this file.
    Image(std::fs::File),
}

/// Counters, readable while the handler runs.
#[derive(Debug, Default)]
pub struct MiniStats {
    pub faults: AtomicU64,
    pub zero_fills: AtomicU64,
    pub removes: AtomicU64,
}

/// How the single session ended.
#[derive(Debug)]
pub struct MiniOutcome {
    pub handshake: &'static str,
    pub regions: Vec<GuestRegionUffdMapping>,
}

/// Accept one VMM on `listener` and serve it until it hangs up or `stop` is set.
pub fn serve_one(
    listener: &UnixListener,
    source: &MiniSource,
    stats: &MiniStats,
    stop: &AtomicBool,
) -> anyhow::Result<MiniOutcome> {
    listener.set_nonblocking(true)?;
    let sock = loop {
        match listener.accept() {
            Ok((sock, _)) => break sock,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    bail!("stopped before any VMM attached");
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting the VMM"),
        }
    };
    sock.set_nonblocking(false)?;
    let (uffd, regions, handshake) = match protocol::recv_handshake(&sock)? {
        Handshake::Firecracker { regions, uffd } => (uffd, regions, "firecracker"),
        Handshake::Pagewise { request, uffd, .. } => {
            protocol::send_reply(
                &sock,
                &AttachReply {
                    ok: true,
                    error: None,
                    swapdev: Some("minipager".into()),
                    reattach: false,
                    retry: false,
                },
            )?;
            (uffd, request.regions, "pagewise")
        }
    };
    let layout = GuestLayout::from_mappings(&regions)?;
    let uffd = Uffd::from(uffd);
    let mut removed: HashSet<u64> = HashSet::new();
    let mut buf = vec![0u8; PAGE_SIZE];
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            PollFd::new(uffd.as_fd(), PollFlags::POLLIN),
            PollFd::new(sock.as_fd(), PollFlags::POLLIN),
        ];
        let n = match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll"),
        };
        if n == 0 {
            continue;
        }
        let hup = fds[1].revents().is_some_and(|r| !r.is_empty());
        events.clear();
        uffd.read_events(&mut events, 64)?;
        for ev in events.drain(..) {
            match ev {
                Event::PageFault { addr, .. } => {
                    let page_addr = addr & !(PAGE_SIZE as u64 - 1);
                    let offset = layout
                        .page_of_addr(page_addr)
                        .and_then(|p| layout.file_offset(p));
                    let Some(offset) = offset else {
                        bail!("fault at {addr:#x} outside every region");
                    };
                    stats.faults.fetch_add(1, Ordering::Relaxed);
                    let result = if removed.contains(&page_addr) {
                        stats.zero_fills.fetch_add(1, Ordering::Relaxed);
                        uffd.zeropage(page_addr, PAGE_SIZE as u64, false)
                    } else {
                        let page: &[u8] = match source {
                            MiniSource::Static(p) => &p[..],
                            MiniSource::Image(f) => {
                                f.read_exact_at(&mut buf, offset)
                                    .with_context(|| format!("reading image at {offset}"))?;
                                &buf
                            }
                        };
                        uffd.copy_from(page_addr, page, PlaceMode::default())
                    };
                    match result {
                        Ok(_) | Err(CopyError::Exists { .. }) => {}
                        // A REMOVE is pending: it is read next round; the thread re-faults.
                        Err(CopyError::Again { .. }) => {}
                        Err(CopyError::ProcessGone | CopyError::Unmapped { .. }) => {
                            return Ok(MiniOutcome { handshake, regions })
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Event::Remove { start, end } => {
                    stats.removes.fetch_add(1, Ordering::Relaxed);
                    let mut a = start;
                    while a < end {
                        removed.insert(a);
                        a += PAGE_SIZE as u64;
                    }
                }
                _ => {}
            }
        }
        if hup {
            break;
        }
    }
    Ok(MiniOutcome { handshake, regions })
}

/// A minipager on its own thread, listening on a socket path.
pub struct MiniPager {
    pub stats: Arc<MiniStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<MiniOutcome>>>,
}

impl MiniPager {
    /// Listen on `socket` (created now, so clients may connect as soon as this returns).
    pub fn spawn(socket: &std::path::Path, source: MiniSource) -> anyhow::Result<Self> {
        let listener =
            UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        let stats = Arc::new(MiniStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("minipager".into())
            .spawn(move || serve_one(&listener, &source, &st, &sp))?;
        Ok(Self {
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// Wait for the session to end (the VMM hung up).
    pub fn join(mut self) -> anyhow::Result<MiniOutcome> {
        self.thread
            .take()
            .expect("joined once")
            .join()
            .map_err(|_| anyhow::anyhow!("minipager thread panicked"))?
    }
}

impl Drop for MiniPager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
