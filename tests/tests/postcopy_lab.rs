//! Post-copy between two hosts of the two-host lab, pagewise moving the RAM: the destination
//! guest's memory (anonymous, registered with a real userfaultfd, served by the real fault
//! loop) starts empty and routes every page to the source host; a guest thread on the
//! destination keeps touching pages while the source pushes the rest over the tc-shaped link
//! in bubbling order around the faults. Both channels are authenticated. At the end every
//! page is checked against the source's memory file.

mod twohost;

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::migrate::auth::{open_client, open_server, Psk};
use agent::migrate::bulk::{push_pages, receive_pages, PushOrder, SentPages, SourcePage};
use agent::migrate::link::Link;
use agent::migrate::message::Channel;
use agent::migrate::page_server::serve_page_requests;
use agent::migrate::remote::RemoteSource;
use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::fault_loop::{FaultLoop, FaultLoopConfig};
use pager::route::Route;
use twohost::TwoHost;

const PAGE: usize = 4096;
const PAGES: u64 = 16384; // 64 MiB

fn page_bytes(i: u64) -> Vec<u8> {
    if i % 3 == 2 {
        return vec![0; PAGE];
    }
    (0..PAGE)
        .map(|j| (i as usize * 7 + j * 3) as u8 | 1)
        .collect()
}

fn key() -> Psk {
    Psk::new(b"postcopy-lab-test-key-0123".to_vec())
}

#[test]
fn postcopy_moves_every_page_with_demand_faults_and_active_push() {
    let lab = TwoHost::up("pwpc", "240mbit");
    let memory = tempfile::tempfile().unwrap();
    for i in 0..PAGES {
        memory
            .write_all_at(&page_bytes(i), i * PAGE as u64)
            .unwrap();
    }
    let memory = Arc::new(memory);

    // The destination: listens on the migration link, one urgent and one bulk connection.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let destination = lab.on("dst", move || {
        let listener = TcpListener::bind("10.77.0.2:7400").unwrap();
        ready_tx.send(()).unwrap();
        let mut urgent = listener.accept().unwrap().0;
        let u = open_server(&mut urgent, &key()).unwrap();
        let mut bulk = listener.accept().unwrap().0;
        let b = open_server(&mut bulk, &key()).unwrap();
        assert_eq!((u.channel, b.channel), (Channel::Urgent, Channel::Bulk));
        assert_eq!(u.session, b.session);

        let guest = pagewise_tools::lab_vm::AnonVm::new("pc", PAGES, PAGE).unwrap();
        let (map, vm) = (guest.map, Arc::new(guest.vm));
        let base = map.as_ptr() as u64;
        vm.routes.set_range(0..PAGES, Route::Remote).unwrap();
        let remote = RemoteSource::new(Link::plain(urgent), PAGE, PAGES, u.version).unwrap();
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
        let fl = FaultLoop::with_sources(
            vm.clone(),
            vec![Box::new(remote)],
            pager::prefetch::by_name("none", PAGES).unwrap(),
            FaultLoopConfig::default(),
            stop.clone(),
            None,
        )
        .unwrap();
        let control = fl.controller();
        let serving = std::thread::spawn(move || fl.run());
        let started = Instant::now();
        // The guest: touches pages far apart while the push runs.
        let guest = {
            let addr = base as usize;
            std::thread::spawn(move || {
                let mut sum = 0u64;
                for k in 0..400u64 {
                    let p = (k * 7919) % PAGES;
                    // SAFETY: inside the mapping, which outlives this thread (joined below).
                    sum += unsafe {
                        std::ptr::read_volatile((addr + p as usize * PAGE + 5) as *const u8)
                    } as u64;
                }
                sum
            })
        };
        let received = receive_pages(&mut bulk, &control, PAGE, PAGES, b.version).unwrap();
        let push_done = started.elapsed();
        guest.join().unwrap();
        let bad: Vec<u64> = (0..PAGES)
            .filter(|&i| map[i as usize * PAGE..(i as usize + 1) * PAGE] != page_bytes(i)[..])
            .collect();
        let m = vm.metrics.snapshot();
        stop.write(1).unwrap();
        serving.join().unwrap().unwrap();
        (bad, received, m, push_done)
    });

    // The source: connects both channels, answers demand requests, pushes the rest.
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let source = lab.on("src", move || {
        let session = [0x5a; 16];
        let mut urgent = TcpStream::connect("10.77.0.2:7400").unwrap();
        let u = open_client(&mut urgent, &key(), Channel::Urgent, session).unwrap();
        let mut bulk = TcpStream::connect("10.77.0.2:7400").unwrap();
        open_client(&mut bulk, &key(), Channel::Bulk, session).unwrap();
        let (faults_tx, faults_rx) = crossbeam_channel::unbounded();
        let mem = memory.clone();
        let sent = Arc::new(SentPages::new(PAGES));
        let answering = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                serve_page_requests(
                    Link::plain(urgent),
                    &*mem,
                    PAGE,
                    PAGES,
                    u.version,
                    Some(&sent),
                    |p| {
                        let _ = faults_tx.send(p);
                    },
                )
            })
        };
        let mut order = PushOrder::new(sent, |_| false);
        let cancel = AtomicBool::new(false);
        let pushed = push_pages(
            &mut bulk,
            &mut order,
            PAGE,
            &faults_rx,
            &cancel,
            |p, buf| {
                memory.read_exact_at(buf, p * PAGE as u64)?;
                Ok(if swapdev::is_zero_page(buf) {
                    SourcePage::Zero
                } else {
                    SourcePage::Data
                })
            },
        )
        .unwrap();
        // Keep answering until the destination has what it asked for and closes.
        (pushed, answering)
    });
    let (pushed, answering) = source.join().unwrap();
    let (bad, received, m, push_done) = destination.join().unwrap();
    let served = answering.join().unwrap().unwrap();
    assert!(
        bad.is_empty(),
        "{} pages differ, first {:?}",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    // Every page arrived exactly once: pushed, or answered on demand.
    assert_eq!(
        pushed.0 + pushed.1 + served.pages + served.zero_pages,
        PAGES,
        "{pushed:?} {served:?}"
    );
    assert!(
        served.pages + served.zero_pages > 0,
        "no demand fault went to the source"
    );
    assert_eq!(
        received.placed + received.already_present,
        pushed.0 + pushed.1
    );
    eprintln!(
        "postcopy over 30 MB/s: push done in {push_done:?}; pushed {} data + {} zero, demand {} + {} zero, {} already in bulk, faults to source {}, fault p50 {:?} us p99 {:?} us",
        pushed.0, pushed.1, served.pages, served.zero_pages, served.in_bulk, m.faults_to_source,
        m.fault_latency.quantile_us(0.5), m.fault_latency.quantile_us(0.99)
    );
}
