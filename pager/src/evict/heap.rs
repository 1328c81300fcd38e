//! Handing the memory an eviction staged back to the kernel when it ends.
//!
//! An eviction stages every batch in memory: the pages read from the guest's file, their
//! encoded copies and the swap device's write buffer, a few MiB per batch, freed when the
//! batch is stored. glibc's dynamic mmap threshold moves buffers of that size from mmap into
//! the heap after the first one is freed, and each eviction runs on the thread of its
//! request, which takes one of glibc's per-thread arenas. Freed pages inside an arena (not at
//! its top) stay resident: measured with four VMs evicted over and over
//! (`tests/tests/load_four_vms.rs`), the daemon held 115-130 MiB of anonymous memory that
//! way, ten times what it uses. [`release_freed_memory`] after each eviction returns it.

/// Return the heap's free pages to the kernel (`malloc_trim(0)`: every arena, and free
/// pages in the middle of an arena too, not only its top). Cheap next to an eviction.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping under its arena locks and
    // madvises free pages; it touches no memory the caller owns and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The mmap threshold [`keep_large_buffers_out_of_the_heap`] pins (glibc's own default).
pub const MMAP_THRESHOLD: usize = 128 << 10;
/// The most malloc arenas the daemon's threads share.
pub const ARENA_MAX: i32 = 4;

/// For a long-running daemon, at start before its threads: buffers of
/// [`MMAP_THRESHOLD`] and more always come from mmap and go back to the kernel when freed
/// (a fixed threshold turns glibc's dynamic one off, which otherwise moves the eviction's,
/// the migration's and the prefetch's MiB-sized staging buffers into the heap after the
/// first one is freed), and the threads share at most [`ARENA_MAX`] arenas instead of 8
/// per core, each of which keeps its own free memory. Returns whether glibc took both.
pub fn keep_large_buffers_out_of_the_heap() -> bool {
    let threshold = libc::c_int::try_from(MMAP_THRESHOLD).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets glibc allocator parameters (integers, checked by glibc,
    // which returns 0 on a value it refuses); it touches no memory of the caller.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1
            && libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's RssAnon in KiB.
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn memory_freed_inside_an_arena_goes_back_to_the_kernel() {
        // On a thread of its own (its own arena), as an eviction runs: 1 MiB staging buffers
        // with small allocations that outlive them in between, so the freed buffers sit in
        // the middle of the arena, where glibc's automatic trim (top only) cannot reach.
        const BUFFERS: usize = 48;
        let attempt = || {
            std::thread::spawn(|| {
                let baseline = rss_anon_kib();
                // A 2 MiB buffer freed from mmap raises the dynamic mmap threshold above
                // 1 MiB: from then on 1 MiB buffers come from the heap, as in the daemon.
                drop(std::hint::black_box(vec![1u8; 2 << 20]));
                let mut big = Vec::new();
                let mut small = Vec::new();
                for i in 0..BUFFERS {
                    big.push(std::hint::black_box(vec![i as u8 | 1; 1 << 20]));
                    small.push(std::hint::black_box(Box::new([i as u64; 8])));
                }
                drop(big);
                let before = rss_anon_kib();
                release_freed_memory();
                let after = rss_anon_kib();
                drop(small);
                (baseline, before, after)
            })
            .join()
            .unwrap()
        };
        // Whether glibc keeps the freed buffers resident depends on the arena the thread
        // gets (one reused from an earlier thread has free small chunks, so the small
        // allocations do not land between the buffers and glibc trims the top by itself).
        // What must hold either way: after the release, less than half of what was freed is
        // still resident. RssAnon is the whole process's and other tests of this binary
        // allocate meanwhile, so it must hold in one of three attempts.
        let mut seen = Vec::new();
        for _ in 0..3 {
            let (baseline, before, after) = attempt();
            if after.saturating_sub(baseline) < (BUFFERS as u64 / 2) << 10 {
                return;
            }
            seen.push((baseline, before, after));
        }
        panic!(
            "RssAnon KiB (at the start, before the release, after it), three attempts: {seen:?}"
        );
    }
}
