//! Post-copy's demand path end to end on real parts: a destination guest mapping registered
//! with a real userfaultfd, the real fault loop routing every page to a `RemoteSource`, an
//! authenticated TCP urgent channel on loopback, and the source side answering from a real
//! memory file. Then the link breaks: the remote pages park, the rest of the VM is served,
//! and a new connection installed through the loop's controller resumes them.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use agent::migrate::auth::{open_client, open_server, Psk};
use agent::migrate::link::Link;
use agent::migrate::message::Channel;
use agent::migrate::page_server::serve_page_requests;
use agent::migrate::remote::RemoteSource;
use memmap2::MmapMut;
use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::fault_loop::{FaultLoop, FaultLoopConfig, LoopController};
use pager::route::Route;
use pager::vm::Vm;

const PAGE: usize = 4096;

fn page_bytes(i: u64) -> Vec<u8> {
    if i % 5 == 4 {
        return vec![0; PAGE];
    }
    (0..PAGE)
        .map(|j| (i as usize * 13 + j) as u8 | 0x80)
        .collect()
}

fn key() -> Psk {
    Psk::new(b"remote-pages-test-key".to_vec())
}

/// The source host: a memory file with `pages` pages; serves one urgent connection per
/// accept on `listener` until it closes. Returns the server-side stream of each connection
/// (so a test can cut it).
fn source_host(listener: TcpListener, pages: u64) -> std::sync::mpsc::Receiver<TcpStream> {
    let memory = tempfile::tempfile().unwrap();
    for i in 0..pages {
        memory
            .write_all_at(&page_bytes(i), i * PAGE as u64)
            .unwrap();
    }
    let memory = Arc::new(memory);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let opened = open_server(&mut stream, &key()).unwrap();
            assert_eq!(opened.channel, Channel::Urgent);
            let _ = tx.send(stream.try_clone().unwrap());
            let memory = memory.clone();
            std::thread::spawn(move || {
                let _ = serve_page_requests(
                    Link::plain(stream),
                    &*memory,
                    PAGE,
                    pages,
                    opened.version,
                    None,
                    |_| {},
                );
            });
        }
    });
    rx
}

fn connect_remote(addr: std::net::SocketAddr, pages: u64) -> RemoteSource {
    let mut s = TcpStream::connect(addr).unwrap();
    let opened = open_client(&mut s, &key(), Channel::Urgent, [7; 16]).unwrap();
    RemoteSource::new(Link::plain(s), PAGE, pages, opened.version).unwrap()
}

struct Destination {
    map: MmapMut,
    vm: Arc<Vm>,
    stop: Arc<EventFd>,
    control: LoopController,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn destination(pages: u64, remote: RemoteSource) -> Destination {
    let guest = pagewise_tools::lab_vm::AnonVm::new("dst", pages, PAGE).unwrap();
    let (map, vm) = (guest.map, Arc::new(guest.vm));
    vm.routes.set_range(0..pages, Route::Remote).unwrap();
    let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
    let fl = FaultLoop::with_sources(
        vm.clone(),
        vec![Box::new(remote)],
        pager::prefetch::by_name("none", pages).unwrap(),
        FaultLoopConfig::default(),
        stop.clone(),
        None,
    )
    .unwrap();
    let control = fl.controller();
    let thread = Some(std::thread::spawn(move || {
        fl.run().unwrap();
    }));
    Destination {
        map,
        vm,
        stop,
        control,
        thread,
    }
}

impl Destination {
    /// Stop the loop (its counters are final then) and return them.
    fn finish(mut self) -> pager::metrics::MetricsSnapshot {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.vm.metrics.snapshot()
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn every_page_is_fetched_from_the_source_host_on_demand() {
    let pages = 200;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _conns = source_host(listener, pages);
    let d = destination(pages, connect_remote(addr, pages));
    for i in (0..pages).rev() {
        let got = &d.map[i as usize * PAGE..(i as usize + 1) * PAGE];
        assert!(got == &page_bytes(i)[..], "page {i} differs");
    }
    let m = d.finish();
    assert_eq!(m.faults_to_source, pages);
    assert_eq!(m.pages_zeroed, pages / 5);
    assert_eq!(m.pages_copied, pages - pages / 5);
}

#[test]
fn a_broken_link_parks_remote_pages_until_a_new_connection_is_installed() {
    let pages = 64;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = source_host(listener, pages);
    let d = destination(pages, connect_remote(addr, pages));
    assert_eq!(d.map[3 * PAGE + 1], page_bytes(3)[1]);
    // Cut the link from the source's side.
    let first = conns.recv_timeout(Duration::from_secs(5)).unwrap();
    first.shutdown(std::net::Shutdown::Both).unwrap();
    let addr_of = |i: usize| d.map.as_ptr() as usize + i * PAGE;
    let (tx, answered) = std::sync::mpsc::channel();
    let at = addr_of(9);
    std::thread::spawn(move || {
        // SAFETY: inside the destination mapping, which outlives this thread's answer (the
        // test waits for it before the mapping is dropped).
        let b = unsafe { std::ptr::read_volatile((at + 1) as *const u8) };
        let _ = tx.send(b);
    });
    let since = std::time::Instant::now();
    loop {
        let r = d.control.report().unwrap();
        if r.sources.iter().any(|s| s.route == Route::Remote && s.gone) && r.parked_faults == 1 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "never parked: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(answered.try_recv().is_err(), "served over a cut link");
    d.control
        .install_source(Route::Remote, Box::new(connect_remote(addr, pages)))
        .unwrap();
    assert_eq!(
        answered.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(9)[1]
    );
    assert_eq!(d.map[20 * PAGE + 7], page_bytes(20)[7]);
}
