//! A minimal in-test pager: accepts pagewise handshakes (parsed with the pager's own
//! `recv_handshake`, so the library's hand-written request is checked against the real
//! parser), replies, and serves every MISSING fault with a zero page. It stands in for the
//! daemon only where a test is about the preload library itself.

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use pager::attach::protocol::{self, AttachReply, AttachRequest, Handshake};
use uffd::{CopyError, Event, Uffd};

#[derive(Default)]
pub struct Counters {
    pub faults: AtomicU64,
    pub zero_pages: AtomicU64,
    pub wp_faults: AtomicU64,
    pub removes: AtomicU64,
    pub probes: AtomicU64,
    /// Anything the pager saw that a correct library would not cause.
    pub errors: Mutex<Vec<String>>,
}

pub struct ZeroPager {
    pub socket: PathBuf,
    pub counters: Arc<Counters>,
    pub requests: Arc<Mutex<Vec<AttachRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ZeroPager {
    /// Listen on `socket`; `refuse` makes it answer every attach with that error.
    pub fn start(socket: &Path, refuse: Option<String>) -> Self {
        Self::start_with(socket, refuse, None)
    }

    /// Like [`ZeroPager::start`], but after `faults` faults it drops every VM (closes the
    /// uffds and connections), as a crashed pager would.
    pub fn start_dropping_after(socket: &Path, faults: u64) -> Self {
        Self::start_with(socket, None, Some(faults))
    }

    fn start_with(socket: &Path, refuse: Option<String>, drop_after: Option<u64>) -> Self {
        let listener = UnixListener::bind(socket).expect("bind zero pager socket");
        listener.set_nonblocking(true).unwrap();
        let counters = Arc::new(Counters::default());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (counters, requests, stop) = (counters.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                serve(listener, refuse, drop_after, &counters, &requests, &stop)
            })
        };
        ZeroPager {
            socket: socket.to_path_buf(),
            counters,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for ZeroPager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn serve(
    listener: UnixListener,
    refuse: Option<String>,
    drop_after: Option<u64>,
    counters: &Counters,
    requests: &Mutex<Vec<AttachRequest>>,
    stop: &AtomicBool,
) {
    let mut uffds: Vec<Uffd> = Vec::new();
    let mut streams = Vec::new();
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok((stream, _)) = listener.accept() {
            stream.set_nonblocking(false).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            match protocol::recv_handshake(&stream) {
                Ok(Handshake::Pagewise {
                    request,
                    uffd,
                    memory_file,
                }) => {
                    if memory_file.is_none() {
                        fail(counters, "the library sent no memory file fd".into());
                    }
                    if let Err(e) = protocol::validate_regions(&request.regions) {
                        fail(
                            counters,
                            format!("invalid regions {:?}: {e}", request.regions),
                        );
                    }
                    requests.lock().unwrap().push(request);
                    let reply = AttachReply {
                        ok: refuse.is_none(),
                        error: refuse.clone(),
                        swapdev: refuse.is_none().then(|| "zero-pages (test)".to_string()),
                        reattach: false,
                        retry: false,
                    };
                    if let Err(e) = protocol::send_reply(&stream, &reply) {
                        fail(counters, format!("send reply: {e}"));
                    }
                    uffds.push(Uffd::from(uffd));
                    streams.push(stream);
                }
                Ok(other) => fail(counters, format!("unexpected handshake {other:?}")),
                // The library's load-time probe connects and closes without a word.
                Err(protocol::HandshakeError::Truncated(0)) => {
                    counters.probes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => fail(
                    counters,
                    format!("bad handshake from the preload library: {e}"),
                ),
            }
        }
        if drop_after.is_some_and(|n| counters.faults.load(Ordering::Relaxed) >= n) {
            uffds.clear();
            streams.clear();
        }
        if uffds.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let mut fds: Vec<PollFd> = uffds
            .iter()
            .map(|u| PollFd::new(u.as_fd(), PollFlags::POLLIN))
            .collect();
        let _ = poll(&mut fds, PollTimeout::from(50u16));
        for u in &uffds {
            events.clear();
            while u.read_events(&mut events, 64).unwrap_or(0) > 0 {}
            for ev in events.drain(..) {
                handle(u, ev, counters);
            }
        }
    }
}

fn fail(counters: &Counters, message: String) {
    counters.errors.lock().unwrap().push(message);
}

fn handle(u: &Uffd, ev: Event, counters: &Counters) {
    match ev {
        Event::PageFault { addr, wp, .. } => {
            counters.faults.fetch_add(1, Ordering::Relaxed);
            let page = addr & !4095;
            if wp {
                counters.wp_faults.fetch_add(1, Ordering::Relaxed);
                let _ = u.write_protect(page, 4096, false, false);
                return;
            }
            match u.zeropage(page, 4096, false) {
                Ok(_) => {
                    counters.zero_pages.fetch_add(1, Ordering::Relaxed);
                }
                // Raced with another fault on the same page, or a pending REMOVE: the
                // faulting thread retries and faults again if still needed.
                Err(CopyError::Exists { .. }) | Err(CopyError::Again { .. }) => {
                    let _ = u.wake(page, 4096);
                }
                Err(e) => fail(counters, format!("zeropage at {page:#x}: {e}")),
            }
        }
        Event::Remove { .. } => {
            counters.removes.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}
