//! `uffd` — a thin userfaultfd layer for the pagewise pager.
//!
//! All of the pager's `unsafe` lives here: raw `ioctl`s on a userfaultfd with hand-written
//! `#[repr(C)]` structs ([`sys`]), so the kernel's full feature mask is visible and features
//! like `WP_ASYNC`, `WP_UNPOPULATED`, `MINOR_SHMEM` and `MOVE` are usable regardless of the
//! build host's headers. No bindgen.

mod error;
mod event;
mod features;
pub mod pagemap;
mod sys;

#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

pub use error::{CopyError, UffdError};
pub use event::Event;
pub use features::{Features, Ioctls, RegisterMode};
pub use pagemap::{PageCategories, PageRegion, Pagemap, ScanQuery};

/// Flags for creating a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdFlags {
    /// `O_NONBLOCK`: `read` returns no events instead of blocking (use with poll/io_uring).
    pub nonblocking: bool,
    /// `O_CLOEXEC`.
    pub cloexec: bool,
    /// `UFFD_USER_MODE_ONLY`: only user-mode faults are reported. Must be false for KVM
    /// guests (their faults happen in kernel mode, on the VMM's behalf).
    pub user_mode_only: bool,
}

impl Default for UffdFlags {
    fn default() -> Self {
        Self {
            nonblocking: false,
            cloexec: true,
            user_mode_only: false,
        }
    }
}

/// How a copy/zeropage/continue places a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlaceMode {
    /// Map the page write-protected (copy/continue; needs a WP registration).
    pub wp: bool,
    /// Do not wake the faulting threads (wake them later with [`Uffd::wake`]).
    pub dontwake: bool,
}

/// An open userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Uffd {
    /// Create a userfaultfd: `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) first, the
    /// `userfaultfd(2)` syscall if the device is missing or refuses.
    pub fn new(flags: UffdFlags) -> Result<Self, UffdError> {
        let mut raw_flags = 0;
        if flags.nonblocking {
            raw_flags |= libc::O_NONBLOCK;
        }
        if flags.cloexec {
            raw_flags |= libc::O_CLOEXEC;
        }
        if flags.user_mode_only {
            raw_flags |= sys::UFFD_USER_MODE_ONLY;
        }
        let dev_err = match Self::new_from_device(raw_flags) {
            Ok(fd) => return Ok(Self { fd }),
            Err(e) => e,
        };
        // SAFETY: userfaultfd(2) takes an int flag word and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, raw_flags) };
        if fd < 0 {
            return Err(UffdError::Create {
                device: dev_err,
                syscall: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the syscall returned a fresh fd that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
        })
    }

    fn new_from_device(raw_flags: i32) -> std::io::Result<OwnedFd> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd or -1.
        let fd = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                sys::USERFAULTFD_IOC_NEW as _,
                raw_flags as libc::c_ulong,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a fresh fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Take ownership of a raw uffd.
    ///
    /// # Safety
    /// `fd` must be an open userfaultfd that nothing else owns or closes.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: the caller promises `fd` is an owned, open userfaultfd.
        Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }

    pub fn into_raw(self) -> RawFd {
        self.fd.into_raw_fd()
    }

    /// Negotiate the API (once per uffd). Enables exactly `requested` and returns the full
    /// feature mask the kernel supports. If the kernel lacks some requested feature the call
    /// fails naming the missing bits (and the uffd cannot be negotiated again).
    pub fn api(&self, requested: Features) -> Result<Features, UffdError> {
        let mut api = sys::UffdioApi {
            api: sys::UFFD_API,
            features: requested.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_API as _, &mut api) };
        let available = Features(api.features);
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            let missing = requested.missing_from(available);
            return Err(UffdError::Api {
                requested,
                missing: (api.features != 0).then_some(missing),
                source,
            });
        }
        Ok(available)
    }

    /// Register `[addr, addr+len)` for `mode`; returns the ioctls the range supports.
    pub fn register(&self, addr: u64, len: u64, mode: RegisterMode) -> Result<Ioctls, UffdError> {
        let mut reg = sys::UffdioRegister {
            range: sys::UffdioRange { start: addr, len },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_REGISTER as _, &mut reg) };
        if rc < 0 {
            return Err(UffdError::range("register", addr, len));
        }
        Ok(Ioctls(reg.ioctls))
    }

    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = sys::UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_UNREGISTER as _, &range) };
        if rc < 0 {
            return Err(UffdError::range("unregister", addr, len));
        }
        Ok(())
    }

    /// Wake threads waiting on faults in `[addr, addr+len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let range = sys::UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WAKE as _, &range) };
        if rc < 0 {
            return Err(UffdError::range("wake", addr, len));
        }
        Ok(())
    }

    /// Atomically copy `len` bytes from `src` (our memory) into the registered range at
    /// `dst`. Returns the bytes copied (`len`), or a [`CopyError`] carrying how many bytes
    /// were placed before the problem.
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes in this process.
    pub unsafe fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        mode: PlaceMode,
    ) -> Result<u64, CopyError> {
        let mut bits = 0;
        if mode.dontwake {
            bits |= sys::UFFDIO_COPY_MODE_DONTWAKE;
        }
        if mode.wp {
            bits |= sys::UFFDIO_COPY_MODE_WP;
        }
        let mut copy = sys::UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: bits,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one `struct uffdio_copy`; the kernel reads
        // `len` bytes at `src`, which the caller guarantees are readable.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_COPY as _, &mut copy) };
        if rc < 0 {
            return Err(CopyError::from_errno(errno(), copy.copy, dst, len));
        }
        Ok(copy.copy as u64)
    }

    /// Copy from a byte slice (safe wrapper of [`Uffd::copy`]).
    pub fn copy_from(&self, dst: u64, src: &[u8], mode: PlaceMode) -> Result<u64, CopyError> {
        // SAFETY: `src` is a live slice of exactly `src.len()` readable bytes.
        unsafe { self.copy(dst, src.as_ptr(), src.len() as u64, mode) }
    }

    /// Map zero pages over `[dst, dst+len)`.
    pub fn zeropage(&self, dst: u64, len: u64, dontwake: bool) -> Result<u64, CopyError> {
        let mut zp = sys::UffdioZeropage {
            range: sys::UffdioRange { start: dst, len },
            mode: if dontwake {
                sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `struct uffdio_zeropage`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_ZEROPAGE as _, &mut zp) };
        if rc < 0 {
            return Err(CopyError::from_errno(errno(), zp.zeropage, dst, len));
        }
        Ok(zp.zeropage as u64)
    }

    /// Set (`protect`) or clear write protection on `[addr, addr+len)`. Clearing without
    /// `dontwake` wakes writers blocked on the range.
    pub fn write_protect(
        &self,
        addr: u64,
        len: u64,
        protect: bool,
        dontwake: bool,
    ) -> Result<(), UffdError> {
        let mut mode = 0;
        if protect {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_WP;
        }
        if dontwake {
            mode |= sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = sys::UffdioWriteprotect {
            range: sys::UffdioRange { start: addr, len },
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `struct uffdio_writeprotect`.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_WRITEPROTECT as _, &mut wp) };
        if rc < 0 {
            return Err(UffdError::range("write_protect", addr, len));
        }
        Ok(())
    }

    /// Resolve MINOR faults on `[addr, addr+len)` by mapping the page-cache pages already there.
    pub fn continue_(&self, addr: u64, len: u64, mode: PlaceMode) -> Result<u64, CopyError> {
        let mut bits = 0;
        if mode.dontwake {
            bits |= sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        if mode.wp {
            bits |= sys::UFFDIO_CONTINUE_MODE_WP;
        }
        let mut c = sys::UffdioContinue {
            range: sys::UffdioRange { start: addr, len },
            mode: bits,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads and writes one `struct uffdio_continue`.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), sys::UFFDIO_CONTINUE as _, &mut c) };
        if rc < 0 {
            return Err(CopyError::from_errno(errno(), c.mapped, addr, len));
        }
        Ok(c.mapped as u64)
    }

    /// Read up to `max` pending events, appending them to `out`. Returns how many were read:
    /// 0 when a non-blocking uffd has nothing pending. A blocking uffd waits for at least one.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, UffdError> {
        const BATCH: usize = 64;
        let mut msgs = [sys::UffdMsg::default(); BATCH];
        let want = max.clamp(1, BATCH);
        let n = loop {
            // SAFETY: reading into `msgs`, an array of `want` or more 32-byte uffd_msg slots.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    want * std::mem::size_of::<sys::UffdMsg>(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(0),
                _ => return Err(UffdError::Read(std::io::Error::last_os_error())),
            }
        };
        let count = n / std::mem::size_of::<sys::UffdMsg>();
        out.extend(msgs[..count].iter().map(Event::from_msg));
        Ok(count)
    }
}

/// What `fd` is, as `/proc/self/fd/N` names it (e.g. `anon_inode:[userfaultfd]`).
pub fn describe_fd(fd: BorrowedFd<'_>) -> std::io::Result<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(target.to_string_lossy().into_owned())
}

/// Whether `fd` is a userfaultfd (checked through `/proc/self/fd`). Use it on fds received
/// from other processes before wrapping them with `Uffd::from`.
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    Ok(describe_fd(fd)? == "anon_inode:[userfaultfd]")
}

impl From<OwnedFd> for Uffd {
    /// Wrap a uffd received from elsewhere (SCM_RIGHTS). The caller vouches it is a uffd;
    /// a wrong fd makes every ioctl fail with an error, nothing worse.
    fn from(fd: OwnedFd) -> Self {
        Self { fd }
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> Self {
        u.fd
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
