//! Property test against a byte-array model, and the (ignored) IOPS benchmark.

use super::*;

#[derive(Debug, Clone)]
enum ModelOp {
    Write { off: u64, len: usize, seed: u64 },
    Read { off: u64, len: usize },
    Trim { off: u64, len: u64 },
    Flush,
}

fn model_op() -> impl proptest::strategy::Strategy<Value = ModelOp> {
    use proptest::prelude::*;
    const SPAN: u64 = 64 * 1024;
    prop_oneof![
        4 => (0..SPAN, 1usize..9000, any::<u64>())
            .prop_map(|(off, len, seed)| ModelOp::Write { off, len, seed }),
        4 => (0..SPAN, 1usize..9000).prop_map(|(off, len)| ModelOp::Read { off, len }),
        1 => (0..SPAN, 1u64..20000).prop_map(|(off, len)| ModelOp::Trim { off, len }),
        1 => Just(ModelOp::Flush),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Any sequence of buffered writes, reads, trims and flushes (unaligned, overlapping,
    /// each waited for before the next) leaves the file equal to a byte-array model; reads
    /// past the end are `Short` exactly when the model says so.
    #[test]
    fn buffered_file_matches_a_byte_model(ops in proptest::collection::vec(model_op(), 1..40)) {
        let (_tmp, mut b) = open_in(TMPFS_DIR, DirectMode::Never, 8);
        let mut model: Vec<u8> = Vec::new();
        for op in ops {
            match op {
                ModelOp::Write { off, len, seed } => {
                    let mut buf = AlignedBuf::new(len);
                    StdRng::seed_from_u64(seed).fill(buf.as_mut_slice());
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&buf);
                    run_one(&mut b, off, IoOp::Write { buf }).unwrap();
                }
                ModelOp::Read { off, len } => {
                    let got = run_one(&mut b, off, IoOp::Read { buf: AlignedBuf::new(len) });
                    let end = off as usize + len;
                    if end <= model.len() {
                        let got = got.unwrap().unwrap();
                        proptest::prop_assert!(got.as_slice() == &model[off as usize..end]);
                    } else {
                        let is_short = matches!(got, Err(BackendError::Short { .. }));
                        proptest::prop_assert!(is_short, "{:?}", got);
                    }
                }
                ModelOp::Trim { off, len } => {
                    let start = (off as usize).min(model.len());
                    let end = (off + len).min(model.len() as u64) as usize;
                    model[start..end].fill(0);
                    run_one(&mut b, off, IoOp::Trim { len }).unwrap();
                }
                ModelOp::Flush => {
                    run_one(&mut b, 0, IoOp::Flush).unwrap();
                }
            }
            proptest::prop_assert_eq!(b.size().unwrap(), model.len() as u64);
        }
        let on_disk = std::fs::read(b.path()).unwrap();
        proptest::prop_assert!(on_disk == model);
    }
}

/// 4 KiB random reads over a 256 MiB file at QD 32 (IOPS) and QD 1 (mean latency), for
/// O_DIRECT and buffered I/O on the disk filesystem and on tmpfs. Run:
/// `cargo test --release -p swapdev --lib bench_file_random_read -- --ignored --nocapture`
#[test]
#[ignore = "benchmark; run with --ignored --nocapture"]
fn bench_file_random_read() {
    let pages = 65536u64;
    for (dir, mode) in [
        (DISK_DIR, DirectMode::Always),
        (DISK_DIR, DirectMode::Never),
        (TMPFS_DIR, DirectMode::Always),
        (TMPFS_DIR, DirectMode::Never),
    ] {
        let (_tmp, mut b) = open_in(dir, mode, 64);
        {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(b.path())
                .unwrap();
            let chunk = vec![0xA5u8; 1 << 20];
            for i in 0..(pages * PAGE as u64) >> 20 {
                std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i << 20).unwrap();
            }
            f.sync_all().unwrap();
        }
        for (qd, total) in [(32usize, 200_000u64), (1, 20_000)] {
            let secs = random_reads(&mut b, pages, qd, total);
            println!(
                "{}: QD{qd} 4KiB random read: {total} reads in {secs:.2} s = {:.0} IOPS, \
                 {:.1} us mean per read at this depth",
                b.describe(),
                total as f64 / secs,
                secs * 1e6 * qd as f64 / total as f64
            );
        }
    }
}

/// Issue `total` random 4 KiB reads keeping `qd` in flight; returns elapsed seconds.
fn random_reads(b: &mut FileBackend, pages: u64, qd: usize, total: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(1);
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    for i in 0..total {
        if b.in_flight() >= qd {
            out.clear();
            b.complete(&mut out, 1).unwrap();
        }
        let page = rng.random_range(0..pages);
        let op = IoOp::Read {
            buf: AlignedBuf::new(PAGE),
        };
        b.submit(IoRequest {
            tag: i,
            offset: page * PAGE as u64,
            op,
        })
        .unwrap();
    }
    out.clear();
    b.complete(&mut out, b.in_flight()).unwrap();
    start.elapsed().as_secs_f64()
}
