//! `release_ownership` on a handle that stays in use (the daemon, the evictor and the fault
//! loop's source share one `SwapDevice`).

use super::super::tests::{create, open_rw, page, PS};
use crate::backend::mem::MemStore;
use crate::format::CodecPolicy;
use crate::SwapError;

#[test]
fn release_ownership_keeps_reads_refuses_writes_and_lets_another_host_acquire() {
    let store = MemStore::new();
    let mut a = create(&store, 32, CodecPolicy::Lz4);
    for p in 0..8 {
        a.write_pages(&[(p, &page((p % 3) as u8, p))]).unwrap();
    }
    // A write begun and never polled is finished (acknowledged) by the release.
    let t = a
        .begin_write(a.encoder().encode(&[(9, &page(1, 9))]).unwrap())
        .unwrap();
    // Reads in flight across the release.
    for p in 0..4 {
        a.submit_read(p, p).unwrap();
    }
    let gen_before = a.generation();
    a.release_ownership().unwrap();
    assert!(a.is_released());
    assert_eq!(a.owner(), ("host-a", false));
    assert_eq!(a.generation(), gen_before + 1);
    assert!(
        a.poll_write(&t, false).unwrap(),
        "release finished the pending write"
    );
    let mut out = Vec::new();
    a.poll_reads(&mut out, 4).unwrap();
    assert_eq!(out.len(), 4);
    for r in out {
        let got = r.result.unwrap().to_vec(PS).unwrap();
        assert_eq!(got, page((r.page % 3) as u8, r.page), "page {}", r.page);
    }
    // Reads after the release keep working.
    for p in 4..8 {
        let got = a.read_page(p).unwrap().to_vec(PS).unwrap();
        assert_eq!(got, page((p % 3) as u8, p));
    }
    // Every write-path call is refused, naming the state.
    let err = a.write_pages(&[(1, &page(1, 100))]).unwrap_err();
    assert!(
        matches!(&err, SwapError::Released { host, generation } if host == "host-a" && *generation == gen_before + 1),
        "{err}"
    );
    assert!(err.to_string().contains("released"), "{err}");
    let enc = a.encoder().encode(&[(1, &page(1, 100))]).unwrap();
    assert!(matches!(
        a.begin_write(enc),
        Err(SwapError::Released { .. })
    ));
    assert!(matches!(
        a.remove_pages(&[1]),
        Err(SwapError::Released { .. })
    ));
    assert!(matches!(a.flush(), Err(SwapError::Released { .. })));
    assert!(matches!(a.checkpoint(), Err(SwapError::Released { .. })));
    assert!(matches!(
        a.release_ownership(),
        Err(SwapError::Released { .. })
    ));
    // Another host acquires it and sees every acknowledged page, including the one the
    // release finished.
    let mut b = open_rw(&store, "host-b").unwrap();
    assert_eq!(b.owner(), ("host-b", true));
    assert_eq!(b.generation(), gen_before + 2);
    assert_eq!(b.read_page(9).unwrap().to_vec(PS).unwrap(), page(1, 9));
    b.write_pages(&[(1, &page(2, 200))]).unwrap();
    // The released handle still refuses, and its reads of pages B did not touch still work.
    assert!(matches!(
        a.write_pages(&[(2, &page(1, 2))]),
        Err(SwapError::Released { .. })
    ));
    assert_eq!(a.read_page(5).unwrap().to_vec(PS).unwrap(), page(2, 5));
    // `close` of a released handle writes nothing (B's checkpoints stay valid).
    a.close().unwrap();
    b.close().unwrap();
    let mut b = open_rw(&store, "host-b").unwrap();
    assert_eq!(b.read_page(1).unwrap().to_vec(PS).unwrap(), page(2, 200));
    assert!(b.fsck().unwrap().is_clean());
}
