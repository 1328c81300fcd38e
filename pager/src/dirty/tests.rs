use super::*;

fn sub(t: &WriteTracker) -> Subscription {
    t.subscribe(SubscribeOptions::default()).unwrap()
}

#[test]
fn each_subscriber_harvests_its_own_view() {
    let t = WriteTracker::new(130);
    let a = sub(&t);
    t.mark_written(3);
    let b = sub(&t);
    assert!(t.mark_written(64));
    t.mark_written(129);
    assert_eq!(a.count(), 3);
    assert!(
        a.is_dirty(3) && !b.is_dirty(3),
        "b subscribed after the write to 3"
    );
    assert_eq!(a.harvest(), vec![3, 64, 129]);
    assert_eq!(a.count(), 0);
    // a's harvest left b's bits alone.
    assert_eq!(b.harvest(), vec![64, 129]);
    t.mark_written(5);
    assert_eq!(a.harvest(), vec![5]);
    assert_eq!(b.harvest(), vec![5]);
    assert_eq!(t.count(), 0);
}

#[test]
fn page_indices_are_bounded() {
    let t = WriteTracker::new(10);
    let a = sub(&t);
    assert!(!t.mark_written(10));
    assert!(!t.mark_written(u64::MAX));
    assert!(!a.mark(10));
    assert!(!a.is_dirty(1 << 40));
    t.mark_placed(8, u64::MAX);
    t.mark_placed(u64::MAX, 4);
    assert_eq!(a.count(), 0, "no subscriber wants placements");
    let m = t
        .subscribe(SubscribeOptions {
            placed_counts_as_written: true,
        })
        .unwrap();
    t.mark_placed(8, u64::MAX);
    t.mark_placed(u64::MAX, 4);
    assert_eq!(m.harvest(), vec![8, 9]);
}

#[test]
fn placements_count_only_for_subscribers_that_ask() {
    let t = WriteTracker::new(300);
    let wss = sub(&t);
    let migration = t
        .subscribe(SubscribeOptions {
            placed_counts_as_written: true,
        })
        .unwrap();
    t.mark_placed(60, 70); // crosses two word boundaries
    t.mark_placed(256, 1);
    let got = migration.harvest();
    let want: Vec<u64> = (60..130).chain([256]).collect();
    assert_eq!(got, want);
    assert_eq!(wss.count(), 0);
    drop(migration);
    // Nobody asks any more: the placement path is back to one load.
    assert_eq!(t.inner.placed_subscribers.load(Ordering::SeqCst), 0);
    t.mark_placed(0, 300);
    assert_eq!(wss.count(), 0);
}

#[test]
fn dropped_subscriptions_free_their_slot_and_do_not_leak() {
    let t = WriteTracker::new(64);
    let all: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| sub(&t)).collect();
    assert_eq!(t.subscribers(), MAX_SUBSCRIBERS);
    assert_eq!(
        t.subscribe(SubscribeOptions::default()).err(),
        Some(DirtyError::TooManySubscribers {
            max: MAX_SUBSCRIBERS
        })
    );
    t.mark_written(7);
    drop(all);
    assert_eq!(t.subscribers(), 0);
    // Subscribe/unsubscribe many times: slots are reused, and a reused slot starts clean.
    for _ in 0..1000 {
        let s = sub(&t);
        assert_eq!(s.count(), 0, "a reused slot kept its old bits");
        t.mark_written(9);
        assert_eq!(s.harvest(), vec![9]);
    }
    let allocated = t
        .inner
        .slots
        .iter()
        .filter(|s| s.bits.get().is_some())
        .count();
    assert_eq!(
        allocated, MAX_SUBSCRIBERS,
        "bitmaps are allocated once per slot"
    );
    // The subscription keeps the tracker's state alive on its own.
    let s = sub(&t);
    let t2 = t.clone();
    drop(t);
    t2.mark_written(1);
    drop(t2);
    assert_eq!(s.harvest(), vec![1]);
}

#[test]
fn concurrent_marks_and_harvests_lose_nothing() {
    // One marking thread (the fault loop) and two harvesting consumers: every page marked is
    // harvested exactly once by each consumer (bits of one round may be harvested in the
    // next, never dropped).
    const PAGES: usize = 4096;
    const ROUNDS: usize = 200;
    let t = WriteTracker::new(PAGES);
    let subs = [sub(&t), sub(&t)];
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        let marker = sc.spawn(|| {
            for r in 0..ROUNDS {
                for p in (r % 7..PAGES).step_by(7) {
                    t.mark_written(p as u64);
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        let harvesters: Vec<_> = subs
            .iter()
            .map(|s| {
                sc.spawn(|| {
                    let mut seen = vec![0u32; PAGES];
                    loop {
                        let finished = done.load(Ordering::SeqCst);
                        for p in s.harvest() {
                            seen[p as usize] += 1;
                        }
                        if finished {
                            return seen;
                        }
                    }
                })
            })
            .collect();
        marker.join().unwrap();
        for h in harvesters {
            let seen = h.join().unwrap();
            // Every page was marked in some round; each harvest sees it at most once per
            // round it was marked in, and at least once overall.
            assert!(
                seen.iter().all(|&n| n >= 1),
                "a marked page was never harvested"
            );
            assert!(seen.iter().all(|&n| n as usize <= ROUNDS));
        }
    });
}

/// Cost of the placement-path call (docs/evict.md, "Write tracking"):
/// `cargo test -p pager --release --lib -- --ignored --nocapture mark_costs`
#[test]
#[ignore = "a measurement; run it by name"]
fn mark_costs() {
    const N: u64 = 4_000_000;
    let t = WriteTracker::new(1 << 20);
    let time = |f: &dyn Fn(u64)| {
        let started = std::time::Instant::now();
        for i in 0..N {
            f(i % (1 << 20));
        }
        started.elapsed().as_secs_f64() * 1e9 / N as f64
    };
    // Best of three: the machine is shared.
    let time = |f: &dyn Fn(u64)| (0..3).map(|_| time(f)).fold(f64::MAX, f64::min);
    let none = time(&|p| t.mark_placed(p, 1));
    let _wss = sub(&t);
    let written_1 = time(&|p| {
        t.mark_written(p);
    });
    let _mig = t
        .subscribe(SubscribeOptions {
            placed_counts_as_written: true,
        })
        .unwrap();
    let placed_1 = time(&|p| t.mark_placed(p, 1));
    let written_2 = time(&|p| {
        t.mark_written(p);
    });
    println!(
        "ns per call: mark_placed, nobody asks {none:.1}; mark_placed, 1 of 2 asks {placed_1:.1}; \
         mark_written, 1 subscriber {written_1:.1}; 2 subscribers {written_2:.1}"
    );
}

#[test]
fn device_copies_are_noted_ranged_forgotten_and_ended_by_a_write() {
    let t = WriteTracker::new(200);
    assert!(!t.device_copy_current(5), "nothing noted yet");
    t.note_device_copy(60, 70);
    assert!((60..130).all(|p| t.device_copy_current(p)));
    assert!(!t.device_copy_current(59) && !t.device_copy_current(130));
    t.forget_device_copy(64, 64);
    assert!((60..64).all(|p| t.device_copy_current(p)));
    assert!((64..128).all(|p| !t.device_copy_current(p)));
    assert!(t.device_copy_current(128) && t.device_copy_current(129));
    // A write ends it, whether or not a consumer subscribed.
    t.mark_written(61);
    assert!(!t.device_copy_current(61) && t.device_copy_current(60));
    // Ranges are clamped to the VM; pages outside it are never current.
    t.note_device_copy(190, u64::MAX);
    assert!(t.device_copy_current(199));
    assert!(!t.device_copy_current(200) && !t.device_copy_current(u64::MAX));
    t.forget_device_copy(u64::MAX - 1, 10);
}
