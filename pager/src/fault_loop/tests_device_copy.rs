//! Pages read back from the VM's own swap device stay that device's current copy until the
//! guest writes them (agile migration then need not send them): they are placed
//! write-protected, the first write faults, and write tracking forgets the copy. Pages from
//! any other source, and VMs without a WP registration, never count as device copies.

use std::time::Duration;

use super::tests_routed::{eventually, Guest, PAGE};
use super::tests_scripted::{page_bytes, ScriptedSource};
use crate::page_state::PageState;
use crate::route::Route;

/// Write one byte into page `i` of the guest from another thread (a WP fault blocks it
/// until the loop resolves it).
fn write_async(g: &Guest, i: u64) -> std::sync::mpsc::Receiver<()> {
    let addr = g.page(0).as_ptr() as usize + i as usize * PAGE;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: `addr` lies in the guest mapping, which the test keeps alive until this
        // thread answered.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 0xee) };
        let _ = tx.send(());
    });
    rx
}

#[test]
fn device_pages_stay_current_until_written_and_others_never_are() {
    let pages = 8;
    // 0..4 were evicted (their copy is in the own device); 4..8 come from the source host.
    let own = ScriptedSource::new(7, Route::Swapdev, pages);
    let remote = ScriptedSource::new(2, Route::Remote, pages);
    let mut g = Guest::start_with(
        pages,
        |_| Route::Remote,
        vec![Box::new(own), Box::new(remote)],
        "none",
        &[(0..4, PageState::Evicted)],
        true,
    );
    for p in 0..pages {
        let want = if p < 4 {
            page_bytes(7, p)
        } else {
            page_bytes(2, p)
        };
        assert_eq!(g.page(p), &want[..], "page {p}");
    }
    let dirty = g.vm.dirty.clone();
    for p in 0..4 {
        assert!(
            dirty.device_copy_current(p),
            "page {p} read from the device"
        );
    }
    for p in 4..pages {
        assert!(
            !dirty.device_copy_current(p),
            "page {p} came from elsewhere"
        );
    }
    // A write to a device page faults (it was placed write-protected) and ends its copy.
    write_async(&g, 1)
        .recv_timeout(Duration::from_secs(5))
        .expect("the write was resolved");
    eventually("the write is recorded", || !dirty.device_copy_current(1));
    assert_eq!(g.page(1)[0], 0xee);
    assert!(dirty.device_copy_current(0) && dirty.device_copy_current(2));
    assert!(g.vm.metrics.snapshot().wp_faults >= 1);
    g.stop().unwrap();
}

#[test]
fn without_a_wp_registration_nothing_counts_as_a_device_copy() {
    let pages = 4;
    let own = ScriptedSource::new(7, Route::Swapdev, pages);
    let mut g = Guest::start(
        pages,
        |_| Route::Swapdev,
        vec![Box::new(own)],
        "none",
        &[(0..pages, PageState::Evicted)],
    );
    for p in 0..pages {
        assert_eq!(g.page(p), &page_bytes(7, p)[..]);
        assert!(!g.vm.dirty.device_copy_current(p), "page {p}");
    }
    g.stop().unwrap();
}
