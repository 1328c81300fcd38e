//! lz4 on the wire for pages sent whole, and the gate that decides whether it pays.
//!
//! Compressing costs the sender `1/E` seconds per byte (E: the encoder's rate) and saves
//! `(1 - r)` of the page on a link of `L` bytes per second (r: compressed / plain). It pays
//! when `L < E * (1 - r)`: on a link faster than the encoder, or with pages that do not
//! shrink, it is off. The gate measures all three as it goes, over windows of
//! [`WINDOW`] pages: E and r from the pages it compresses (while off, one page in
//! [`SAMPLE_EVERY`], so it notices when compression starts to pay), L from the wall time of
//! the window minus the time spent compressing (the rest is spent handing bytes to a link
//! that takes them at its own rate).

use std::time::{Duration, Instant};

/// Pages per measurement window.
const WINDOW: u32 = 64;
/// While off, one page in this many is compressed to measure E and r.
const SAMPLE_EVERY: u32 = 16;
/// Weight of a new window in the running estimates.
const ALPHA: f64 = 0.3;
/// Compression must beat the plain link by this factor to turn on (hysteresis).
const MARGIN: f64 = 1.1;

/// Compress `page` into `out`; `None` when it does not shrink.
pub fn compress(page: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    out.resize(lz4_flex::block::get_maximum_output_size(page.len()), 0);
    let n = lz4_flex::block::compress_into(page, out).ok()?;
    out.truncate(n);
    (n < page.len()).then_some(n)
}

/// Decompress `body` into `page`, which it must fill exactly.
pub fn decompress(body: &[u8], page: &mut [u8]) -> Result<(), Lz4Error> {
    match lz4_flex::block::decompress_into(body, page) {
        Ok(n) if n == page.len() => Ok(()),
        Ok(n) => Err(Lz4Error::Short {
            got: n,
            want: page.len(),
        }),
        Err(e) => Err(Lz4Error::Malformed(e)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Lz4Error {
    #[error("the lz4 body decodes to {got} bytes, not the page's {want}")]
    Short { got: usize, want: usize },
    #[error("the lz4 body is malformed")]
    Malformed(#[source] lz4_flex::block::DecompressError),
}

/// Whether to compress the next page, learnt from the last ones.
#[derive(Debug)]
pub struct Lz4Gate {
    on: bool,
    /// Pages in the current window, and of them compressed.
    seen: u32,
    window_started: Instant,
    window_compress: Duration,
    window_wire: u64,
    window_in: u64,
    window_out: u64,
    /// Running estimates: encoder bytes/s, compressed/plain, link bytes/s.
    encoder_rate: Option<f64>,
    ratio: Option<f64>,
    link_rate: Option<f64>,
    pub switched: u32,
}

impl Default for Lz4Gate {
    fn default() -> Self {
        Self {
            // Start on: the first window measures what it costs.
            on: true,
            seen: 0,
            window_started: Instant::now(),
            window_compress: Duration::ZERO,
            window_wire: 0,
            window_in: 0,
            window_out: 0,
            encoder_rate: None,
            ratio: None,
            link_rate: None,
            switched: 0,
        }
    }
}

fn blend(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + ALPHA * (new - o))
}

impl Lz4Gate {
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Should the next page be compressed (for sending, or, while off, as a sample)?
    pub fn try_next(&self) -> bool {
        self.on || self.seen.is_multiple_of(SAMPLE_EVERY)
    }

    /// A page was compressed: `plain` bytes in `took`, giving `packed` (plain if it did not
    /// shrink).
    pub fn compressed(&mut self, plain: usize, packed: usize, took: Duration) {
        self.window_compress += took;
        self.window_in += plain as u64;
        self.window_out += packed as u64;
    }

    /// A page went out as `wire` bytes. Closes the window every [`WINDOW`] pages.
    pub fn sent(&mut self, wire: u64) {
        self.window_wire += wire;
        self.seen += 1;
        if self.seen < WINDOW {
            return;
        }
        let wall = self.window_started.elapsed().as_secs_f64();
        let compress = self.window_compress.as_secs_f64();
        if self.window_in > 0 && compress > 0.0 {
            self.encoder_rate = Some(blend(self.encoder_rate, self.window_in as f64 / compress));
            self.ratio = Some(blend(
                self.ratio,
                self.window_out as f64 / self.window_in as f64,
            ));
        }
        // While on, the time spent compressing is not time the link waited for.
        let link_secs = if self.on { wall - compress } else { wall };
        if link_secs > 0.0 {
            self.link_rate = Some(blend(self.link_rate, self.window_wire as f64 / link_secs));
        }
        if let (Some(e), Some(r), Some(l)) = (self.encoder_rate, self.ratio, self.link_rate) {
            let pays = e * (1.0 - r);
            let on = if self.on { pays > l } else { pays > l * MARGIN };
            if on != self.on {
                tracing::debug!(on, encoder_rate = e, ratio = r, link_rate = l, "wire lz4");
                self.on = on;
                self.switched += 1;
            }
        }
        self.seen = 0;
        self.window_started = Instant::now();
        self.window_compress = Duration::ZERO;
        self.window_wire = 0;
        self.window_in = 0;
        self.window_out = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(gate: &mut Lz4Gate, windows: u32, per_page: Duration, compress_took: Duration) {
        for _ in 0..windows * WINDOW {
            if gate.try_next() {
                let t = Instant::now();
                std::thread::sleep(compress_took);
                gate.compressed(4096, 1024, t.elapsed());
            }
            std::thread::sleep(per_page);
            gate.sent(if gate.is_on() { 1024 } else { 4096 });
        }
    }

    #[test]
    fn lz4_round_trips_and_refuses_a_wrong_size() {
        let page: Vec<u8> = (0..4096).map(|i| (i / 64) as u8).collect();
        let mut out = Vec::new();
        let n = compress(&page, &mut out).expect("it shrinks");
        assert!(n < 1024, "{n}");
        let mut back = vec![0; 4096];
        decompress(&out, &mut back).unwrap();
        assert_eq!(back, page);
        let mut short = vec![0; 8192];
        assert!(matches!(
            decompress(&out, &mut short),
            Err(Lz4Error::Short { got: 4096, .. })
        ));
        assert!(decompress(&[0xff, 0xff], &mut back).is_err());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert_eq!(compress(&noise, &mut out), None, "noise does not shrink");
    }

    #[test]
    fn turns_off_when_the_link_outruns_the_encoder_and_on_when_it_is_slow() {
        // A fast link: sending takes no time, compressing a page 1 ms (4 MB/s encoder).
        let mut fast = Lz4Gate::default();
        run(&mut fast, 3, Duration::ZERO, Duration::from_millis(1));
        assert!(!fast.is_on(), "{fast:?}");
        // A slow link: 200 us per page sent (5 MB/s compressed), compressing fast (4x).
        let mut slow = Lz4Gate::default();
        run(
            &mut slow,
            3,
            Duration::from_micros(200),
            Duration::from_micros(2),
        );
        assert!(slow.is_on(), "{slow:?}");
    }
}
