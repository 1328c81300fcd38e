//! Thin wrappers over the few raw calls the library makes. All of its `unsafe` is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Signature of libc's `mmap`.
type MmapFn = unsafe extern "C" fn(
    *mut libc::c_void,
    libc::size_t,
    libc::c_int,
    libc::c_int,
    libc::c_int,
    libc::off_t,
) -> *mut libc::c_void;

static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);

fn resolve_real_mmap() -> usize {
    let cached = REAL_MMAP.load(Ordering::Acquire);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; returns a function address or
    // null. glibc's dlsym does not call mmap through the PLT, so this cannot recurse into us.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mmap".as_ptr()) } as usize;
    REAL_MMAP.store(found, Ordering::Release);
    found
}

/// The next `mmap` in the lookup order (libc's), or the raw syscall if none is found.
pub fn real_mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: RawFd,
    offset: i64,
) -> *mut libc::c_void {
    let next = resolve_real_mmap();
    if next != 0 {
        // SAFETY: `next` is the address dlsym returned for "mmap", which has this signature;
        // the arguments are passed through unchanged from our caller, who owns their meaning.
        let next: MmapFn = unsafe { std::mem::transmute::<usize, MmapFn>(next) };
        // SAFETY: see above; mmap's contract is the caller's.
        return unsafe { next(addr, len, prot, flags, fd, offset) };
    }
    // SAFETY: the mmap syscall with the caller's arguments; it returns an address or -errno.
    let rc = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, offset) };
    if (-4095..0).contains(&rc) {
        set_errno(-rc as i32);
        return libc::MAP_FAILED;
    }
    rc as *mut libc::c_void
}

fn set_errno(value: i32) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = value };
}

/// Save and restore errno around work done inside a hook, so the caller sees mmap's errno.
pub struct ErrnoGuard(i32);

impl ErrnoGuard {
    pub fn save() -> Self {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        Self(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        set_errno(self.0);
    }
}

/// `f_type` and `f_bsize` of the filesystem holding `fd`.
pub fn fstatfs(fd: RawFd) -> io::Result<(i64, i64)> {
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one struct statfs through the valid pointer.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_type as i64, st.f_bsize as i64))
}

/// A close-on-exec duplicate of `fd`.
pub fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a caller-provided fd returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Send `bytes` with `fds` attached as SCM_RIGHTS (the rest plainly if the first send was short).
pub fn send_with_fds(sock: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `space` zeroed bytes, enough for one cmsghdr holding
    // `fds`; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr() as *const u8,
            libc::CMSG_DATA(cmsg),
            fd_bytes as usize,
        );
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &bytes[sent as usize..];
    while !rest.is_empty() {
        // SAFETY: send reads `rest.len()` bytes from a valid slice.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                rest.as_ptr() as *const libc::c_void,
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        rest = &rest[n as usize..];
    }
    Ok(())
}

/// Write a message to stderr (fd 2) without locks or allocation beyond the message itself.
pub fn write_stderr(message: &str) {
    let mut rest = message.as_bytes();
    while !rest.is_empty() {
        // SAFETY: write reads `rest.len()` bytes from a valid slice.
        let n = unsafe { libc::write(2, rest.as_ptr() as *const libc::c_void, rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Leave the process at once with status 1 (no atexit handlers: we may be inside mmap).
pub fn exit_now() -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(1) }
}

/// Block every signal in the calling thread; returns the previous mask.
pub fn block_all_signals() -> libc::sigset_t {
    // SAFETY: all-zero sigset_t values are valid inputs to sigfillset/pthread_sigmask, which
    // initialise/overwrite them; the pointers are to live locals.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        old
    }
}

/// Restore a mask saved by [`block_all_signals`].
pub fn restore_signals(saved: &libc::sigset_t) {
    // SAFETY: `saved` is a mask returned by pthread_sigmask.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, saved, std::ptr::null_mut());
    }
}
