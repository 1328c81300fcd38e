//! Device tests on the in-memory backend: round trips, crash recovery at every kind of
//! moment (a write budget cuts the store off mid-write), damage detection, ownership,
//! bounded space under rewrites.

use proptest::prelude::*;

use super::*;
use crate::backend::mem::{MemBackend, MemStore};
use crate::format::CodecPolicy;

pub(super) const PS: usize = 4096;

fn opts(cap: u64, codec: CodecPolicy) -> CreateOptions {
    CreateOptions {
        vm_uuid: uuid::Uuid::from_u128(42),
        page_size: PS as u32,
        capacity_pages: cap,
        host_id: "host-a".into(),
        codec,
        checksum: ChecksumKind::Crc32c,
        force: false,
    }
}

pub(super) fn create(store: &MemStore, cap: u64, codec: CodecPolicy) -> SwapDevice {
    SwapDevice::create(Box::new(MemBackend::new(store.clone())), opts(cap, codec)).unwrap()
}

pub(super) fn open_rw(store: &MemStore, host: &str) -> Result<SwapDevice> {
    SwapDevice::open(
        Box::new(MemBackend::new(store.clone())),
        OpenOptions::read_write(host, true, false),
    )
}

/// Page content kinds: 0 zero, 1 text-like, 2 random, seeded by `v`.
pub(super) fn page(kind: u8, v: u64) -> Vec<u8> {
    let mut x = v.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    match kind % 3 {
        0 => vec![0; PS],
        1 => format!("page {v} says hello; ")
            .bytes()
            .cycle()
            .take(PS)
            .collect(),
        _ => (0..PS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect(),
    }
}

fn read_all(dev: &mut SwapDevice) -> Vec<Option<Vec<u8>>> {
    let cap = dev.capacity_pages();
    for p in 0..cap {
        dev.submit_read(p, p * 10).unwrap();
    }
    let mut out = Vec::new();
    dev.poll_reads(&mut out, cap as usize).unwrap();
    assert_eq!(out.len() as u64, cap);
    let mut res = vec![None; cap as usize];
    for r in out {
        assert_eq!(r.tag, r.page * 10);
        res[r.page as usize] = r.result.unwrap().to_vec(PS);
    }
    res
}

#[test]
fn round_trip_states_and_reopen() {
    let store = MemStore::new();
    let mut dev = create(&store, 64, CodecPolicy::Lz4);
    let a = page(1, 1);
    let b = page(2, 2);
    let z = page(0, 0);
    dev.write_pages(&[(0, &a), (1, &b), (2, &z), (63, &a)])
        .unwrap();
    assert_eq!(dev.page_state(0), PageState::Stored);
    assert_eq!(dev.page_state(2), PageState::Zero);
    assert_eq!(dev.page_state(3), PageState::Absent);
    assert!(dev.contains(2) && !dev.contains(3));
    assert!(matches!(dev.read_page(3).unwrap(), PageData::NotStored));
    assert!(matches!(dev.read_page(2).unwrap(), PageData::Zero));
    assert_eq!(dev.read_page(1).unwrap().to_vec(PS).unwrap(), b);
    let s = dev.inspect();
    assert_eq!(
        (s.pages_stored, s.pages_zero, s.pages_compressed),
        (3, 1, 2)
    );
    assert!(s.compression_ratio > 1.0);
    dev.remove_pages(&[63]).unwrap();
    assert_eq!(dev.page_state(63), PageState::Absent);
    // Not closed: recovery must replay the log.
    drop(dev);
    let mut dev = open_rw(&store, "host-a").unwrap();
    let all = read_all(&mut dev);
    assert_eq!(all[0].as_deref(), Some(&a[..]));
    assert_eq!(all[1].as_deref(), Some(&b[..]));
    assert_eq!(all[2].as_deref(), Some(&z[..]));
    assert_eq!(all[63], None);
    assert!(dev.fsck().unwrap().is_clean());
    dev.close().unwrap();
    let report = SwapDevice::fsck_backend(Box::new(MemBackend::new(store.clone()))).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.pages_checked, 2);
}

#[test]
fn bad_requests_are_refused() {
    let store = MemStore::new();
    let mut dev = create(&store, 8, CodecPolicy::Raw);
    let err = dev.write_pages(&[(8, &page(1, 1))]).unwrap_err();
    assert!(
        err.to_string()
            .contains("page 8 is outside the device (capacity 8 pages)"),
        "{err}"
    );
    let err = dev.write_pages(&[(1, &[1u8; 100][..])]).unwrap_err();
    assert!(err.to_string().contains("100 bytes"), "{err}");
    assert!(dev.submit_read(9, 0).is_err());
    // Formatting again over an existing device is refused.
    let err = SwapDevice::create(
        Box::new(MemBackend::new(store.clone())),
        opts(8, CodecPolicy::Raw),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string()
            .contains("already holds a pagewise swap device"),
        "{err}"
    );
}

#[test]
fn flipped_payload_byte_is_caught_by_read_and_fsck() {
    let store = MemStore::new();
    let mut dev = create(&store, 16, CodecPolicy::Lz4);
    let t = page(1, 5);
    let r = page(2, 6);
    dev.write_pages(&[(5, &t), (6, &r)]).unwrap();
    let e = dev.index[6];
    dev.close().unwrap();
    store.corrupt(e.offset() + 100, 0x40);
    let mut dev = open_rw(&store, "host-a").unwrap();
    let err = dev.read_page(6).unwrap_err();
    assert!(err.to_string().starts_with("page 6 is corrupt"), "{err}");
    dev.submit_read(6, 1).unwrap();
    let mut out = Vec::new();
    dev.poll_reads(&mut out, 1).unwrap();
    assert!(out[0].result.is_err());
    assert_eq!(dev.read_page(5).unwrap().to_vec(PS).unwrap(), t);
    let rep = dev.fsck().unwrap();
    assert_eq!(rep.errors.len(), 1, "{rep:?}");
    assert!(rep.errors[0].contains("page 6"));
}

#[test]
fn bad_devices_give_clear_errors() {
    let open = |s: &MemStore| {
        SwapDevice::open(
            Box::new(MemBackend::new(s.clone())),
            OpenOptions::read_only("x"),
        )
        .err()
        .expect("open must fail")
        .to_string()
    };
    let store = MemStore::new();
    create(&store, 16, CodecPolicy::Raw).close().unwrap();
    let good = store.snapshot();
    // Truncated.
    store.truncate(100_000);
    assert!(open(&store).contains("truncated"), "{}", open(&store));
    // Wrong magic.
    let s2 = MemStore::new();
    MemBackend::new(s2.clone()).grow(good.len() as u64).unwrap();
    assert!(open(&s2).contains("bad magic"));
    // Index entry pointing outside the data area: hand-craft a checkpoint entry.
    let s3 = MemStore::new();
    let mut dev = create(&s3, 16, CodecPolicy::Raw);
    dev.index[3] = IndexEntry::stored(crate::format::Codec::Raw, 1 << 50, PS as u32, 0);
    dev.checkpoint().unwrap();
    drop(dev);
    let msg = open(&s3);
    assert!(
        msg.contains("index entry for page 3 points outside the data area"),
        "{msg}"
    );
    let rep = SwapDevice::fsck_backend(Box::new(MemBackend::new(s3.clone()))).unwrap();
    assert!(
        !rep.is_clean() && rep.errors[0].contains("page 3"),
        "{rep:?}"
    );
    // Corrupt checkpoint.
    let s4 = MemStore::new();
    let dev = create(&s4, 16, CodecPolicy::Raw);
    let off = dev.hdr.layout.ckpt_offset(dev.hdr.ckpt_slot);
    drop(dev);
    s4.corrupt(off + BLOCK + 5, 1);
    assert!(open(&s4).contains("checkpoint in slot"), "{}", open(&s4));
}

#[test]
fn ownership_hand_off_and_fencing() {
    let store = MemStore::new();
    let mut a = create(&store, 16, CodecPolicy::Raw);
    a.write_pages(&[(1, &page(1, 1))]).unwrap();
    // Another host cannot take it while owned.
    let err = open_rw(&store, "host-b").err().unwrap();
    assert_eq!(
        err.to_string(),
        "swap device is owned by host host-a (generation 1); release it there first or use --force"
    );
    a.release().unwrap();
    let mut b = open_rw(&store, "host-b").unwrap();
    assert_eq!(b.owner(), ("host-b", true));
    assert_eq!(b.generation(), 3);
    assert_eq!(b.read_page(1).unwrap().to_vec(PS).unwrap(), page(1, 1));
    b.write_pages(&[(2, &page(2, 2))]).unwrap();
    // A stale writer of host-b's generation is fenced once host-c forces a takeover.
    let mut c = SwapDevice::open(
        Box::new(MemBackend::new(store.clone())),
        OpenOptions::read_write("host-c", true, true),
    )
    .unwrap();
    b.fence_interval = std::time::Duration::ZERO;
    let err = b.write_pages(&[(3, &page(1, 3))]).unwrap_err();
    assert!(matches!(err, SwapError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("host-c"));
    assert!(b.checkpoint().is_err());
    c.write_pages(&[(4, &page(1, 4))]).unwrap();
    c.close().unwrap();
    let mut r = SwapDevice::open(
        Box::new(MemBackend::new(store.clone())),
        OpenOptions::read_only("r"),
    )
    .unwrap();
    assert!(matches!(r.read_page(3).unwrap(), PageData::NotStored));
    assert_eq!(r.read_page(2).unwrap().to_vec(PS).unwrap(), page(2, 2));
    assert!(r.write_pages(&[(5, &page(1, 5))]).is_err());
}

#[test]
fn steady_rewrites_stay_bounded() {
    let store = MemStore::new();
    let cap = 1024u64;
    let mut dev = create(&store, cap, CodecPolicy::Lz4);
    let total = dev.hdr.layout.segments;
    let mut x = 7u64;
    for round in 0..64u64 {
        let mut batch = Vec::new();
        for i in 0..256u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let p = (x >> 33) % cap;
            batch.push((p, page(if i % 4 == 0 { 1 } else { 2 }, round * 1000 + p)));
        }
        let refs: Vec<(u64, &[u8])> = batch.iter().map(|(p, d)| (*p, &d[..])).collect();
        dev.write_pages(&refs).unwrap();
    }
    // 64 rounds x 256 pages (~50 MiB) is more than the data area: space was reused.
    let s = dev.inspect();
    assert!(s.segments_total == total && s.segments_free > 0, "{s:?}");
    assert!(s.cleaned_segments > 0, "{s:?}");
    assert!(s.pages_stored + s.pages_zero <= cap);
    assert!(dev.fsck().unwrap().is_clean());
    drop(dev);
    let mut dev = open_rw(&store, "host-a").unwrap();
    assert!(dev.fsck().unwrap().is_clean());
}

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<(u64, u8)>),
    Remove(Vec<u64>),
}

fn op_strategy(cap: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec((0..cap, 0u8..3), 1..40).prop_map(Op::Write),
        1 => prop::collection::vec(0..cap, 1..5).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random page sets survive reopen, and a crash at a random byte of writing leaves
    /// every page at its last acknowledged content or the content of the write in flight.
    #[test]
    fn random_ops_round_trip_and_crash(
        ops in prop::collection::vec(op_strategy(96), 1..14),
        crash_budget in 0usize..400_000,
        lz4 in any::<bool>(),
    ) {
        let cap = 96u64;
        let store = MemStore::new();
        let codec = if lz4 { CodecPolicy::Lz4 } else { CodecPolicy::Raw };
        create(&store, cap, codec).close().unwrap();
        let mut dev = open_rw(&store, "host-a").unwrap();
        let mut acked: Vec<Option<Vec<u8>>> = vec![None; cap as usize];
        let mut in_flight: Vec<Option<Option<Vec<u8>>>> = vec![None; cap as usize];
        store.set_write_budget(Some(crash_budget));
        for (n, op) in ops.iter().enumerate() {
            let mut next = acked.clone();
            let result = match op {
                Op::Write(ps) => {
                    let data: Vec<(u64, Vec<u8>)> =
                        ps.iter().map(|&(p, k)| (p, page(k, n as u64 * 1000 + p))).collect();
                    for (p, d) in &data {
                        next[*p as usize] = Some(d.clone());
                    }
                    let refs: Vec<(u64, &[u8])> = data.iter().map(|(p, d)| (*p, &d[..])).collect();
                    dev.write_pages(&refs)
                }
                Op::Remove(ps) => {
                    for p in ps {
                        next[*p as usize] = None;
                    }
                    dev.remove_pages(ps)
                }
            };
            if result.is_err() {
                break;
            }
            // Writes past the budget are silently dropped: like a kill, the process may
            // have "seen" acknowledgements the store never got. Only count a write as
            // acknowledged if the store still had budget left after it.
            if store_budget_exhausted(&store) {
                for p in 0..cap as usize {
                    if next[p] != acked[p] {
                        in_flight[p] = Some(next[p].clone());
                    }
                }
                break;
            }
            acked = next;
        }
        drop(dev);
        store.set_write_budget(None);
        let mut dev = open_rw(&store, "host-a").unwrap();
        let rep = dev.fsck().unwrap();
        prop_assert!(rep.is_clean(), "{:?}", rep);
        let all = read_all(&mut dev);
        for p in 0..cap as usize {
            let ok = all[p] == acked[p] || in_flight[p].as_ref().is_some_and(|f| *f == all[p]);
            prop_assert!(ok, "page {} neither acknowledged nor in-flight content", p);
        }
        dev.close().unwrap();
    }
}

fn store_budget_exhausted(store: &MemStore) -> bool {
    store.budget_left() == Some(0)
}

#[test]
fn swap_device_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<SwapDevice>();
}

#[test]
fn damage_inside_the_log_is_told_apart_from_a_torn_tail() {
    let store = MemStore::new();
    let mut dev = create(&store, 16, CodecPolicy::Raw);
    dev.write_pages(&[(1, &page(2, 1)), (2, &page(2, 2))])
        .unwrap();
    let first = dev.index[1].offset();
    dev.write_pages(&[(3, &page(2, 3))]).unwrap();
    let last = dev.index[3].offset();
    drop(dev); // no checkpoint: both appends live only in the log
    let image = store.snapshot();

    // A flipped byte in the last append looks like a torn write: the device opens
    // without it, and fsck only notes it.
    store.corrupt(last + 10, 1);
    let mut dev = SwapDevice::open(
        Box::new(MemBackend::new(store.clone())),
        OpenOptions::read_only("r"),
    )
    .unwrap();
    assert!(matches!(dev.read_page(3).unwrap(), PageData::NotStored));
    assert_eq!(dev.read_page(1).unwrap().to_vec(PS).unwrap(), page(2, 1));
    let rep = SwapDevice::fsck_backend(Box::new(MemBackend::new(store.clone()))).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert!(
        rep.notes.iter().any(|n| n.contains("torn batch")),
        "{rep:?}"
    );

    // The same flip in the first append cannot come from a crash: a later append exists.
    let store = MemStore::new();
    MemBackend::new(store.clone())
        .grow(image.len() as u64)
        .unwrap();
    {
        let mut b = MemBackend::new(store.clone());
        b.submit(crate::backend::IoRequest {
            tag: 0,
            offset: 0,
            op: crate::backend::IoOp::Write {
                buf: AlignedBuf::from_slice(&image),
            },
        })
        .unwrap();
    }
    store.corrupt(first + 10, 1);
    let err = SwapDevice::open(
        Box::new(MemBackend::new(store.clone())),
        OpenOptions::read_only("r"),
    )
    .err()
    .unwrap();
    assert!(matches!(err, SwapError::LogDamaged { .. }), "{err}");
    assert!(
        err.to_string().contains("later acknowledged append"),
        "{err}"
    );
    let rep = SwapDevice::fsck_backend(Box::new(MemBackend::new(store.clone()))).unwrap();
    assert!(!rep.is_clean());
}
