//! What the fuzz targets share: an allocator that measures the largest heap a call held
//! ([`peak_during`]), so a target can check that a decoder allocates no more than its input
//! justifies, and a peer stand-in that serves the input as a byte stream in reads of chosen
//! sizes ([`Peer`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};

pub mod attach;

/// What a journal target decodes: the input's first byte chooses whether the rest is taken
/// as it is (odd: no) or with its last four bytes replaced by the crc32c of the bytes before
/// them, so the fuzzer reaches what the checksum guards. None for an empty input.
pub fn resealed(input: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    let [ctl, data @ ..] = input else {
        return None;
    };
    if ctl & 1 == 1 && data.len() >= 4 {
        let body = data.len() - 4;
        let crc = crc32c::crc32c(&data[..body]);
        return Some([&data[..body], &crc.to_le_bytes()[..]].concat().into());
    }
    Some(data.into())
}

/// What both journal targets check: the [`resealed`] input decodes with a heap of at most
/// 300 x its size + 64 KiB (a declared size beyond what lz4 could pack into the bytes given
/// is refused before it allocates), and a journal it accepts encodes and decodes back to
/// itself. Returns the accepted journal. Needs [`Counting`] as the target's allocator.
pub fn journal_round_trip<J: PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
    input: &[u8],
    decode: impl Fn(&[u8]) -> Result<J, E>,
    encode: impl Fn(&J) -> Vec<u8>,
) -> Option<J> {
    let data = resealed(input)?;
    let (decoded, peak) = peak_during(|| decode(&data));
    assert!(
        peak <= 300 * data.len() + 65536,
        "{peak} bytes held for {} bytes",
        data.len()
    );
    let journal = decoded.ok()?;
    let again = decode(&encode(&journal)).expect("an encoded journal decodes");
    assert_eq!(again, journal);
    Some(journal)
}

/// The system allocator, counting the bytes the current thread holds while a
/// [`peak_during`] measures it. Install it in a target with
/// `#[global_allocator] static A: pagewise_fuzz::Counting = pagewise_fuzz::Counting;`.
pub struct Counting;

thread_local! {
    /// (measuring, bytes held now, most bytes held)
    static HELD: Cell<(bool, usize, usize)> = const { Cell::new((false, 0, 0)) };
}

fn note(grow: usize, shrink: usize) {
    // `try_with`: the thread-local may already be gone while the thread exits.
    let _ = HELD.try_with(|h| {
        let (on, now, peak) = h.get();
        if on {
            let now = now.saturating_add(grow).saturating_sub(shrink);
            h.set((on, now, peak.max(now)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the counting touches only a
// thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size(), 0);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(0, layout.size());
        // SAFETY: as for `alloc`; `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size, layout.size());
        // SAFETY: as for `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Run `f` and return its result and the most heap bytes it held at once (allocations made
/// before `f` and freed inside it make the figure smaller, never larger). Needs
/// [`Counting`] as the global allocator; without it the figure is 0.
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    HELD.with(|h| h.set((true, 0, 0)));
    let out = f();
    let (_, _, peak) = HELD.with(|h| h.replace((false, 0, 0)));
    (out, peak)
}

/// A peer whose bytes are `input`, handed out at most `chunk` bytes per read (then EOF);
/// what is written to it is kept in `written`.
pub struct Peer<'a> {
    pub input: &'a [u8],
    pub chunk: usize,
    pub written: Vec<u8>,
}

impl<'a> Peer<'a> {
    /// A peer reading `input` in reads of `1 + ctl % 64` bytes, or whole reads when
    /// `ctl % 64 == 63`.
    pub fn new(ctl: u8, input: &'a [u8]) -> Self {
        let chunk = match ctl % 64 {
            63 => usize::MAX,
            n => 1 + n as usize,
        };
        Self {
            input,
            chunk,
            written: Vec::new(),
        }
    }

    /// The next chunk of at most `max` bytes (empty at the end).
    pub fn next_chunk(&mut self, max: usize) -> &'a [u8] {
        let n = max.min(self.chunk).min(self.input.len());
        let (now, rest) = self.input.split_at(n);
        self.input = rest;
        now
    }
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let c = self.next_chunk(buf.len());
        buf[..c.len()].copy_from_slice(c);
        Ok(c.len())
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
