//! A damaged page a guest thread waits on (see `crate::damage`): never placed, never
//! retried; by default the thread is held and the VM goes on being served, under
//! `tear-down` the loop ends naming the page.

use std::time::Duration;

use super::tests_routed::{Guest, PAGE};
use super::tests_scripted::{page_bytes, Script, ScriptedSource};
use super::{FaultLoopConfig, FaultLoopError};
use crate::damage::DamagePolicy;
use crate::page_state::PageState;
use crate::route::Route;

#[test]
fn by_default_a_damaged_page_holds_its_thread_and_the_rest_is_served() {
    let pages = 8;
    let source = ScriptedSource::new(1, Route::Local, pages).with(3, Script::Damaged);
    let asked = source.asked.clone();
    let mut g = Guest::start(pages, |_| Route::Local, vec![Box::new(source)], "none", &[]);
    let held = g.touch_async(3);
    let start = std::time::Instant::now();
    while g.vm.damage.get().is_none() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let record = g.vm.damage.get().expect("the damaged page is recorded");
    assert_eq!(record.page, 3);
    assert_eq!(
        record.error,
        "page 3 from scripted is damaged: checksum mismatch"
    );
    assert_eq!(record.faults_held, 1);
    // The test process is the "VMM" here: the pager never stops itself.
    assert_eq!(record.paused_pid, None);
    assert!(record.not_paused.is_some(), "{record:?}");
    // The loop goes on: other pages are served, the held thread is not woken.
    assert_eq!(g.page(5), &page_bytes(1, 5)[..]);
    assert!(held.recv_timeout(Duration::from_millis(300)).is_err());
    assert_ne!(g.vm.states.get(3), PageState::Present);
    assert_eq!(
        *asked.lock().unwrap(),
        vec![3, 5],
        "a damaged page was retried"
    );
    assert_eq!(g.vm.metrics.snapshot().pages_damaged, 1);
    g.stop().unwrap();
    // Closing the uffd releases the blocked thread (the kernel then fills the page itself).
    let Guest { map, vm, .. } = g;
    drop(vm);
    held.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(map.len(), pages as usize * PAGE);
}

#[test]
fn under_tear_down_a_damaged_page_a_thread_waits_on_ends_the_loop_and_is_never_placed() {
    let pages = 8;
    let source = ScriptedSource::new(1, Route::Local, pages).with(3, Script::Damaged);
    let asked = source.asked.clone();
    let mut g = Guest::start_configured(
        pages,
        |_| Route::Local,
        vec![Box::new(source)],
        "none",
        &[],
        false,
        FaultLoopConfig {
            on_damaged: DamagePolicy::TearDown,
            ..Default::default()
        },
    );
    let answer = g.touch_async(3);
    let exit = g.wait_exit();
    match exit {
        Err(FaultLoopError::Damaged { page: 3, .. }) => {}
        other => panic!("expected a damaged-page error naming page 3, got {other:?}"),
    }
    assert_eq!(
        crate::error_chain(&exit.unwrap_err()),
        "page 3 is damaged and a guest thread waits on it; it is never placed: \
         page 3 from scripted is damaged: checksum mismatch"
    );
    assert_eq!(
        *asked.lock().unwrap(),
        vec![3],
        "a damaged page was retried"
    );
    assert_ne!(g.vm.states.get(3), PageState::Present);
    // Closing the uffd releases the blocked thread (the kernel then fills the page itself).
    let Guest { map, vm, .. } = g;
    drop(vm);
    answer.recv_timeout(Duration::from_secs(5)).unwrap();
    drop(map);
}
