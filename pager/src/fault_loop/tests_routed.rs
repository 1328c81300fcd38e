//! Routed sources, orders and read failures, on real memory: an anonymous mapping registered
//! with a real uffd, the real fault loop, and scripted page sources (`tests_scripted.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use nix::sys::eventfd::{EfdFlags, EventFd};
use swapdev::AlignedBuf;
use uffd::{Features, RegisterMode, Uffd, UffdFlags};

use super::tests_scripted::{buf_of, page_bytes, Script, ScriptedSource};
use super::{FaultLoop, FaultLoopConfig, FaultLoopError, LoopController, LoopExit, PushedPage};
use crate::attach::protocol::GuestRegionUffdMapping;
use crate::page_state::PageState;
use crate::prefetch;
use crate::route::Route;
use crate::source::{PageContent, PageSource};
use crate::vm::{GuestLayout, PeerInfo, Vm};

pub(super) const PAGE: usize = 4096;

pub(super) struct Guest {
    pub(super) map: MmapMut,
    pub(super) vm: Arc<Vm>,
    stop: Arc<EventFd>,
    control: LoopController,
    thread: Option<std::thread::JoinHandle<Result<LoopExit, FaultLoopError>>>,
}

impl Guest {
    /// `pages` pages; `route_of` routes them; `sources` serve them.
    pub(super) fn start(
        pages: u64,
        route_of: impl Fn(u64) -> Route,
        sources: Vec<Box<dyn PageSource>>,
        policy: &str,
        states: &[(std::ops::Range<u64>, PageState)],
    ) -> Self {
        Self::start_with(pages, route_of, sources, policy, states, false)
    }

    /// [`start`](Self::start), with the memory registered for write-protect faults too
    /// when `wp` is set.
    pub(super) fn start_with(
        pages: u64,
        route_of: impl Fn(u64) -> Route,
        sources: Vec<Box<dyn PageSource>>,
        policy: &str,
        states: &[(std::ops::Range<u64>, PageState)],
        wp: bool,
    ) -> Self {
        Self::start_configured(
            pages,
            route_of,
            sources,
            policy,
            states,
            wp,
            FaultLoopConfig::default(),
        )
    }

    /// [`start_with`](Self::start_with) under `config`.
    pub(super) fn start_configured(
        pages: u64,
        route_of: impl Fn(u64) -> Route,
        sources: Vec<Box<dyn PageSource>>,
        policy: &str,
        states: &[(std::ops::Range<u64>, PageState)],
        wp: bool,
        config: FaultLoopConfig,
    ) -> Self {
        let uffd = Uffd::new(UffdFlags {
            nonblocking: true,
            ..Default::default()
        })
        .unwrap();
        let (features, mode) = if wp {
            (
                Features::EVENT_REMOVE | Features::WP_UNPOPULATED,
                RegisterMode::MISSING | RegisterMode::WP,
            )
        } else {
            (Features::EVENT_REMOVE, RegisterMode::MISSING)
        };
        uffd.api(features).unwrap();
        let map = MmapMut::map_anon(pages as usize * PAGE).unwrap();
        let addr = map.as_ptr() as u64;
        uffd.register(addr, pages * PAGE as u64, mode).unwrap();
        let layout = GuestLayout::from_mappings(&[GuestRegionUffdMapping {
            base_host_virt_addr: addr,
            size: pages as usize * PAGE,
            offset: 0,
            page_size: PAGE,
            page_size_kib: 0,
        }])
        .unwrap();
        let mut vm = Vm::new("r".into(), uffd, layout, None, PeerInfo::default());
        vm.wp_registered = wp;
        let vm = Arc::new(vm);
        for p in 0..pages {
            vm.routes.set_range(p..p + 1, route_of(p)).unwrap();
        }
        for (range, state) in states {
            vm.states.set_range(range.clone(), *state);
        }
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap());
        let fl = FaultLoop::with_sources(
            vm.clone(),
            sources,
            prefetch::by_name(policy, pages).unwrap(),
            config,
            stop.clone(),
            None,
        )
        .unwrap();
        let control = fl.controller();
        let thread = Some(std::thread::spawn(move || fl.run()));
        Self {
            map,
            vm,
            stop,
            control,
            thread,
        }
    }

    pub(super) fn page(&self, i: u64) -> &[u8] {
        &self.map[i as usize * PAGE..(i as usize + 1) * PAGE]
    }

    /// Touch page `i` from another thread; the receiver gets its first byte once served.
    pub(super) fn touch_async(&self, i: u64) -> std::sync::mpsc::Receiver<u8> {
        let addr = self.map.as_ptr() as usize + i as usize * PAGE;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: `addr` lies in the guest mapping, alive until the test ends (tests end
            // the loop and drop the mapping only after this thread was answered or the uffd
            // was closed, which releases it).
            let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
            let _ = tx.send(b);
        });
        rx
    }

    pub(super) fn stop(&mut self) -> Result<LoopExit, FaultLoopError> {
        self.stop.write(1).unwrap();
        self.thread.take().unwrap().join().unwrap()
    }

    pub(super) fn wait_exit(&mut self) -> Result<LoopExit, FaultLoopError> {
        self.thread.take().unwrap().join().unwrap()
    }
}

pub(super) fn eventually(what: &str, f: impl Fn() -> bool) {
    let since = Instant::now();
    while !f() {
        assert!(
            since.elapsed() < Duration::from_secs(5),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn each_route_is_answered_by_its_own_source() {
    let pages = 24;
    let route_of = |p: u64| match p {
        0..8 => Route::Local,
        8..16 => Route::Remote,
        _ => Route::Zero,
    };
    let local = ScriptedSource::new(1, Route::Local, pages);
    let remote = ScriptedSource::new(2, Route::Remote, pages);
    let (local_asked, remote_asked) = (local.asked.clone(), remote.asked.clone());
    let mut g = Guest::start(
        pages,
        route_of,
        vec![Box::new(local), Box::new(remote)],
        "none",
        &[],
    );
    for p in 0..pages {
        let want = match route_of(p) {
            Route::Local => page_bytes(1, p),
            Route::Remote => page_bytes(2, p),
            _ => vec![0; PAGE],
        };
        assert_eq!(g.page(p), &want[..], "page {p}");
    }
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
    assert_eq!(*local_asked.lock().unwrap(), (0..8).collect::<Vec<_>>());
    assert_eq!(*remote_asked.lock().unwrap(), (8..16).collect::<Vec<_>>());
    assert_eq!(g.vm.metrics.snapshot().pages_zeroed, 8);
}

#[test]
fn a_fault_without_a_source_waits_for_one_to_be_installed() {
    let pages = 8;
    let local = ScriptedSource::new(1, Route::Local, pages);
    let mut g = Guest::start(
        pages,
        |p| if p < 4 { Route::Local } else { Route::Remote },
        vec![Box::new(local)],
        "none",
        &[],
    );
    let answer = g.touch_async(5);
    assert!(
        answer.recv_timeout(Duration::from_millis(300)).is_err(),
        "served without a source"
    );
    let report = g.control.report().unwrap();
    assert_eq!(report.parked_faults, 1, "{report:?}");
    g.control
        .install_source(
            Route::Remote,
            Box::new(ScriptedSource::new(2, Route::Remote, pages)),
        )
        .unwrap();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(2, 5)[0]
    );
    assert_eq!(g.page(1), &page_bytes(1, 1)[..]);
    g.stop().unwrap();
    assert_eq!(g.vm.metrics.snapshot().faults_parked, 1);
}

#[test]
fn a_gone_host_parks_its_pages_and_a_new_source_resumes_them() {
    let pages = 8;
    let gone = ScriptedSource::new(2, Route::Remote, pages).with(6, Script::HostGone);
    let local = ScriptedSource::new(1, Route::Local, pages);
    let mut g = Guest::start(
        pages,
        |p| if p < 4 { Route::Local } else { Route::Remote },
        vec![Box::new(local), Box::new(gone)],
        "none",
        &[],
    );
    let answer = g.touch_async(6);
    eventually("the remote source marked gone", || {
        g.control
            .report()
            .unwrap()
            .sources
            .iter()
            .any(|s| s.route == Route::Remote && s.gone)
    });
    // The rest of the VM is still served.
    assert_eq!(g.page(2), &page_bytes(1, 2)[..]);
    assert!(answer.try_recv().is_err());
    assert_eq!(
        g.vm.states.get(6),
        PageState::Missing,
        "a parked page is not claimed"
    );
    g.control
        .install_source(
            Route::Remote,
            Box::new(ScriptedSource::new(3, Route::Remote, pages)),
        )
        .unwrap();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(3, 6)[0]
    );
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
}

#[test]
fn a_page_promised_by_a_replaced_source_is_asked_of_the_new_one() {
    // The source answers "it comes on the bulk channel"; its connection breaks before it
    // does: the new source is asked for the page and the waiting fault is served.
    let pages = 8;
    let promised = ScriptedSource::new(2, Route::Remote, pages).with(5, Script::Elsewhere);
    let mut g = Guest::start(
        pages,
        |_| Route::Remote,
        vec![Box::new(promised)],
        "none",
        &[],
    );
    let answer = g.touch_async(5);
    eventually("the page waits for its promised copy", || {
        g.vm.states.get(5) == PageState::InFlight && g.control.report().unwrap().in_flight == 0
    });
    assert!(answer.try_recv().is_err());
    let next = ScriptedSource::new(3, Route::Remote, pages);
    let asked = next.asked.clone();
    g.control
        .install_source(Route::Remote, Box::new(next))
        .unwrap();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(3, 5)[0]
    );
    assert_eq!(*asked.lock().unwrap(), vec![5]);
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
}

#[test]
fn a_promised_page_that_arrives_is_not_asked_again() {
    let pages = 8;
    let promised = ScriptedSource::new(2, Route::Remote, pages).with(5, Script::Elsewhere);
    let mut g = Guest::start(
        pages,
        |_| Route::Remote,
        vec![Box::new(promised)],
        "none",
        &[],
    );
    let answer = g.touch_async(5);
    eventually("the page waits for its promised copy", || {
        g.vm.states.get(5) == PageState::InFlight && g.control.report().unwrap().in_flight == 0
    });
    g.control
        .place(vec![PushedPage {
            page: 5,
            content: PageContent::Data(buf_of(&page_bytes(7, 5))),
        }])
        .unwrap();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(7, 5)[0]
    );
    let next = ScriptedSource::new(3, Route::Remote, pages);
    let asked = next.asked.clone();
    g.control
        .install_source(Route::Remote, Box::new(next))
        .unwrap();
    assert!(
        asked.lock().unwrap().is_empty(),
        "a page that arrived was asked again"
    );
    assert_eq!(g.page(5), &page_bytes(7, 5)[..]);
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
}

#[test]
fn paused_faults_wait_and_are_served_on_resume() {
    let pages = 8;
    let mut g = Guest::start(
        pages,
        |_| Route::Local,
        vec![Box::new(ScriptedSource::new(1, Route::Local, pages))],
        "none",
        &[],
    );
    g.control.pause().unwrap();
    let answer = g.touch_async(3);
    assert!(
        answer.recv_timeout(Duration::from_millis(300)).is_err(),
        "served while paused"
    );
    let report = g.control.report().unwrap();
    assert!(report.paused);
    assert_eq!(report.deferred_faults, 1, "{report:?}");
    g.control.resume().unwrap();
    assert_eq!(
        answer.recv_timeout(Duration::from_secs(5)).unwrap(),
        page_bytes(1, 3)[0]
    );
    g.stop().unwrap();
}

#[test]
fn pushed_pages_are_placed_once_and_never_overwrite_what_the_guest_has() {
    let pages = 16;
    let local = ScriptedSource::new(1, Route::Remote, pages);
    let asked = local.asked.clone();
    let mut g = Guest::start(pages, |_| Route::Remote, vec![Box::new(local)], "none", &[]);
    // The guest already has page 0 (from its source) and writes to it.
    assert_eq!(g.page(0), &page_bytes(1, 0)[..]);
    g.map[0] = 0x55;
    let pushed = |p: u64| PushedPage {
        page: p,
        content: PageContent::Data(buf_of(&page_bytes(9, p))),
    };
    let report = g
        .control
        .place(vec![
            pushed(0),
            pushed(4),
            pushed(5),
            PushedPage {
                page: 6,
                content: PageContent::Zero,
            },
            pushed(pages),
            pushed(u64::MAX),
            PushedPage {
                page: 7,
                content: PageContent::Data(AlignedBuf::new(100)),
            },
        ])
        .unwrap();
    assert_eq!(report.placed, 3, "{report:?}");
    assert_eq!(report.already_present, 1, "{report:?}");
    assert_eq!(report.rejected, 3, "{report:?}");
    assert_eq!(g.map[0], 0x55, "a push overwrote the guest's own write");
    assert_eq!(g.page(4), &page_bytes(9, 4)[..]);
    assert_eq!(g.page(5), &page_bytes(9, 5)[..]);
    assert!(g.page(6).iter().all(|&b| b == 0));
    assert_eq!(
        g.page(7),
        &page_bytes(1, 7)[..],
        "a short pushed buffer was refused"
    );
    g.stop().unwrap();
    assert_eq!(
        *asked.lock().unwrap(),
        vec![0, 7],
        "pushed pages were fetched again"
    );
    assert_eq!(g.vm.metrics.snapshot().pages_pushed, 3);
}

#[test]
fn failed_prefetches_keep_evicted_pages_evicted() {
    let pages = 32;
    let source = ScriptedSource::new(1, Route::Swapdev, pages)
        .with(11, Script::IoErrors(100))
        .with(12, Script::Damaged);
    let mut g = Guest::start(
        pages,
        |_| Route::Swapdev,
        vec![Box::new(source)],
        "bubble",
        &[(8..16, PageState::Evicted)],
    );
    // A demand fault on page 10; bubbling prefetches its neighbours 11 and 12, which fail.
    assert_eq!(g.page(10), &page_bytes(1, 10)[..]);
    eventually("the failed prefetches settled", || {
        g.vm.states.get(11) != PageState::InFlight && g.vm.states.get(12) != PageState::InFlight
    });
    assert_eq!(g.vm.states.get(11), PageState::Evicted);
    assert_eq!(g.vm.states.get(12), PageState::Evicted);
    g.stop().unwrap();
    let m = g.vm.metrics.snapshot();
    assert_eq!(m.pages_damaged, 1, "{m:?}");
    // Page 11: the first read and its retries (3 attempts in all); page 12: one read only.
    assert_eq!(m.read_errors, 4, "{m:?}");
}

#[test]
fn an_io_error_is_retried_and_the_page_served() {
    let pages = 8;
    let source = ScriptedSource::new(1, Route::Local, pages).with(2, Script::IoErrors(2));
    let mut g = Guest::start(pages, |_| Route::Local, vec![Box::new(source)], "none", &[]);
    assert_eq!(g.page(2), &page_bytes(1, 2)[..]);
    g.stop().unwrap();
    assert_eq!(g.vm.metrics.snapshot().read_errors, 2);
}

#[test]
fn answers_nobody_asked_for_are_dropped() {
    let pages = 8;
    let source = ScriptedSource::new(1, Route::Local, pages).with(1, Script::AlsoUnrequested);
    let mut g = Guest::start(pages, |_| Route::Local, vec![Box::new(source)], "none", &[]);
    assert_eq!(g.page(1), &page_bytes(1, 1)[..]);
    g.stop().unwrap();
    assert_eq!(g.vm.metrics.snapshot().unrequested_pages, 1);
}

#[test]
fn an_evicted_page_comes_from_the_swap_device_whatever_its_route_says() {
    // A migration destination: pages routed zero, remote and to the handed-over device
    // (local) were placed, then evicted to the VM's own swap device.
    let pages = 12;
    let route_of = |p: u64| match p {
        0..4 => Route::Zero,
        4..8 => Route::Remote,
        _ => Route::Local,
    };
    let own = ScriptedSource::new(7, Route::Swapdev, pages);
    let remote = ScriptedSource::new(2, Route::Remote, pages);
    let (own_asked, remote_asked) = (own.asked.clone(), remote.asked.clone());
    let mut g = Guest::start(
        pages,
        route_of,
        vec![Box::new(own), Box::new(remote)],
        "none",
        &[(0..pages, PageState::Evicted)],
    );
    for p in 0..pages {
        assert_eq!(g.page(p), &page_bytes(7, p)[..], "page {p}");
    }
    g.stop().unwrap();
    assert_eq!(*own_asked.lock().unwrap(), (0..pages).collect::<Vec<_>>());
    assert!(remote_asked.lock().unwrap().is_empty());
}

#[test]
fn without_a_swap_device_source_an_evicted_page_keeps_its_route() {
    // One store on the local route (a lab guest): the evictor's pages come back from it.
    let pages = 8;
    let local = ScriptedSource::new(3, Route::Local, pages);
    let mut g = Guest::start(
        pages,
        |_| Route::Local,
        vec![Box::new(local)],
        "none",
        &[(0..pages, PageState::Evicted)],
    );
    for p in 0..pages {
        assert_eq!(g.page(p), &page_bytes(3, p)[..], "page {p}");
    }
    g.stop().unwrap();
}

#[test]
fn idle_push_pulls_nothing_while_a_migration_source_is_installed() {
    let pages = 256;
    // Local only: one fault, then the idle push brings in every page.
    let local = ScriptedSource::new(1, Route::Local, pages);
    let asked = local.asked.clone();
    let mut g = Guest::start(
        pages,
        |_| Route::Local,
        vec![Box::new(local)],
        "adaptive",
        &[],
    );
    assert_eq!(g.page(0), &page_bytes(1, 0)[..]);
    eventually("every page pushed", || {
        asked.lock().unwrap().len() == pages as usize
    });
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
    // Half the pages remote: the peer pushes those; only the fault and its prefetch run.
    let route_of = |p: u64| if p < 128 { Route::Local } else { Route::Remote };
    let local = ScriptedSource::new(1, Route::Local, pages);
    let remote = ScriptedSource::new(2, Route::Remote, pages);
    let (local_asked, remote_asked) = (local.asked.clone(), remote.asked.clone());
    let sources: Vec<Box<dyn PageSource>> = vec![Box::new(local), Box::new(remote)];
    let mut g = Guest::start(pages, route_of, sources, "adaptive", &[]);
    assert_eq!(g.page(0), &page_bytes(1, 0)[..]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(g.stop().unwrap(), LoopExit::Stopped);
    assert!(remote_asked.lock().unwrap().is_empty());
    let fetched = local_asked.lock().unwrap().len();
    let budget = FaultLoopConfig::default().prefetch_per_fault;
    assert!(fetched <= 1 + budget, "{fetched} local pages fetched");
}
