//! The source's journal of a migration that is about to switch over: written (and synced)
//! right before `migrate-continue`, removed once the destination reported the migration
//! over. A source daemon killed after the switchover finds it when it starts again and
//! resumes the push without its QEMU ([`super::restarted`]): the guest's RAM file and its
//! swap devices still hold every page the destination lacks, and the journal says which of
//! them holds each page (the page-state and route tables died with the daemon).
//!
//! The framing is [`crate::migrate::session::journal`]'s, with magic `"PWMJRNL1"`, file
//! `VM.journal` and one [`Where`] per page.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::migrate::session::journal::{dir_of, session_hex, write, JournalError};
use crate::migrate::session::journal::{Common, Found, Kind};
#[cfg(test)]
use crate::migrate::session::journal::{MAX_HEADER, MAX_PAGES};

pub const MAGIC: &[u8; 8] = b"PWMJRNL1";

/// Where one page's current copy is on the source host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Where {
    /// In the guest's RAM file.
    Memory = 0,
    /// In the VM's own swap device (this host's).
    OwnDevice = 1,
    /// In the device an earlier agile migration handed over to this host.
    HandedOver = 2,
    /// The guest freed it: nothing to send but that.
    Freed = 3,
    /// In no store: zero.
    Zero = 4,
    /// In the shared swap device the destination reads itself (agile): it never asks.
    Shared = 5,
}

impl Where {
    pub fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Where::Memory,
            1 => Where::OwnDevice,
            2 => Where::HandedOver,
            3 => Where::Freed,
            4 => Where::Zero,
            5 => Where::Shared,
            _ => return None,
        })
    }
}

/// What a restarted source needs to go on with a migration past its switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub vm: String,
    /// The migration's first session id, 32 hex digits (what `Resume` names).
    pub session: String,
    /// The destination as `pagewise migrate` named it (TLS checks its certificate against
    /// this name) and as it was resolved.
    pub to: String,
    pub addr: std::net::SocketAddr,
    /// The wire version both sides agreed on.
    pub wire_version: u16,
    /// precopy, postcopy or agile.
    pub mode: String,
    pub page_size: u32,
    pub pages: u64,
    pub memory_file: PathBuf,
    /// The spec of the VM's own swap device, when `Where::OwnDevice` pages are read there.
    pub own_device: Option<String>,
    /// The spec of the device handed over to this host, when `Where::HandedOver` pages are.
    pub handed_over_device: Option<String>,
    /// Bytes per second the push may use (0: unlimited).
    pub max_bandwidth: u64,
    /// The source QEMU's QMP socket (told to quit once the migration is over).
    pub qmp: Option<PathBuf>,
    /// The source QEMU's pid and start time (clock ticks after boot, `/proc/PID/stat`):
    /// while that process lives, a restarted source asks it whether the switchover
    /// happened.
    pub qemu_pid: Option<i32>,
    pub qemu_start: Option<u64>,
}

/// The source's journal.
pub type Journal = crate::migrate::session::journal::Journal<Header>;

impl Kind for Header {
    const MAGIC: &'static [u8; 8] = MAGIC;
    const SUFFIX: &'static str = ".journal";
    fn common(&self) -> Common<'_> {
        Common {
            vm: &self.vm,
            session: &self.session,
            page_size: self.page_size,
            pages: self.pages,
            mode: &self.mode,
        }
    }
    fn valid_entry(b: u8) -> bool {
        Where::from_byte(b).is_some()
    }
}

impl Journal {
    /// Where page `p` is (`Where::Zero` beyond the map).
    pub fn place(&self, p: u64) -> Where {
        usize::try_from(p)
            .ok()
            .and_then(|i| self.map.get(i))
            .and_then(|b| Where::from_byte(*b))
            .unwrap_or(Where::Zero)
    }
}

/// Remove `vm`'s source journal from `dir` (gone already is fine).
pub fn remove(dir: &Path, vm: &str) -> Result<(), JournalError> {
    crate::migrate::session::journal::remove::<Header>(dir, vm)
}

/// Every source journal in `dir`, each read and checked (a damaged one is its error, with
/// its path).
pub fn scan(dir: &Path) -> Vec<Found<Header>> {
    crate::migrate::session::journal::scan(dir)
}

#[cfg(test)]
mod tests;
