//! A VMM attaching again after its pager went away (kill -9, crash, restart): the same uffd
//! (still registered: the VMM's reference kept it) and the same memory file. Nothing of the
//! gone pager's memory survives, so the page states are rebuilt from what does:
//!
//! * a page with data in the memory file is `Present` (on tmpfs, `SEEK_DATA`/`SEEK_HOLE`
//!   find them exactly, swapped-out shmem pages included);
//! * a page not in the file is whatever the VM's swap device holds for it: `Evicted` (a
//!   stored copy: eviction punches a page only after its copy completed), `Zero`, or
//!   `Missing` (never stored: reads as zeros, as before);
//! * nothing is dirty and no device copy counts as current (the next eviction stores every
//!   page it takes again): the gone pager's write tracking is unknown, so this assumes the
//!   worst, which costs writes, never data.
//!
//! On filesystems where holes cannot be found (hugetlbfs), every page is taken as absent: a
//! present page marked absent is harmless (the kernel never reports a missing fault for it,
//! and a placement finds it there), whereas an absent page marked present would make its
//! faults loop. After the fault loop runs, [`wake_all`] wakes every thread that faulted and
//! whose fault the gone pager had read but never answered: it touches the page again and
//! the fault is delivered anew.

use std::os::fd::{AsFd, BorrowedFd};

use crate::page_state::PageState;
use crate::vm::Vm;

/// tmpfs's `f_type`, where `SEEK_DATA` answers exactly.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What the rebuild found, for the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebuilt {
    pub present: u64,
    pub evicted: u64,
    pub zero: u64,
    pub missing: u64,
    /// Whether the memory file's holes could be found (false: every page taken as absent).
    pub holes_known: bool,
}

/// Why the states could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("a re-attach needs the guest memory file (the pagewise handshake with memory_file)")]
    NoMemoryFile,
    #[error("examining the guest memory file")]
    Stat(#[source] nix::Error),
    #[error("finding the data in the guest memory file at byte {offset}")]
    Seek {
        offset: u64,
        #[source]
        source: nix::Error,
    },
}

/// Set every page's state of `vm` (a new [`Vm`], no fault loop yet) from its memory file and
/// swap device.
pub fn rebuild_states(vm: &Vm) -> Result<Rebuilt, RebuildError> {
    let file = vm.memory_file.as_ref().ok_or(RebuildError::NoMemoryFile)?;
    let fs = nix::sys::statfs::fstatfs(file.as_fd()).map_err(RebuildError::Stat)?;
    let holes_known = fs.filesystem_type().0 as i64 == TMPFS_MAGIC;
    let ps = vm.page_size();
    let pages = vm.layout.pages();
    let mut present = vec![false; pages as usize];
    if holes_known {
        let size = nix::sys::stat::fstat(file.as_fd())
            .map_err(RebuildError::Stat)?
            .st_size as u64;
        for (start, end) in data_extents(file.as_fd(), size.min(pages * ps))? {
            // A partly written page counts as present (the kernel allocates whole pages).
            for p in start / ps..end.div_ceil(ps).min(pages) {
                present[p as usize] = true;
            }
        }
    }
    let device = vm
        .swapdev
        .as_ref()
        .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()));
    let mut out = Rebuilt {
        holes_known,
        ..Rebuilt::default()
    };
    for p in 0..pages {
        let state = if present[p as usize] {
            out.present += 1;
            PageState::Present
        } else {
            match device.as_ref().map(|d| d.page_state(p)) {
                Some(swapdev::PageState::Stored) => {
                    out.evicted += 1;
                    PageState::Evicted
                }
                Some(swapdev::PageState::Zero) => {
                    out.zero += 1;
                    PageState::Zero
                }
                Some(swapdev::PageState::Absent) | None => {
                    out.missing += 1;
                    PageState::Missing
                }
            }
        };
        vm.states.set(p, state);
    }
    Ok(out)
}

/// The `[start, end)` byte ranges of `fd` below `size` that hold data.
fn data_extents(fd: BorrowedFd<'_>, size: u64) -> Result<Vec<(u64, u64)>, RebuildError> {
    use nix::unistd::{lseek, Whence};
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let start = match lseek(fd, at as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            // No data after `at`.
            Err(nix::Error::ENXIO) => break,
            Err(source) => return Err(RebuildError::Seek { offset: at, source }),
        };
        if start >= size {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(source) => {
                return Err(RebuildError::Seek {
                    offset: start,
                    source,
                })
            }
        };
        out.push((start, end));
        at = end.max(start + 1);
    }
    Ok(out)
}

/// Wake every thread waiting on a fault in `vm`'s guest memory (non-blocking for the ones
/// that are not: a wake of a range nobody waits on does nothing).
pub fn wake_all(vm: &Vm) -> Result<(), uffd::UffdError> {
    let ps = vm.layout.page_size();
    for run in vm.layout.all_runs() {
        vm.uffd.wake(run.host_addr, run.byte_len(ps))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GuestLayout, Region};
    use crate::vm::PeerInfo;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};
    use swapdev::backend::mem::{MemBackend, MemStore};
    use swapdev::{ChecksumKind, CodecPolicy, CreateOptions};

    fn memfd(pages: u64) -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(
            c"pw-reattach-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        let f = std::fs::File::from(fd);
        f.set_len(pages * 4096).unwrap();
        f
    }

    fn vm_with(file: std::fs::File, pages: u64, dev: Option<swapdev::SwapDevice>) -> Vm {
        let uffd = uffd::Uffd::new(uffd::UffdFlags::default()).unwrap();
        let layout = GuestLayout::new(
            4096,
            vec![Region {
                host_addr: 0x7000_0000,
                size: pages * 4096,
                offset: 0,
            }],
        )
        .unwrap();
        let mut vm = Vm::new(
            "r".into(),
            uffd,
            layout,
            Some(OwnedFd::from(file)),
            PeerInfo::default(),
        );
        vm.swapdev = dev.map(|d| Arc::new(Mutex::new(d)));
        vm
    }

    #[test]
    fn states_come_from_the_file_then_the_device() {
        let pages = 64;
        let file = memfd(pages);
        // Data in pages 0, 5..8 (a run) and the last page (partly).
        for p in [0u64, 5, 6, 7] {
            file.write_all_at(&[p as u8 + 1; 4096], p * 4096).unwrap();
        }
        file.write_all_at(b"tail", pages * 4096 - 100).unwrap();
        let mut dev = swapdev::SwapDevice::create(
            Box::new(MemBackend::new(MemStore::new())),
            CreateOptions {
                vm_uuid: uuid::Uuid::new_v4(),
                page_size: 4096,
                capacity_pages: pages,
                host_id: "test".into(),
                codec: CodecPolicy::Raw,
                checksum: ChecksumKind::Crc32c,
                force: false,
            },
        )
        .unwrap();
        let data = [7u8; 4096];
        let zero = [0u8; 4096];
        // 5 is in both (resident wins), 9 and 10 stored, 11 zero.
        dev.write_pages(&[
            (5, &data[..]),
            (9, &data[..]),
            (10, &data[..]),
            (11, &zero[..]),
        ])
        .unwrap();
        dev.flush().unwrap();
        let vm = vm_with(file, pages, Some(dev));
        let got = rebuild_states(&vm).unwrap();
        assert_eq!(
            got,
            Rebuilt {
                present: 5,
                evicted: 2,
                zero: 1,
                missing: pages - 8,
                holes_known: true
            }
        );
        for (p, want) in [
            (0, PageState::Present),
            (1, PageState::Missing),
            (5, PageState::Present),
            (7, PageState::Present),
            (8, PageState::Missing),
            (9, PageState::Evicted),
            (10, PageState::Evicted),
            (11, PageState::Zero),
            (pages - 1, PageState::Present),
        ] {
            assert_eq!(vm.states.get(p), want, "page {p}");
        }
        assert!(
            !vm.dirty.device_copy_current(9),
            "no device copy is trusted"
        );
    }

    #[test]
    fn an_empty_file_without_a_device_is_all_missing() {
        let vm = vm_with(memfd(16), 16, None);
        let got = rebuild_states(&vm).unwrap();
        assert_eq!((got.present, got.missing), (0, 16));
    }

    #[test]
    fn no_memory_file_is_refused() {
        let uffd = uffd::Uffd::new(uffd::UffdFlags::default()).unwrap();
        let layout = GuestLayout::new(
            4096,
            vec![Region {
                host_addr: 0x7000_0000,
                size: 4096,
                offset: 0,
            }],
        )
        .unwrap();
        let vm = Vm::new("r".into(), uffd, layout, None, PeerInfo::default());
        assert!(matches!(
            rebuild_states(&vm),
            Err(RebuildError::NoMemoryFile)
        ));
    }
}
