//! Tests on real mappings: anonymous memory and a memfd, faults raised from threads.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PAGE: u64 = 4096;

/// An mmap'd test region, unmapped on drop.
struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    fn anonymous(pages: u64) -> Self {
        let len = pages * PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            addr: p as u64,
            len,
        }
    }

    fn shared_memfd(pages: u64) -> (Self, OwnedFd) {
        let len = pages * PAGE;
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd from memfd_create.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) }, 0);
        // SAFETY: a fresh shared mapping of our memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (
            Self {
                addr: p as u64,
                len,
            },
            fd,
        )
    }

    fn page(&self, i: u64) -> u64 {
        self.addr + i * PAGE
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region this struct mapped.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: test addresses point into live mappings; the read may fault into uffd.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, v: u64) {
    // SAFETY: as read_u64.
    unsafe { std::ptr::write_volatile(addr as *mut u64, v) }
}

fn blocking_uffd(features: Features) -> Uffd {
    let u = Uffd::new(UffdFlags::default()).unwrap();
    u.api(features).unwrap();
    u
}

fn next_fault(u: &Uffd) -> (u64, bool, bool) {
    let mut ev = Vec::new();
    assert_eq!(u.read_events(&mut ev, 1).unwrap(), 1);
    match ev.pop().unwrap() {
        Event::PageFault {
            addr, write, wp, ..
        } => (addr & !(PAGE - 1), write, wp),
        other => panic!("expected a page fault, got {other:?}"),
    }
}

#[test]
fn api_reports_the_kernels_full_feature_mask() {
    let u = Uffd::new(UffdFlags::default()).unwrap();
    let all = u.api(Features::EVENT_REMOVE).unwrap();
    assert!(all.contains(Features::EVENT_REMOVE | Features::MISSING_SHMEM));
    // Kernels since 6.7 report WP_ASYNC; the lab kernel is 6.18.
    assert!(
        all.contains(Features::WP_ASYNC | Features::WP_UNPOPULATED),
        "{all:#x?}"
    );
    // The API handshake happens once per uffd.
    assert!(u.api(Features::EVENT_REMOVE).is_err());
}

#[test]
fn missing_faults_on_anonymous_memory_served_by_copy_and_zeropage() {
    let m = Mapping::anonymous(4);
    let u = blocking_uffd(Features::THREAD_ID);
    let ioctls = u.register(m.addr, m.len, RegisterMode::MISSING).unwrap();
    assert!(ioctls.supports(Ioctls::COPY) && ioctls.supports(Ioctls::ZEROPAGE));

    let (p0, p1) = (m.page(0), m.page(1));
    let toucher = std::thread::spawn(move || (read_u64(p0 + 8), read_u64(p1 + 16)));

    let (addr, write, wp) = next_fault(&u);
    assert_eq!((addr, write, wp), (p0, false, false));
    let content: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        u.copy_from(p0, &content, PlaceMode::default()).unwrap(),
        PAGE
    );

    let (addr, _, _) = next_fault(&u);
    assert_eq!(addr, p1);
    assert_eq!(u.zeropage(p1, PAGE, false).unwrap(), PAGE);

    let (a, b) = toucher.join().unwrap();
    assert_eq!(a, u64::from_le_bytes(content[8..16].try_into().unwrap()));
    assert_eq!(b, 0);

    // Placing again over a present page reports EEXIST with nothing placed.
    match u.copy_from(p0, &content, PlaceMode::default()) {
        Err(CopyError::Exists { addr, placed }) => assert_eq!((addr, placed), (p0, 0)),
        other => panic!("expected EEXIST, got {other:?}"),
    }
    // A run whose second page exists: the kernel places the first page and reports a short
    // copy as EAGAIN with the bytes placed; retrying the rest then reports EEXIST.
    u.zeropage(m.page(3), PAGE, false).unwrap();
    let two = vec![7u8; 2 * PAGE as usize];
    match u.copy_from(m.page(2), &two, PlaceMode::default()) {
        Err(CopyError::Again { addr, placed }) => assert_eq!((addr, placed), (m.page(3), PAGE)),
        other => panic!("expected a short copy, got {other:?}"),
    }
    assert!(matches!(
        u.copy_from(m.page(3), &two[..PAGE as usize], PlaceMode::default()),
        Err(CopyError::Exists { .. })
    ));
    assert_eq!(read_u64(m.page(2)), 0x0707_0707_0707_0707);
    u.unregister(m.addr, m.len).unwrap();
}

#[test]
fn nonblocking_read_returns_nothing_when_idle() {
    let u = Uffd::new(UffdFlags {
        nonblocking: true,
        ..Default::default()
    })
    .unwrap();
    u.api(Features::empty()).unwrap();
    let mut ev = Vec::new();
    assert_eq!(u.read_events(&mut ev, 16).unwrap(), 0);
    assert!(ev.is_empty());
}

#[test]
fn shmem_missing_fault_served_by_copy() {
    let (m, _fd) = Mapping::shared_memfd(2);
    let u = blocking_uffd(Features::MISSING_SHMEM);
    u.register(m.addr, m.len, RegisterMode::MISSING).unwrap();
    let p1 = m.page(1);
    let toucher = std::thread::spawn(move || read_u64(p1));
    assert_eq!(next_fault(&u).0, p1);
    u.copy_from(p1, &[0xab; PAGE as usize], PlaceMode::default())
        .unwrap();
    assert_eq!(toucher.join().unwrap(), 0xabab_abab_abab_abab);
}

#[test]
fn write_protect_round_trip_on_memfd_blocks_writer_until_unprotect() {
    let (m, _fd) = Mapping::shared_memfd(2);
    let u = blocking_uffd(
        Features::MISSING_SHMEM | Features::WP_HUGETLBFS_SHMEM | Features::WP_UNPOPULATED,
    );
    let ioctls = u
        .register(m.addr, m.len, RegisterMode::MISSING | RegisterMode::WP)
        .unwrap();
    assert!(ioctls.supports(Ioctls::WRITEPROTECT));

    let p0 = m.page(0);
    // Populate page 0 (served through a MISSING fault), then protect it.
    let first = std::thread::spawn(move || write_u64(p0, 1));
    let (addr, write, wp) = next_fault(&u);
    assert_eq!((addr, write, wp), (p0, true, false));
    u.copy_from(p0, &[0u8; PAGE as usize], PlaceMode::default())
        .unwrap();
    first.join().unwrap();
    assert_eq!(read_u64(p0), 1);
    u.write_protect(p0, PAGE, true, false).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let done2 = done.clone();
    let writer = std::thread::spawn(move || {
        write_u64(p0, 2);
        done2.store(true, Ordering::Release);
    });
    let (addr, write, wp) = next_fault(&u);
    assert_eq!((addr, write, wp), (p0, true, true));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::Acquire),
        "writer passed a write-protected page"
    );
    assert_eq!(
        read_u64(p0),
        1,
        "reads are not blocked and see the old value"
    );
    u.write_protect(p0, PAGE, false, false).unwrap();
    writer.join().unwrap();
    assert!(done.load(Ordering::Acquire));
    assert_eq!(read_u64(p0), 2);
}

#[test]
fn remove_event_after_madv_dontneed() {
    let m = Mapping::anonymous(4);
    let u = blocking_uffd(Features::EVENT_REMOVE);
    u.register(m.addr, m.len, RegisterMode::MISSING).unwrap();
    u.zeropage(m.addr, m.len, false).unwrap();
    let (start, len) = (m.page(1), 2 * PAGE);
    // The madvise blocks until the REMOVE message is read, so it runs on another thread.
    let advisor = std::thread::spawn(move || {
        // SAFETY: discarding pages of our own live test mapping.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        }
    });
    let mut ev = Vec::new();
    assert_eq!(u.read_events(&mut ev, 4).unwrap(), 1);
    match ev.pop().unwrap() {
        Event::Remove { start: s, end } => assert_eq!((s, end), (start, start + len)),
        other => panic!("expected REMOVE, got {other:?}"),
    }
    assert_eq!(advisor.join().unwrap(), 0);
}

#[test]
fn recognises_userfaultfds() {
    let u = Uffd::new(UffdFlags::default()).unwrap();
    assert!(is_userfaultfd(u.as_fd()).unwrap());
    let f = std::fs::File::open("/dev/zero").unwrap();
    assert!(!is_userfaultfd(f.as_fd()).unwrap());
    assert_eq!(describe_fd(f.as_fd()).unwrap(), "/dev/zero");
}
