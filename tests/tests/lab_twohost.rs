//! The two-host lab script: two hosts and a store in namespaces, a tbf-shaped migration link
//! that really limits throughput, storage reachable from both hosts, nothing left after
//! `down` (or after a failed `up`).

mod twohost;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use twohost::{netns_exists, run_script, TwoHost};

#[test]
fn the_link_is_shaped_the_store_is_reachable_and_down_removes_everything() {
    let lab = TwoHost::up("pwt1", "80mbit");
    // The store answers both hosts on the storage network.
    let store = lab.on("store", || {
        let l = TcpListener::bind("10.77.1.254:7000").unwrap();
        for _ in 0..2 {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"store").unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    for host in ["src", "dst"] {
        let got = lab
            .on(host, || {
                let mut s = TcpStream::connect("10.77.1.254:7000").unwrap();
                let mut b = String::new();
                s.read_to_string(&mut b).unwrap();
                b
            })
            .join()
            .unwrap();
        assert_eq!(got, "store", "from {host}");
    }
    store.join().unwrap();
    // 80 Mbit/s is 10 MB/s: two seconds of sending must land near it, far below loopback.
    let sink = lab.on("dst", || {
        let l = TcpListener::bind("10.77.0.2:7001").unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut n = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let since = Instant::now();
        loop {
            match s.read(&mut buf).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        n as f64 / since.elapsed().as_secs_f64() / 1e6
    });
    std::thread::sleep(Duration::from_millis(200));
    lab.on("src", || {
        let mut s = TcpStream::connect("10.77.0.2:7001").unwrap();
        let buf = vec![7u8; 1 << 16];
        let since = Instant::now();
        while since.elapsed() < Duration::from_secs(2) {
            s.write_all(&buf).unwrap();
        }
    })
    .join()
    .unwrap();
    let mbps = sink.join().unwrap();
    assert!(
        (6.0..=12.0).contains(&mbps),
        "shaped link carried {mbps:.1} MB/s, expected ~10"
    );
    drop(lab);
    for ns in ["pwt1-src", "pwt1-dst", "pwt1-store"] {
        assert!(!netns_exists(ns), "{ns} left behind");
    }
}

#[test]
fn a_failed_up_leaves_nothing_and_says_why() {
    let (ok, text) = run_script(&["up", "--prefix", "pwt2", "--rate", "not-a-rate"]);
    assert!(!ok, "up with a bad rate succeeded: {text}");
    for ns in ["pwt2-src", "pwt2-dst", "pwt2-store"] {
        assert!(!netns_exists(ns), "{ns} left behind after a failed up");
    }
    let (ok, text) = run_script(&["up", "--prefix", "bad/prefix"]);
    assert!(!ok);
    assert!(text.contains("--prefix must be letters"), "{text}");
}
