//! A swap device on a file in an NFSv3 export, spoken to from userspace through libnfs
//! (`nfs://SERVER/EXPORT/PATH`; no kernel NFS client needed).
//!
//! One TCP connection; reads, writes and COMMITs are pipelined: every submitted request
//! becomes one libnfs asynchronous call (libnfs splits it into READ/WRITE RPCs of at most the
//! server's rtmax/wtmax and sends them all), and replies are matched in any order. One
//! `poll` loop drives the socket in both directions.
//!
//! Guarantees (what the swap device's crash-safety and fencing rules need):
//! - **Writes are stable.** The file is opened `O_SYNC`, so every WRITE is sent `FILE_SYNC`:
//!   a write completes only after the server has put it on stable storage. We do not use
//!   UNSTABLE writes + COMMIT, because libnfs's file API hides the write verifier: after a
//!   server reboot between WRITE and COMMIT the lost unstable data could not be detected and
//!   a COMMIT would still report success.
//! - **`Flush`** waits until every write submitted before it has been replied to, then sends
//!   a COMMIT for the whole file; it completes when the COMMIT does. With stable writes the
//!   COMMIT is belt and braces, but it keeps `flush()` meaning "durable" on any server.
//! - **No client cache.** libnfs's page cache and read-ahead are off (their defaults), so every
//!   read goes to the server: there is no close-to-open window in which this host could read
//!   stale data written by another host (see docs/backends.md, "NFS").
//! - **`Trim` is advisory**: NFSv3 has no way to deallocate a range (DEALLOCATE is NFSv4.2),
//!   so it completes at once and changes nothing (like NBD without `SEND_TRIM`).
//! - A broken connection fails every outstanding request with a `Protocol` error naming the
//!   server and path, and later submits fail the same way (no silent reconnect and resend).
//! - A read that reaches the end of the file completes with `Short` (never zero-filled).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Duration;

use super::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use crate::AlignedBuf;

mod ffi;
pub mod locate;

#[cfg(test)]
mod tests;

use ffi::{Context, Done};

/// Typed errors of the NFS backend; each names the server, and the export and path it was
/// working on.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    #[error("libnfs could not create a context (out of memory?)")]
    Context,
    #[error(
        "NFS server {server} did not answer (no export list from its rpcbind/MOUNT service, and \
         mounting {export} failed: {message})"
    )]
    Unreachable {
        server: String,
        export: String,
        message: String,
    },
    #[error("NFS server {server} exports nothing that contains {path} (its exports: {exports})")]
    NoExport {
        server: String,
        path: String,
        exports: String,
    },
    #[error("cannot mount export {export} from NFS server {server}: {message}")]
    Mount {
        server: String,
        export: String,
        message: String,
    },
    #[error("cannot open {path} in export {export} on NFS server {server}: {message}")]
    Open {
        server: String,
        export: String,
        path: String,
        errno: i32,
        message: String,
    },
    #[error("{op} of {path} in export {export} on NFS server {server} failed: {message}")]
    Request {
        op: &'static str,
        server: String,
        export: String,
        path: String,
        errno: i32,
        message: String,
    },
}

impl NfsError {
    /// The errno libnfs reported, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NfsError::Open { errno, .. } | NfsError::Request { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    fn into_backend(self) -> BackendError {
        BackendError::Setup(self.to_string())
    }
}

/// Connection tuning for [`NfsBackend::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NfsOptions {
    /// Create the file (mode 0600) if it does not exist.
    pub create: bool,
    /// Timeout of each RPC during set-up (rpcbind, MOUNT, LOOKUP, CREATE).
    pub setup_timeout: Duration,
    /// Timeout of each READ/WRITE/COMMIT RPC (`None`: wait forever).
    pub io_timeout: Option<Duration>,
}

impl Default for NfsOptions {
    fn default() -> Self {
        Self {
            create: false,
            setup_timeout: Duration::from_secs(30),
            io_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// Largest read or write in one request: libnfs returns the byte count of a call as a C
/// `int` (and READ3/WRITE3 counts are 32-bit), so anything near 2 GiB would be misreported.
pub const MAX_REQUEST: usize = 1 << 30;

/// What a submitted request is, while libnfs works on it.
struct Pending {
    tag: u64,
    op: &'static str,
    offset: u64,
    len: usize,
}

/// A file in an NFSv3 export.
pub struct NfsBackend {
    ctx: Context,
    server: String,
    export: String,
    /// Path of the file relative to the export's root (starts with '/').
    path: String,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    writes_in_flight: usize,
    in_flight: usize,
    ready: VecDeque<IoCompletion>,
    done: Vec<Done>,
    /// Size from GETATTR at open, then tracked (grow, writes past the end).
    size: u64,
    broken: Option<String>,
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

impl NfsBackend {
    /// Mount the export holding `full_path` (an absolute path on `server`, export included)
    /// and open that file. The export is the longest one the server lists that is a prefix
    /// of `full_path` at a '/' boundary.
    pub fn connect(server: &str, full_path: &str, opts: NfsOptions) -> Result<Self, NfsError> {
        let listed = ffi::list_exports(server);
        let (export, path) = match &listed {
            Some(exports) => {
                locate::split_export(full_path, exports).ok_or_else(|| NfsError::NoExport {
                    server: server.into(),
                    path: full_path.into(),
                    exports: if exports.is_empty() {
                        "none".into()
                    } else {
                        exports.join(", ")
                    },
                })?
            }
            None => locate::split_parent(full_path),
        };
        let mut ctx = Context::new().ok_or(NfsError::Context)?;
        ctx.set_timeout(Some(ms(opts.setup_timeout)));
        ctx.set_autoreconnect(0);
        ctx.mount(server, &export).map_err(|message| match listed {
            None => NfsError::Unreachable {
                server: server.into(),
                export: export.clone(),
                message,
            },
            Some(_) => NfsError::Mount {
                server: server.into(),
                export: export.clone(),
                message,
            },
        })?;
        let mut flags = libc::O_RDWR | libc::O_SYNC;
        if opts.create {
            flags |= libc::O_CREAT;
        }
        ctx.open(&path, flags, 0o600)
            .map_err(|(errno, message)| NfsError::Open {
                server: server.into(),
                export: export.clone(),
                path: path.clone(),
                errno,
                message,
            })?;
        let size = ctx.size().map_err(|(errno, message)| NfsError::Request {
            op: "getattr",
            server: server.into(),
            export: export.clone(),
            path: path.clone(),
            errno,
            message,
        })?;
        ctx.set_timeout(opts.io_timeout.map(ms));
        tracing::debug!(server, export, path, size, "NFS file opened");
        Ok(Self {
            ctx,
            server: server.into(),
            export,
            path,
            pending: HashMap::new(),
            next_token: 1,
            writes_in_flight: 0,
            in_flight: 0,
            ready: VecDeque::new(),
            done: Vec::new(),
            size,
            broken: None,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn export(&self) -> &str {
        &self.export
    }

    /// The file's path relative to the export's root.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Largest READ and WRITE payload per RPC the server accepts (FSINFO rtmax/wtmax).
    pub fn max_io(&self) -> (u64, u64) {
        self.ctx.max_io()
    }

    fn request_error(&self, op: &'static str, errno: i32, message: String) -> NfsError {
        NfsError::Request {
            op,
            server: self.server.clone(),
            export: self.export.clone(),
            path: self.path.clone(),
            errno,
            message,
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, errno: i32, message: String) -> BackendError {
        let kind = io::Error::from_raw_os_error(errno.unsigned_abs() as i32).kind();
        BackendError::Io {
            op,
            offset,
            source: io::Error::new(kind, self.request_error(op, errno, message)),
        }
    }

    fn broken_error(&self, why: &str) -> BackendError {
        BackendError::Protocol(format!(
            "NFS connection to {} (export {}, file {}) is broken: {why}",
            self.server, self.export, self.path
        ))
    }

    fn complete_now(&mut self, tag: u64, buf: Option<AlignedBuf>) {
        self.in_flight += 1;
        self.ready.push_back(IoCompletion {
            tag,
            result: Ok(buf),
        });
    }

    fn track(&mut self, pending: Pending) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        if pending.op == "write" {
            self.writes_in_flight += 1;
        }
        self.pending.insert(token, pending);
        self.in_flight += 1;
        token
    }

    fn untrack(&mut self, token: u64) -> Option<Pending> {
        let p = self.pending.remove(&token)?;
        if p.op == "write" {
            self.writes_in_flight -= 1;
        }
        Some(p)
    }

    /// Turn finished libnfs calls into completions.
    fn collect(&mut self) {
        self.ctx.take_done(&mut self.done);
        let done = std::mem::take(&mut self.done);
        for d in done {
            // Unknown token: a call already failed by `fail_all`.
            let Some(p) = self.untrack(d.token) else {
                continue;
            };
            let result = match d.result {
                Err((errno, message)) => Err(self.io_error(p.op, p.offset, errno, message)),
                Ok(n) if p.op != "flush" && n < p.len => Err(BackendError::Short {
                    op: p.op,
                    offset: p.offset,
                    done: n,
                    len: p.len,
                }),
                Ok(_) => {
                    if p.op == "write" {
                        self.size = self.size.max(p.offset + p.len as u64);
                    }
                    Ok(d.buf)
                }
            };
            self.ready.push_back(IoCompletion { tag: p.tag, result });
        }
    }

    /// The connection is unusable: every outstanding request fails with the cause.
    fn fail_all(&mut self, why: String) {
        tracing::warn!(server = %self.server, path = %self.path, %why, "NFS connection broken");
        let tokens: Vec<u64> = self.pending.keys().copied().collect();
        for t in tokens {
            if let Some(p) = self.untrack(t) {
                let result = Err(self.broken_error(&why));
                self.ready.push_back(IoCompletion { tag: p.tag, result });
            }
        }
        self.broken = Some(why);
    }

    /// Drive the connection until `done(self)` holds, nothing is outstanding, or it breaks.
    fn pump_until(&mut self, done: impl Fn(&Self) -> bool) {
        loop {
            self.collect();
            if done(self) || self.pending.is_empty() || self.broken.is_some() {
                return;
            }
            // Short waits so libnfs's RPC timeouts (run from nfs_service) fire on time.
            let revents = self.ctx.wait(100);
            if let Err(why) = self.ctx.service(revents) {
                self.collect();
                self.fail_all(why);
                return;
            }
        }
    }
}

impl Backend for NfsBackend {
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError> {
        if let Some(why) = self.broken.clone() {
            return Err(self.broken_error(&why));
        }
        let IoRequest { tag, offset, op } = req;
        match op {
            IoOp::Read { buf } | IoOp::Write { buf } if buf.is_empty() => {
                self.complete_now(tag, None);
                Ok(())
            }
            IoOp::Read { buf } | IoOp::Write { buf } if buf.len() > MAX_REQUEST => {
                let why = format!(
                    "a request of {} bytes is larger than the NFS backend's {MAX_REQUEST}-byte \
                     limit (libnfs reports transfer sizes as int); split it",
                    buf.len()
                );
                let kind = io::ErrorKind::InvalidInput;
                Err(BackendError::Io {
                    op: "submit",
                    offset,
                    source: io::Error::new(kind, why),
                })
            }
            IoOp::Read { buf } => {
                let len = buf.len();
                let p = Pending {
                    tag,
                    op: "read",
                    offset,
                    len,
                };
                let token = self.track(p);
                self.ctx.pread(token, offset, buf).map_err(|m| {
                    self.untrack(token);
                    self.in_flight -= 1;
                    self.io_error("read", offset, -libc::EIO, m)
                })
            }
            IoOp::Write { buf } => {
                let len = buf.len();
                let p = Pending {
                    tag,
                    op: "write",
                    offset,
                    len,
                };
                let token = self.track(p);
                self.ctx.pwrite(token, offset, buf).map_err(|m| {
                    self.untrack(token);
                    self.in_flight -= 1;
                    self.io_error("write", offset, -libc::EIO, m)
                })
            }
            IoOp::Flush => {
                // COMMIT covers only writes the server has replied to: drain first.
                self.pump_until(|s| s.writes_in_flight == 0);
                if let Some(why) = self.broken.clone() {
                    return Err(self.broken_error(&why));
                }
                let p = Pending {
                    tag,
                    op: "flush",
                    offset: 0,
                    len: 0,
                };
                let token = self.track(p);
                self.ctx.fsync(token).map_err(|m| {
                    self.untrack(token);
                    self.in_flight -= 1;
                    self.io_error("flush", 0, -libc::EIO, m)
                })
            }
            IoOp::Trim { .. } => {
                self.complete_now(tag, None);
                Ok(())
            }
        }
    }

    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError> {
        let target = min.min(self.in_flight);
        // One non-blocking round even for min == 0, so queued calls go out.
        if let Err(why) = self.ctx.service(self.ctx.wait(0)) {
            self.collect();
            self.fail_all(why);
        }
        self.pump_until(|s| s.ready.len() >= target);
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn size(&self) -> Result<u64, BackendError> {
        Ok(self.size)
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        if len <= self.size {
            return Ok(());
        }
        if let Some(why) = self.broken.clone() {
            return Err(self.broken_error(&why));
        }
        // A blocking SETATTR; it also services the socket, so collect what finished meanwhile.
        let r = self.ctx.truncate(len);
        self.collect();
        r.map_err(|(errno, m)| self.io_error("grow", len, errno, m))?;
        self.size = len;
        Ok(())
    }

    fn alignment(&self) -> usize {
        1
    }

    fn describe(&self) -> String {
        format!(
            "nfs file {} in export {} on {} (NFSv3 via libnfs, FILE_SYNC writes, {} bytes)",
            self.path, self.export, self.server, self.size
        )
    }
}

impl Drop for NfsBackend {
    fn drop(&mut self) {
        // Let outstanding calls finish (their buffers are libnfs's until then); the context's
        // own drop cancels whatever is still left after a broken connection.
        self.pump_until(|s| s.pending.is_empty());
    }
}

/// Open `nfs://SERVER/FULL_PATH` as a boxed backend with `create` from the spec options.
pub fn open(server: &str, full_path: &str, create: bool) -> Result<NfsBackend, BackendError> {
    let opts = NfsOptions {
        create,
        ..NfsOptions::default()
    };
    NfsBackend::connect(server, full_path, opts).map_err(NfsError::into_backend)
}
