//! Thin wrapper over libnfs 4 (Debian `libnfs-dev`): one context, one open file, and the
//! asynchronous pread/pwrite/fsync calls whose completions libnfs reports through callbacks.
//!
//! All of the NFS backend's `unsafe` lives here. The contract with libnfs:
//! - A request's state (`Req`: its token, and for reads and writes the buffer) is boxed and
//!   handed to libnfs as `private_data`; libnfs calls `on_done` exactly once for every call
//!   it accepted (success, error, timeout, or `RPC_STATUS_CANCEL` while the context is
//!   destroyed). `on_done` takes the box back, so the buffer lives until libnfs is done with
//!   it: libnfs keeps the write buffer's address to resend the rest of a short write.
//! - Callbacks run only inside libnfs calls made on this context (`service`, the blocking
//!   calls, `nfs_destroy_context`); they touch nothing but the request box and the done queue.
//! - The done queue is freed only after the context is destroyed.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr;

use crate::AlignedBuf;

#[repr(C)]
struct NfsContextRaw {
    _opaque: [u8; 0],
}

#[repr(C)]
struct NfsFhRaw {
    _opaque: [u8; 0],
}

/// `struct exportnode` from libnfs-raw-mount.h.
#[repr(C)]
struct ExportNode {
    ex_dir: *mut c_char,
    ex_groups: *mut c_void,
    ex_next: *mut ExportNode,
}

/// `struct nfs_stat_64` from libnfs.h.
#[repr(C)]
#[derive(Default)]
struct NfsStat64 {
    dev: u64,
    ino: u64,
    mode: u64,
    nlink: u64,
    uid: u64,
    gid: u64,
    rdev: u64,
    size: u64,
    blksize: u64,
    blocks: u64,
    atime: u64,
    mtime: u64,
    ctime: u64,
    atime_nsec: u64,
    mtime_nsec: u64,
    ctime_nsec: u64,
    used: u64,
}

type NfsCb = unsafe extern "C" fn(
    err: c_int,
    nfs: *mut NfsContextRaw,
    data: *mut c_void,
    private_data: *mut c_void,
);

#[link(name = "nfs")]
extern "C" {
    fn nfs_init_context() -> *mut NfsContextRaw;
    fn nfs_destroy_context(nfs: *mut NfsContextRaw);
    fn nfs_get_error(nfs: *mut NfsContextRaw) -> *mut c_char;
    fn nfs_get_fd(nfs: *mut NfsContextRaw) -> c_int;
    fn nfs_which_events(nfs: *mut NfsContextRaw) -> c_int;
    fn nfs_service(nfs: *mut NfsContextRaw, revents: c_int) -> c_int;
    fn nfs_set_timeout(nfs: *mut NfsContextRaw, milliseconds: c_int);
    fn nfs_set_autoreconnect(nfs: *mut NfsContextRaw, num_retries: c_int);
    fn nfs_get_readmax(nfs: *mut NfsContextRaw) -> u64;
    fn nfs_get_writemax(nfs: *mut NfsContextRaw) -> u64;
    fn nfs_mount(nfs: *mut NfsContextRaw, server: *const c_char, export: *const c_char) -> c_int;
    fn nfs_open2(
        nfs: *mut NfsContextRaw,
        path: *const c_char,
        flags: c_int,
        mode: c_int,
        fh: *mut *mut NfsFhRaw,
    ) -> c_int;
    fn nfs_close(nfs: *mut NfsContextRaw, fh: *mut NfsFhRaw) -> c_int;
    fn nfs_fstat64(nfs: *mut NfsContextRaw, fh: *mut NfsFhRaw, st: *mut NfsStat64) -> c_int;
    fn nfs_ftruncate(nfs: *mut NfsContextRaw, fh: *mut NfsFhRaw, length: u64) -> c_int;
    fn nfs_pread_async(
        nfs: *mut NfsContextRaw,
        fh: *mut NfsFhRaw,
        offset: u64,
        count: u64,
        cb: NfsCb,
        private_data: *mut c_void,
    ) -> c_int;
    fn nfs_pwrite_async(
        nfs: *mut NfsContextRaw,
        fh: *mut NfsFhRaw,
        offset: u64,
        count: u64,
        buf: *const c_void,
        cb: NfsCb,
        private_data: *mut c_void,
    ) -> c_int;
    fn nfs_fsync_async(
        nfs: *mut NfsContextRaw,
        fh: *mut NfsFhRaw,
        cb: NfsCb,
        private_data: *mut c_void,
    ) -> c_int;
    fn mount_getexports(server: *const c_char) -> *mut ExportNode;
    fn mount_free_export_list(exports: *mut ExportNode);
}

/// A finished asynchronous call.
pub struct Done {
    pub token: u64,
    /// Bytes transferred (reads, writes) or 0 (fsync); or (-errno, libnfs's message).
    pub result: Result<usize, (i32, String)>,
    /// The request's buffer, back from libnfs (reads: filled with what arrived).
    pub buf: Option<AlignedBuf>,
}

struct Req {
    token: u64,
    is_read: bool,
    buf: Option<AlignedBuf>,
    done: *mut Vec<Done>,
}

unsafe extern "C" fn on_done(
    err: c_int,
    nfs: *mut NfsContextRaw,
    data: *mut c_void,
    private_data: *mut c_void,
) {
    // SAFETY: private_data is the Box<Req> leaked by `submit_req`; libnfs calls back once per
    // accepted call, so the box is taken back exactly once.
    let mut req = unsafe { Box::from_raw(private_data as *mut Req) };
    let result = if err >= 0 {
        let n = err as usize;
        if req.is_read {
            if let Some(buf) = req.buf.as_mut() {
                // Bounded: never copy more than the buffer holds, whatever libnfs reports.
                let n = n.min(buf.len());
                if n > 0 && !data.is_null() {
                    // SAFETY: for a successful pread, `data` points at `err` bytes that stay
                    // valid during the callback; we copy at most that many into our buffer.
                    unsafe { ptr::copy_nonoverlapping(data as *const u8, buf.as_mut_ptr(), n) };
                }
            }
        }
        Ok(n)
    } else {
        // SAFETY: nfs is the live context that is calling us.
        Err((err, unsafe { error_string(nfs) }))
    };
    let done = Done {
        token: req.token,
        result,
        buf: req.buf.take(),
    };
    // SAFETY: `done` points at the queue owned by the Context, freed only after
    // nfs_destroy_context returned (no callback can run after that).
    unsafe { (*req.done).push(done) };
}

/// # Safety
/// `nfs` must be a live context.
unsafe fn error_string(nfs: *mut NfsContextRaw) -> String {
    // SAFETY: per the caller; nfs_get_error returns NULL or a NUL-terminated string owned by
    // the context.
    let p = unsafe { nfs_get_error(nfs) };
    if p.is_null() {
        return "unknown libnfs error".into();
    }
    // SAFETY: non-null, NUL-terminated (above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn cstring(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("'{s}' contains a NUL byte"))
}

/// The exports an NFS server lists through its MOUNT service; `None` if it did not answer
/// (rpcbind or mountd unreachable; libnfs gives no reason for this call).
pub fn list_exports(server: &str) -> Option<Vec<String>> {
    let server = cstring(server).ok()?;
    // SAFETY: server is a valid C string; the result is freed below.
    let head = unsafe { mount_getexports(server.as_ptr()) };
    if head.is_null() {
        return None;
    }
    let mut out = Vec::new();
    let mut node = head;
    // Bounded walk: a list longer than this is not something a server should send.
    while !node.is_null() && out.len() < 4096 {
        // SAFETY: node is a live element of the list libnfs allocated.
        let n = unsafe { &*node };
        if !n.ex_dir.is_null() {
            // SAFETY: ex_dir is a NUL-terminated string decoded by libnfs.
            out.push(
                unsafe { CStr::from_ptr(n.ex_dir) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        node = n.ex_next;
    }
    // SAFETY: head came from mount_getexports and is freed once.
    unsafe { mount_free_export_list(head) };
    Some(out)
}

/// A libnfs context with (after `open`) one open file.
pub struct Context {
    nfs: *mut NfsContextRaw,
    fh: *mut NfsFhRaw,
    done: *mut Vec<Done>,
}

// SAFETY: libnfs 4 contexts have no thread affinity; Context is used by one thread at a time
// (&mut self for everything that calls into libnfs), and Send only moves it.
unsafe impl Send for Context {}

impl Context {
    pub fn new() -> Option<Self> {
        // SAFETY: plain constructor; NULL on failure.
        let nfs = unsafe { nfs_init_context() };
        if nfs.is_null() {
            return None;
        }
        Some(Self {
            nfs,
            fh: ptr::null_mut(),
            done: Box::into_raw(Box::default()),
        })
    }

    fn error(&self) -> String {
        // SAFETY: self.nfs is live for self's lifetime.
        unsafe { error_string(self.nfs) }
    }

    /// RPC timeout for every call (blocking and asynchronous); `None`: wait forever.
    pub fn set_timeout(&mut self, ms: Option<u32>) {
        let ms = ms.map_or(-1, |m| m.min(i32::MAX as u32) as c_int);
        // SAFETY: live context.
        unsafe { nfs_set_timeout(self.nfs, ms) };
    }

    /// 0: a broken connection fails every outstanding call instead of reconnecting.
    pub fn set_autoreconnect(&mut self, retries: i32) {
        // SAFETY: live context.
        unsafe { nfs_set_autoreconnect(self.nfs, retries) };
    }

    pub fn mount(&mut self, server: &str, export: &str) -> Result<(), String> {
        let (s, e) = (cstring(server)?, cstring(export)?);
        // SAFETY: live context, valid C strings.
        let rc = unsafe { nfs_mount(self.nfs, s.as_ptr(), e.as_ptr()) };
        if rc != 0 {
            return Err(self.error());
        }
        Ok(())
    }

    /// Open `path` (relative to the export's root, starting with '/'). Errors: (-errno, msg).
    pub fn open(&mut self, path: &str, flags: c_int, mode: c_int) -> Result<(), (i32, String)> {
        assert!(self.fh.is_null(), "one file per context");
        let p = cstring(path).map_err(|e| (-libc::EINVAL, e))?;
        let mut fh = ptr::null_mut();
        // SAFETY: live context, valid C string, fh is an out-pointer.
        let rc = unsafe { nfs_open2(self.nfs, p.as_ptr(), flags, mode, &mut fh) };
        if rc != 0 || fh.is_null() {
            return Err((rc.min(-1), self.error()));
        }
        self.fh = fh;
        Ok(())
    }

    /// File size from GETATTR (blocking).
    pub fn size(&mut self) -> Result<u64, (i32, String)> {
        let mut st = NfsStat64::default();
        // SAFETY: live context and open file; st is a valid out-pointer.
        let rc = unsafe { nfs_fstat64(self.nfs, self.fh, &mut st) };
        if rc != 0 {
            return Err((rc, self.error()));
        }
        Ok(st.size)
    }

    /// SETATTR size (blocking).
    pub fn truncate(&mut self, len: u64) -> Result<(), (i32, String)> {
        // SAFETY: live context and open file.
        let rc = unsafe { nfs_ftruncate(self.nfs, self.fh, len) };
        if rc != 0 {
            return Err((rc, self.error()));
        }
        Ok(())
    }

    /// Largest READ / WRITE payload the server accepts in one call (from FSINFO, bounded).
    pub fn max_io(&self) -> (u64, u64) {
        // SAFETY: live context.
        let (r, w) = unsafe { (nfs_get_readmax(self.nfs), nfs_get_writemax(self.nfs)) };
        (r.clamp(4096, 1 << 20), w.clamp(4096, 1 << 20))
    }

    fn submit_req(
        &mut self,
        req: Req,
        call: impl FnOnce(*mut NfsContextRaw, *mut NfsFhRaw, *mut c_void, Option<*const u8>) -> c_int,
    ) -> Result<(), String> {
        let data = req.buf.as_ref().map(|b| b.as_ptr());
        let raw = Box::into_raw(Box::new(req));
        let rc = call(self.nfs, self.fh, raw as *mut c_void, data);
        if rc != 0 {
            // SAFETY: libnfs refused the call, so it will not call back: the box is ours again.
            drop(unsafe { Box::from_raw(raw) });
            return Err(self.error());
        }
        Ok(())
    }

    /// Queue a READ of `buf.len()` bytes at `offset`; the buffer comes back in its `Done`.
    pub fn pread(&mut self, token: u64, offset: u64, buf: AlignedBuf) -> Result<(), String> {
        let len = buf.len() as u64;
        let req = Req {
            token,
            is_read: true,
            buf: Some(buf),
            done: self.done,
        };
        self.submit_req(req, |nfs, fh, private, _| {
            // SAFETY: live context and file; private is the boxed Req, owned by libnfs until
            // on_done runs.
            unsafe { nfs_pread_async(nfs, fh, offset, len, on_done, private) }
        })
    }

    /// Queue a WRITE of all of `buf` at `offset`; libnfs reads `buf` until `Done` returns it.
    pub fn pwrite(&mut self, token: u64, offset: u64, buf: AlignedBuf) -> Result<(), String> {
        let len = buf.len() as u64;
        let req = Req {
            token,
            is_read: false,
            buf: Some(buf),
            done: self.done,
        };
        self.submit_req(req, |nfs, fh, private, data| {
            let data = data.unwrap_or(ptr::null()) as *const c_void;
            // SAFETY: data points at `len` bytes of the boxed buffer, which libnfs owns (and
            // which does not move: it is a heap allocation) until on_done runs.
            unsafe { nfs_pwrite_async(nfs, fh, offset, len, data, on_done, private) }
        })
    }

    /// Queue a COMMIT of the whole file.
    pub fn fsync(&mut self, token: u64) -> Result<(), String> {
        let req = Req {
            token,
            is_read: false,
            buf: None,
            done: self.done,
        };
        self.submit_req(req, |nfs, fh, private, _| {
            // SAFETY: live context and file; private as above.
            unsafe { nfs_fsync_async(nfs, fh, on_done, private) }
        })
    }

    /// The socket to poll, and the events libnfs wants (POLLIN/POLLOUT).
    pub fn poll_target(&self) -> (c_int, i16) {
        // SAFETY: live context.
        unsafe { (nfs_get_fd(self.nfs), nfs_which_events(self.nfs) as i16) }
    }

    /// Wait up to `timeout_ms` for the socket to be ready for what libnfs wants; the revents
    /// (0 on timeout or EINTR).
    pub fn wait(&self, timeout_ms: i32) -> i16 {
        let (fd, events) = self.poll_target();
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc <= 0 {
            0
        } else {
            pfd.revents
        }
    }

    /// Let libnfs send/receive after `revents` (0: only run its timers). Err: the connection is
    /// unusable; libnfs's message.
    pub fn service(&mut self, revents: i16) -> Result<(), String> {
        // SAFETY: live context.
        let rc = unsafe { nfs_service(self.nfs, revents as c_int) };
        if rc < 0 {
            return Err(self.error());
        }
        Ok(())
    }

    /// Move finished calls to `out`.
    pub fn take_done(&mut self, out: &mut Vec<Done>) -> usize {
        // SAFETY: the queue lives as long as self; no callback runs during this call.
        let q = unsafe { &mut *self.done };
        let n = q.len();
        out.append(q);
        n
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if !self.fh.is_null() {
            // SAFETY: live context and file, closed once. (Runs the event loop: callbacks of
            // outstanding calls may fire and push to the queue, which is still alive.)
            unsafe { nfs_close(self.nfs, self.fh) };
        }
        // SAFETY: destroyed once; outstanding calls are cancelled and their callbacks run now.
        unsafe { nfs_destroy_context(self.nfs) };
        // SAFETY: allocated by Box::into_raw in new(); no callback can run any more.
        drop(unsafe { Box::from_raw(self.done) });
    }
}
