//! Free guest pages: an unmodified QEMU guest with `-device virtio-balloon,
//! free-page-reporting=on` under the real daemon (`pagewise serve` + `pagewise vm run`).
//! memverify fills an extra buffer, the pager evicts it into the swap device, the guest
//! reads it back and frees it; the guest kernel reports the free blocks, QEMU discards them
//! (fallocate punch of the RAM file + madvise(MADV_DONTNEED)), the pager gets
//! UFFD_EVENT_REMOVE, marks the pages Removed and forgets them in the swap device; a second
//! eviction does not store them again; memverify finds no bad page.
//!
//! Run: `cargo test -p pagewise-tests --release --test qemu_balloon -- --nocapture`

mod qemu_lab;

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_lab::*;

const RAM_MIB: u64 = 512;
const FREE_MIB: u64 = 128;
const PAGE: u64 = 4096;
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE;

fn eviction(stats: &serde_json::Value, name: &str) -> u64 {
    stats
        .get("eviction")
        .and_then(|m| m.get(name))
        .and_then(|v| v.as_u64())
        .unwrap_or_else(|| panic!("no eviction.{name} in {stats}"))
}

/// Pages the swap device holds (stored + zero), read by `pagewise swapdev inspect`.
fn device_pages(device: &Path) -> u64 {
    let out = pagewise_ok(&["swapdev", "inspect", "--json", device.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("swapdev inspect --json printed non-JSON ({e}): {out}"));
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    n("pages_stored") + n("pages_zero")
}

/// Poll `pages_removed` until it has not changed for `quiet` (within `limit`).
fn settled_removed(vm: &DaemonVm, quiet: Duration, limit: Duration) -> u64 {
    let start = Instant::now();
    let mut last = metric(&vm.stats(), "pages_removed");
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(
            start.elapsed() < limit,
            "pages_removed still changing after {limit:?} (now {last})"
        );
        std::thread::sleep(Duration::from_millis(500));
        let now = metric(&vm.stats(), "pages_removed");
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
    last
}

#[test]
fn balloon_free_page_reporting_skips_freed_pages() {
    let mut vm = start_under_daemon(
        "balloon",
        RAM_MIB,
        &format!(
            "memverify.mib=64 memverify.hot_mib=8 memverify.hot_rate_mibs=4 \
             memverify.verify_secs=5 memverify.duration_secs=80 \
             memverify.free_mib={FREE_MIB} memverify.free_after_secs=45"
        ),
        &[
            "-device".into(),
            "virtio-balloon,free-page-reporting=on".into(),
        ],
    );
    let device = vm.guest.device.clone();
    let boot = vm
        .guest
        .wait_for("memverify: free phase filled", Duration::from_secs(120));
    assert!(
        boot.contains("guest: virtio-balloon bound"),
        "the guest did not bind virtio-balloon:\n{boot}"
    );

    // 1. The boot-time report of never-used guest memory is over; the free buffer is held.
    let removed_before = settled_removed(&vm, Duration::from_secs(3), Duration::from_secs(30));

    // 2. Evict down to 32 MiB: most of the free buffer goes to the swap device (victims are
    //    taken coldest first; the buffer's last-touched pages may stay resident). The buffer
    //    is read back 45 s after its fill: time for the settle and the eviction on a loaded
    //    machine (at 20 s a CI run once saw half the evicted pages faulted back before the
    //    census below).
    let report1 = vm.evict(&["--target-rss", "32M"]);
    let after_evict = vm.stats();
    // Pages in state Evicted (stored data); `zero_pages` also counts never-touched pages.
    let evicted1 = eviction(&after_evict, "evicted_pages");
    let resident1 = eviction(&after_evict, "resident_pages");
    assert!(
        evicted1 >= (FREE_MIB + 32) * PAGES_PER_MIB,
        "only {evicted1} pages evicted to 48M: {report1}"
    );
    let device_before_free = device_pages(&device);
    assert!(
        device_before_free >= evicted1 - PAGES_PER_MIB,
        "the device holds {device_before_free} pages after evicting {evicted1}"
    );

    // 3. memverify reads the buffer back (from the swap device), then frees it; the guest
    //    reports the free blocks, QEMU discards them, the pager sees REMOVE.
    let text = vm
        .guest
        .wait_for("memverify: freed", Duration::from_secs(120));
    assert!(
        text.contains(&format!("memverify: freed {FREE_MIB} MiB")) && !text.contains("BAD "),
        "the freed buffer did not read back intact:\n{text}"
    );
    let ram_at_free = resident_bytes(&vm.guest.mem.0);
    let removed_after = settled_removed(&vm, Duration::from_secs(4), Duration::from_secs(60));
    let removed = removed_after - removed_before;
    // The kernel reports whole free blocks (4 MiB, MAX_ORDER-1 here) only: allow slack below;
    // above, only other memory the guest freed meanwhile.
    assert!(
        ((FREE_MIB - 24) * PAGES_PER_MIB..=(FREE_MIB + 16) * PAGES_PER_MIB).contains(&removed),
        "{removed} pages removed after freeing {FREE_MIB} MiB (before {removed_before}, after \
         {removed_after})"
    );
    let ram_after_free = resident_bytes(&vm.guest.mem.0);
    // The sampler (1 s interval) forgets Removed pages in the swap device: wait for it (a
    // loaded machine can take several intervals), up to 30 s.
    let since = std::time::Instant::now();
    let (device_after_free, forgotten) = loop {
        let after = device_pages(&device);
        let forgotten = device_before_free.saturating_sub(after);
        if forgotten >= removed / 2 || since.elapsed() > Duration::from_secs(30) {
            break (after, forgotten);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    // Each removed page was either on the device (then it must be forgotten) or resident
    // after the first eviction (never stored); slack for pages the guest touched since.
    assert!(
        forgotten + resident1 + 4 * PAGES_PER_MIB >= removed && forgotten >= removed / 2,
        "the swap device still holds freed pages: {device_before_free} pages before the free, \
         {device_after_free} after; {removed} pages removed, {resident1} were resident"
    );

    // 4. A second eviction never stores the Removed pages.
    let census_before = vm.stats();
    let removed_state_before = eviction(&census_before, "removed_pages");
    let report2 = vm.evict(&["--target-rss", "24M"]);
    let census_after = vm.stats();
    let removed_state_after = eviction(&census_after, "removed_pages");
    let device_after_evict2 = device_pages(&device);
    let evicted2 = (eviction(&census_after, "evicted_pages")
        + eviction(&census_after, "zero_pages"))
    .saturating_sub(
        eviction(&census_before, "evicted_pages") + eviction(&census_before, "zero_pages"),
    );
    assert!(
        removed_state_after + PAGES_PER_MIB >= removed_state_before,
        "Removed pages left their state in an eviction: {removed_state_before} -> \
         {removed_state_after}: {report2}"
    );
    assert!(
        device_after_evict2 <= device_after_free + evicted2 + PAGES_PER_MIB,
        "the device grew by more than the second eviction: {device_after_free} -> \
         {device_after_evict2}, {evicted2} evicted"
    );
    // No page is both Removed and on the device.
    assert!(
        device_after_evict2 + removed_state_after <= RAM_MIB * PAGES_PER_MIB,
        "{device_after_evict2} pages on the device + {removed_state_after} Removed exceed the \
         guest's {} pages",
        RAM_MIB * PAGES_PER_MIB
    );

    vm.guest.finish(Duration::from_secs(150));
    let end = device_pages(&device);
    eprintln!(
        "balloon: removed at boot {removed_before} pages; evict 1: {evicted1} pages, {resident1} \
         resident, device {device_before_free}; freed {FREE_MIB} MiB -> {removed} pages removed ({:.1} MiB), RAM \
         file {} -> {} MiB, device forgot {forgotten} ({device_before_free} -> \
         {device_after_free}); evict 2: {evicted2} pages, Removed {removed_state_before} -> \
         {removed_state_after}, device {device_after_evict2}; at exit device {end}",
        removed as f64 / PAGES_PER_MIB as f64,
        ram_at_free >> 20,
        ram_after_free >> 20
    );
}
