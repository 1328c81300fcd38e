//! Errors of the userfaultfd layer.

use crate::Features;

/// A userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot create a userfaultfd: /dev/userfaultfd: {device}; userfaultfd(2): {syscall}")]
    Create {
        device: std::io::Error,
        syscall: std::io::Error,
    },
    #[error("UFFDIO_API with features {requested:#x?} failed{}",
        .missing.map(|m| format!(" (kernel lacks {:#x})", m.0)).unwrap_or_default())]
    Api {
        requested: Features,
        missing: Option<Features>,
        source: std::io::Error,
    },
    #[error("userfaultfd {op} of [{addr:#x}, +{len:#x}) failed")]
    Range {
        op: &'static str,
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(std::io::Error),
}

impl UffdError {
    pub(crate) fn range(op: &'static str, addr: u64, len: u64) -> Self {
        Self::Range {
            op,
            addr,
            len,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Why placing pages (COPY / ZEROPAGE / CONTINUE) stopped. Each variant says how many bytes
/// from the start of the request were placed before the stop.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// EEXIST: the page at `dst + placed` is already mapped. For a fault handler this is
    /// success for that page (someone else placed it); continue after it if the run is longer.
    #[error("page at {addr:#x} already present ({placed} bytes placed before it)")]
    Exists { addr: u64, placed: u64 },
    /// EAGAIN: a mapping change (REMOVE/UNMAP/REMAP) is pending, or the kernel placed only
    /// part of the run (it reports any short copy this way, e.g. when a later page of the run
    /// already exists): read pending events, then retry from `addr`.
    #[error("mapping change pending at {addr:#x} ({placed} bytes placed); drain events and retry")]
    Again { addr: u64, placed: u64 },
    /// ENOENT: the range is no longer registered / mapped (the VMM unmapped it).
    #[error("range at {addr:#x} is no longer mapped or registered")]
    Unmapped { addr: u64 },
    /// ESRCH: the faulting process's address space is gone (the VMM exited).
    #[error("the process owning the userfaultfd's address space has exited")]
    ProcessGone,
    #[error("placing pages at {addr:#x} (+{len:#x}) failed")]
    Os {
        addr: u64,
        len: u64,
        source: std::io::Error,
    },
}

impl CopyError {
    pub(crate) fn from_errno(errno: i32, result: i64, addr: u64, len: u64) -> Self {
        let placed = if result > 0 { result as u64 } else { 0 };
        match errno {
            libc::EEXIST => Self::Exists {
                addr: addr + placed,
                placed,
            },
            libc::EAGAIN => Self::Again {
                addr: addr + placed,
                placed,
            },
            libc::ENOENT => Self::Unmapped { addr },
            libc::ESRCH => Self::ProcessGone,
            e => Self::Os {
                addr,
                len,
                source: std::io::Error::from_raw_os_error(e),
            },
        }
    }

    /// Bytes placed before the stop.
    pub fn placed(&self) -> u64 {
        match self {
            Self::Exists { placed, .. } | Self::Again { placed, .. } => *placed,
            _ => 0,
        }
    }
}
