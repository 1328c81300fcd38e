//! The bulk channel: the source pushes pages unasked, the destination places them through
//! its fault loop's [`LoopController`] (claimed on arrival, never over a page the guest
//! already has).
//!
//! The source's order follows the faults (Hines' bubbling): every page the destination asked
//! for on the urgent channel becomes a pivot, and the pusher sends the unsent pages around
//! the newest pivot outward before it goes back to address order. No page is pushed twice.

use std::collections::VecDeque;
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Receiver;
use pager::fault_loop::{LoopController, PushedPage};
use pager::source::PageContent;
use swapdev::AlignedBuf;

use super::message::{read_message, write_message, write_page, Message, WireError};

/// How far around a pivot the pusher bubbles before it takes the next pivot.
const BUBBLE_RADIUS: u64 = 256;
/// Pages handed to the fault loop in one order.
const PLACE_BATCH: usize = 64;

/// What one page of the source holds, as the pusher reads it.
pub enum SourcePage {
    /// All zero: sent as a count, no bytes.
    Zero,
    /// The guest freed it: never sent.
    Freed,
    /// Its bytes (written into the buffer the reader was given).
    Data,
    /// Its current copy is in the swap device both hosts share (agile): never sent, the
    /// destination reads it there.
    Stored,
}

/// Pushing failed.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("the bulk channel failed")]
    Wire(#[from] WireError),
    #[error("reading page {page} on the source")]
    Read {
        page: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the fault loop refused pushed pages")]
    Place(#[from] pager::fault_loop::OrderError),
    #[error("the source sent {0:?} on the bulk channel")]
    Unexpected(super::frame::Command),
    #[error("the source sent page {page}, outside the VM's {pages} pages")]
    OutOfRange { page: u64, pages: u64 },
    #[error("the source sent a {got}-byte page; the VM's pages have {want} bytes")]
    WrongPageSize { got: usize, want: usize },
    #[error("the migration was cancelled")]
    Cancelled,
}

/// Which pages have crossed (or are crossing) the link, shared by the pusher and the
/// urgent channel's page server: whoever claims a page first sends it, the other never does,
/// so no page crosses twice.
pub struct SentPages {
    bits: Vec<AtomicU64>,
    pages: u64,
    claimed: AtomicU64,
}

impl SentPages {
    pub fn new(pages: u64) -> Self {
        Self {
            bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            claimed: AtomicU64::new(0),
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Claim `page` for sending; false if it was claimed before (or is outside the VM).
    pub fn claim(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % 64);
        let won = self.bits[(page / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if won {
            self.claimed.fetch_add(1, Ordering::Relaxed);
        }
        won
    }

    pub fn is_claimed(&self, page: u64) -> bool {
        page < self.pages
            && self.bits[(page / 64) as usize].load(Ordering::Acquire) & (1u64 << (page % 64)) != 0
    }

    /// Pages not claimed yet.
    pub fn unclaimed(&self) -> u64 {
        self.pages - self.claimed.load(Ordering::Relaxed)
    }
}

/// The order the pusher sends pages in: around the newest demand fault first, then address
/// order. Pages are claimed in the shared [`SentPages`].
pub struct PushOrder {
    sent: Arc<SentPages>,
    cursor: u64,
    /// Pages around the newest pivot, nearest first.
    around: VecDeque<u64>,
}

impl PushOrder {
    /// Push the pages `sent` does not hold yet; `skip(p)` marks pages that never need pushing
    /// (freed, routed elsewhere): they are claimed now.
    pub fn new(sent: Arc<SentPages>, skip: impl Fn(u64) -> bool) -> Self {
        for p in 0..sent.pages() {
            if skip(p) {
                sent.claim(p);
            }
        }
        Self {
            sent,
            cursor: 0,
            around: VecDeque::new(),
        }
    }

    pub fn remaining(&self) -> u64 {
        self.sent.unclaimed()
    }

    /// A demand fault at `page`: bubble around it next (the newest pivot wins).
    pub fn pivot(&mut self, page: u64) {
        let pages = self.sent.pages();
        if page >= pages {
            return;
        }
        self.around.clear();
        for d in 1..=BUBBLE_RADIUS {
            if let Some(up) = page.checked_add(d).filter(|p| *p < pages) {
                self.around.push_back(up);
            }
            if let Some(down) = page.checked_sub(d) {
                self.around.push_back(down);
            }
        }
    }

    fn take(&mut self, p: u64) -> Option<u64> {
        self.sent.claim(p).then_some(p)
    }

    /// The next page to push, or `None` when every page was sent.
    pub fn next_page(&mut self) -> Option<u64> {
        if self.sent.unclaimed() == 0 {
            return None;
        }
        while let Some(p) = self.around.pop_front() {
            if let Some(p) = self.take(p) {
                return Some(p);
            }
        }
        while self.cursor < self.sent.pages() {
            let p = self.cursor;
            self.cursor += 1;
            if let Some(p) = self.take(p) {
                return Some(p);
            }
        }
        None
    }
}

/// Source side: push every page `order` yields, reading each with `read`, steering by the
/// demand faults arriving on `faults`. Ends with `Done`. Returns pages sent (data, zero).
pub fn push_pages(
    stream: impl Write,
    order: &mut PushOrder,
    page_size: usize,
    faults: &Receiver<u64>,
    cancel: &AtomicBool,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<SourcePage, std::io::Error>,
) -> Result<(u64, u64), BulkError> {
    let mut w = BufWriter::with_capacity(256 * 1024, stream);
    let mut buf = vec![0u8; page_size];
    let (mut data, mut zero) = (0u64, 0u64);
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(BulkError::Cancelled);
        }
        let mut steered = false;
        while let Ok(p) = faults.try_recv() {
            order.pivot(p);
            steered = true;
        }
        if steered {
            // Whatever is buffered goes out before we turn towards the new faults.
            w.flush().map_err(WireError::Io)?;
        }
        let Some(page) = order.next_page() else {
            break;
        };
        match read(page, &mut buf).map_err(|source| BulkError::Read { page, source })? {
            SourcePage::Data => {
                write_page(&mut w, page, &buf)?;
                data += 1;
            }
            SourcePage::Zero => {
                write_message(
                    &mut w,
                    &Message::ZeroPages {
                        first: page,
                        count: 1,
                    },
                )?;
                zero += 1;
            }
            SourcePage::Freed => {
                write_message(
                    &mut w,
                    &Message::FreedPages {
                        first: page,
                        count: 1,
                    },
                )?;
            }
            // The destination routes it to the shared swap device (announced before the
            // switchover): nothing to push.
            SourcePage::Stored => {}
        }
    }
    write_message(&mut w, &Message::Done)?;
    w.flush().map_err(WireError::Io)?;
    Ok((data, zero))
}

/// Counts of what the destination received on the bulk channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub placed: u64,
    pub already_present: u64,
    pub freed: u64,
}

/// Destination side: place every pushed page until the source says `Done`.
pub fn receive_pages(
    stream: impl Read,
    control: &LoopController,
    page_size: usize,
    pages: u64,
    version: u16,
) -> Result<Received, BulkError> {
    let mut got = Received::default();
    receive_pages_into(stream, control, page_size, pages, version, &mut got)?;
    Ok(got)
}

/// [`receive_pages`], counting into `got` (what was placed before a failure counts too).
pub fn receive_pages_into(
    mut stream: impl Read,
    control: &LoopController,
    page_size: usize,
    pages: u64,
    version: u16,
    got: &mut Received,
) -> Result<(), BulkError> {
    let mut batch = Vec::with_capacity(PLACE_BATCH);
    let flush = |batch: &mut Vec<PushedPage>, got: &mut Received| -> Result<(), BulkError> {
        if !batch.is_empty() {
            let r = control.place(std::mem::take(batch))?;
            got.placed += r.placed;
            got.already_present += r.already_present;
        }
        Ok(())
    };
    loop {
        let (page, content) = match read_message(&mut stream, Some(version))? {
            Message::Page { page, data } => {
                if data.len() != page_size {
                    return Err(BulkError::WrongPageSize {
                        got: data.len(),
                        want: page_size,
                    });
                }
                let mut buf = AlignedBuf::new(page_size);
                buf.as_mut_slice().copy_from_slice(&data);
                (page, PageContent::Data(buf))
            }
            Message::ZeroPages { first, count: 1 } => (first, PageContent::Zero),
            Message::FreedPages { first, count: 1 } => {
                got.freed += 1;
                (first, PageContent::Zero)
            }
            Message::Done => {
                flush(&mut batch, got)?;
                return Ok(());
            }
            other => return Err(BulkError::Unexpected(other.command())),
        };
        if page >= pages {
            return Err(BulkError::OutOfRange { page, pages });
        }
        batch.push(PushedPage { page, content });
        if batch.len() >= PLACE_BATCH {
            flush(&mut batch, got)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_order_visits_every_page_once_bubbling_around_pivots() {
        let mut o = PushOrder::new(Arc::new(SentPages::new(2000)), |p| p % 7 == 0);
        let mut seen = vec![false; 2000];
        let mut order = Vec::new();
        for i in 0..2000 {
            if i == 10 {
                o.pivot(1500);
            }
            let Some(p) = o.next_page() else { break };
            assert!(!seen[p as usize], "page {p} pushed twice");
            seen[p as usize] = true;
            order.push(p);
        }
        assert_eq!(o.remaining(), 0);
        assert!(o.next_page().is_none());
        let expect: usize = (0..2000).filter(|p| p % 7 != 0).count();
        assert_eq!(order.len(), expect);
        assert!(order.iter().all(|p| p % 7 != 0), "skipped pages pushed");
        // Right after the pivot the pusher works around page 1500.
        assert!(
            order[10..20].iter().all(|p| p.abs_diff(1500) < 20),
            "not bubbling around the pivot: {:?}",
            &order[10..20]
        );
    }

    #[test]
    fn pages_claimed_by_the_urgent_channel_are_not_pushed() {
        let sent = Arc::new(SentPages::new(10));
        let mut o = PushOrder::new(sent.clone(), |_| false);
        assert!(sent.claim(3));
        assert!(!sent.claim(3));
        assert!(!sent.claim(10), "outside the VM");
        let all: Vec<u64> = std::iter::from_fn(|| o.next_page()).collect();
        assert_eq!(all, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
        assert!(!sent.claim(5), "a pushed page is claimed");
    }
}
