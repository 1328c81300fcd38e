//! Migration journals: what a daemon killed after a switchover needs to go on with the
//! migration when it starts again, written durably (temporary file, sync, rename, directory
//! sync) before the switchover and removed once the migration is over. Each side has its
//! own kind, with its own magic, file suffix, JSON header and meaning of the one byte per
//! page of its map: the source's says where each page's copy is on the source host
//! ([`super::source::journal`]), the destination's which route serves each absent page
//! ([`super::incoming::journal`]). The framing and its checks are shared.
//!
//! # Layout (little-endian)
//! ```text
//! magic                      8 bytes (the kind's)
//! header length              u32, at most MAX_HEADER
//! header                     JSON (the kind's header)
//! map length                 u32, at most MAX_MAP
//! map                        lz4 block with its size prepended (u32): one byte per page
//! crc32c                     u32, of every byte before it
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Longest header the decoder accepts.
pub const MAX_HEADER: u32 = 64 << 10;
/// Most guest pages a journal may describe (4 TiB of 4 KiB pages).
pub const MAX_PAGES: u64 = 1 << 30;
/// Longest compressed map the decoder accepts (lz4's worst case for MAX_PAGES, and a bit).
pub const MAX_MAP: u32 = (MAX_PAGES + MAX_PAGES / 255 + 64) as u32;

/// The fields every kind's header has, which the decoder checks.
pub struct Common<'a> {
    pub vm: &'a str,
    /// The migration's first session id, 32 hex digits (what `Resume` names).
    pub session: &'a str,
    pub page_size: u32,
    pub pages: u64,
    /// precopy, postcopy or agile.
    pub mode: &'a str,
}

/// One side's journal: its magic, its file suffix, its header and its map's bytes.
pub trait Kind: Serialize + DeserializeOwned {
    const MAGIC: &'static [u8; 8];
    /// The end of its file names (`VM.SUFFIX`).
    const SUFFIX: &'static str;
    fn common(&self) -> Common<'_>;
    /// Whether `b` means something in this kind's page map.
    fn valid_entry(b: u8) -> bool;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal<H> {
    pub header: H,
    /// One entry per page.
    pub map: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal is {len} bytes, shorter than its fixed fields")]
    TooShort { len: usize },
    #[error("not a pagewise migration journal of this kind (magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("the journal's {what} is {len} bytes, over the {max} allowed")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("the journal ends inside its {what}")]
    Truncated { what: &'static str },
    #[error("the journal's checksum is {stored:#010x}, its bytes sum to {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("the journal has {0} bytes after its checksum")]
    Trailing(usize),
    #[error("the journal's header")]
    Header(#[source] serde_json::Error),
    #[error("the journal's session {0:?} is not 32 hex digits")]
    Session(String),
    #[error("the journal's page size {0} is not 4 KiB, 2 MiB or 1 GiB")]
    PageSize(u32),
    #[error("the journal describes {0} pages, over the {MAX_PAGES} allowed")]
    TooManyPages(u64),
    #[error("the journal's page map does not decompress")]
    Map(#[source] lz4_flex::block::DecompressError),
    #[error("the journal's page map of {len} bytes cannot hold {pages} pages")]
    MapBlock { len: usize, pages: u64 },
    #[error("the journal's page map says {got} pages, the header {pages}")]
    MapSize { got: u64, pages: u64 },
    #[error("the journal's page map holds {value} for page {page}, which means nothing")]
    BadEntry { page: u64, value: u8 },
    #[error("the journal's mode {0:?} is not precopy, postcopy or agile")]
    Mode(String),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn take<'a>(bytes: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], JournalError> {
    if bytes.len() < n {
        return Err(JournalError::Truncated { what });
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_u32(bytes: &mut &[u8], what: &'static str) -> Result<u32, JournalError> {
    let b = take(bytes, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The 16 bytes of a session id written as 32 hex digits.
pub fn session_hex(session: &[u8; 16]) -> String {
    session.iter().map(|b| format!("{b:02x}")).collect()
}

fn session_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl<H: Kind> Journal<H> {
    /// The migration's session id.
    pub fn session(&self) -> [u8; 16] {
        // (`decode` checked it; a journal built in memory is this host's own.)
        session_bytes(self.header.common().session).unwrap_or_default()
    }

    pub fn mode(&self) -> Result<crate::migrate::message::Mode, JournalError> {
        let mode = self.header.common().mode;
        crate::migrate::session::engine::mode_of(mode)
            .ok_or_else(|| JournalError::Mode(mode.to_string()))
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap_or_default();
        let map = lz4_flex::block::compress_prepend_size(&self.map);
        let mut out = Vec::with_capacity(24 + header.len() + map.len());
        out.extend_from_slice(H::MAGIC);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(map.len() as u32).to_le_bytes());
        out.extend_from_slice(&map);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parse and check a journal: every length is bounded before it is used.
    pub fn decode(bytes: &[u8]) -> Result<Self, JournalError> {
        if bytes.len() < H::MAGIC.len() + 12 {
            return Err(JournalError::TooShort { len: bytes.len() });
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let mut rest = body;
        let magic = take(&mut rest, 8, "magic")?;
        if magic != H::MAGIC {
            let mut m = [0u8; 8];
            m.copy_from_slice(magic);
            return Err(JournalError::BadMagic(m));
        }
        let header_len = take_u32(&mut rest, "header length")?;
        if header_len > MAX_HEADER {
            return Err(JournalError::TooLong {
                what: "header",
                len: header_len.into(),
                max: MAX_HEADER.into(),
            });
        }
        let header = take(&mut rest, header_len as usize, "header")?;
        let map_len = take_u32(&mut rest, "map length")?;
        if map_len > MAX_MAP {
            return Err(JournalError::TooLong {
                what: "page map",
                len: map_len.into(),
                max: MAX_MAP.into(),
            });
        }
        let map = take(&mut rest, map_len as usize, "page map")?;
        if !rest.is_empty() {
            // The last four bytes were taken as the checksum, so this is a length field
            // that did not reach the end.
            return Err(JournalError::Trailing(rest.len()));
        }
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(JournalError::Checksum { stored, computed });
        }
        let header: H = serde_json::from_slice(header).map_err(JournalError::Header)?;
        let common = header.common();
        if session_bytes(common.session).is_none() {
            return Err(JournalError::Session(common.session.to_string()));
        }
        if ![4096, 2 << 20, 1 << 30].contains(&common.page_size) {
            return Err(JournalError::PageSize(common.page_size));
        }
        let pages = common.pages;
        if pages > MAX_PAGES {
            return Err(JournalError::TooManyPages(pages));
        }
        if map.len() < 4 {
            return Err(JournalError::Truncated { what: "page map" });
        }
        let said = u64::from(u32::from_le_bytes([map[0], map[1], map[2], map[3]]));
        if said != pages {
            return Err(JournalError::MapSize { got: said, pages });
        }
        // lz4 packs at most 255 bytes into one: a size beyond that is a lie, refused before
        // it allocates.
        if said > (map.len() as u64).saturating_mul(255) {
            return Err(JournalError::MapBlock {
                len: map.len(),
                pages: said,
            });
        }
        let map = lz4_flex::block::decompress_size_prepended(map).map_err(JournalError::Map)?;
        if map.len() as u64 != pages {
            return Err(JournalError::MapSize {
                got: map.len() as u64,
                pages,
            });
        }
        if let Some(i) = map.iter().position(|b| !H::valid_entry(*b)) {
            return Err(JournalError::BadEntry {
                page: i as u64,
                value: map[i],
            });
        }
        let journal = Journal { header, map };
        journal.mode()?;
        Ok(journal)
    }
}

/// Where the journals of this host's migrations live.
pub fn dir_of(migrate_dir: &Path) -> PathBuf {
    migrate_dir.join("journal")
}

/// The journal file of kind `H` of `vm` in `dir`: VM names that are not plain file names
/// are spelled in hex.
pub fn path_of<H: Kind>(dir: &Path, vm: &str) -> PathBuf {
    let plain = !vm.is_empty()
        && !vm.starts_with('.')
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let name = if plain {
        vm.to_string()
    } else {
        format!(
            "x-{}",
            vm.bytes().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    dir.join(format!("{name}{}", H::SUFFIX))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { op, path, source }
}

/// Write `journal` to `dir` durably: a temporary file, synced, renamed over the old one,
/// the directory synced.
pub fn write<H: Kind>(dir: &Path, journal: &Journal<H>) -> Result<PathBuf, JournalError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let path = path_of::<H>(dir, journal.header.common().vm);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        f.write_all(&journal.encode())
            .map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    Ok(path)
}

/// Remove `vm`'s journal of kind `H` (gone already is fine).
pub fn remove<H: Kind>(dir: &Path, vm: &str) -> Result<(), JournalError> {
    let path = path_of::<H>(dir, vm);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", &path)(e)),
    }
}

/// Remove `vm`'s journal of kind `H` from the journal directory of `swapdev_dir`, logging a
/// failure (the migration it described is over either way).
pub fn remove_logged<H: Kind>(swapdev_dir: &Path, vm: &str) {
    if let Err(e) = remove::<H>(&dir_of(swapdev_dir), vm) {
        tracing::warn!(vm, journal = H::SUFFIX, error = %pager::error_chain(&e),
            "removing the migration journal");
    }
}

/// A journal file in `dir` read and checked (a damaged one is its error).
pub type Found<H> = (PathBuf, Result<Journal<H>, JournalError>);

/// Every journal of kind `H` in `dir`, each read and checked.
pub fn scan<H: Kind>(dir: &Path) -> Vec<Found<H>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_str().is_some_and(|s| s.ends_with(H::SUFFIX)))
        .map(|p| {
            let read = std::fs::read(&p)
                .map_err(io("reading", &p))
                .and_then(|b| Journal::decode(&b));
            (p, read)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}
