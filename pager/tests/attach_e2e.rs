//! End to end, in one process: a thread plays the VMM (anonymous guest memory, a uffd, the
//! Firecracker or pagewise handshake) against the real attach server backed by a real swap
//! device file; touching guest pages must show the stored content.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use pager::attach::protocol::{
    recv_reply, send_firecracker, send_request, AttachRequest, GuestRegionUffdMapping,
};
use pager::attach::server::Naming;
use pager::server::protocol::{Request, Response};
use pager::server::{control, ControlClient, Daemon, DaemonConfig, SwapdevProvider};
use pager::uffd::{Features, RegisterMode, Uffd, UffdFlags};

mod support;
use support::{create_swapdev, page_content, wait_until, Guest, PAGE, PAGES};

fn start_daemon(
    dir: &Path,
    prefetch: &str,
) -> (Arc<Daemon>, std::path::PathBuf, std::path::PathBuf) {
    let provider = SwapdevProvider {
        dir: Some(dir.to_path_buf()),
        host_id: "e2e".into(),
        ..Default::default()
    };
    let daemon = Daemon::new(
        DaemonConfig {
            prefetch: prefetch.into(),
            handshake_timeout: Duration::from_secs(2),
            ..Default::default()
        },
        Arc::new(provider),
    )
    .unwrap();
    let sock = dir.join("pager.sock");
    let fc_sock = dir.join("vm1.sock");
    let stats = dir.join("pager.sock.stats");
    for (path, naming) in [
        (&sock, Naming::FromRequest),
        (&fc_sock, Naming::Fixed("vm1".into())),
    ] {
        let l = pager::server::bind_unix(path).unwrap();
        let d = daemon.clone();
        std::thread::spawn(move || d.serve_attach(l, naming));
    }
    let l = pager::server::bind_unix(&stats).unwrap();
    let d = daemon.clone();
    std::thread::spawn(move || control::serve_control(&d, l));
    (daemon, fc_sock, sock)
}

#[test]
fn firecracker_vm_served_from_a_swap_device_then_detached_on_hangup() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("vm1.swap"));
    let (daemon, fc_sock, _) = start_daemon(dir.path(), "stride");
    let stats_sock = dir.path().join("pager.sock.stats");

    let guest = Guest::new();
    let conn = UnixStream::connect(&fc_sock).unwrap();
    send_firecracker(&conn, &[guest.region(PAGES * PAGE)], guest.uffd.as_raw_fd()).unwrap();

    // Touch every page (a strided order, then the rest) and compare with what was stored.
    for i in (0..PAGES)
        .step_by(3)
        .chain((0..PAGES).filter(|i| i % 3 != 0))
    {
        let got = &guest.map[i * PAGE..(i + 1) * PAGE];
        match page_content(i) {
            Some(c) => assert_eq!(got, &c[..], "page {i}"),
            None => assert!(got.iter().all(|&b| b == 0), "page {i} should be zero"),
        }
    }

    let mut client = ControlClient::connect(&stats_sock).unwrap();
    let stats = serde_json::to_value(client.stats(Some("vm1")).unwrap()).unwrap();
    let vm = &stats["vms"][0];
    assert_eq!(vm["vm"], "vm1");
    assert_eq!(vm["flavour"], "firecracker");
    assert_eq!(vm["pid"], std::process::id());
    assert_eq!(vm["states"]["present"], PAGES);
    let m = &vm["metrics"];
    assert_eq!(
        m["pages_copied"].as_u64().unwrap() + m["pages_zeroed"].as_u64().unwrap(),
        PAGES as u64
    );
    assert!(m["faults"].as_u64().unwrap() >= 1);
    // The same connection answers further requests, a malformed one included.
    match client.call(&Request::List).unwrap() {
        Response::List { vms } => assert_eq!(vms.len(), 1),
        other => panic!("list answered {other:?}"),
    }
    match client.call_raw(r#"{"v":1,"op":"frobnicate"}"#) {
        Ok(Response::Error { message }) => {
            assert!(
                message.contains("unknown variant `frobnicate`"),
                "{message}"
            )
        }
        other => panic!("expected an error response, got {other:?}"),
    }
    assert!(matches!(
        client.call(&Request::Ping).unwrap(),
        Response::Pong { version: 1 }
    ));

    // The VMM goes away: the VM is torn down, the daemon keeps running.
    drop(conn);
    wait_until("detach after hangup", || daemon.vms().is_empty());
    daemon.shutdown();
}

#[test]
fn pagewise_handshake_refused_when_regions_exceed_the_swap_device() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("small.swap"));
    let (daemon, _, sock) = start_daemon(dir.path(), "none");
    let guest = Guest::new();
    let mut region = guest.region(PAGES * PAGE);
    region.offset = (PAGES * PAGE) as u64; // ends at twice the device's capacity
    let req = AttachRequest {
        vm: "small".into(),
        regions: vec![region],
        memory_file: false,
        uffd_features: Features::EVENT_REMOVE.bits(),
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    let conn = UnixStream::connect(&sock).unwrap();
    send_request(&conn, &req, guest.uffd.as_raw_fd(), None).unwrap();
    let reply = recv_reply(&conn).unwrap();
    assert!(!reply.ok);
    let err = reply.error.unwrap();
    assert!(err.contains(&format!("{}", 2 * PAGES * PAGE)), "{err}");
    assert!(err.contains(&format!("{}", PAGES * PAGE)), "{err}");

    // A VM with no swap device in the directory is refused with the path named.
    let conn = UnixStream::connect(&sock).unwrap();
    let req = AttachRequest {
        vm: "ghost".into(),
        ..req
    };
    send_request(&conn, &req, guest.uffd.as_raw_fd(), None).unwrap();
    let err = recv_reply(&conn).unwrap().error.unwrap();
    assert!(err.contains("ghost.swap"), "{err}");

    // The valid request succeeds and the daemon serves it.
    let conn = UnixStream::connect(&sock).unwrap();
    let req = AttachRequest {
        vm: "small".into(),
        regions: vec![guest.region(PAGES * PAGE)],
        ..req
    };
    send_request(&conn, &req, guest.uffd.as_raw_fd(), None).unwrap();
    let reply = recv_reply(&conn).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        &guest.map[7 * PAGE..8 * PAGE],
        &page_content(7).unwrap()[..]
    );
    daemon.shutdown();
    assert!(daemon.vms().is_empty());
}

/// Guest memory in a memfd (MAP_SHARED), as QEMU's memory-backend-file share=on.
struct ShmemGuest {
    map: MmapMut,
    file: std::fs::File,
    uffd: Uffd,
}

impl ShmemGuest {
    /// The pagewise handshake for this guest as VM `vm`, with its memory file.
    fn request(&self, vm: &str, reattach: bool) -> AttachRequest {
        AttachRequest {
            vm: vm.into(),
            regions: vec![GuestRegionUffdMapping {
                base_host_virt_addr: self.map.as_ptr() as u64,
                size: PAGES * PAGE,
                offset: 0,
                page_size: PAGE,
                page_size_kib: 0,
            }],
            memory_file: true,
            uffd_features: 0,
            modes: vec!["missing".into(), "wp".into()],
            reattach,
            served_by: None,
        }
    }

    fn new() -> Self {
        let fd = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len((PAGES * PAGE) as u64).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd, sized above.
        let map = unsafe { MmapMut::map_mut(&file).unwrap() };
        let uffd = Uffd::new(UffdFlags::default()).unwrap();
        uffd.api(
            Features::EVENT_REMOVE
                | Features::MISSING_SHMEM
                | Features::WP_HUGETLBFS_SHMEM
                | Features::WP_UNPOPULATED,
        )
        .unwrap();
        uffd.register(
            map.as_ptr() as u64,
            (PAGES * PAGE) as u64,
            RegisterMode::MISSING | RegisterMode::WP,
        )
        .unwrap();
        Self { map, file, uffd }
    }
}

#[test]
fn shmem_guest_with_memory_file_served_while_bad_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("shm.swap"));
    create_swapdev(&dir.path().join("vm1.swap"));
    let (daemon, fc_sock, sock) = start_daemon(dir.path(), "none");

    // A silent client and a garbage client on the same socket must not hold anyone up.
    let _silent = UnixStream::connect(&sock).unwrap();
    let garbage = UnixStream::connect(&sock).unwrap();
    nix::sys::socket::send(
        garbage.as_raw_fd(),
        b"GET / HTTP/1.0\r\n\r\n",
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();

    let guest = ShmemGuest::new();
    let req = guest.request("shm", false);
    let conn = UnixStream::connect(&sock).unwrap();
    let started = Instant::now();
    send_request(
        &conn,
        &req,
        guest.uffd.as_raw_fd(),
        Some(guest.file.as_raw_fd()),
    )
    .unwrap();
    let reply = recv_reply(&conn).unwrap();
    assert!(reply.ok, "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // A second VM on its own Firecracker socket at the same time.
    let fc_guest = Guest::new();
    let fc_conn = UnixStream::connect(&fc_sock).unwrap();
    send_firecracker(
        &fc_conn,
        &[fc_guest.region(PAGES * PAGE)],
        fc_guest.uffd.as_raw_fd(),
    )
    .unwrap();

    for i in (0..PAGES).rev().step_by(7) {
        let expect = page_content(i).unwrap_or_else(|| vec![0; PAGE]);
        assert_eq!(
            &guest.map[i * PAGE..(i + 1) * PAGE],
            &expect[..],
            "shm page {i}"
        );
        assert_eq!(
            &fc_guest.map[i * PAGE..(i + 1) * PAGE],
            &expect[..],
            "fc page {i}"
        );
    }
    // Pages placed in shmem are in the memory file itself.
    let mut buf = vec![0u8; PAGE];
    nix::sys::uio::pread(&guest.file, &mut buf, (7 * PAGE) as i64).unwrap();
    assert_eq!(buf, page_content(7).unwrap());

    let vm = daemon.vm("shm").unwrap();
    assert!(vm.wp_registered && vm.memory_file.is_some());
    assert_eq!(daemon.vms().len(), 2);
    // The first VM leaving does not disturb the second.
    drop(conn);
    wait_until("shm VM detached", || daemon.vm("shm").is_none());
    assert_eq!(
        &fc_guest.map[3 * PAGE..4 * PAGE],
        &page_content(3).unwrap()[..]
    );
    daemon.shutdown();
}

#[test]
fn a_restarted_vmm_reattaches_at_once_under_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    create_swapdev(&dir.path().join("vm1.swap"));
    let (daemon, _, sock) = start_daemon(dir.path(), "none");
    for round in 0..5 {
        let guest = Guest::new();
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
        let reply = recv_reply(&conn).unwrap();
        assert!(reply.ok, "round {round}: {reply:?}");
        let i = [10, 11, 12, 13, 15][round];
        assert_eq!(
            &guest.map[i * PAGE..(i + 1) * PAGE],
            &page_content(i).unwrap()[..],
            "round {round}"
        );
        // No waiting for the detach: the next VMM attaches right after this one closes.
        drop(conn);
    }
    daemon.shutdown();
}

/// A migration destination restarted after the switchover prepares the VM for its VMM's
/// re-attach (`Daemon::prepare_reattach`): a new VMM cannot take it; the re-attach gets the
/// prepared routes with states rebuilt from the memory file and the swap device, and a page
/// routed to a source not installed yet waits for it.
#[test]
fn a_vm_prepared_for_reattach_is_taken_only_by_a_reattach_with_its_routes() {
    use pager::route::Route;
    use pager::server::protocol::{LayoutSpec, PrepareSpec, RegionSpec, RouteRange};
    let dir = tempfile::tempdir().unwrap();
    let device = dir.path().join("shm.swap");
    create_swapdev(&device);
    let image = dir.path().join("image.raw");
    std::fs::write(&image, vec![0xab; PAGES * PAGE]).unwrap();
    let (daemon, _, sock) = start_daemon(dir.path(), "none");
    daemon
        .prepare_reattach(PrepareSpec {
            vm: "shm".into(),
            layout: LayoutSpec {
                page_size: PAGE as u64,
                regions: vec![RegionSpec {
                    offset: 0,
                    size: (PAGES * PAGE) as u64,
                }],
            },
            swapdev: Some(device.display().to_string()),
            states: vec![],
            // Page 4 (not on the device) comes from a source installed later.
            routes: vec![RouteRange {
                first_page: 4,
                count: 1,
                route: Route::Local,
            }],
        })
        .unwrap();
    let guest = ShmemGuest::new();
    // What the gone pager placed: page 9 (not on the device) is in the memory file.
    nix::sys::uio::pwrite(&guest.file, &[0x77; PAGE], (9 * PAGE) as i64).unwrap();
    let attach = |reattach| {
        let conn = UnixStream::connect(&sock).unwrap();
        send_request(
            &conn,
            &guest.request("shm", reattach),
            guest.uffd.as_raw_fd(),
            Some(guest.file.as_raw_fd()),
        )
        .unwrap();
        (recv_reply(&conn).unwrap(), conn)
    };
    let (fresh, _) = attach(false);
    assert!(!fresh.ok, "{fresh:?}");
    let why = fresh.error.unwrap_or_default();
    assert!(why.contains("waits for its own VMM"), "{why}");

    let (back, _conn) = attach(true);
    assert!(back.ok, "{back:?}");
    assert!(back.reattach, "a pager restarted again could take it too");
    assert_eq!(&guest.map[9 * PAGE..10 * PAGE], &[0x77; PAGE][..]);
    assert_eq!(
        &guest.map[3 * PAGE..4 * PAGE],
        &page_content(3).unwrap()[..]
    );
    assert_eq!(&guest.map[14 * PAGE..15 * PAGE], &[0; PAGE][..]);
    // Page 4 waits for its source.
    let addr = guest.map.as_ptr() as usize + 4 * PAGE;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the guest mapping outlives the test's wait below (joined through `rx`).
        let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(b);
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "page 4 was served before its source was installed"
    );
    let source = pager::source::image::ImageFileSource::open(&image, PAGE, PAGES as u64).unwrap();
    daemon
        .controller("shm")
        .unwrap()
        .install_source(Route::Local, Box::new(source))
        .unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 0xab);
    daemon.shutdown();
}
