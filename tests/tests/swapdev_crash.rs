//! kill -9 during a write storm, several rounds, on a real file through io_uring (O_DIRECT).
//!
//! The writer is this test binary run again as a child (`storm_child`, enabled by an env
//! var): it opens the device read-write, then loops writing random page sets (zero,
//! text-like and random pages) and removing pages, printing `W`/`D` before each request
//! and `A` when it is acknowledged. The parent SIGKILLs it at a random moment, then checks
//! that the device passes fsck and that every page holds its last acknowledged content or
//! the content of the request in flight.
//!
//! Run: `cargo test -p pagewise-tests --test swapdev_crash` (file and qemu-nbd variants)

#[path = "common/nbd_server.rs"]
mod nbd_server;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::{ChecksumKind, CodecPolicy, CreateOptions, OpenOptions, PageData, SwapDevice};

const PS: usize = 4096;
const PAGES: u64 = 1024;
const CHILD_ENV: &str = "PAGEWISE_STORM_DEVICE";

/// The content written for `page` at `version`: kinds rotate between zero, text-like and
/// random, so every codec path is exercised.
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
            v[..8].copy_from_slice(&page.to_le_bytes());
            v[8..16].copy_from_slice(&version.to_le_bytes());
            v
        }
    }
}

/// A file path (io_uring, O_DIRECT) or an NBD URI.
fn backend(spec: &str, create: bool) -> Box<dyn swapdev::backend::Backend> {
    let opts = SpecOptions {
        create,
        ..SpecOptions::default()
    };
    open_backend(spec, &opts).expect("open backend")
}

/// The writer. Does nothing unless started by `kill9_write_storm`.
#[test]
fn storm_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let base: u64 = std::env::var("PAGEWISE_STORM_BASE")
        .unwrap()
        .parse()
        .unwrap();
    let mut dev = SwapDevice::open(
        backend(&path, false),
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
        if version.is_multiple_of(11) {
            writeln!(out, "STORM D {version} {list}").unwrap();
            out.flush().unwrap();
            dev.remove_pages(&pages).expect("storm: remove");
        } else {
            let data: Vec<(u64, Vec<u8>)> =
                pages.iter().map(|&p| (p, content(p, version))).collect();
            let refs: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, &d[..])).collect();
            writeln!(out, "STORM W {version} {list}").unwrap();
            out.flush().unwrap();
            dev.write_pages(&refs).expect("storm: write");
        }
        writeln!(out, "STORM A {version}").unwrap();
        out.flush().unwrap();
        if version.is_multiple_of(40) {
            dev.flush().expect("storm: flush");
        }
    }
}

/// What a page may hold: `None` = not stored, `Some(v)` = content(page, v).
type Expect = Option<u64>;

#[test]
fn kill9_write_storm() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let path = dir.path().join("storm.swap");
    storm_rounds(path.to_str().unwrap(), 6);
}

/// The same storm against a qemu-nbd export: the killed writer's requests may be cut
/// anywhere on the socket.
#[test]
fn kill9_write_storm_over_nbd() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    nbd_server::require_qemu_nbd();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("storm.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let server = nbd_server::NbdServer::unix(&img, &dir.path().join("nbd.sock"), "storm", &[]);
    storm_rounds(&server.spec(), 3);
}

fn storm_rounds(path_s: &str, rounds: u64) {
    let dev = SwapDevice::create(
        backend(path_s, true),
        CreateOptions {
            vm_uuid: uuid_for_test(),
            page_size: PS as u32,
            capacity_pages: PAGES,
            host_id: "storm-host".into(),
            codec: CodecPolicy::Lz4,
            checksum: ChecksumKind::Crc32c,
            force: false,
        },
    )
    .unwrap();
    dev.close().unwrap();
    let mut acked: HashMap<u64, Expect> = HashMap::new();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let exe = std::env::current_exe().unwrap();
    let mut total_acked = 0usize;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "storm_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, path_s)
            .env("PAGEWISE_STORM_BASE", ((round + 1) << 32).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn storm child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test storm_child ... " on the same line first.
                if let Some(at) = line.find("STORM ") {
                    if tx.send(line[at..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        // Wait until the writer has opened (and so recovered) the device.
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
        std::thread::sleep(Duration::from_millis(rng.random_range(150..900)));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        // Replay the transcript: acknowledged requests update `acked`; the last request
        // without an acknowledgement is in flight.
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
                _ => panic!("unexpected line {line}"),
            }
        }
        total_acked += n_acked;
        // fsck must pass.
        let report = SwapDevice::fsck_backend(backend(path_s, false)).unwrap();
        assert!(
            report.is_clean(),
            "round {round}: fsck found damage: {report:#?}"
        );
        // Every page: last acknowledged content, or the in-flight request's.
        let mut dev =
            SwapDevice::open(backend(path_s, false), OpenOptions::read_only("checker")).unwrap();
        let mut from_in_flight = 0;
        for page in 0..PAGES {
            let got = match dev.read_page(page).unwrap() {
                PageData::NotStored => None,
                d => d.to_vec(PS),
            };
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
            // The in-flight request reached the device: it is now the page's content.
            from_in_flight += 1;
        }
        if from_in_flight > 0 {
            let (v, pages, removed) = pending.unwrap();
            // Pages of the torn request may hold either; record what they actually hold.
            for p in pages {
                let got = match dev.read_page(p).unwrap() {
                    PageData::NotStored => None,
                    d => d.to_vec(PS),
                };
                let newer = if removed { None } else { Some(content(p, v)) };
                if got == newer {
                    acked.insert(p, if removed { None } else { Some(v) });
                }
            }
        }
        let s = dev.inspect();
        eprintln!(
            "round {round}: {n_acked} requests acknowledged, {from_in_flight} pages from the request in flight; {} pages stored, {} zero, {} of {} segments free",
            s.pages_stored, s.pages_zero, s.segments_free, s.segments_total
        );
    }
    assert!(
        total_acked > 20,
        "the writer made too little progress ({total_acked} requests)"
    );
}

fn uuid_for_test() -> swapdev::Uuid {
    swapdev::Uuid::from_u128(0x5a5a)
}
