//! Transmission-phase tests: pipelined requests against a scripted server on a socketpair.

use super::super::proto::*;
use super::super::*;
use super::FLAGS_RW;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

/// A read-write backend of `size` bytes whose server end is returned for the test to play.
fn backend_on_pair(size: u64, max_block: u32) -> (NbdBackend, UnixStream) {
    let (client, srv) = UnixStream::pair().unwrap();
    client.set_nonblocking(true).unwrap();
    let info = ExportInfo {
        name: "mem".into(),
        size,
        flags: FLAGS_RW,
        min_block: 1,
        preferred_block: 4096,
        max_block,
    };
    let b = NbdBackend::with_stream(
        NbdAddress::Unix("scripted".into()),
        info,
        NbdOptions::default(),
        Stream::Unix(client),
    );
    (b, srv)
}

fn serve_reversed(mut s: UnixStream, size: usize, batch: usize) -> Vec<u8> {
    let mut mem = vec![0u8; size];
    let mut pending = Vec::new();
    loop {
        let mut h = [0u8; REQUEST_LEN];
        if s.read_exact(&mut h).is_err() {
            return mem;
        }
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            REQUEST_MAGIC
        );
        let cmd = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = &h[8..16];
        let off = u64::from_be_bytes(h[16..24].try_into().unwrap()) as usize;
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
        let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(cookie);
        match cmd {
            0 => reply.extend_from_slice(&mem[off..off + len]),
            1 => s.read_exact(&mut mem[off..off + len]).unwrap(),
            2 => return mem,
            3 => {}
            4 => mem[off..off + len].fill(0),
            other => panic!("unexpected command {other}"),
        }
        pending.push(reply);
        if pending.len() >= batch {
            for r in pending.drain(..).rev() {
                s.write_all(&r).unwrap();
            }
        }
    }
}

fn scripted_backend(
    size: u64,
    max_block: u32,
    batch: usize,
) -> (NbdBackend, thread::JoinHandle<Vec<u8>>) {
    let (b, srv) = backend_on_pair(size, max_block);
    let t = thread::spawn(move || serve_reversed(srv, size as usize, batch));
    (b, t)
}

#[test]
fn out_of_order_replies_and_split_requests() {
    // max_block 4096 splits each 16 KiB request into 4 commands; replies come reversed.
    let (mut b, t) = scripted_backend(1 << 20, 4096, 4);
    for i in 0..8u64 {
        let buf = AlignedBuf::from_slice(&vec![i as u8 + 1; 16384]);
        b.submit(IoRequest {
            tag: i,
            offset: i * 16384,
            op: IoOp::Write { buf },
        })
        .unwrap();
    }
    let mut out = Vec::new();
    b.complete(&mut out, 8).unwrap();
    assert_eq!(out.len(), 8);
    assert!(out.iter().all(|c| c.result.is_ok()));
    out.clear();
    for i in 0..8u64 {
        let op = IoOp::Read {
            buf: AlignedBuf::new(16384),
        };
        b.submit(IoRequest {
            tag: i,
            offset: i * 16384,
            op,
        })
        .unwrap();
    }
    b.complete(&mut out, 8).unwrap();
    for c in &out {
        let buf = c.result.as_ref().unwrap().as_ref().unwrap();
        assert!(
            buf.iter().all(|&x| x == c.tag as u8 + 1),
            "request {}",
            c.tag
        );
    }
    assert_eq!(b.in_flight(), 0);
    drop(b); // sends NBD_CMD_DISC; the scripted server returns its memory.
    let mem = t.join().unwrap();
    assert!(mem[..16384].iter().all(|&x| x == 1));
}

#[test]
fn server_hangup_fails_outstanding_requests() {
    let (mut b, srv) = backend_on_pair(1 << 20, 1 << 20);
    let t = thread::spawn(move || {
        let mut s = srv;
        let mut h = [0u8; REQUEST_LEN];
        s.read_exact(&mut h).unwrap();
        // Hang up without replying.
    });
    b.submit(IoRequest {
        tag: 5,
        offset: 0,
        op: IoOp::Read {
            buf: AlignedBuf::new(4096),
        },
    })
    .unwrap();
    let mut out = Vec::new();
    b.complete(&mut out, 1).unwrap();
    t.join().unwrap();
    assert_eq!(out[0].tag, 5);
    let err = out[0].result.as_ref().unwrap_err().to_string();
    assert!(err.contains("closed the connection"), "{err}");
    let err = b
        .submit(IoRequest {
            tag: 6,
            offset: 0,
            op: IoOp::Flush,
        })
        .unwrap_err();
    assert!(err.to_string().contains("closed the connection"), "{err}");
}

#[test]
fn requests_outside_the_export_are_refused() {
    let (mut b, t) = scripted_backend(8192, 4096, 1);
    let err = b
        .submit(IoRequest {
            tag: 1,
            offset: 4096,
            op: IoOp::Read {
                buf: AlignedBuf::new(8192),
            },
        })
        .unwrap_err();
    let msg = crate::error_chain(&err);
    assert!(
        msg.contains("past the end of NBD export 'mem' (8192 bytes)"),
        "{msg}"
    );
    let err = b.grow(1 << 20).unwrap_err();
    assert!(
        crate::error_chain(&err).contains("fixed size of 8192 bytes"),
        "{err}"
    );
    assert!(b.grow(8192).is_ok());
    drop(b);
    t.join().unwrap();
}

#[test]
fn backend_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<NbdBackend>();
}

#[test]
fn server_error_replies_fail_only_their_request() {
    let (mut b, srv) = backend_on_pair(1 << 20, 1 << 20);
    // Reads at offset 0 fail with EIO, writes fail with ENOSPC; other reads succeed.
    let t = thread::spawn(move || {
        let mut s = srv;
        loop {
            let mut h = [0u8; REQUEST_LEN];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let cmd = u16::from_be_bytes(h[6..8].try_into().unwrap());
            let off = u64::from_be_bytes(h[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
            if cmd == Command::Disc as u16 {
                return;
            }
            let error: u32 = match cmd {
                0 if off == 0 => 5,
                1 => {
                    let mut sink = vec![0u8; len];
                    s.read_exact(&mut sink).unwrap();
                    28
                }
                _ => 0,
            };
            let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend_from_slice(&error.to_be_bytes());
            reply.extend_from_slice(&h[8..16]);
            if cmd == 0 && error == 0 {
                reply.extend(std::iter::repeat_n(0x5A, len));
            }
            s.write_all(&reply).unwrap();
        }
    });
    let read = |tag, offset| IoRequest {
        tag,
        offset,
        op: IoOp::Read {
            buf: AlignedBuf::new(4096),
        },
    };
    b.submit(read(1, 0)).unwrap();
    b.submit(IoRequest {
        tag: 2,
        offset: 8192,
        op: IoOp::Write {
            buf: AlignedBuf::new(4096),
        },
    })
    .unwrap();
    b.submit(read(3, 4096)).unwrap();
    let mut out = Vec::new();
    b.complete(&mut out, 3).unwrap();
    out.sort_by_key(|c| c.tag);
    let e1 = crate::error_chain(out[0].result.as_ref().unwrap_err());
    assert!(
        e1.contains("read at offset 0") && e1.contains("os error 5"),
        "{e1}"
    );
    let e2 = crate::error_chain(out[1].result.as_ref().unwrap_err());
    assert!(
        e2.contains("write at offset 8192") && e2.contains("os error 28"),
        "{e2}"
    );
    let ok = out[2].result.as_ref().unwrap().as_ref().unwrap();
    assert!(ok.iter().all(|&x| x == 0x5A));
    drop(b);
    t.join().unwrap();
}
