//! Writes begun with `begin_write` and finished by `poll_write` (or by another write-path
//! call), with reads going on meanwhile, on the in-memory backend (its requests stay in
//! flight until `complete`, so the middle of a write is observable).

use super::super::tests::{create, open_rw, page, PS};
use super::*;
use crate::backend::mem::MemStore;
use crate::format::CodecPolicy;
use crate::{PageData, PageState, SwapError};

fn read(dev: &mut SwapDevice, p: u64) -> Option<Vec<u8>> {
    dev.submit_read(p, 99).unwrap();
    let mut out = Vec::new();
    dev.poll_reads(&mut out, 1).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap().result.unwrap().to_vec(PS)
}

fn finish(dev: &mut SwapDevice, t: &WriteTicket) -> usize {
    for polls in 1..10_000 {
        if dev.poll_write(t, false).unwrap() {
            return polls;
        }
    }
    panic!("write never finished");
}

#[test]
fn begun_write_is_invisible_until_acknowledged_and_reads_go_on_meanwhile() {
    let store = MemStore::new();
    let mut dev = create(&store, 64, CodecPolicy::Lz4);
    let (a, b, c) = (page(1, 1), page(2, 2), page(1, 3));
    dev.write_pages(&[(1, &a)]).unwrap();
    let enc = dev.encoder().encode(&[(1, &b), (2, &c)]).unwrap();
    let t = dev.begin_write(enc).unwrap();
    // The batches are in flight: the index still names the old content.
    assert_eq!(read(&mut dev, 1).as_deref(), Some(&a[..]));
    assert_eq!(dev.page_state(2), PageState::Absent);
    finish(&mut dev, &t);
    assert_eq!(read(&mut dev, 1).as_deref(), Some(&b[..]));
    assert_eq!(read(&mut dev, 2).as_deref(), Some(&c[..]));
    let err = dev.poll_write(&t, false).unwrap_err();
    assert!(matches!(err, SwapError::InvalidOption(_)), "{err}");
    // Acknowledged means it survives a crash (drop without close) and a reopen.
    drop(dev);
    let mut dev = open_rw(&store, "host-a").unwrap();
    assert_eq!(read(&mut dev, 2).as_deref(), Some(&c[..]));
}

#[test]
fn another_write_finishes_a_pending_one_and_its_owner_gets_the_result() {
    let store = MemStore::new();
    let mut dev = create(&store, 64, CodecPolicy::Raw);
    let (a, d) = (page(2, 5), page(2, 6));
    let t = dev
        .begin_write(dev.encoder().encode(&[(3, &a)]).unwrap())
        .unwrap();
    dev.write_pages(&[(4, &d)]).unwrap();
    assert!(
        dev.poll_write(&t, false).unwrap(),
        "finished by write_pages"
    );
    assert_eq!(read(&mut dev, 3).as_deref(), Some(&a[..]));
    assert_eq!(read(&mut dev, 4).as_deref(), Some(&d[..]));
    // A flush and a checkpoint finish a pending write too.
    let t = dev
        .begin_write(dev.encoder().encode(&[(5, &d)]).unwrap())
        .unwrap();
    dev.checkpoint().unwrap();
    assert!(dev.poll_write(&t, false).unwrap());
    assert!(matches!(dev.read_page(5).unwrap(), PageData::Data(b) if b[..] == d[..]));
}

#[test]
fn pages_encoded_for_another_format_are_refused() {
    let store = MemStore::new();
    let mut dev = create(&store, 64, CodecPolicy::Lz4);
    let other = create(&MemStore::new(), 32, CodecPolicy::Lz4);
    let enc = other.encoder().encode(&[(1, &page(1, 1))]).unwrap();
    let err = dev.begin_write(enc.clone()).unwrap_err();
    assert!(matches!(err, SwapError::InvalidOption(_)), "{err}");
    let err = dev.write_encoded(enc).unwrap_err();
    assert!(matches!(err, SwapError::InvalidOption(_)), "{err}");
}

/// Many rewrites through begun writes on a small device, so their jobs take checkpoint
/// steps (space runs short), with a read of every page of the batch in flight
/// during each: reads always see the last acknowledged content, fsck stays clean.
#[test]
fn rewrites_through_begun_writes_checkpoint_with_reads_in_flight() {
    let store = MemStore::new();
    let cap = 512u64;
    let mut dev = create(&store, cap, CodecPolicy::Lz4);
    let mut model: Vec<Option<Vec<u8>>> = vec![None; cap as usize];
    let mut x = 11u64;
    let mut pending_after_begin = 0;
    for round in 0..160u64 {
        let mut batch = Vec::new();
        for i in 0..128u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let p = (x >> 33) % cap;
            batch.push((p, page((i % 3) as u8, round * 1000 + p)));
        }
        let refs: Vec<(u64, &[u8])> = batch.iter().map(|(p, d)| (*p, &d[..])).collect();
        let t = dev
            .begin_write(dev.encoder().encode(&refs).unwrap())
            .unwrap();
        for &(p, _) in batch.iter().take(8) {
            dev.submit_read(p, p).unwrap();
        }
        pending_after_begin += usize::from(dev.write_pending());
        let mut polls = 0;
        while !dev.poll_write(&t, false).unwrap() {
            polls += 1;
            assert!(polls < 10_000, "write never finished");
        }
        let mut out = Vec::new();
        dev.poll_reads(&mut out, 8).unwrap();
        for r in out {
            // Submitted before the write was acknowledged: the content before it.
            let got = r.result.unwrap().to_vec(PS);
            assert_eq!(got, model[r.page as usize].clone(), "page {}", r.page);
        }
        for (p, d) in batch {
            model[p as usize] = Some(d);
        }
    }
    assert!(
        pending_after_begin > 150,
        "begin_write finished the write itself: {pending_after_begin}"
    );
    let s = dev.inspect();
    // Space ran short several times: the jobs took checkpoint steps.
    assert!(s.checkpoint_seq >= 3, "{s:?}");
    assert!(dev.fsck().unwrap().is_clean());
    for p in 0..cap {
        let got = dev.read_page(p).unwrap().to_vec(PS);
        let want = model[p as usize].clone();
        assert_eq!(got, want, "page {p}");
    }
}
