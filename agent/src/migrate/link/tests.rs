use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Link;
use crate::migrate::tls::testpki::Pki;
use crate::migrate::tls::{server_name, TlsConfig};

/// Two ends of one loopback connection: (dialler, acceptor), TLS or plain.
fn pair(tls: bool) -> (Link, Link) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("link test CA");
    let a = pki.host(dir.path(), "a", &["127.0.0.1"]);
    let b = pki.host(dir.path(), "b", &["127.0.0.1"]);
    let ca = TlsConfig::from_files(&a.cert, &a.key, &a.ca).unwrap();
    let cb = TlsConfig::from_files(&b.cert, &b.key, &b.ca).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        if tls {
            Link::accept_tls(s, &cb).unwrap()
        } else {
            Link::plain(s)
        }
    });
    let s = TcpStream::connect(addr).unwrap();
    let client = if tls {
        Link::connect_tls(s, &ca, server_name(&addr.to_string()).unwrap()).unwrap()
    } else {
        Link::plain(s)
    };
    (client, server.join().unwrap())
}

/// Byte `i` of stream `seed`.
fn pattern(seed: u64, i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(seed) >> 29) as u8
}

/// Write `total` bytes of `seed` in chunks of changing sizes.
fn send(mut w: Link, seed: u64, total: u64) -> Link {
    let mut sent = 0u64;
    let mut buf = vec![0u8; 300_000];
    let mut step = 1usize;
    while sent < total {
        let n = (step % buf.len()).max(1).min((total - sent) as usize);
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(seed, sent + k as u64);
        }
        w.write_all(&buf[..n]).unwrap();
        sent += n as u64;
        step = step * 7 + 13;
    }
    w.flush().unwrap();
    w
}

/// Read `total` bytes and check they are `seed`'s.
fn receive(mut r: Link, seed: u64, total: u64) -> Link {
    let mut got = 0u64;
    let mut buf = vec![0u8; 70_000];
    while got < total {
        let want = buf.len().min((total - got) as usize);
        let n = r.read(&mut buf[..want]).unwrap();
        assert!(n > 0, "the stream ended after {got} of {total} bytes");
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(seed, got + k as u64), "byte {}", got + k as u64);
        }
        got += n as u64;
    }
    r
}

/// Each end writes `total` bytes from one thread while another thread of the same end reads
/// the other's `total` bytes.
fn both_ways_at_once(tls: bool, total: u64) {
    let (a, b) = pair(tls);
    assert_eq!(a.is_tls(), tls);
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let threads = [
        std::thread::spawn(move || drop(send(a, 1, total))),
        std::thread::spawn(move || drop(receive(a2, 2, total))),
        std::thread::spawn(move || drop(send(b, 2, total))),
        std::thread::spawn(move || drop(receive(b2, 1, total))),
    ];
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_tls_link_carries_large_transfers_both_ways_at_once() {
    both_ways_at_once(true, 24 << 20);
}

#[test]
fn a_plain_link_does_the_same() {
    both_ways_at_once(false, 8 << 20);
}

#[test]
fn a_reader_blocked_on_a_silent_peer_never_stops_the_writer() {
    let (a, b) = pair(true);
    let blocked = Arc::new(AtomicBool::new(true));
    let reader = {
        let (mut r, blocked) = (a.try_clone().unwrap(), blocked.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 3];
            r.read_exact(&mut buf).unwrap();
            blocked.store(false, Ordering::Release);
            buf
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // 8 MiB does not fit in the socket buffers: the writer needs the peer to read while our
    // reader waits in its read.
    let start = Instant::now();
    let peer = std::thread::spawn(move || receive(b, 5, 8 << 20));
    let a = send(a, 5, 8 << 20);
    let mut b = peer.join().unwrap();
    assert!(blocked.load(Ordering::Acquire), "the reader returned early");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    b.write_all(b"end").unwrap();
    b.flush().unwrap();
    assert_eq!(&reader.join().unwrap(), b"end");
    drop(a);
}

#[test]
fn a_read_timeout_leaves_the_tls_link_usable() {
    let (a, mut b) = pair(true);
    a.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut r = a.try_clone().unwrap();
    let mut buf = [0u8; 4];
    let e = r.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    b.write_all(b"late").unwrap();
    b.flush().unwrap();
    r.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"late");
}

#[test]
fn shutting_down_the_write_side_ends_the_peers_reads_and_keeps_ours() {
    for tls in [true, false] {
        let (mut a, mut b) = pair(tls);
        a.write_all(b"last words").unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words", "tls {tls}");
        b.write_all(b"reply").unwrap();
        b.flush().unwrap();
        drop(b);
        let mut reply = Vec::new();
        a.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"reply", "tls {tls}");
    }
}

#[test]
fn addresses_and_socket_options_are_the_sockets() {
    let (a, b) = pair(true);
    assert_eq!(a.peer_addr().unwrap(), b.local_addr().unwrap());
    assert_eq!(a.local_addr().unwrap(), b.peer_addr().unwrap());
    a.set_nodelay(true).unwrap();
    a.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(format!("{a:?}").starts_with("Link(tls 127.0.0.1:"), "{a:?}");
}
