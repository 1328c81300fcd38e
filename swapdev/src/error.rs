//! Errors of the swap device. Every variant names what went wrong and where.

use crate::backend::BackendError;

/// An error and its causes on one line, `outer: cause: root cause`: for log fields and
/// reports that keep errors as text. No variant prints its source inline
/// (ARCHITECTURE.md, "Errors"), so this is how a flattened error keeps its cause.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Everything that can go wrong opening, reading or writing a swap device.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("not a pagewise swap device: bad magic \"{found}\" in both header copies (expected \"PWSWAP01\")")]
    BadMagic { found: String },
    #[error("format version {found} is newer than this pagewise supports ({supported})")]
    NewerVersion { found: u32, supported: u32 },
    #[error("device is truncated: it holds {size} bytes but needs at least {needed} ({what})")]
    Truncated {
        size: u64,
        needed: u64,
        what: &'static str,
    },
    #[error("both header copies are corrupt (checksum mismatch at offsets 0 and 4096)")]
    HeaderCorrupt,
    #[error("checkpoint in slot {slot} at offset {offset} is corrupt: {reason}")]
    CheckpointCorrupt {
        slot: u8,
        offset: u64,
        reason: String,
    },
    #[error(
        "index entry for page {page} points outside the data area \
         (offset {offset}, length {len}; data area is {start}..{end})"
    )]
    IndexOutOfRange {
        page: u64,
        offset: u64,
        len: u32,
        start: u64,
        end: u64,
    },
    #[error("index entry for page {page} is invalid: {reason}")]
    IndexInvalid { page: u64, reason: String },
    #[error("the log is damaged, refusing to open (run fsck): {detail}")]
    LogDamaged { detail: String },
    #[error("page {page} is corrupt at device offset {offset}: {reason}")]
    PageCorrupt {
        page: u64,
        offset: u64,
        reason: String,
    },
    #[error("page {page} is outside the device (capacity {capacity} pages)")]
    PageOutOfRange { page: u64, capacity: u64 },
    #[error("page {page}: data is {len} bytes, the device's page size is {page_size}")]
    WrongPageLength {
        page: u64,
        len: usize,
        page_size: usize,
    },
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("swap device is owned by host {owner} (generation {generation}); release it there first or use --force")]
    OwnedByOther { owner: String, generation: u64 },
    #[error("swap device is not owned by this host ({host}); acquire it first")]
    NotOwned { host: String },
    #[error(
        "this host's ownership is stale: the device is now at generation {generation} \
         (owner {owner}, owned: {owned}), we hold generation {ours}; refusing to write"
    )]
    Fenced {
        owner: String,
        owned: bool,
        generation: u64,
        ours: u64,
    },
    #[error(
        "this host ({host}) released the swap device (now unowned at generation {generation}); \
         it is read-only here until acquired again"
    )]
    Released { host: String, generation: u64 },
    #[error("this host ({host}) did not release the swap device through this handle: nothing to take back")]
    NotReleased { host: String },
    #[error(
        "the swap device changed after this host released it at generation {released_at} \
         (now generation {generation}, owner {owner}): {detail}; it stays released here \
         (reopen it to use what it holds now)"
    )]
    ChangedWhileReleased {
        owner: String,
        generation: u64,
        released_at: u64,
        detail: String,
    },
    #[error("device was opened read-only")]
    ReadOnly,
    #[error("device is unusable after an earlier write failure; reopen it to recover")]
    Poisoned,
    #[error("device is full: no reclaimable space left for {needed} more bytes (data area {data_bytes} bytes, live {live_bytes} bytes)")]
    NoSpace {
        needed: u64,
        data_bytes: u64,
        live_bytes: u64,
    },
    #[error(
        "backend already holds {what}; refusing to overwrite it (use --force to format anyway)"
    )]
    AlreadyHoldsData { what: String },
    #[error("image is {image_len} bytes but the device holds {capacity} pages of {page_size} bytes ({expected} bytes)")]
    ImageSizeMismatch {
        image_len: u64,
        capacity: u64,
        page_size: u32,
        expected: u64,
    },
    #[error("image I/O failed")]
    Image(#[source] std::io::Error),
}

pub type Result<T, E = SwapError> = std::result::Result<T, E>;
