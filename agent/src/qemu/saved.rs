//! A saved QEMU guest for lazy restore: a raw RAM image (served as it is by the pager,
//! `raw:PATH`, never written) and a state file.
//!
//! The state file is a pagewise header followed by QEMU's own migration stream of the
//! device state (saved with `x-ignore-shared`, so it holds no RAM):
//!
//! ```text
//! PAGEWISE-SAVED-STATE 1\n
//! {"ram_bytes":...,"page_size":4096,"stream_bytes":...,"samples":256,"fingerprint":...}\n
//! QEVM...                         (QEMU's stream, `stream_bytes` long)
//! ```
//!
//! The header ties the state to its image: the guest RAM size (the image must be exactly
//! that long) and a fingerprint, a CRC-32C over `samples` pages of the image spread evenly
//! over it (read at restore in well under a millisecond per sample, so a restore stays
//! lazy). A state paired with another guest's image is refused before QEMU starts: QEMU
//! itself would load it and run the guest on the wrong memory.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// First line of a state file.
pub const MAGIC_LINE: &str = "PAGEWISE-SAVED-STATE 1";
/// QEMU's migration stream magic (`QEMU_VM_FILE_MAGIC`, "QEVM").
pub const QEMU_STREAM_MAGIC: [u8; 4] = *b"QEVM";
/// Pages sampled by the fingerprint (fewer on a smaller image: every page).
pub const FINGERPRINT_SAMPLES: u64 = 256;
/// Longest header line accepted.
const MAX_HEADER_LINE: u64 = 4096;
/// Largest guest RAM a header may describe (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// Largest device-state stream accepted (QEMU's is ~1 MiB without RAM).
pub const MAX_STREAM_BYTES: u64 = 1 << 30;

/// The header of a state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateHeader {
    /// Guest RAM bytes (the memory backend's size; the image's length).
    pub ram_bytes: u64,
    /// Page size of the image's pages.
    pub page_size: u64,
    /// Length of QEMU's stream after the header.
    pub stream_bytes: u64,
    /// Pages sampled by `fingerprint`.
    pub samples: u64,
    /// CRC-32C of the sampled pages, each preceded by its page index (little endian).
    pub fingerprint: u32,
}

/// A state file opened and checked: its header and where QEMU's stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    pub path: PathBuf,
    pub header: StateHeader,
    /// Byte offset of QEMU's stream in the file.
    pub stream_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error("opening {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not a pagewise state file (no {MAGIC_LINE:?} line): make it with pagewise vm save",
        path.display()
    )]
    NotAState { path: PathBuf },
    #[error("{}: the state header is malformed: {why}", path.display())]
    BadHeader { path: PathBuf, why: String },
    #[error(
        "{}: the state file is {len} bytes, its header says {expected} (header + QEMU stream): \
         truncated or appended to",
        path.display()
    )]
    StateLength {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{}: the device state does not start with QEMU's stream magic QEVM", path.display())]
    NotQemuStream { path: PathBuf },
    #[error("the RAM image {} is not a regular file", path.display())]
    ImageNotFile { path: PathBuf },
    #[error(
        "the RAM image {} is {len} bytes, the state {} was saved from a guest of {ram_bytes} \
         bytes: they are not one saved guest",
        image.display(), state.display()
    )]
    ImageSize {
        image: PathBuf,
        state: PathBuf,
        len: u64,
        ram_bytes: u64,
    },
    #[error(
        "the guest's memory backend is {backend} bytes, the saved guest had {ram_bytes}: give \
         the restored QEMU size={ram_bytes} (and the same -m)"
    )]
    BackendSize { backend: u64, ram_bytes: u64 },
    #[error(
        "the state {} does not match the RAM image {}: fingerprint of {samples} sampled pages \
         {found:#010x}, the state expects {expected:#010x} (another guest's image, or the image \
         changed since it was saved)",
        state.display(), image.display()
    )]
    Fingerprint {
        state: PathBuf,
        image: PathBuf,
        samples: u64,
        expected: u32,
        found: u32,
    },
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> SavedError + '_ {
    move |source| SavedError::Read {
        path: path.into(),
        source,
    }
}

/// Pages of a `ram_bytes` image the fingerprint reads, in order.
pub fn sample_pages(ram_bytes: u64, page_size: u64, samples: u64) -> Vec<u64> {
    let pages = ram_bytes / page_size;
    if pages == 0 || samples == 0 {
        return Vec::new();
    }
    let n = samples.min(pages);
    (0..n)
        .map(|i| {
            // Spread over the whole image, the last page included.
            if n == 1 {
                0
            } else {
                ((i as u128 * (pages - 1) as u128) / (n - 1) as u128) as u64
            }
        })
        .collect()
}

/// The fingerprint of `image` (see [`StateHeader::fingerprint`]).
pub fn fingerprint(
    image: &File,
    path: &Path,
    ram_bytes: u64,
    page_size: u64,
    samples: u64,
) -> Result<u32, SavedError> {
    let mut page = vec![0u8; page_size as usize];
    let mut crc = 0u32;
    for index in sample_pages(ram_bytes, page_size, samples) {
        image
            .read_exact_at(&mut page, index * page_size)
            .map_err(read_err(path))?;
        crc = crc32c::crc32c_append(crc, &index.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &page);
    }
    Ok(crc)
}

/// The two header lines for `header`.
pub fn encode_header(header: &StateHeader) -> Vec<u8> {
    let json = serde_json::to_string(header).expect("a header always serializes");
    format!("{MAGIC_LINE}\n{json}\n").into_bytes()
}

/// Read one `\n`-terminated line of at most [`MAX_HEADER_LINE`] bytes.
fn header_line(reader: &mut impl BufRead, path: &Path) -> Result<Option<String>, SavedError> {
    let mut line = Vec::new();
    reader
        .take(MAX_HEADER_LINE)
        .read_until(b'\n', &mut line)
        .map_err(read_err(path))?;
    if line.pop() != Some(b'\n') {
        return Ok(None);
    }
    Ok(String::from_utf8(line).ok())
}

impl SavedState {
    /// Open and check a state file: magic, header values, length, QEMU's stream magic.
    pub fn open(path: &Path) -> Result<Self, SavedError> {
        let file = File::open(path).map_err(|source| SavedError::Open {
            path: path.into(),
            source,
        })?;
        let len = file.metadata().map_err(read_err(path))?.len();
        let mut reader = BufReader::new(&file);
        if header_line(&mut reader, path)?.as_deref() != Some(MAGIC_LINE) {
            return Err(SavedError::NotAState { path: path.into() });
        }
        let bad = |why: String| SavedError::BadHeader {
            path: path.into(),
            why,
        };
        let json = header_line(&mut reader, path)?.ok_or_else(|| bad("no header line".into()))?;
        let header: StateHeader = serde_json::from_str(&json).map_err(|e| bad(e.to_string()))?;
        check_header(&header).map_err(bad)?;
        let stream_offset = (MAGIC_LINE.len() + 1 + json.len() + 1) as u64;
        let expected = stream_offset + header.stream_bytes;
        if len != expected {
            return Err(SavedError::StateLength {
                path: path.into(),
                len,
                expected,
            });
        }
        let mut magic = [0u8; 4];
        file.read_exact_at(&mut magic, stream_offset)
            .map_err(read_err(path))?;
        if magic != QEMU_STREAM_MAGIC {
            return Err(SavedError::NotQemuStream { path: path.into() });
        }
        Ok(Self {
            path: path.into(),
            header,
            stream_offset,
        })
    }

    /// Check that `image` is this state's RAM image and `backend_bytes` its guest's size.
    pub fn check_image(&self, image: &Path, backend_bytes: u64) -> Result<(), SavedError> {
        let h = &self.header;
        if backend_bytes != h.ram_bytes {
            return Err(SavedError::BackendSize {
                backend: backend_bytes,
                ram_bytes: h.ram_bytes,
            });
        }
        let file = File::open(image).map_err(|source| SavedError::Open {
            path: image.into(),
            source,
        })?;
        let meta = file.metadata().map_err(read_err(image))?;
        if !meta.is_file() {
            return Err(SavedError::ImageNotFile { path: image.into() });
        }
        if meta.len() != h.ram_bytes {
            return Err(SavedError::ImageSize {
                image: image.into(),
                state: self.path.clone(),
                len: meta.len(),
                ram_bytes: h.ram_bytes,
            });
        }
        let found = fingerprint(&file, image, h.ram_bytes, h.page_size, h.samples)?;
        if found != h.fingerprint {
            return Err(SavedError::Fingerprint {
                state: self.path.clone(),
                image: image.into(),
                samples: h.samples,
                expected: h.fingerprint,
                found,
            });
        }
        Ok(())
    }
}

/// `path` quoted for `/bin/sh` (QEMU runs an `exec:` URI through it).
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The QMP `migrate` URI that writes QEMU's stream into `path`.
pub fn save_uri(path: &Path) -> String {
    format!("exec:cat > {}", shell_quote(path))
}

impl SavedState {
    /// The QMP `migrate-incoming` URI that feeds QEMU the stream after the header.
    pub fn incoming_uri(&self) -> String {
        format!(
            "exec:tail -c +{} {}",
            self.stream_offset + 1,
            shell_quote(&self.path)
        )
    }
}

/// Every header value bounded before it is used.
fn check_header(h: &StateHeader) -> Result<(), String> {
    if !h.page_size.is_power_of_two() || !(4096..=1 << 30).contains(&h.page_size) {
        return Err(format!(
            "page_size {} is not a power of two from 4096",
            h.page_size
        ));
    }
    if h.ram_bytes == 0 || h.ram_bytes > MAX_RAM_BYTES || !h.ram_bytes.is_multiple_of(h.page_size) {
        return Err(format!(
            "ram_bytes {} is not a whole number of pages up to {MAX_RAM_BYTES}",
            h.ram_bytes
        ));
    }
    if h.stream_bytes < QEMU_STREAM_MAGIC.len() as u64 || h.stream_bytes > MAX_STREAM_BYTES {
        return Err(format!(
            "stream_bytes {} is outside 4..={MAX_STREAM_BYTES}",
            h.stream_bytes
        ));
    }
    if h.samples == 0 || h.samples > FINGERPRINT_SAMPLES {
        return Err(format!(
            "samples {} is outside 1..={FINGERPRINT_SAMPLES}",
            h.samples
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(dir: &Path, pages: u64, seed: u8) -> PathBuf {
        let path = dir.join(format!("img-{seed}"));
        let bytes: Vec<u8> = (0..pages * 4096).map(|i| (i / 4096) as u8 ^ seed).collect();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn state(dir: &Path, img: &Path, pages: u64) -> PathBuf {
        let ram_bytes = pages * 4096;
        let f = File::open(img).unwrap();
        let stream = b"QEVM\0\0\0\x03device state".to_vec();
        let header = StateHeader {
            ram_bytes,
            page_size: 4096,
            stream_bytes: stream.len() as u64,
            samples: FINGERPRINT_SAMPLES,
            fingerprint: fingerprint(&f, img, ram_bytes, 4096, FINGERPRINT_SAMPLES).unwrap(),
        };
        let path = dir.join("state");
        let mut out = File::create(&path).unwrap();
        out.write_all(&encode_header(&header)).unwrap();
        out.write_all(&stream).unwrap();
        path
    }

    #[test]
    fn uris_quote_paths() {
        assert_eq!(
            save_uri(Path::new("/a b/it's")),
            r"exec:cat > '/a b/it'\''s'"
        );
        let s = SavedState {
            path: "/x/st".into(),
            header: StateHeader {
                ram_bytes: 4096,
                page_size: 4096,
                stream_bytes: 4,
                samples: 1,
                fingerprint: 0,
            },
            stream_offset: 99,
        };
        assert_eq!(s.incoming_uri(), "exec:tail -c +100 '/x/st'");
    }

    #[test]
    fn samples_cover_the_image() {
        assert_eq!(sample_pages(4 * 4096, 4096, 256), vec![0, 1, 2, 3]);
        let s = sample_pages(1 << 30, 4096, 256);
        assert_eq!((s.len(), s[0], *s.last().unwrap()), (256, 0, (1 << 18) - 1));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(sample_pages(0, 4096, 256).is_empty());
    }

    #[test]
    fn a_state_matches_its_image_only() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 300, 1);
        let st = state(dir.path(), &img, 300);
        let saved = SavedState::open(&st).unwrap();
        assert_eq!(saved.header.ram_bytes, 300 * 4096);
        let mut stream = vec![0u8; 4];
        File::open(&st)
            .unwrap()
            .read_exact_at(&mut stream, saved.stream_offset)
            .unwrap();
        assert_eq!(stream, b"QEVM");
        saved.check_image(&img, 300 * 4096).unwrap();

        let other = image(dir.path(), 300, 2);
        let e = saved.check_image(&other, 300 * 4096).unwrap_err();
        assert!(matches!(e, SavedError::Fingerprint { .. }), "{e}");
        assert!(e.to_string().contains("does not match"), "{e}");

        let short = image(dir.path(), 299, 1);
        let e = saved
            .check_image(&short, 300 * 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1224704 bytes") && e.contains("1228800"), "{e}");

        let e = saved.check_image(&img, 512 << 20).unwrap_err().to_string();
        assert!(e.contains("size=1228800"), "{e}");

        let e = saved
            .check_image(&dir.path().join("none"), 300 * 4096)
            .unwrap_err();
        assert!(matches!(e, SavedError::Open { .. }), "{e}");
    }

    #[test]
    fn damaged_state_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8, 1);
        let st = state(dir.path(), &img, 8);
        let good = std::fs::read(&st).unwrap();
        let write = |bytes: &[u8]| {
            let p = dir.path().join("bad");
            std::fs::write(&p, bytes).unwrap();
            SavedState::open(&p).unwrap_err()
        };
        assert!(matches!(
            write(b"QEVM raw qemu stream"),
            SavedError::NotAState { .. }
        ));
        assert!(matches!(
            write(&good[..good.len() - 1]),
            SavedError::StateLength { .. }
        ));
        let mut appended = good.clone();
        appended.push(0);
        assert!(matches!(write(&appended), SavedError::StateLength { .. }));
        let mut not_qemu = good.clone();
        let at = not_qemu.len() - 20;
        not_qemu[at] = b'X';
        assert!(matches!(write(&not_qemu), SavedError::NotQemuStream { .. }));
        let text = String::from_utf8_lossy(&good).replace("\"page_size\":4096", "\"page_size\":3");
        let e = write(text.as_bytes()).to_string();
        assert!(e.contains("page_size 3"), "{e}");
        let e = write(format!("{MAGIC_LINE}\n{{\"ram_bytes\":1}}\n").as_bytes()).to_string();
        assert!(e.contains("malformed"), "{e}");
        assert!(matches!(
            SavedState::open(&dir.path().join("none")).unwrap_err(),
            SavedError::Open { .. }
        ));
    }
}
