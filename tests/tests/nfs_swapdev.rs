//! A swap device on NFS (`nfs://`, libnfs) against a real NFS-Ganesha started by the test:
//! created, written, reopened and fsck'd; the two-host hand-off; and a kill -9 write storm
//! (the approach of swapdev_crash.rs: the writer is this binary run again as a child), with
//! the NFS server itself killed -9 and restarted in some rounds.
//!
//! Run: `cargo test -p pagewise-tests --test nfs_swapdev`

#[path = "common/nfs_server.rs"]
mod nfs_server;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nfs_server::NfsServer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::file::{FileBackend, OpenOptions as FileOpts};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::backend::Backend;
use swapdev::{
    ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, PageData, SwapDevice, SwapError,
};

const PS: usize = 4096;
const PAGES: u64 = 1024;
const CHILD_ENV: &str = "PAGEWISE_NFS_STORM_DEVICE";

fn nfs(spec: &str, create: bool) -> Box<dyn Backend> {
    let opts = SpecOptions {
        create,
        ..SpecOptions::default()
    };
    open_backend(spec, &opts).unwrap_or_else(|e| panic!("open {spec}: {e}"))
}

fn create_opts(pages: u64, host: &str) -> CreateOptions {
    CreateOptions {
        vm_uuid: swapdev::Uuid::from_u128(0x4e4653),
        page_size: PS as u32,
        capacity_pages: pages,
        host_id: host.into(),
        codec: CodecPolicy::Lz4,
        checksum: ChecksumKind::Xxh3,
        force: false,
    }
}

/// Zero, text-like or random content for (page, version).
fn content(page: u64, version: u64) -> Vec<u8> {
    match version % 5 {
        0 => vec![0; PS],
        1 | 2 => format!("page {page} version {version}; ")
            .bytes()
            .cycle()
            .take(PS)
            .collect(),
        _ => {
            let mut r = StdRng::seed_from_u64(page << 32 ^ version);
            let mut v = vec![0u8; PS];
            r.fill(&mut v[..]);
            v
        }
    }
}

fn read(dev: &mut SwapDevice, page: u64) -> Option<Vec<u8>> {
    match dev.read_page(page).unwrap() {
        PageData::NotStored => None,
        d => d.to_vec(PS),
    }
}

#[test]
fn device_created_written_reopened_and_fsck_clean_over_nfs() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let server = NfsServer::start();
    let spec = server.spec("vm1.swap");
    let mut dev = SwapDevice::create(nfs(&spec, true), create_opts(PAGES, "host-a")).unwrap();
    for round in 0..4u64 {
        let data: Vec<(u64, Vec<u8>)> = (0..PAGES)
            .filter(|p| (p + round) % 3 != 0)
            .map(|p| (p, content(p, round * 1000 + p)))
            .collect();
        for chunk in data.chunks(64) {
            let refs: Vec<(u64, &[u8])> = chunk.iter().map(|(p, d)| (*p, &d[..])).collect();
            dev.write_pages(&refs).unwrap();
        }
        dev.flush().unwrap();
    }
    dev.close().unwrap();
    // Reopened over NFS: every page holds its last version.
    let mut dev = SwapDevice::open(
        nfs(&spec, false),
        OpenOptions::read_write("host-a", true, false),
    )
    .unwrap();
    for p in 0..PAGES {
        let last = (0..4u64).rev().find(|r| (p + r) % 3 != 0).unwrap();
        assert_eq!(
            read(&mut dev, p),
            Some(content(p, last * 1000 + p)),
            "page {p}"
        );
    }
    let report = dev.fsck().unwrap();
    assert!(report.is_clean(), "{report:#?}");
    dev.close().unwrap();
    let report = SwapDevice::fsck_backend(nfs(&spec, false)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    // The server's file is the device: the local file backend reads the same device.
    let local = FileBackend::open(server.file("vm1.swap"), FileOpts::default()).unwrap();
    let report = SwapDevice::fsck_backend(Box::new(local)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
}

/// Host A creates and releases; B acquires and writes; a stale A is refused, then force-takes
/// it and B is fenced — each host with its own NFS connection to the same file.
#[test]
fn two_host_hand_off_over_nfs() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let server = NfsServer::start();
    let spec = server.spec("shared.swap");
    let open = |create| nfs(&spec, create);
    let a_page = content(1, 3);
    let b_page = content(2, 4);
    let mut a = SwapDevice::create(open(true), create_opts(512, "host-a")).unwrap();
    a.write_pages(&[(10, &a_page)]).unwrap();
    let err = SwapDevice::open(open(false), OpenOptions::read_write("host-b", true, false))
        .err()
        .unwrap();
    assert!(err.to_string().contains("owned by host host-a"), "{err}");
    a.release().unwrap();
    let mut b =
        SwapDevice::open(open(false), OpenOptions::read_write("host-b", true, false)).unwrap();
    assert_eq!(read(&mut b, 10), Some(a_page.clone()));
    b.write_pages(&[(11, &b_page)]).unwrap();
    b.flush().unwrap();
    let err = SwapDevice::open(open(false), OpenOptions::read_write("host-a", false, false))
        .err()
        .unwrap();
    assert!(err.to_string().contains("owned by host host-b"), "{err}");
    let mut a2 =
        SwapDevice::open(open(false), OpenOptions::read_write("host-a", true, true)).unwrap();
    std::thread::sleep(swapdev::DEFAULT_FENCE_INTERVAL + Duration::from_millis(50));
    let err = b.write_pages(&[(12, &b_page)]).unwrap_err();
    assert!(matches!(err, SwapError::Fenced { .. }), "{err}");
    assert!(b.flush().is_err());
    assert!(b.release().is_err());
    assert_eq!(read(&mut a2, 11), Some(b_page.clone()));
    assert_eq!(read(&mut a2, 12), None);
    a2.write_pages(&[(13, &a_page)]).unwrap();
    a2.release().unwrap();
    let report = SwapDevice::fsck_backend(open(false)).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let mut r = SwapDevice::open(open(false), OpenOptions::read_only("reader")).unwrap();
    assert_eq!(r.owner(), ("host-a", false));
    assert_eq!(read(&mut r, 13), Some(a_page));
}

/// The storm writer. Does nothing unless started by `kill9_write_storm_over_nfs`.
#[test]
fn nfs_storm_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let base: u64 = std::env::var("PAGEWISE_NFS_STORM_BASE")
        .unwrap()
        .parse()
        .unwrap();
    let mut dev = SwapDevice::open(
        nfs(&spec, false),
        OpenOptions::read_write("storm-host", true, false),
    )
    .expect("storm: open");
    let mut rng = StdRng::seed_from_u64(base);
    let out = std::io::stdout();
    let mut out = out.lock();
    writeln!(out, "STORM R").unwrap();
    out.flush().unwrap();
    let mut version = base;
    loop {
        version += 1;
        let n = rng.random_range(1..48);
        let pages: Vec<u64> = (0..n)
            .map(|_| rng.random_range(0..PAGES))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let list = pages
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let r = if version.is_multiple_of(11) {
            writeln!(out, "STORM D {version} {list}").unwrap();
            out.flush().unwrap();
            dev.remove_pages(&pages)
        } else {
            let data: Vec<(u64, Vec<u8>)> =
                pages.iter().map(|&p| (p, content(p, version))).collect();
            let refs: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, &d[..])).collect();
            writeln!(out, "STORM W {version} {list}").unwrap();
            out.flush().unwrap();
            dev.write_pages(&refs)
        };
        // The server was killed under us: stop without acknowledging (the parent kills us).
        if r.is_err() {
            writeln!(out, "STORM E").unwrap();
            out.flush().unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        writeln!(out, "STORM A {version}").unwrap();
        out.flush().unwrap();
        if version.is_multiple_of(40) {
            dev.flush().expect("storm: flush");
        }
    }
}

type Expect = Option<u64>;

/// The storm writer, killed if the test fails before it does (it never stops by itself).
struct Writer(std::process::Child);

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill9_write_storm_over_nfs() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let mut server = NfsServer::start();
    let spec = server.spec("storm.swap");
    SwapDevice::create(nfs(&spec, true), create_opts(PAGES, "storm-host"))
        .unwrap()
        .close()
        .unwrap();
    let mut acked: HashMap<u64, Expect> = HashMap::new();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let exe = std::env::current_exe().unwrap();
    let mut total_acked = 0usize;
    for round in 0..4u64 {
        // Odd rounds: the NFS server dies (kill -9) under the writer first.
        let kill_server = round % 2 == 1;
        let mut child = Writer(
            Command::new(&exe)
                .args([
                    "--exact",
                    "nfs_storm_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &spec)
                .env("PAGEWISE_NFS_STORM_BASE", ((round + 1) << 32).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn storm child"),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(at) = line.find("STORM ") {
                    if tx.send(line[at..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let l = rx
                .recv_timeout(left)
                .expect("storm child ready within 60 s");
            if l == "STORM R" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        if kill_server {
            server.kill();
            std::thread::sleep(Duration::from_millis(200));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.0.wait().unwrap();
        reader.join().unwrap();
        if kill_server {
            server.restart();
        }
        let mut pending: Option<(u64, Vec<u64>, bool)> = None;
        let mut n_acked = 0;
        for line in rx.try_iter() {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f[1] {
                "W" | "D" => {
                    let pages = f[3].split(',').map(|p| p.parse().unwrap()).collect();
                    pending = Some((f[2].parse().unwrap(), pages, f[1] == "D"));
                }
                "A" => {
                    let (v, pages, removed) = pending.take().expect("ack without request");
                    assert_eq!(v, f[2].parse::<u64>().unwrap());
                    for p in pages {
                        acked.insert(p, if removed { None } else { Some(v) });
                    }
                    n_acked += 1;
                }
                "E" => {}
                _ => panic!("unexpected line {line}"),
            }
        }
        total_acked += n_acked;
        let report = SwapDevice::fsck_backend(nfs(&spec, false)).unwrap();
        assert!(
            report.is_clean(),
            "round {round}: fsck found damage: {report:#?}"
        );
        let mut dev =
            SwapDevice::open(nfs(&spec, false), OpenOptions::read_only("checker")).unwrap();
        let mut from_in_flight = 0;
        for page in 0..PAGES {
            let got = read(&mut dev, page);
            let want = |e: Expect| e.map(|v| content(page, v));
            let last = acked.get(&page).copied().flatten();
            if got == want(last) {
                continue;
            }
            let in_flight = pending.as_ref().filter(|(_, ps, _)| ps.contains(&page));
            let ok = in_flight
                .is_some_and(|(v, _, removed)| got == want(if *removed { None } else { Some(*v) }));
            assert!(
                ok,
                "round {round}: page {page} holds neither its acknowledged version {last:?} nor the in-flight request {in_flight:?}"
            );
            from_in_flight += 1;
        }
        if from_in_flight > 0 {
            let (v, pages, removed) = pending.unwrap();
            for p in pages {
                let newer = if removed { None } else { Some(content(p, v)) };
                if read(&mut dev, p) == newer {
                    acked.insert(p, if removed { None } else { Some(v) });
                }
            }
        }
        eprintln!(
            "round {round} (server killed: {kill_server}): {n_acked} requests acknowledged, {from_in_flight} pages from the request in flight"
        );
    }
    assert!(
        total_acked > 20,
        "the writer made too little progress ({total_acked} requests)"
    );
}
