//! Pre-copy (Clark et al., NSDI'05): send every page, then rounds of the pages written since,
//! until what is left fits the downtime limit at the measured bandwidth, or a round or time
//! cap ends it (the report says which rule did).
//!
//! Write tracking is the migration's own subscription to the VM's writes
//! (`placed_counts_as_written`: a page that becomes resident after its round counts as
//! written). Each round protects the pages it is about to send before it reads them, so a
//! write during the round faults, is recorded, and the page goes again next round; a page is
//! never read while unprotected and then missed.
//!
//! The destination side ([`receive_into_file`]) writes the pages into the destination's
//! memory file before its VMM attaches (a page that turned zero is punched out, so the file
//! reads zero there).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use pager::dirty::Subscription;
use pager::vm::Vm;
use serde::Serialize;

use super::bulk::SourcePage;
use super::delta::{decode_into, DecodeError, PageEncoder};
use super::message::{read_message, write_message, Message, WireError};
use super::order::{Order, StripeRates};

/// How the rounds run and when they stop.
#[derive(Debug, Clone, Copy)]
pub struct PrecopyLimits {
    /// The order of each round's pages (and, for microwiper, where a round ends).
    pub order: Order,
    /// What is left is sent with the guest paused: it must fit this.
    pub downtime_limit: Duration,
    pub max_rounds: u32,
    pub max_time: Duration,
    /// When set (agile: what is left goes by post-copy, each page once), another round runs
    /// only while the pages written during a round are at most this share of the data pages
    /// it sent; past it, a round would send most of them twice.
    pub rewrite_share: Option<f64>,
}

/// Which rule ended the rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopRule {
    /// Remaining dirty bytes / measured bandwidth fit the downtime limit.
    Converged,
    /// The round cap was reached first (the guest dirties faster than the link).
    RoundCap,
    /// The time cap was reached first.
    TimeCap,
    /// The guest rewrote more of the round than [`PrecopyLimits::rewrite_share`]: post-copy
    /// moves the rest with fewer bytes than another round.
    PostcopyCheaper,
}

/// One round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Round {
    pub round: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub secs: f64,
    /// Pages written during the round (next round's work).
    pub dirty_after: u64,
    /// Pages not sent in the round: written again before their turn (in `dirty_after`).
    pub skipped: u64,
    /// Pages left for the next round by the microwiper cut-off (in `dirty_after`).
    pub deferred: u64,
}

/// The rounds and what is left for the pause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrecopyOutcome {
    pub rounds: Vec<Round>,
    pub stop: StopRule,
    /// Pages to send while the guest is paused (harvested at the pause by the caller).
    pub remaining_estimate: u64,
    /// Bytes per second moved since the start (what the link sustained).
    pub bandwidth: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PrecopyError {
    #[error("the migration channel failed")]
    Wire(#[from] WireError),
    #[error("write-protecting pages of VM {vm}")]
    Protect {
        vm: String,
        #[source]
        source: pager::uffd::UffdError,
    },
    #[error("reading page {page} on the source")]
    Read {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the destination sent {0:?} during pre-copy")]
    Unexpected(super::frame::Command),
    #[error("the source sent page {page}, outside the VM's {pages} pages")]
    OutOfRange { page: u64, pages: u64 },
    #[error("the source sent a {got}-byte page; the VM's pages have {want} bytes")]
    WrongPageSize { got: usize, want: usize },
    #[error("page {page} does not decode against the destination's copy")]
    Decode {
        page: u64,
        #[source]
        source: DecodeError,
    },
    #[error("writing page {page} into the destination memory file")]
    Write {
        page: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Write-protect `pages` of `vm` before they are read.
fn protect(vm: &Vm, pages: &[u64]) -> Result<(), PrecopyError> {
    vm.write_protect_pages(pages)
        .map_err(|source| PrecopyError::Protect {
            vm: vm.name.clone(),
            source,
        })
}

/// What one [`send_round`] sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub data: u64,
    pub zero: u64,
    pub bytes: u64,
    /// Pages left for the next round because the guest wrote them again before their turn.
    pub skipped: u64,
}

/// Send `pages` (protected first), each read with `read` and encoded by `enc`. With
/// `skip_rewritten` (the guest runs), a page the guest wrote again after the protect and
/// before its turn is skipped: it is dirty in that subscription, so the next round or the
/// final set sends it once instead of twice (Clark et al.'s "skip" pages).
pub fn send_round(
    vm: &Vm,
    pages: &[u64],
    out: &mut impl Write,
    read: &mut impl FnMut(u64, &mut [u8]) -> Result<SourcePage, std::io::Error>,
    skip_rewritten: Option<&Subscription>,
    enc: &mut PageEncoder,
) -> Result<Sent, PrecopyError> {
    protect(vm, pages)?;
    let ps = vm.layout.page_size();
    let mut buf = vec![0u8; ps];
    let (mut data, mut zero, mut bytes, mut skipped) = (0, 0, 0, 0);
    for &page in pages {
        if skip_rewritten.is_some_and(|w| w.is_dirty(page)) {
            skipped += 1;
            continue;
        }
        let kind = read(page, &mut buf).map_err(|source| PrecopyError::Read { page, source })?;
        if !matches!(kind, SourcePage::Data) {
            // The destination drops what it held of the page.
            enc.forget(page);
        }
        match kind {
            SourcePage::Data => {
                // `buf` is this thread's copy, read out of guest memory before.
                bytes += enc.send(out, page, &buf)?;
                data += 1;
            }
            SourcePage::Zero => {
                write_message(
                    out,
                    &Message::ZeroPages {
                        first: page,
                        count: 1,
                    },
                )?;
                zero += 1;
                bytes += 32;
            }
            SourcePage::Freed => {
                write_message(
                    out,
                    &Message::FreedPages {
                        first: page,
                        count: 1,
                    },
                )?;
                bytes += 32;
            }
            SourcePage::Stored => {
                write_message(
                    out,
                    &Message::StoredPages {
                        first: page,
                        count: 1,
                    },
                )?;
                bytes += 32;
            }
        }
    }
    Ok(Sent {
        data,
        zero,
        bytes,
        skipped,
    })
}

/// Rounds until a stop rule holds. The first round sends every page except `held_back`
/// (ascending; pages the guest is writing now), each later one the pages `writes` recorded
/// since, the held-back ones among them, in `limits.order`.
pub fn run_rounds(
    vm: &Vm,
    writes: &Subscription,
    stream: impl Write,
    limits: PrecopyLimits,
    held_back: &[u64],
    enc: &mut PageEncoder,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<SourcePage, std::io::Error>,
) -> Result<PrecopyOutcome, PrecopyError> {
    let started = Instant::now();
    let mut out = BufWriter::with_capacity(256 * 1024, stream);
    let mut rounds = Vec::new();
    let mut pages: Vec<u64> = (0..vm.layout.pages())
        .filter(|p| held_back.binary_search(p).is_err())
        .collect();
    // Writes before the first round's protect are in every page's first send anyway.
    let _ = writes.harvest();
    for &p in held_back {
        writes.mark(p);
    }
    let mut bandwidth = 0.0;
    let mut total_bytes = 0u64;
    let mut rates = StripeRates::default();
    loop {
        let round = rounds.len() as u32;
        let t = Instant::now();
        let mut deferred = 0;
        if limits.order == Order::Microwiper && round > 0 {
            let send = rates.plan(&mut pages, vm.layout.page_size(), bandwidth);
            // The hotter rest stays dirty: the next round (or the pause) sends it.
            for &p in &pages[send..] {
                writes.mark(p);
            }
            deferred = (pages.len() - send) as u64;
            pages.truncate(send);
        }
        enc.set_first_pass(round == 0);
        let sent = send_round(vm, &pages, &mut out, &mut read, Some(writes), enc);
        enc.set_first_pass(false);
        let Sent {
            data,
            zero,
            bytes,
            skipped,
        } = sent?;
        write_message(
            &mut out,
            &Message::RoundEnd {
                round,
                sent: data + zero,
                dirty: writes.count() as u64,
            },
        )?;
        out.flush().map_err(WireError::Io)?;
        let secs = t.elapsed().as_secs_f64();
        // Over the whole migration so far: a small round fits in socket buffers and would
        // look infinitely fast on its own.
        total_bytes += bytes;
        let elapsed = started.elapsed().as_secs_f64();
        if elapsed > 0.0 && total_bytes > 0 {
            bandwidth = total_bytes as f64 / elapsed;
        }
        pages = writes.harvest();
        rates.learn(&pages, secs);
        rounds.push(Round {
            round,
            pages: data,
            zero_pages: zero,
            bytes,
            secs,
            dirty_after: pages.len() as u64,
            skipped,
            deferred,
        });
        // What is left costs what this round's pages cost on the wire (deltas and lz4 make
        // a page cheaper than its size; a round of only zero pages says nothing).
        let per_page = if data > 0 {
            (bytes as f64 / (data + zero) as f64).min(vm.layout.page_size() as f64 + 32.0)
        } else {
            vm.layout.page_size() as f64
        };
        let left = pages.len() as f64 * per_page;
        let stop = if bandwidth > 0.0 && (left / bandwidth) <= limits.downtime_limit.as_secs_f64() {
            Some(StopRule::Converged)
        } else if limits.rewrite_share.is_some_and(|share| {
            (pages.len() as u64).saturating_sub(deferred) as f64 > share * data as f64
        }) {
            Some(StopRule::PostcopyCheaper)
        } else if rounds.len() as u32 >= limits.max_rounds {
            Some(StopRule::RoundCap)
        } else if started.elapsed() >= limits.max_time {
            Some(StopRule::TimeCap)
        } else {
            None
        };
        if let Some(stop) = stop {
            // The harvested pages are not lost: mark them again for the caller's final pass.
            for &p in &pages {
                writes.mark(p);
            }
            return Ok(PrecopyOutcome {
                rounds,
                stop,
                remaining_estimate: pages.len() as u64,
                bandwidth,
            });
        }
    }
}

/// The final pass with the guest paused: the pages written since the last round, then
/// `Switchover`. Returns pages sent.
pub fn final_pass(
    vm: &Vm,
    writes: &Subscription,
    stream: impl Write,
    enc: &mut PageEncoder,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<SourcePage, std::io::Error>,
) -> Result<u64, PrecopyError> {
    let mut out = BufWriter::new(stream);
    let pages = writes.harvest();
    let sent = send_round(vm, &pages, &mut out, &mut read, None, enc)?;
    write_message(&mut out, &Message::Switchover)?;
    out.flush().map_err(WireError::Io)?;
    Ok(sent.data + sent.zero)
}

/// What the destination received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Written {
    pub pages: u64,
    pub zero_pages: u64,
    pub rounds: u32,
}

/// Drop `len` bytes at `offset` from a memory file (they read zero; a mapping faults again).
pub(crate) fn punch(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    fallocate(
        file.as_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(std::io::Error::from)
}

/// Destination side: write pre-copied pages into `memory` until `Switchover`.
pub fn receive_into_file(
    mut stream: impl Read,
    memory: &File,
    page_size: usize,
    pages: u64,
    version: u16,
) -> Result<Written, PrecopyError> {
    let mut got = Written::default();
    loop {
        match read_message(&mut stream, Some(version))? {
            Message::Page { page, data } if page < pages && data.len() == page_size => {
                memory
                    .write_all_at(&data, page * page_size as u64)
                    .map_err(|source| PrecopyError::Write { page, source })?;
                got.pages += 1;
            }
            Message::Page { page, .. } | Message::EncodedPage { page, .. } if page >= pages => {
                return Err(PrecopyError::OutOfRange { page, pages })
            }
            Message::EncodedPage {
                page,
                checksum,
                encoding,
                body,
            } => {
                let at = page * page_size as u64;
                let mut copy = vec![0u8; page_size];
                memory
                    .read_exact_at(&mut copy, at)
                    .map_err(|source| PrecopyError::Write { page, source })?;
                decode_into(encoding, &body, checksum, &mut copy)
                    .map_err(|source| PrecopyError::Decode { page, source })?;
                memory
                    .write_all_at(&copy, at)
                    .map_err(|source| PrecopyError::Write { page, source })?;
                got.pages += 1;
            }
            Message::Page { data, .. } => {
                return Err(PrecopyError::WrongPageSize {
                    got: data.len(),
                    want: page_size,
                })
            }
            Message::ZeroPages { first, count } | Message::FreedPages { first, count } => {
                let end = first.checked_add(count).filter(|&e| e <= pages).ok_or(
                    PrecopyError::OutOfRange {
                        page: first.saturating_add(count),
                        pages,
                    },
                )?;
                punch(
                    memory,
                    first * page_size as u64,
                    (end - first) * page_size as u64,
                )
                .map_err(|source| PrecopyError::Write {
                    page: first,
                    source,
                })?;
                got.zero_pages += count;
            }
            Message::RoundEnd { .. } => got.rounds += 1,
            Message::Switchover => return Ok(got),
            other => return Err(PrecopyError::Unexpected(other.command())),
        }
    }
}
