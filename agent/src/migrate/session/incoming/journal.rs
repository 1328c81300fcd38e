//! The destination's journal of a migration past its switchover: written (and synced) right
//! before `Ready`, removed once the source's push is over. A destination daemon killed in
//! between finds it when it starts again ([`super::restarted`]): the guest's QEMU still runs
//! (it was this daemon's child, not its part) and waits for its pager to come back, its
//! memory file holds every page placed so far, and the journal says which route serves each
//! page that is absent (the route table died with the daemon): the source (through the
//! link, when it reconnects), the shared swap device (agile), or none (zero).
//!
//! The framing is [`crate::migrate::session::journal`]'s, with magic `"PWDJRNL1"`, file
//! `VM.incoming` and one [`Route`] byte per page.

use std::path::{Path, PathBuf};

use pager::route::Route;
use serde::{Deserialize, Serialize};

pub use crate::migrate::session::journal::JournalError;
use crate::migrate::session::journal::{Common, Found, Kind};

pub const MAGIC: &[u8; 8] = b"PWDJRNL1";

/// What a restarted destination needs to go on with a migration past its switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub vm: String,
    /// The migration's first session id, 32 hex digits (what the source's `Resume` names).
    pub session: String,
    /// The wire version both sides agreed on.
    pub wire_version: u16,
    /// precopy, postcopy or agile.
    pub mode: String,
    pub page_size: u32,
    pub pages: u64,
    /// The guest's memory file on this host.
    pub memory_file: PathBuf,
    /// The VM's own swap device on this host (the one it was prepared with).
    pub swapdev: String,
    /// The shared swap device handed over to this host (agile).
    pub shared: Option<String>,
    /// The destination QEMU's QMP socket, pid and start time (clock ticks after boot): only
    /// that process may take the VM back.
    pub qmp: PathBuf,
    pub qemu_pid: i32,
    pub qemu_start: u64,
    /// The source's paths and this host's for the files QEMU uses (for the report).
    pub dest_paths: std::collections::BTreeMap<String, String>,
}

/// The destination's journal.
pub type Journal = crate::migrate::session::journal::Journal<Header>;

impl Kind for Header {
    const MAGIC: &'static [u8; 8] = MAGIC;
    const SUFFIX: &'static str = ".incoming";
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
        route_of(b).is_some()
    }
}

/// The route a map byte names.
fn route_of(b: u8) -> Option<Route> {
    Route::ALL.into_iter().find(|r| *r as u8 == b)
}

impl Journal {
    /// The route of page `p` (`Route::Remote` beyond the map: ask the source).
    pub fn route(&self, p: u64) -> Route {
        usize::try_from(p)
            .ok()
            .and_then(|i| self.map.get(i))
            .and_then(|b| route_of(*b))
            .unwrap_or(Route::Remote)
    }

    /// The map as runs of one route: (first page, count, route).
    pub fn runs(&self) -> Vec<(u64, u64, Route)> {
        let mut out: Vec<(u64, u64, Route)> = Vec::new();
        for p in 0..self.map.len() as u64 {
            let r = self.route(p);
            match out.last_mut() {
                Some((first, count, route)) if *route == r && *first + *count == p => *count += 1,
                _ => out.push((p, 1, r)),
            }
        }
        out
    }
}

/// Write `journal` to `dir` durably.
pub fn write(dir: &Path, journal: &Journal) -> Result<PathBuf, JournalError> {
    crate::migrate::session::journal::write(dir, journal)
}

/// Remove `vm`'s destination journal from `dir` (gone already is fine).
pub fn remove(dir: &Path, vm: &str) -> Result<(), JournalError> {
    crate::migrate::session::journal::remove::<Header>(dir, vm)
}

/// Every destination journal in `dir`, each read and checked.
pub fn scan(dir: &Path) -> Vec<Found<Header>> {
    crate::migrate::session::journal::scan(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Journal {
        Journal {
            header: Header {
                vm: "vm1".into(),
                session: "000102030405060708090a0b0c0d0e0f".into(),
                wire_version: 3,
                mode: "agile".into(),
                page_size: 4096,
                pages: 5,
                memory_file: "/dev/shm/in/vm1.ram".into(),
                swapdev: "/var/lib/pagewise/vm1.swap".into(),
                shared: Some("nbd://10.0.0.9/vm1".into()),
                qmp: "/dev/shm/in/vm1.qmp".into(),
                qemu_pid: 77,
                qemu_start: 12345,
                dest_paths: [("/src/vm1.log".into(), "/dev/shm/in/vm1.log".into())].into(),
            },
            map: vec![2, 2, 3, 0, 2],
        }
    }

    #[test]
    fn a_journal_round_trips_and_gives_runs_of_routes() {
        let j = tiny();
        let back = Journal::decode(&j.encode()).unwrap();
        assert_eq!(back, j);
        assert_eq!(back.session(), std::array::from_fn(|i| i as u8));
        assert_eq!(
            back.runs(),
            [
                (0, 2, Route::Remote),
                (2, 1, Route::Zero),
                (3, 1, Route::Local),
                (4, 1, Route::Remote)
            ]
        );
        assert_eq!(back.route(99), Route::Remote);
    }

    #[test]
    fn the_layout_is_pinned() {
        let j = Journal {
            header: Header {
                shared: None,
                dest_paths: Default::default(),
                pages: 2,
                ..tiny().header
            },
            map: vec![2, 3],
        };
        let header = br#"{"vm":"vm1","session":"000102030405060708090a0b0c0d0e0f","wire_version":3,"mode":"agile","page_size":4096,"pages":2,"memory_file":"/dev/shm/in/vm1.ram","swapdev":"/var/lib/pagewise/vm1.swap","shared":null,"qmp":"/dev/shm/in/vm1.qmp","qemu_pid":77,"qemu_start":12345,"dest_paths":{}}"#;
        let mut want = b"PWDJRNL1".to_vec();
        want.extend_from_slice(&(header.len() as u32).to_le_bytes());
        want.extend_from_slice(header);
        // lz4 block, size prepended: 2 literals (token 0x20) and no match.
        want.extend_from_slice(&[7, 0, 0, 0, 2, 0, 0, 0, 0x20, 2, 3]);
        let crc = crc32c::crc32c(&want);
        want.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(j.encode(), want);
    }

    #[test]
    fn bad_inputs_are_refused_by_name() {
        let bytes = tiny().encode();
        for n in 0..bytes.len() {
            assert!(Journal::decode(&bytes[..n]).is_err(), "{n} bytes decoded");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            assert!(Journal::decode(&bad).is_err(), "byte {i} flipped decoded");
        }
        // A route byte that names no route.
        let mut odd = tiny();
        odd.map[1] = 4;
        let e = Journal::decode(&odd.encode());
        assert!(
            matches!(e, Err(JournalError::BadEntry { page: 1, value: 4 })),
            "{e:?}"
        );
        // A source journal is not a destination one.
        let e = Journal::decode(&crate::migrate::session::source::journal::MAGIC.map(|b| b));
        assert!(matches!(e, Err(JournalError::TooShort { .. })), "{e:?}");
        let mut theirs = bytes.clone();
        theirs[..8].copy_from_slice(crate::migrate::session::source::journal::MAGIC);
        let e = Journal::decode(&theirs);
        assert!(matches!(e, Err(JournalError::BadMagic(_))), "{e:?}");
    }

    #[test]
    fn files_do_not_meet_the_sources() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &tiny()).unwrap();
        assert_eq!(p, dir.path().join("vm1.incoming"));
        assert!(crate::migrate::session::source::journal::scan(dir.path()).is_empty());
        let found = scan(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].1.as_ref().unwrap(), &tiny());
        remove(dir.path(), "vm1").unwrap();
        assert!(scan(dir.path()).is_empty());
    }
}
