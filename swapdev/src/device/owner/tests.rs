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

fn fresh(store: &MemStore) -> Box<dyn crate::backend::Backend> {
    Box::new(crate::backend::mem::MemBackend::new(store.clone()))
}

/// A released device written to with 8 pages; the generation it was released at.
fn released_with_pages(store: &MemStore) -> (crate::SwapDevice, u64) {
    let mut a = create(store, 32, CodecPolicy::Lz4);
    for p in 0..8 {
        a.write_pages(&[(p, &page((p % 3) as u8, p))]).unwrap();
    }
    a.release_ownership().unwrap();
    let g = a.generation();
    (a, g)
}

#[test]
fn reclaim_of_an_unowned_device_nobody_wrote_to_makes_it_writable_again() {
    let store = MemStore::new();
    let (mut a, released_at) = released_with_pages(&store);
    // A hand-off that happened and was undone: the receiver acquired it and released it.
    let b = open_rw(&store, "host-b").unwrap();
    b.release().unwrap();
    let got = a.reclaim(fresh(&store)).unwrap();
    assert_eq!(got.taken_from, None);
    assert_eq!(got.generation, released_at + 3);
    assert_eq!(a.owner(), ("host-a", true));
    assert!(!a.is_released());
    a.write_pages(&[(20, &page(2, 20))]).unwrap();
    a.close().unwrap();
    let mut a = open_rw(&store, "host-a").unwrap();
    for p in 0..8 {
        assert_eq!(
            a.read_page(p).unwrap().to_vec(PS).unwrap(),
            page((p % 3) as u8, p)
        );
    }
    assert_eq!(a.read_page(20).unwrap().to_vec(PS).unwrap(), page(2, 20));
    assert!(a.fsck().unwrap().is_clean());
}

#[test]
fn reclaim_takes_it_from_the_one_host_that_acquired_it_and_fences_that_host() {
    let store = MemStore::new();
    let (mut a, released_at) = released_with_pages(&store);
    // The receiver acquired it and died (or gave up) without releasing it.
    let mut b = open_rw(&store, "host-b").unwrap();
    let got = a.reclaim(fresh(&store)).unwrap();
    assert_eq!(got.taken_from.as_deref(), Some("host-b"));
    assert_eq!(got.generation, released_at + 2);
    // The receiver's ownership is stale: what re-reads the header refuses.
    assert!(matches!(b.checkpoint(), Err(SwapError::Fenced { .. })));
    assert!(
        b.release().is_err(),
        "a fenced host cannot release what it lost"
    );
    a.write_pages(&[(3, &page(1, 300))]).unwrap();
    a.close().unwrap();
    let mut a = open_rw(&store, "host-a").unwrap();
    assert_eq!(a.read_page(3).unwrap().to_vec(PS).unwrap(), page(1, 300));
    assert_eq!(a.read_page(4).unwrap().to_vec(PS).unwrap(), page(1, 4));
    assert!(a.fsck().unwrap().is_clean());
}

#[test]
fn reclaim_refuses_a_device_written_to_or_passed_on_since_and_stays_released() {
    // Another host wrote a page: the handle's index would be wrong.
    let store = MemStore::new();
    let (mut a, _) = released_with_pages(&store);
    let mut b = open_rw(&store, "host-b").unwrap();
    b.write_pages(&[(1, &page(2, 100))]).unwrap();
    b.release().unwrap();
    let err = a.reclaim(fresh(&store)).unwrap_err();
    assert!(
        matches!(err, SwapError::ChangedWhileReleased { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("log moved on"), "{err}");
    assert!(a.is_released());
    assert!(matches!(
        a.write_pages(&[(2, &page(1, 2))]),
        Err(SwapError::Released { .. })
    ));
    // Owned by a host that is not the one acquire after the release: refused.
    let store = MemStore::new();
    let (mut a, _) = released_with_pages(&store);
    open_rw(&store, "host-b").unwrap().release().unwrap();
    let _c = open_rw(&store, "host-c").unwrap();
    let err = a.reclaim(fresh(&store)).unwrap_err();
    assert!(
        matches!(&err, SwapError::OwnedByOther { owner, .. } if owner == "host-c"),
        "{err}"
    );
    assert!(a.is_released());
    // Only a released handle reclaims.
    let store = MemStore::new();
    let mut a = create(&store, 32, CodecPolicy::Lz4);
    let err = a.reclaim(fresh(&store)).unwrap_err();
    assert!(matches!(err, SwapError::NotReleased { .. }), "{err}");
}
