//! Writing a saved guest's files: the RAM file copied into a raw image (its holes kept, the
//! result read-only) and the state file (header + QEMU's stream), each written under a
//! temporary name, synced and renamed, so a failed save never leaves a file that looks whole.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::{lseek, Whence};

use super::saved::{encode_header, fingerprint, StateHeader, FINGERPRINT_SAMPLES};

/// Copy chunk (the RAM file is on tmpfs; the image usually on disk).
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ImageWriteError {
    #[error("{} exists: a save never overwrites a file (remove it or pick another name)", path.display())]
    Exists { path: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the RAM file {} is {len} bytes: not a whole number of {page_size}-byte pages",
        path.display()
    )]
    RamSize {
        path: PathBuf,
        len: u64,
        page_size: u64,
    },
    #[error("fingerprinting the image")]
    Fingerprint(#[source] super::saved::SavedError),
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageWriteError + 'a {
    move |source| ImageWriteError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// `path` + `.partial`: where a file is written before it is renamed into place.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".partial");
    PathBuf::from(s)
}

/// Refuse to overwrite `path`.
pub fn refuse_existing(path: &Path) -> Result<(), ImageWriteError> {
    if path.symlink_metadata().is_ok() {
        return Err(ImageWriteError::Exists { path: path.into() });
    }
    Ok(())
}

/// The data extents of `file` (SEEK_DATA / SEEK_HOLE) up to `len`.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsFd;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(start) = lseek(file.as_fd(), pos as i64, Whence::SeekData) else {
            break; // ENXIO: no data after pos
        };
        let start = start as u64;
        let end = lseek(file.as_fd(), start as i64, Whence::SeekHole)
            .map(|e| (e as u64).min(len))
            .unwrap_or(len);
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    out
}

/// What [`write_image`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageWritten {
    pub ram_bytes: u64,
    /// Bytes of data copied (the rest are holes: zero).
    pub data_bytes: u64,
    pub fingerprint: u32,
}

/// Copy the guest RAM file `ram` into the raw image `image` (new, read-only afterwards).
pub fn write_image(
    ram: &Path,
    image: &Path,
    page_size: u64,
) -> Result<ImageWritten, ImageWriteError> {
    refuse_existing(image)?;
    let src = File::open(ram).map_err(io("opening the RAM file", ram))?;
    let len = src.metadata().map_err(io("reading", ram))?.len();
    if len == 0 || !len.is_multiple_of(page_size) {
        return Err(ImageWriteError::RamSize {
            path: ram.into(),
            len,
            page_size,
        });
    }
    let tmp = partial_path(image);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let dst = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        dst.set_len(len).map_err(io("sizing", &tmp))?;
        let mut buf = vec![0u8; CHUNK];
        let mut data_bytes = 0;
        for (start, end) in data_extents(&src, len) {
            let mut at = start;
            while at < end {
                let n = (end - at).min(CHUNK as u64) as usize;
                src.read_exact_at(&mut buf[..n], at)
                    .map_err(io("reading the RAM file", ram))?;
                if buf[..n].iter().any(|b| *b != 0) {
                    dst.write_all_at(&buf[..n], at)
                        .map_err(io("writing", &tmp))?;
                }
                at += n as u64;
                data_bytes += n as u64;
            }
        }
        dst.sync_all().map_err(io("syncing", &tmp))?;
        let fingerprint = fingerprint(&dst, &tmp, len, page_size, FINGERPRINT_SAMPLES)
            .map_err(ImageWriteError::Fingerprint)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))
            .map_err(io("making read-only", &tmp))?;
        std::fs::rename(&tmp, image).map_err(io("renaming into place", image))?;
        Ok(ImageWritten {
            ram_bytes: len,
            data_bytes,
            fingerprint,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Write the state file `state`: `header` (its `stream_bytes` set here) then the QEMU
/// stream read from `stream`.
pub fn write_state(
    state: &Path,
    mut header: StateHeader,
    stream: &Path,
) -> Result<StateHeader, ImageWriteError> {
    refuse_existing(state)?;
    let mut src = File::open(stream).map_err(io("opening the device state", stream))?;
    header.stream_bytes = src.metadata().map_err(io("reading", stream))?.len();
    let tmp = partial_path(state);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        dst.write_all(&encode_header(&header))
            .map_err(io("writing", &tmp))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf).map_err(io("reading", stream))?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).map_err(io("writing", &tmp))?;
        }
        dst.sync_all().map_err(io("syncing", &tmp))?;
        std::fs::rename(&tmp, state).map_err(io("renaming into place", state))?;
        Ok(header)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::saved::SavedState;

    #[test]
    fn image_and_state_round_trip_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ram = dir.path().join("ram");
        let f = File::create(&ram).unwrap();
        f.set_len(64 * 4096).unwrap();
        f.write_all_at(&[7u8; 4096], 10 * 4096).unwrap();
        f.write_all_at(&[9u8; 8192], 40 * 4096).unwrap();
        drop(f);
        let image = dir.path().join("img");
        let w = write_image(&ram, &image, 4096).unwrap();
        assert_eq!(w.ram_bytes, 64 * 4096);
        assert!(
            w.data_bytes >= 3 * 4096 && w.data_bytes <= 64 * 4096,
            "{w:?}"
        );
        assert_eq!(std::fs::read(&image).unwrap(), std::fs::read(&ram).unwrap());
        let mode = std::fs::metadata(&image).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        assert!(matches!(
            write_image(&ram, &image, 4096),
            Err(ImageWriteError::Exists { .. })
        ));
        assert!(!partial_path(&image).exists());

        let stream = dir.path().join("stream");
        std::fs::write(&stream, b"QEVM\0\0\0\x03devices").unwrap();
        let state = dir.path().join("state");
        let header = StateHeader {
            ram_bytes: w.ram_bytes,
            page_size: 4096,
            stream_bytes: 0,
            samples: FINGERPRINT_SAMPLES,
            fingerprint: w.fingerprint,
        };
        let written = write_state(&state, header, &stream).unwrap();
        assert_eq!(written.stream_bytes, 15);
        let saved = SavedState::open(&state).unwrap();
        saved.check_image(&image, 64 * 4096).unwrap();
        assert!(matches!(
            write_state(&state, header, &stream),
            Err(ImageWriteError::Exists { .. })
        ));

        std::fs::write(dir.path().join("odd"), [1u8; 100]).unwrap();
        assert!(matches!(
            write_image(&dir.path().join("odd"), &dir.path().join("img2"), 4096),
            Err(ImageWriteError::RamSize { len: 100, .. })
        ));
    }
}
