//! Opening a backend file: O_DIRECT where the filesystem supports it (and with which
//! alignment), buffered I/O where it does not.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{DirectMode, OpenOptions, FALLBACK_DIRECT_ALIGN};
use crate::backend::BackendError;

/// Open the file, trying O_DIRECT as `opts.direct` says. Returns (file, direct, alignment).
pub(super) fn open_file(
    path: &Path,
    opts: OpenOptions,
) -> Result<(File, bool, usize), BackendError> {
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        if opts.read_only {
            o.read(true);
        } else {
            o.read(true).write(true).create(opts.create).mode(0o600);
        }
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let open_err =
        |e: io::Error| BackendError::Setup(format!("cannot open {}: {e}", path.display()));
    let refused = |why: String| {
        BackendError::Setup(format!(
            "O_DIRECT was required but {} does not support it: {why}",
            path.display()
        ))
    };
    if opts.direct == DirectMode::Never {
        return Ok((open(false).map_err(open_err)?, false, 1));
    }
    let file = match open(true) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            if opts.direct == DirectMode::Always {
                return Err(refused(e.to_string()));
            }
            tracing::debug!(path = %path.display(), "O_DIRECT refused, using buffered I/O");
            return Ok((open(false).map_err(open_err)?, false, 1));
        }
        Err(e) => return Err(open_err(e)),
    };
    match direct_alignment(&file) {
        Some(0) if opts.direct == DirectMode::Always => {
            Err(refused("statx reports no direct I/O alignment".to_string()))
        }
        Some(0) => {
            drop(file);
            Ok((open(false).map_err(open_err)?, false, 1))
        }
        Some(align) => Ok((file, true, align.max(1))),
        None => Ok((file, true, FALLBACK_DIRECT_ALIGN)),
    }
}

/// The O_DIRECT offset/length alignment of an open file: `Some(0)` when the filesystem says it
/// does not support direct I/O, `None` when the kernel cannot tell.
fn direct_alignment(file: &File) -> Option<usize> {
    let meta = file.metadata().ok()?;
    if meta.file_type().is_block_device() {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one c_int to the pointer, which is valid for that.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector) };
        return (rc == 0 && sector > 0).then_some(sector as usize);
    }
    // SAFETY: statx is plain old data; an all-zero value is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx look
    // at the fd itself, and `stx` is a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_offset_align == 0 || stx.stx_dio_mem_align as usize > crate::BUF_ALIGN {
        return Some(0);
    }
    Some(stx.stx_dio_offset_align as usize)
}
