//! `read_message` on an arbitrary stream, delivered in reads of arbitrary sizes: frames
//! until an error, never a panic, never more than a frame's cap allocated per frame.
#![no_main]

use std::io::Read;

use agent::migrate::message::read_message;
use libfuzzer_sys::fuzz_target;

/// Hands out `data` at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    // Low bits: the read size (1..=64, 0 = whole reads); bit 7: a version agreed or not.
    let chunk = match (ctl & 0x3f) as usize {
        0 => usize::MAX,
        n => n,
    };
    let agreed = (ctl & 0x80 != 0).then_some(1);
    let mut r = Chunked {
        data: stream,
        chunk,
    };
    while let Ok(m) = read_message(&mut r, agreed) {
        let _ = m.command();
    }
});
