//! Decoding `struct uffd_msg` into [`Event`]s.

use std::os::fd::{FromRawFd, OwnedFd};

use crate::sys;

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted at `addr` (the exact address; round down to the page yourself).
    PageFault {
        addr: u64,
        /// The access was a write.
        write: bool,
        /// A write hit a write-protected page (register mode WP).
        wp: bool,
        /// A minor fault (page in the page cache, not mapped; register mode MINOR).
        minor: bool,
        /// Faulting thread id when `THREAD_ID` was negotiated, else 0.
        thread_id: u32,
    },
    /// `madvise(MADV_DONTNEED/MADV_REMOVE)` or similar discarded `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped; stop serving it.
    Unmap { start: u64, end: u64 },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// The process forked; `uffd` serves the child's copy of the registered ranges.
    Fork { uffd: OwnedFd },
    /// An event number this layer does not know.
    Unknown { event: u8 },
}

impl Event {
    pub(crate) fn from_msg(msg: &sys::UffdMsg) -> Self {
        let arg = msg.arg;
        match msg.event {
            sys::UFFD_EVENT_PAGEFAULT => {
                let flags = arg[0];
                Event::PageFault {
                    addr: arg[1],
                    write: flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
                    wp: flags & sys::UFFD_PAGEFAULT_FLAG_WP != 0,
                    minor: flags & sys::UFFD_PAGEFAULT_FLAG_MINOR != 0,
                    thread_id: arg[2] as u32,
                }
            }
            sys::UFFD_EVENT_REMOVE => Event::Remove {
                start: arg[0],
                end: arg[1],
            },
            sys::UFFD_EVENT_UNMAP => Event::Unmap {
                start: arg[0],
                end: arg[1],
            },
            sys::UFFD_EVENT_REMAP => Event::Remap {
                from: arg[0],
                to: arg[1],
                len: arg[2],
            },
            sys::UFFD_EVENT_FORK => {
                // SAFETY: for a FORK event the kernel installed a new uffd in our fd table and
                // passes its number in the low 32 bits; nobody else owns it.
                let uffd = unsafe { OwnedFd::from_raw_fd(arg[0] as u32 as i32) };
                Event::Fork { uffd }
            }
            other => Event::Unknown { event: other },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, arg: [u64; 3]) -> sys::UffdMsg {
        sys::UffdMsg {
            event,
            arg,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_pagefault_flags_and_ranges() {
        let e = Event::from_msg(&msg(
            sys::UFFD_EVENT_PAGEFAULT,
            [
                sys::UFFD_PAGEFAULT_FLAG_WRITE | sys::UFFD_PAGEFAULT_FLAG_WP,
                0x7000_1234,
                42,
            ],
        ));
        match e {
            Event::PageFault {
                addr,
                write,
                wp,
                minor,
                thread_id,
            } => {
                assert_eq!(
                    (addr, write, wp, minor, thread_id),
                    (0x7000_1234, true, true, false, 42)
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Event::from_msg(&msg(sys::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        ));
        assert!(matches!(
            Event::from_msg(&msg(sys::UFFD_EVENT_UNMAP, [0x1000, 0x3000, 0])),
            Event::Unmap { .. }
        ));
        assert!(matches!(
            Event::from_msg(&msg(0x77, [0; 3])),
            Event::Unknown { event: 0x77 }
        ));
    }
}
