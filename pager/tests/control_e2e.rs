//! End to end, in one process, through the real control socket: several requests per
//! connection, malformed lines, `prepare` (layout check, seeds and routes applied at
//! attach), `seed`, `census`; and a fault loop that panics tearing down only its VM.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use pager::attach::protocol::{recv_reply, send_request, AttachRequest};
use pager::attach::server::Naming;
use pager::page_state::PageState;
use pager::route::Route;
use pager::server::protocol::{
    LayoutSpec, PrepareSpec, RangeWindow, RegionSpec, Request, Response, RouteRange, StateRange,
    VmStatus,
};
use pager::server::{
    control, ControlClient, ControlError, Daemon, DaemonConfig, OpenedSource, ProviderError,
    SourceProvider, SwapdevProvider,
};
use pager::source::{PageCompletion, PageSource, SourceError};
use pager::uffd::Features;
use pager::vm::GuestLayout;

mod support;
use support::{create_swapdev, page_content, wait_until, Guest, PAGE, PAGES};

/// A source whose first read panics (a bug in a page source, or in the loop).
struct PanickingSource {
    fd: EventFd,
}

impl PageSource for PanickingSource {
    fn page_size(&self) -> usize {
        PAGE
    }
    fn capacity_pages(&self) -> u64 {
        PAGES as u64
    }
    fn submit(&mut self, page: u64, _tag: u64) -> Result<(), SourceError> {
        panic!("injected panic reading page {page}");
    }
    fn poll(&mut self, _: &mut Vec<PageCompletion>, _: usize) -> Result<usize, SourceError> {
        Ok(0)
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn describe(&self) -> String {
        "panicking test source".into()
    }
    fn route(&self) -> pager::route::Route {
        pager::route::Route::Swapdev
    }
}

/// Swap devices from a directory; the first open of VM "bad" gets a panicking source.
struct TestProvider {
    inner: SwapdevProvider,
    bad_used: AtomicBool,
}

impl SourceProvider for TestProvider {
    fn source_key(&self, vm: &str, spec: Option<&str>) -> Result<String, ProviderError> {
        self.inner.source_key(vm, spec)
    }
    fn open(
        &self,
        vm: &str,
        spec: Option<&str>,
        layout: &GuestLayout,
    ) -> Result<OpenedSource, ProviderError> {
        if vm == "bad" && !self.bad_used.swap(true, Ordering::SeqCst) {
            return Ok(OpenedSource {
                source: Box::new(PanickingSource {
                    fd: EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap(),
                }),
                description: "panicking test source".into(),
                swapdev: None,
            });
        }
        self.inner.open(vm, spec, layout)
    }
}

fn start(dir: &Path) -> (Arc<Daemon>, PathBuf, PathBuf) {
    start_with(dir, DaemonConfig::default())
}

fn start_with(dir: &Path, config: DaemonConfig) -> (Arc<Daemon>, PathBuf, PathBuf) {
    let provider = TestProvider {
        inner: SwapdevProvider {
            dir: Some(dir.to_path_buf()),
            host_id: "e2e".into(),
            ..Default::default()
        },
        bad_used: AtomicBool::new(false),
    };
    let daemon = Daemon::new(
        DaemonConfig {
            handshake_timeout: Duration::from_secs(2),
            ..config
        },
        Arc::new(provider),
    )
    .unwrap();
    let sock = dir.join("pager.sock");
    let ctl = dir.join("pager.sock.stats");
    let l = pager::server::bind_unix(&sock).unwrap();
    let d = daemon.clone();
    std::thread::spawn(move || d.serve_attach(l, Naming::FromRequest));
    let l = pager::server::bind_unix(&ctl).unwrap();
    let d = daemon.clone();
    std::thread::spawn(move || control::serve_control(&d, l));
    (daemon, sock, ctl)
}

/// Attach `guest` as `vm` with the pagewise handshake; the reply's error on refusal.
fn attach(sock: &Path, vm: &str, guest: &Guest, size: usize) -> Result<UnixStream, String> {
    let conn = UnixStream::connect(sock).unwrap();
    let req = AttachRequest {
        vm: vm.into(),
        regions: vec![guest.region(size)],
        memory_file: false,
        uffd_features: Features::EVENT_REMOVE.bits(),
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    send_request(&conn, &req, guest.uffd.as_raw_fd(), None).unwrap();
    let reply = recv_reply(&conn).unwrap();
    if reply.ok {
        Ok(conn)
    } else {
        Err(reply.error.unwrap_or_default())
    }
}

fn check_page(guest: &Guest, i: usize) {
    let got = &guest.map[i * PAGE..(i + 1) * PAGE];
    match page_content(i) {
        Some(c) => assert_eq!(got, &c[..], "page {i}"),
        None => assert!(got.iter().all(|&b| b == 0), "page {i} should be zero"),
    }
}

fn error_of(r: Result<Response, ControlError>) -> String {
    match r {
        Err(ControlError::Daemon { message }) => message,
        other => panic!("expected a daemon error, got {other:?}"),
    }
}

#[test]
fn one_connection_many_requests_and_malformed_lines_keep_it_usable() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, _, ctl) = start(dir.path());
    let mut c = ControlClient::connect(&ctl).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            c.call(&Request::Ping).unwrap(),
            Response::Pong { version: 1 }
        ));
    }
    for (line, wanted) in [
        ("not json", "not JSON"),
        (r#"{"op":"ping"}"#, "no protocol version"),
        (r#"{"v":9,"op":"ping"}"#, "version 9 is not supported"),
        (r#"{"v":1,"op":"stats","vm":7}"#, "malformed request"),
        (
            r#"{"v":1,"op":"detach","vm":"x","force":true}"#,
            "unknown field `force`",
        ),
    ] {
        match c.call_raw(line).unwrap() {
            Response::Error { message } => assert!(message.contains(wanted), "{line}: {message}"),
            other => panic!("{line}: answered {other:?}"),
        }
    }
    // An oversized line is refused and skipped; the next request is answered.
    let big = format!(r#"{{"v":1,"op":"ping","pad":"{}"}}"#, "x".repeat(2 << 20));
    match c.call_raw(&big).unwrap() {
        Response::Error { message } => assert!(message.contains("larger than"), "{message}"),
        other => panic!("answered {other:?}"),
    }
    match c.call(&Request::Commands).unwrap() {
        Response::Commands { ops } => {
            assert!(ops.contains(&"census".to_string()));
            assert!(
                !ops.contains(&"evict".to_string()),
                "no evictor here: {ops:?}"
            );
        }
        other => panic!("answered {other:?}"),
    }
    let e = error_of(c.call(&Request::Detach { vm: "nope".into() }));
    assert!(e.contains("no VM named \"nope\""), "{e}");
    let e = error_of(c.call(&Request::EvictStatus { vm: "nope".into() }));
    assert!(e.contains("eviction is not enabled"), "{e}");
    assert!(matches!(c.stats(None).unwrap().vms.as_slice(), []));
    daemon.shutdown();
}

#[test]
fn only_an_idle_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_millis(400);
    let (daemon, _, ctl) = start_with(
        dir.path(),
        DaemonConfig {
            control_idle_timeout: idle,
            ..Default::default()
        },
    );
    let mut c = ControlClient::connect(&ctl).unwrap();
    for _ in 0..4 {
        std::thread::sleep(idle / 4);
        assert!(matches!(
            c.call(&Request::Ping).unwrap(),
            Response::Pong { .. }
        ));
    }
    std::thread::sleep(idle * 3);
    match c.call(&Request::Ping) {
        Err(ControlError::Closed | ControlError::Io(_)) => {}
        other => panic!("an idle connection should be closed, got {other:?}"),
    }
    daemon.shutdown();
}

fn layout(pages: usize) -> LayoutSpec {
    LayoutSpec {
        page_size: PAGE as u64,
        regions: vec![RegionSpec {
            offset: 0,
            size: (pages * PAGE) as u64,
        }],
    }
}

#[test]
fn prepared_vm_gets_its_states_and_routes_then_seed_and_census() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("store.swap"));
    let (daemon, sock, ctl) = start(dir.path());
    let mut c = ControlClient::connect(&ctl).unwrap();
    let spec = PrepareSpec {
        vm: "incoming".into(),
        layout: layout(PAGES),
        // Not incoming.swap: the prepared spec overrides the directory rule.
        swapdev: Some(dir.path().join("store.swap").display().to_string()),
        // Pages 0..8 are known zero (their stored content is not served); 8..16 routed remote.
        states: vec![StateRange {
            first_page: 0,
            count: 8,
            state: PageState::Zero,
        }],
        routes: vec![RouteRange {
            first_page: 8,
            count: 8,
            route: Route::Remote,
        }],
    };
    // Refusals, each naming the problem.
    let mut bad = spec.clone();
    bad.states[0].first_page = u64::MAX;
    let e = error_of(c.call(&Request::Prepare(bad)));
    assert!(e.contains("outside the VM's 512 pages"), "{e}");
    let mut bad = spec.clone();
    bad.states[0].state = PageState::Present;
    let e = error_of(c.call(&Request::Prepare(bad)));
    assert!(e.contains("present cannot be seeded"), "{e}");
    let mut bad = spec.clone();
    bad.layout.regions[0].size = 1000;
    let e = error_of(c.call(&Request::Prepare(bad)));
    assert!(e.contains("not page-aligned"), "{e}");

    match c.call(&Request::Prepare(spec.clone())).unwrap() {
        Response::Prepared { vm, pages, source } => {
            assert_eq!((vm.as_str(), pages), ("incoming", PAGES as u64));
            assert!(source.ends_with("store.swap"), "{source}");
        }
        other => panic!("answered {other:?}"),
    }
    let e = error_of(c.call(&Request::Prepare(spec.clone())));
    assert!(e.contains("already prepared"), "{e}");
    match c.call(&Request::List).unwrap() {
        Response::List { vms } => {
            assert_eq!(vms.len(), 1);
            assert_eq!(vms[0].status, VmStatus::Prepared);
        }
        other => panic!("answered {other:?}"),
    }

    // A VMM with another layout is refused, naming the difference; the entry stays.
    let guest = Guest::new();
    let e = attach(&sock, "incoming", &guest, PAGES / 2 * PAGE).unwrap_err();
    assert!(
        e.contains("prepared with another guest layout") && e.contains("size 0x200000"),
        "{e}"
    );
    let conn = attach(&sock, "incoming", &guest, PAGES * PAGE).unwrap();
    match c.call(&Request::List).unwrap() {
        Response::List { vms } => assert_eq!(vms[0].status, VmStatus::Attached),
        other => panic!("answered {other:?}"),
    }
    // Seeded zero pages read as zero although the device stores content for them.
    assert!(page_content(1).is_some());
    assert!(guest.map[PAGE..2 * PAGE].iter().all(|&b| b == 0));
    check_page(&guest, 20);
    let vm = daemon.vm("incoming").unwrap();
    // The guest is woken by the copy; the state becomes `present` right after.
    let present = |p: u64| {
        let vm = vm.clone();
        move || vm.states.get(p) == PageState::Present
    };
    wait_until("pages 1 and 20 present", || present(1)() && present(20)());

    let census = |c: &mut ControlClient, ranges| match c
        .call(&Request::Census {
            vm: "incoming".into(),
            ranges,
        })
        .unwrap()
    {
        Response::Census(r) => r,
        other => panic!("answered {other:?}"),
    };
    let r = census(&mut c, None);
    assert_eq!(r.routes.remote, 8);
    assert_eq!(r.routes.swapdev, PAGES as u64 - 8);
    // Page 20 was read in, page 1 answered with a zero page: both present now.
    assert_eq!(r.states.present, 2, "{:?}", r.states);
    assert!(r.states.zero >= 7, "{:?}", r.states);
    assert!(r.ranges.is_none());

    // seed: absent -> absent is applied; a present page refuses the whole request.
    match c
        .call(&Request::Seed {
            vm: "incoming".into(),
            states: vec![StateRange {
                first_page: 100,
                count: 10,
                state: PageState::Zero,
            }],
            routes: vec![RouteRange {
                first_page: 100,
                count: 10,
                route: Route::Zero,
            }],
        })
        .unwrap()
    {
        Response::Seeded {
            states_set,
            routes_set,
            ..
        } => assert_eq!(
            (states_set, routes_set),
            (8, 10),
            "104 and 109 were zero already (never stored)"
        ),
        other => panic!("answered {other:?}"),
    }
    assert!(guest.map[105 * PAGE..106 * PAGE].iter().all(|&b| b == 0));
    check_page(&guest, 220);
    wait_until("page 220 present", present(220));
    let e = error_of(c.call(&Request::Seed {
        vm: "incoming".into(),
        states: vec![StateRange {
            first_page: 200,
            count: 21,
            state: PageState::Evicted,
        }],
        routes: vec![],
    }));
    assert!(e.contains("page 220 is present"), "{e}");
    let r = census(
        &mut c,
        Some(RangeWindow {
            first_page: 200,
            count: Some(21),
        }),
    );
    let runs = r.ranges.unwrap();
    assert!(
        runs.iter().all(|r| r.state != PageState::Evicted),
        "the refused seed changed nothing: {runs:?}"
    );
    assert_eq!(runs.iter().map(|r| r.count).sum::<u64>(), 21);
    assert_eq!(
        runs.last(),
        Some(&StateRange {
            first_page: 220,
            count: 1,
            state: PageState::Present
        })
    );
    let e = error_of(c.call(&Request::Census {
        vm: "incoming".into(),
        ranges: Some(RangeWindow {
            first_page: 1,
            count: Some(u64::MAX),
        }),
    }));
    assert!(e.contains("outside the VM's 512 pages"), "{e}");

    // unprepare of a name no longer pending, and a fresh prepare/unprepare.
    let e = error_of(c.call(&Request::Unprepare {
        vm: "incoming".into(),
    }));
    assert!(
        e.contains("is not prepared") || e.contains("no VM named"),
        "{e}"
    );
    let e = error_of(c.call(&Request::Prepare(spec.clone())));
    assert!(e.contains("is attached"), "{e}");
    let mut other = spec.clone();
    other.vm = "second".into();
    let e = error_of(c.call(&Request::Prepare(other.clone())));
    assert!(e.contains("one VM per swap device"), "{e}");
    other.swapdev = Some(dir.path().join("elsewhere.swap").display().to_string());
    assert!(matches!(
        c.call(&Request::Prepare(other)).unwrap(),
        Response::Prepared { .. }
    ));
    assert!(matches!(
        c.call(&Request::Unprepare {
            vm: "second".into()
        })
        .unwrap(),
        Response::Unprepared { .. }
    ));
    drop(conn);
    wait_until("detach", || daemon.vms().is_empty());
    daemon.shutdown();
}

#[test]
fn a_panicking_fault_loop_tears_down_only_its_vm_which_can_attach_again() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("good.swap"));
    create_swapdev(&dir.path().join("bad.swap"));
    let (daemon, sock, ctl) = start(dir.path());
    let good = Guest::new();
    let _good_conn = attach(&sock, "good", &good, PAGES * PAGE).unwrap();
    let bad = Guest::new();
    let bad_conn = attach(&sock, "bad", &bad, PAGES * PAGE).unwrap();
    check_page(&good, 3);

    // A guest thread faults on the bad VM: its loop panics.
    let addr = bad.map.as_ptr() as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the mapping outlives this read (the test waits for the thread below before
        // `bad` is dropped) and is readable.
        let b = unsafe { std::ptr::read_volatile((addr + 5 * PAGE) as *const u8) };
        let _ = tx.send(b);
    });
    wait_until("the bad VM torn down", || daemon.vm("bad").is_none());
    // The VMM is told why (so it exits rather than wait for a restarted pager), then its
    // attach connection is closed: its side sees EOF.
    bad_conn
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let last_word = pager::attach::protocol::recv_reply(&bad_conn).expect("the last word");
    assert!(!last_word.ok && !last_word.reattach, "{last_word:?}");
    assert!(
        last_word
            .error
            .as_deref()
            .unwrap_or("")
            .contains("panicked"),
        "{last_word:?}"
    );
    let mut byte = [0u8; 1];
    let n = std::io::Read::read(&mut &bad_conn, &mut byte).expect("EOF, not a timeout");
    assert_eq!(n, 0, "the daemon closed the attach connection");
    // The VMM, told, drops its uffd: the waiting guest thread is released.
    let Guest { map: bad_map, uffd } = bad;
    drop(uffd);
    rx.recv_timeout(Duration::from_secs(5))
        .expect("the faulting thread was released");
    drop(bad_map);

    // The other VM keeps serving faults.
    for i in (0..PAGES).step_by(11) {
        check_page(&good, i);
    }
    // The failed VM's name and device are free: it attaches again and is served.
    let again = Guest::new();
    let _again_conn = attach(&sock, "bad", &again, PAGES * PAGE).unwrap();
    for i in [0, 4, 9, 511] {
        check_page(&again, i);
    }
    let mut c = ControlClient::connect(&ctl).unwrap();
    let names: Vec<String> = c
        .stats(None)
        .unwrap()
        .vms
        .into_iter()
        .map(|v| v.vm)
        .collect();
    assert_eq!(names, ["bad", "good"]);
    daemon.shutdown();
}
