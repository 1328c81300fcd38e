//! `SwapDevice`: one VM's pages on a backend, with a log-structured data area, a crash-safe
//! index and host ownership. See docs/swapdev.md for the format and the crash-safety
//! argument.

mod check;
mod encode;
mod io;
mod job;
mod owner;
mod read;
mod recover;
mod space;
#[cfg(test)]
mod tests;
mod write;

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::{Result, SwapError};
use crate::format::entry::IndexEntry;
use crate::format::header::{DeviceHeader, Layout, FORMAT_VERSION, MAX_HOST_ID};
use crate::format::{checkpoint, ChecksumKind, CodecPolicy, BLOCK};
use crate::AlignedBuf;

pub use check::{FsckReport, Stats};
pub use encode::{EncodedPages, PageEncoder};
pub use job::WriteTicket;
pub use owner::Reclaimed;
pub use read::{PageData, PageRead, RunRead};
use space::SpaceMap;

/// Choices made once, when a device is formatted.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub vm_uuid: uuid::Uuid,
    /// 4096 or 2 MiB.
    pub page_size: u32,
    pub capacity_pages: u64,
    /// The host creating the device; it owns the device when `create` returns.
    pub host_id: String,
    pub codec: CodecPolicy,
    pub checksum: ChecksumKind,
    /// Format even if the backend already holds data.
    pub force: bool,
}

/// How to open an existing device.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    pub host_id: String,
    pub access: Access,
    /// How long a writer trusts its cached view of the header before re-reading it to make
    /// sure no other host took the device over. Checkpoints, flushes and releases always
    /// re-read it.
    pub fence_interval: Duration,
}

impl OpenOptions {
    pub fn read_only(host_id: &str) -> Self {
        Self {
            host_id: host_id.into(),
            access: Access::ReadOnly,
            fence_interval: DEFAULT_FENCE_INTERVAL,
        }
    }

    /// Read-write; take the device if it is unowned (`acquire`), or even from another host
    /// (`force`).
    pub fn read_write(host_id: &str, acquire: bool, force: bool) -> Self {
        Self {
            host_id: host_id.into(),
            access: Access::ReadWrite { acquire, force },
            fence_interval: DEFAULT_FENCE_INTERVAL,
        }
    }
}

/// Read-only opens never write; read-write opens recover, bump the generation and write a
/// fresh checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite { acquire: bool, force: bool },
}

pub const DEFAULT_FENCE_INTERVAL: Duration = Duration::from_millis(100);
/// Take a checkpoint when the log has grown this much since the last one (bounds replay),
/// or four times the checkpoint's own size if that is more (a checkpoint writes the whole
/// index, 16 bytes per page), so checkpoints never cost more than a quarter of the log.
const CHECKPOINT_EVERY: u64 = 256 << 20;

/// Whether a page is in the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Stored with a payload (raw or lz4).
    Stored,
    /// Known to be all zeros; no payload.
    Zero,
    /// Never stored, or removed.
    Absent,
}

/// Where the log continues: the next batch's offset, sequence and chain crc.
#[derive(Debug, Clone, Copy)]
struct LogHead {
    head: u64,
    next_seq: u64,
    last_crc: u32,
    nonce: u64,
}

/// One VM's pages on a backend.
pub struct SwapDevice {
    backend: Box<dyn Backend>,
    hdr: DeviceHeader,
    /// Which header copy (0/1) holds `hdr`.
    hdr_copy: u8,
    writable: bool,
    host_id: String,
    fence_interval: Duration,
    last_fence_check: Instant,
    index: Vec<IndexEntry>,
    space: SpaceMap,
    log: LogHead,
    log_since_ckpt: u64,
    /// Segments emptied by cleaning since open.
    cleaned_segments: u64,
    io: io::IoState,
    poisoned: bool,
    /// `release_ownership` ran: writes are refused with `Released`.
    released: bool,
    /// What replaying the log found when the device was opened (for fsck).
    replayed: recover::ReplayOutcome,
    /// The write in progress between `begin_write` and its last `poll_write` (job.rs).
    job: Option<job::Job>,
    next_job_id: u64,
    /// Results of writes another call finished for them, until their owner polls.
    job_results: Vec<(u64, Result<()>)>,
}

fn check_host_id(host: &str) -> Result<()> {
    if host.is_empty() || host.len() > MAX_HOST_ID {
        return Err(SwapError::InvalidOption(format!(
            "host id {host:?} must be 1 to {MAX_HOST_ID} bytes"
        )));
    }
    Ok(())
}

fn random_u64() -> u64 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

impl SwapDevice {
    fn blank(backend: Box<dyn Backend>, hdr: DeviceHeader, host_id: &str) -> Self {
        Self {
            backend,
            index: Vec::new(),
            space: SpaceMap::new(hdr.layout.segments),
            hdr,
            hdr_copy: 0,
            writable: false,
            host_id: host_id.into(),
            fence_interval: DEFAULT_FENCE_INTERVAL,
            last_fence_check: Instant::now(),
            log: LogHead {
                head: 0,
                next_seq: 1,
                last_crc: 0,
                nonce: random_u64(),
            },
            log_since_ckpt: 0,
            cleaned_segments: 0,
            io: io::IoState::default(),
            poisoned: false,
            released: false,
            replayed: recover::ReplayOutcome::default(),
            job: None,
            next_job_id: 0,
            job_results: Vec::new(),
        }
    }

    /// Format `backend` as an empty swap device owned by `opts.host_id`.
    pub fn create(mut backend: Box<dyn Backend>, opts: CreateOptions) -> Result<Self> {
        check_host_id(&opts.host_id)?;
        if opts.page_size != 4096 && opts.page_size != 2 << 20 {
            return Err(SwapError::InvalidOption(format!(
                "page size {} must be 4096 or 2097152",
                opts.page_size
            )));
        }
        if opts.capacity_pages == 0 || opts.capacity_pages > 1 << 40 {
            return Err(SwapError::InvalidOption(format!(
                "capacity {} pages must be between 1 and 2^40",
                opts.capacity_pages
            )));
        }
        if !opts.force {
            refuse_existing_data(backend.as_mut())?;
        }
        let mut layout = Layout::plan(opts.page_size, opts.capacity_pages);
        let wanted = layout.data_end();
        if backend.grow(wanted).is_err() {
            // A fixed-size store (NBD export): fit the data area into it.
            let size = backend.size()?;
            let min_segments = 8;
            if size < layout.data_start + min_segments * layout.segment_size {
                return Err(SwapError::Truncated {
                    size,
                    needed: wanted,
                    what: "the planned data area; the store cannot grow",
                });
            }
            layout.segments = (size - layout.data_start) / layout.segment_size;
            tracing::warn!(
                size,
                wanted,
                segments = layout.segments,
                "backend cannot grow; data area shrunk to fit, cleaning will run sooner"
            );
        }
        let hdr = DeviceHeader {
            format_version: FORMAT_VERSION,
            header_seq: 0,
            vm_uuid: opts.vm_uuid.into_bytes(),
            page_size: opts.page_size,
            capacity_pages: opts.capacity_pages,
            checksum: opts.checksum,
            codec: opts.codec,
            owner: opts.host_id.clone(),
            owned: true,
            generation: 1,
            ckpt_slot: 0,
            ckpt_seq: 1,
            layout,
        };
        let mut dev = Self::blank(backend, hdr.clone(), &opts.host_id);
        dev.writable = true;
        dev.index = vec![IndexEntry::ABSENT; opts.capacity_pages as usize];
        dev.log.head = layout.data_start;
        dev.log.last_crc = dev.log.nonce as u32;
        dev.space.free_all_except(0);
        // Checkpoint slot 0 first, then the header that points at it.
        let meta = checkpoint::CheckpointMeta {
            ckpt_seq: 1,
            generation: 1,
            head: dev.log.head,
            next_seq: dev.log.next_seq,
            prev_crc: dev.log.last_crc,
            capacity: opts.capacity_pages,
        };
        let buf = checkpoint::encode(&meta, &dev.index, layout.ckpt_slot_size);
        dev.write_chunked(layout.ckpt_offset(0), buf)?;
        dev.flush_backend()?;
        // Invalidate whatever header copy B held, then write copy A.
        dev.write_sync(BLOCK, AlignedBuf::new(BLOCK as usize))?;
        let mut block = AlignedBuf::new(BLOCK as usize);
        hdr.encode(&mut block);
        dev.write_sync(0, block)?;
        dev.flush_backend()?;
        tracing::info!(backend = %dev.backend.describe(), pages = opts.capacity_pages, "swap device created");
        Ok(dev)
    }

    /// Open an existing device (recovering it after a crash when read-write).
    pub fn open(backend: Box<dyn Backend>, opts: OpenOptions) -> Result<Self> {
        check_host_id(&opts.host_id)?;
        let mut dev = recover::load(backend, &opts.host_id, None)?;
        dev.fence_interval = opts.fence_interval;
        if let Access::ReadWrite { acquire, force } = opts.access {
            dev.take_ownership(acquire, force)?;
            dev.writable = true;
            dev.checkpoint()?;
        }
        Ok(dev)
    }

    /// Checkpoint and flush, then drop the device. The device stays owned by this host.
    pub fn close(mut self) -> Result<()> {
        self.finish_job()?;
        if self.writable && !self.poisoned {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn checkpoint_interval(&self) -> u64 {
        CHECKPOINT_EVERY.max(4 * self.hdr.layout.ckpt_slot_size)
    }

    pub fn capacity_pages(&self) -> u64 {
        self.hdr.capacity_pages
    }

    pub fn page_size(&self) -> usize {
        self.hdr.page_size as usize
    }

    pub fn vm_uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.hdr.vm_uuid)
    }

    pub fn generation(&self) -> u64 {
        self.hdr.generation
    }

    /// Host recorded as owner, and whether it currently owns the device.
    pub fn owner(&self) -> (&str, bool) {
        (&self.hdr.owner, self.hdr.owned)
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn describe_backend(&self) -> String {
        self.backend.describe()
    }

    pub fn page_state(&self, page: u64) -> PageState {
        match self.index.get(page as usize).and_then(|e| e.codec()) {
            Some(crate::format::Codec::Zero) => PageState::Zero,
            Some(crate::format::Codec::Raw | crate::format::Codec::Lz4) => PageState::Stored,
            _ => PageState::Absent,
        }
    }

    /// True when the page reads back as data or zeros (not `NotStored`).
    pub fn contains(&self, page: u64) -> bool {
        self.page_state(page) != PageState::Absent
    }

    fn check_page(&self, page: u64) -> Result<()> {
        if page >= self.hdr.capacity_pages {
            return Err(SwapError::PageOutOfRange {
                page,
                capacity: self.hdr.capacity_pages,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.poisoned {
            return Err(SwapError::Poisoned);
        }
        if self.released {
            return Err(SwapError::Released {
                host: self.host_id.clone(),
                generation: self.hdr.generation,
            });
        }
        if !self.writable {
            return Err(SwapError::ReadOnly);
        }
        Ok(())
    }
}

/// Refuse to format a backend whose first 8 KiB hold anything but zeros.
fn refuse_existing_data(backend: &mut dyn Backend) -> Result<()> {
    let size = backend.size()?;
    if size == 0 {
        return Ok(());
    }
    if size < BLOCK {
        return Err(SwapError::AlreadyHoldsData {
            what: format!("{size} bytes of other data"),
        });
    }
    let len = if size >= 2 * BLOCK { 2 * BLOCK } else { BLOCK };
    let buf = io::read_direct(backend, 0, len)?;
    if buf[..8] == crate::format::header::DEVICE_MAGIC[..] {
        return Err(SwapError::AlreadyHoldsData {
            what: "a pagewise swap device".into(),
        });
    }
    if buf.iter().any(|&b| b != 0) {
        return Err(SwapError::AlreadyHoldsData {
            what: format!("{size} bytes of other data"),
        });
    }
    Ok(())
}
