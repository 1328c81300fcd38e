//! A local (or NFS) file or block device read and written with io_uring.
//!
//! Requests become SQEs whose `user_data` is an index into a slab of in-flight slots; a slot
//! owns the request's buffer until its completion is reaped, so the kernel never sees freed
//! memory. SQEs are batched: `submit` only enters the kernel when the SQ is full, `complete`
//! pushes the rest and waits. The number of SQEs owned by the kernel never exceeds the CQ size,
//! so completions cannot overflow.
//!
//! Guarantees:
//! - A `Flush` is an `fdatasync` queued with `IOSQE_IO_DRAIN`: it starts only after every
//!   request submitted before it has completed, so it covers all of them (not only the writes
//!   whose completion was already returned), and requests submitted after it wait for it.
//! - Short transfers are resubmitted for the remainder; a read that reaches end of file is
//!   `BackendError::Short` (never zero-filled), so a truncated file is detected.
//! - `Trim` punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`): later reads return
//!   zeros and the size is unchanged.
//! - On tmpfs, reads are done synchronously with `pread` inside `submit` (they complete into
//!   the ready queue): shmem cannot serve io_uring reads without blocking, so io_uring would
//!   hand every one to an io-wq worker thread (a thread hop per read, ~10-20 µs), while a
//!   `pread` from RAM takes about a microsecond. Writes, flushes and trims still use the ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use io_uring::{opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use crate::AlignedBuf;

mod open;
#[cfg(test)]
mod tests;

use open::open_file;

/// Queue depth used when the caller has no opinion.
pub const DEFAULT_QUEUE_DEPTH: u32 = 64;
/// Largest queue depth accepted (the kernel's SQ limit is 32768; more buys nothing here).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// O_DIRECT alignment assumed when the kernel cannot tell us.
const FALLBACK_DIRECT_ALIGN: usize = 4096;
/// Largest transfer put in one SQE; longer requests continue with follow-up SQEs.
const MAX_CHUNK: usize = 1 << 30;

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectMode {
    /// Use O_DIRECT when the filesystem supports it, buffered I/O otherwise (tmpfs).
    #[default]
    Auto,
    /// Require O_DIRECT; opening fails on filesystems that refuse it.
    Always,
    /// Always go through the page cache.
    Never,
}

/// How to open a [`FileBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Create the file (mode 0600) if it does not exist.
    pub create: bool,
    /// Open the file read-only: every write, flush or trim fails (the kernel refuses
    /// them on the descriptor). `create` is ignored.
    pub read_only: bool,
    pub direct: DirectMode,
    /// io_uring submission queue size (1..=4096).
    pub queue_depth: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            create: false,
            read_only: false,
            direct: DirectMode::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }
}

/// The operation a slot is carrying, with the buffer it owns meanwhile.
enum SlotOp {
    Read(AlignedBuf),
    Write(AlignedBuf),
    Flush,
    Trim(u64),
}

impl SlotOp {
    fn name(&self) -> &'static str {
        match self {
            SlotOp::Read(_) => "read",
            SlotOp::Write(_) => "write",
            SlotOp::Flush => "flush",
            SlotOp::Trim(_) => "trim",
        }
    }
}

/// One request owned by the kernel (or about to be resubmitted).
struct Slot {
    tag: u64,
    offset: u64,
    op: SlotOp,
    /// Bytes transferred so far (reads and writes).
    done: usize,
}

/// A file read and written through io_uring. See the module docs for the guarantees.
pub struct FileBackend {
    path: PathBuf,
    file: File,
    direct: bool,
    alignment: usize,
    block_device: bool,
    queue_depth: u32,
    ring: IoUring,
    cq_capacity: usize,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// SQEs pushed to the SQ (submitted or not) whose CQE has not been reaped.
    in_ring: usize,
    /// Requests accepted by `submit` whose completion has not been handed out.
    in_flight: usize,
    ready: VecDeque<IoCompletion>,
    reaped: Vec<(u64, i32)>,
    /// Reads are served with `pread` in `submit` (the file lives in RAM: tmpfs).
    sync_reads: bool,
    /// Registered with the ring: the kernel signals it whenever it posts a CQE.
    completion_event: EventFd,
}

impl FileBackend {
    /// Open (or create) `path`. See [`OpenOptions`] and [`DirectMode`].
    pub fn open(path: impl AsRef<Path>, opts: OpenOptions) -> Result<Self, BackendError> {
        let path = path.as_ref().to_path_buf();
        if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
            return Err(BackendError::Setup(format!(
                "queue depth {} for {} is out of range 1..={MAX_QUEUE_DEPTH}",
                opts.queue_depth,
                path.display()
            )));
        }
        let (file, direct, alignment) = open_file(&path, opts)?;
        let meta = file
            .metadata()
            .map_err(|e| BackendError::Setup(format!("cannot stat {}: {e}", path.display())))?;
        let block_device = meta.file_type().is_block_device();
        let sync_reads = nix::sys::statfs::fstatfs(&file)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if !meta.is_file() && !block_device {
            return Err(BackendError::Setup(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        let ring = IoUring::new(opts.queue_depth).map_err(|e| {
            BackendError::Setup(format!(
                "io_uring setup with queue depth {} failed: {e}",
                opts.queue_depth
            ))
        })?;
        let cq_capacity = ring.params().cq_entries() as usize;
        let completion_event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(|e| BackendError::Setup(format!("eventfd: {e}")))?;
        ring.submitter()
            .register_eventfd(completion_event.as_fd().as_raw_fd())
            .map_err(|e| {
                BackendError::Setup(format!(
                    "registering the completion eventfd with io_uring: {e}"
                ))
            })?;
        tracing::debug!(path = %path.display(), direct, alignment, queue_depth = opts.queue_depth, "file backend opened");
        Ok(Self {
            path,
            file,
            direct,
            alignment,
            block_device,
            queue_depth: opts.queue_depth,
            ring,
            cq_capacity,
            slots: Vec::new(),
            free_slots: Vec::new(),
            in_ring: 0,
            in_flight: 0,
            ready: VecDeque::new(),
            reaped: Vec::new(),
            sync_reads,
            completion_event,
        })
    }

    /// The file descriptor, for tools that must drive the same file the same way (benchmarks).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Whether reads are served synchronously (`pread`) because the file lives in RAM.
    pub fn reads_synchronously(&self) -> bool {
        self.sync_reads
    }

    /// Read all of `buf` at `offset` with `pread` (short reads continue; end of file is an
    /// error, as for ring reads).
    fn read_now(&self, offset: u64, buf: &mut AlignedBuf) -> Result<(), BackendError> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let pos = offset + done as u64;
            match nix::sys::uio::pread(&self.file, &mut buf.as_mut_slice()[done..], pos as i64) {
                Ok(0) => {
                    return Err(BackendError::Short {
                        op: "read",
                        offset,
                        done,
                        len,
                    })
                }
                Ok(n) => done += n,
                Err(nix::Error::EINTR) => {}
                Err(e) => {
                    return Err(BackendError::Io {
                        op: "read",
                        offset,
                        source: io::Error::from(e),
                    })
                }
            }
        }
        Ok(())
    }

    /// Whether the file was opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_aligned(&self, op: &'static str, offset: u64, len: usize) -> Result<(), BackendError> {
        let align = self.alignment as u64;
        if offset.is_multiple_of(align) && (len as u64).is_multiple_of(align) {
            return Ok(());
        }
        Err(BackendError::Io {
            op,
            offset,
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "offset {offset} and length {len} must be multiples of {align} \
                     (O_DIRECT alignment of {})",
                    self.path.display()
                ),
            ),
        })
    }

    fn alloc_slot(&mut self, slot: Slot) -> usize {
        match self.free_slots.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// The SQE that (re)starts slot `idx` from where it got to.
    fn entry_for(&mut self, idx: usize) -> squeue::Entry {
        let fd = types::Fd(self.file.as_raw_fd());
        let slot = self.slots[idx].as_mut().expect("slot in use");
        let pos = slot.offset + slot.done as u64;
        let entry = match &mut slot.op {
            SlotOp::Read(buf) => {
                let rest = &mut buf.as_mut_slice()[slot.done..];
                let len = rest.len().min(MAX_CHUNK) as u32;
                opcode::Read::new(fd, rest.as_mut_ptr(), len)
                    .offset(pos)
                    .build()
            }
            SlotOp::Write(buf) => {
                let rest = &buf.as_slice()[slot.done..];
                let len = rest.len().min(MAX_CHUNK) as u32;
                opcode::Write::new(fd, rest.as_ptr(), len)
                    .offset(pos)
                    .build()
            }
            SlotOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
            SlotOp::Trim(len) => opcode::Fallocate::new(fd, *len)
                .offset(slot.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        entry.user_data(idx as u64)
    }

    /// Put slot `idx` on the SQ, first making room in the kernel's CQ budget if `may_reap`.
    fn push_slot(&mut self, idx: usize, may_reap: bool) -> Result<(), BackendError> {
        while may_reap && self.in_ring >= self.cq_capacity {
            self.enter(1)?;
            self.reap();
        }
        let entry = self.entry_for(idx);
        loop {
            // SAFETY: the entry points into a buffer owned by slot `idx`; AlignedBuf's heap
            // memory does not move and the slot is kept until the entry's CQE is reaped
            // (Drop waits for every outstanding CQE before freeing slots).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            self.enter(0)?;
        }
        self.in_ring += 1;
        Ok(())
    }

    /// Submit everything queued and wait for `want` completions.
    fn enter(&mut self, want: usize) -> Result<(), BackendError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(BackendError::Io {
                        op: "io_uring_enter",
                        offset: 0,
                        source: e,
                    })
                }
            }
        }
    }

    /// Move every available CQE into `ready` (or resubmit the remainder of short transfers).
    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, res) in &reaped {
            self.in_ring -= 1;
            self.finish_cqe(user_data as usize, res);
        }
        self.reaped = reaped;
    }

    fn finish_cqe(&mut self, idx: usize, res: i32) {
        let slot = self.slots[idx].as_mut().expect("CQE for a live slot");
        let op = slot.op.name();
        if res < 0 {
            let err = BackendError::Io {
                op,
                offset: slot.offset,
                source: io::Error::from_raw_os_error(-res),
            };
            self.finish_slot(idx, Err(err));
            return;
        }
        let len = match &slot.op {
            SlotOp::Read(b) | SlotOp::Write(b) => b.len(),
            SlotOp::Flush | SlotOp::Trim(_) => {
                self.finish_slot(idx, Ok(()));
                return;
            }
        };
        slot.done += res as usize;
        if slot.done == len {
            self.finish_slot(idx, Ok(()));
            return;
        }
        let (offset, done) = (slot.offset, slot.done);
        let misaligned = self.direct && !done.is_multiple_of(self.alignment);
        if res == 0 || misaligned || (op == "read" && self.at_eof(offset + done as u64)) {
            let err = BackendError::Short {
                op,
                offset,
                done,
                len,
            };
            self.finish_slot(idx, Err(err));
            return;
        }
        tracing::trace!(
            op,
            offset,
            done,
            len,
            "short transfer, resubmitting remainder"
        );
        if let Err(e) = self.push_slot(idx, false) {
            self.finish_slot(idx, Err(e));
        }
    }

    fn at_eof(&self, pos: u64) -> bool {
        self.size().map(|size| pos >= size).unwrap_or(false)
    }

    fn finish_slot(&mut self, idx: usize, result: Result<(), BackendError>) {
        let slot = self.slots[idx].take().expect("slot in use");
        self.free_slots.push(idx);
        let result = result.map(|()| match slot.op {
            SlotOp::Read(b) | SlotOp::Write(b) => Some(b),
            SlotOp::Flush | SlotOp::Trim(_) => None,
        });
        self.ready.push_back(IoCompletion {
            tag: slot.tag,
            result,
        });
    }
}

impl Backend for FileBackend {
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError> {
        let IoRequest { tag, offset, op } = req;
        let op = match op {
            IoOp::Read { buf } => {
                self.check_aligned("read", offset, buf.len())?;
                SlotOp::Read(buf)
            }
            IoOp::Write { buf } => {
                self.check_aligned("write", offset, buf.len())?;
                SlotOp::Write(buf)
            }
            IoOp::Flush => SlotOp::Flush,
            IoOp::Trim { len } => SlotOp::Trim(len),
        };
        self.in_flight += 1;
        let nothing_to_do = match &op {
            SlotOp::Read(b) | SlotOp::Write(b) => b.is_empty(),
            SlotOp::Trim(len) => *len == 0,
            SlotOp::Flush => false,
        };
        if let (SlotOp::Read(_), true, false) = (&op, self.sync_reads, nothing_to_do) {
            let SlotOp::Read(mut buf) = op else {
                unreachable!("matched a read")
            };
            let result = self.read_now(offset, &mut buf).map(|()| Some(buf));
            self.ready.push_back(IoCompletion { tag, result });
            return Ok(());
        }
        if nothing_to_do {
            let result = Ok(match op {
                SlotOp::Read(b) | SlotOp::Write(b) => Some(b),
                _ => None,
            });
            self.ready.push_back(IoCompletion { tag, result });
            return Ok(());
        }
        let idx = self.alloc_slot(Slot {
            tag,
            offset,
            op,
            done: 0,
        });
        if let Err(e) = self.push_slot(idx, true) {
            // The request never reached the kernel: take it back so in_flight stays honest.
            self.slots[idx] = None;
            self.free_slots.push(idx);
            self.in_flight -= 1;
            return Err(e);
        }
        Ok(())
    }

    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError> {
        let target = min.min(self.in_flight);
        let mut appended = 0;
        loop {
            let missing = target.saturating_sub(appended + self.ready.len());
            let want = missing.min(self.in_ring);
            // Nothing to submit and nothing to wait for: the CQ ring is read without a syscall.
            if want > 0 || !self.ring.submission().is_empty() {
                self.enter(want)?;
            }
            self.reap();
            let n = self.ready.len();
            out.extend(self.ready.drain(..));
            self.in_flight -= n;
            appended += n;
            if appended >= target {
                return Ok(appended);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn size(&self) -> Result<u64, BackendError> {
        let io_err = |source| BackendError::Io {
            op: "size",
            offset: 0,
            source,
        };
        if self.block_device {
            // SAFETY: lseek on an owned, open fd; it only moves the file position, which
            // io_uring requests (explicit offsets) do not use.
            let end = unsafe { libc::lseek(self.file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(io_err(io::Error::last_os_error()));
            }
            return Ok(end as u64);
        }
        Ok(self.file.metadata().map_err(io_err)?.len())
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        let size = self.size()?;
        if len <= size {
            return Ok(());
        }
        if self.block_device {
            return Err(BackendError::Io {
                op: "grow",
                offset: len,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "block device {} has a fixed size of {size} bytes",
                        self.path.display()
                    ),
                ),
            });
        }
        self.file.set_len(len).map_err(|source| BackendError::Io {
            op: "grow",
            offset: len,
            source,
        })
    }

    fn alignment(&self) -> usize {
        self.alignment
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.completion_event.as_fd())
    }

    fn describe(&self) -> String {
        let mut mode = if self.direct {
            format!("O_DIRECT, {}-byte alignment", self.alignment)
        } else {
            "buffered".to_string()
        };
        if self.sync_reads {
            mode.push_str(", reads by pread (tmpfs)");
        }
        format!(
            "file {} (io_uring QD {}, {mode})",
            self.path.display(),
            self.queue_depth
        )
    }
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        // The kernel may still write into slot buffers: wait for every outstanding CQE.
        while self.in_ring > 0 {
            let waited = self.enter(self.in_ring);
            self.reap();
            if let Err(e) = waited {
                tracing::error!(error = %crate::error_chain(&e), "cannot drain io_uring; leaking in-flight buffers");
                std::mem::forget(std::mem::take(&mut self.slots));
                return;
            }
        }
    }
}
