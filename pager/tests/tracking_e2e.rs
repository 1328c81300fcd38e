//! Write tracking over the control socket, on a real guest mapping registered MISSING|WP with
//! a real uffd, served by the daemon's real fault loop: a consumer starts tracking, the guest
//! writes, `dirty_harvest` returns exactly the written pages and protects them again, so the
//! next harvest sees only later writes; a second consumer has its own view; refusals name the
//! problem.

mod support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pager::attach::protocol::{recv_reply, send_request, AttachRequest};
use pager::attach::server::Naming;
use pager::server::protocol::{Request, Response};
use pager::server::provider::SwapdevProvider;
use pager::server::tracking::PageRun;
use pager::server::{control, ControlClient, ControlError, Daemon, DaemonConfig};
use pager::uffd::{Features, RegisterMode, Uffd, UffdFlags};
use support::{create_swapdev, page_content, PAGE, PAGES};

fn start(dir: &Path) -> (Arc<Daemon>, std::path::PathBuf, std::path::PathBuf) {
    let provider = SwapdevProvider {
        dir: Some(dir.to_path_buf()),
        host_id: "e2e".into(),
        ..Default::default()
    };
    let daemon = Daemon::new(
        DaemonConfig {
            handshake_timeout: Duration::from_secs(2),
            ..Default::default()
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

fn error_of(r: Result<Response, ControlError>) -> String {
    match r {
        Err(ControlError::Daemon { message }) => message,
        other => panic!("expected a daemon error, got {other:?}"),
    }
}

fn harvest(c: &mut ControlClient, consumer: &str) -> Vec<PageRun> {
    match c
        .call(&Request::DirtyHarvest {
            vm: "vm1".into(),
            consumer: consumer.into(),
        })
        .unwrap()
    {
        Response::DirtySet(set) => {
            assert_eq!(set.count, set.runs.iter().map(|r| r.count).sum::<u64>());
            set.runs
        }
        other => panic!("answered {other:?}"),
    }
}

fn run(first_page: u64, count: u64) -> PageRun {
    PageRun { first_page, count }
}

#[test]
fn harvests_return_exactly_the_pages_written_since_the_last_one() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("vm1.swap"));
    let (daemon, sock, ctl) = start(dir.path());
    let mut map = memmap2::MmapMut::map_anon(PAGES * PAGE).unwrap();
    let uffd = Uffd::new(UffdFlags::default()).unwrap();
    uffd.api(Features::EVENT_REMOVE | Features::PAGEFAULT_FLAG_WP)
        .unwrap();
    uffd.register(
        map.as_ptr() as u64,
        (PAGES * PAGE) as u64,
        RegisterMode::MISSING | RegisterMode::WP,
    )
    .unwrap();
    let conn = UnixStream::connect(&sock).unwrap();
    let req = AttachRequest {
        vm: "vm1".into(),
        regions: vec![pager::attach::protocol::GuestRegionUffdMapping {
            base_host_virt_addr: map.as_ptr() as u64,
            size: PAGES * PAGE,
            offset: 0,
            page_size: PAGE,
            page_size_kib: PAGE,
        }],
        memory_file: false,
        uffd_features: (Features::EVENT_REMOVE | Features::PAGEFAULT_FLAG_WP).bits(),
        modes: vec!["missing".into(), "wp".into()],
        reattach: false,
        served_by: None,
    };
    send_request(&conn, &req, uffd.as_raw_fd(), None).unwrap();
    assert!(recv_reply(&conn).unwrap().ok);
    // Make every page resident first (served from the device).
    for i in 0..PAGES {
        let want = page_content(i).map_or(0, |c| c[3]);
        assert_eq!(map[i * PAGE + 3], want, "page {i}");
    }
    // The thread's read returns when its page is mapped, a moment before the loop has
    // finished its bookkeeping (a placement after `dirty_start` counts as written): wait
    // until every placement is accounted for.
    let vm = daemon.vm("vm1").unwrap();
    support::wait_until("all pages placed", || {
        let m = vm.metrics.snapshot();
        m.pages_copied + m.pages_zeroed == PAGES as u64
    });
    let mut c = ControlClient::connect(&ctl).unwrap();
    let start = |c: &mut ControlClient, consumer: &str| {
        c.call(&Request::DirtyStart {
            vm: "vm1".into(),
            consumer: consumer.into(),
            placed_counts_as_written: true,
        })
    };
    match start(&mut c, "mig").unwrap() {
        Response::DirtyStarted { pages, .. } => assert_eq!(pages, PAGES as u64),
        other => panic!("answered {other:?}"),
    }
    assert!(error_of(start(&mut c, "mig")).contains("already tracks"));
    assert_eq!(harvest(&mut c, "mig"), vec![], "nothing written yet");

    for p in [5usize, 6, 7, 100] {
        map[p * PAGE + 1] = 0xab;
    }
    assert_eq!(harvest(&mut c, "mig"), vec![run(5, 3), run(100, 1)]);
    // A second consumer starts now: it sees only what comes after its start.
    start(&mut c, "other").unwrap();
    map[6 * PAGE + 2] = 0xcd;
    map[300 * PAGE] = 1;
    assert_eq!(
        harvest(&mut c, "mig"),
        vec![run(6, 1), run(300, 1)],
        "a page written again after a harvest is seen again"
    );
    assert_eq!(harvest(&mut c, "other"), vec![run(6, 1), run(300, 1)]);
    assert_eq!(harvest(&mut c, "mig"), vec![]);
    assert!(matches!(
        c.call(&Request::DirtyStop {
            vm: "vm1".into(),
            consumer: "mig".into()
        })
        .unwrap(),
        Response::DirtyStopped { .. }
    ));
    assert!(error_of(c.call(&Request::DirtyHarvest {
        vm: "vm1".into(),
        consumer: "mig".into()
    }))
    .contains("does not track"));
    assert!(error_of(c.call(&Request::DirtyStart {
        vm: "nope".into(),
        consumer: "mig".into(),
        placed_counts_as_written: false
    }))
    .contains("no VM named \"nope\""));
    drop(conn);
}

#[test]
fn a_served_vms_swap_device_is_released_for_another_host_while_the_daemon_runs() {
    let dir = tempfile::tempdir().unwrap();
    let dev_path = dir.path().join("vm1.swap");
    create_swapdev(&dev_path);
    let (daemon, sock, ctl) = start(dir.path());
    let guest = support::Guest::new();
    let conn = UnixStream::connect(&sock).unwrap();
    let req = AttachRequest {
        vm: "vm1".into(),
        regions: vec![guest.region(PAGES * PAGE)],
        memory_file: false,
        uffd_features: Features::EVENT_REMOVE.bits(),
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    send_request(&conn, &req, guest.uffd.as_raw_fd(), None).unwrap();
    assert!(recv_reply(&conn).unwrap().ok);
    assert_eq!(guest.map[3 * PAGE + 1], page_content(3).unwrap()[1]);
    // While this daemon owns the device, another host cannot take it.
    let open_as_dst = || {
        let backend = swapdev::backend::spec::open_backend(
            dev_path.to_str().unwrap(),
            &swapdev::backend::spec::SpecOptions::default(),
        )
        .unwrap();
        swapdev::SwapDevice::open(
            backend,
            swapdev::OpenOptions::read_write("dst", true, false),
        )
    };
    let refused = open_as_dst().map(|_| ()).unwrap_err().to_string();
    assert!(
        refused.contains("e2e"),
        "refusal should name the owner: {refused}"
    );
    let mut c = ControlClient::connect(&ctl).unwrap();
    let generation = match c
        .call(&Request::SwapdevRelease { vm: "vm1".into() })
        .unwrap()
    {
        Response::SwapdevReleased { generation, .. } => generation,
        other => panic!("answered {other:?}"),
    };
    // The daemon keeps serving the VM from the released device.
    assert_eq!(guest.map[7 * PAGE + 2], page_content(7).unwrap()[2]);
    let dst = open_as_dst().expect("another host acquires the released device");
    assert!(
        dst.generation() > generation,
        "{} <= {generation}",
        dst.generation()
    );
    assert!(error_of(c.call(&Request::SwapdevRelease { vm: "vm1".into() })).contains("releasing"));
    drop(dst);
    drop(conn);
    daemon.shutdown();
}
