//! The sender's choice per page: an XBZRLE delta when the page was sent before and the delta
//! is smaller, else lz4 when the gate says it pays and the page shrinks, else the page as it
//! is. The encoder works on the caller's private copy of the page (read out of guest memory
//! before), never on memory the guest writes, and caches exactly the bytes it sent.

use std::io::Write;
use std::time::Instant;

use serde::Serialize;

use super::cache::SentCache;
use super::compress::{compress, Lz4Gate};
use super::{xbzrle, Encoding};
use crate::migrate::message::{page_checksum, write_encoded_page, write_page, WireError};

/// What the encoder may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncoderConfig {
    /// XBZRLE with a cache of this many bytes.
    pub xbzrle_cache: Option<u64>,
    /// lz4 for pages sent whole, while it pays.
    pub compress: bool,
}

/// XBZRLE figures, named as QEMU's `query-migrate` `xbzrle-cache` names them where the
/// meaning is the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct XbzrleStats {
    #[serde(rename = "cache-size")]
    pub cache_size: u64,
    /// Pages sent as deltas.
    pub pages: u64,
    /// Bytes of those deltas on the wire (frame included).
    pub bytes: u64,
    /// Pages sent whole because they were not in the cache.
    #[serde(rename = "cache-miss")]
    pub cache_miss: u64,
    /// Pages sent whole because their delta was not smaller.
    pub overflow: u64,
    /// Deltas the destination could not apply (checksum): sent again whole.
    pub resent: u64,
}

/// Wire lz4 figures (QEMU's `compression` names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CompressionStats {
    /// Pages sent compressed.
    pub pages: u64,
    /// Their bytes on the wire.
    #[serde(rename = "compressed-size")]
    pub compressed_size: u64,
    /// Their bytes uncompressed.
    pub plain_size: u64,
    /// Times the gate turned lz4 on or off.
    pub switched: u32,
    /// Whether it was on at the end.
    pub on: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EncodeStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle: Option<XbzrleStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
}

/// Encodes the pages of one migration.
pub struct PageEncoder {
    cache: Option<SentCache>,
    gate: Option<Lz4Gate>,
    scratch: Vec<u8>,
    xbzrle: XbzrleStats,
    lz4: CompressionStats,
    resent: u64,
    /// A first pass over all memory: cache what fits, evict nothing.
    filling: bool,
}

/// Bytes of a `Page` frame and of an `EncodedPage` frame around their bodies.
pub const PAGE_FRAME: u64 = 16 + 12;
pub const ENCODED_FRAME: u64 = 16 + 16;

impl PageEncoder {
    /// Every page as it is.
    pub fn plain() -> Self {
        Self::new(EncoderConfig::default(), 4096)
    }

    pub fn new(config: EncoderConfig, page_size: usize) -> Self {
        let cache = config
            .xbzrle_cache
            .and_then(|b| SentCache::new(b, page_size));
        Self {
            xbzrle: XbzrleStats {
                cache_size: cache.as_ref().map_or(0, SentCache::capacity_bytes),
                ..Default::default()
            },
            cache,
            gate: config.compress.then(Lz4Gate::default),
            scratch: Vec::with_capacity(page_size + 64),
            lz4: CompressionStats::default(),
            resent: 0,
            filling: false,
        }
    }

    /// Send `page` (its bytes: `data`, a private copy). Returns the bytes put on the wire.
    pub fn send(&mut self, out: &mut impl Write, page: u64, data: &[u8]) -> Result<u64, WireError> {
        let _span = tracing::trace_span!("encode", page).entered();
        if let Some(cache) = &mut self.cache {
            match cache.get(page) {
                Some(old) => {
                    if xbzrle::encode(old, data, &mut self.scratch, data.len()) {
                        let sum = page_checksum(data);
                        write_encoded_page(out, page, sum, Encoding::Xbzrle, &self.scratch)?;
                        cache.put(page, data);
                        let wire = ENCODED_FRAME + self.scratch.len() as u64;
                        self.xbzrle.pages += 1;
                        self.xbzrle.bytes += wire;
                        return Ok(wire);
                    }
                    self.xbzrle.overflow += 1;
                }
                None => self.xbzrle.cache_miss += 1,
            }
            if self.filling {
                cache.put_if_room(page, data);
            } else {
                cache.put(page, data);
            }
        }
        self.send_whole(out, page, data)
    }

    fn send_whole(
        &mut self,
        out: &mut impl Write,
        page: u64,
        data: &[u8],
    ) -> Result<u64, WireError> {
        if let Some(gate) = &mut self.gate {
            if gate.try_next() {
                let t = Instant::now();
                let packed = compress(data, &mut self.scratch);
                gate.compressed(data.len(), packed.unwrap_or(data.len()), t.elapsed());
                if let (true, Some(n)) = (gate.is_on(), packed) {
                    let sum = page_checksum(data);
                    write_encoded_page(out, page, sum, Encoding::Lz4, &self.scratch)?;
                    let wire = ENCODED_FRAME + n as u64;
                    gate.sent(wire);
                    self.lz4.pages += 1;
                    self.lz4.compressed_size += wire;
                    self.lz4.plain_size += data.len() as u64;
                    return Ok(wire);
                }
            }
        }
        write_page(out, page, data)?;
        let wire = PAGE_FRAME + data.len() as u64;
        if let Some(gate) = &mut self.gate {
            gate.sent(wire);
        }
        Ok(wire)
    }

    /// Whether the pages sent next are a first pass over all memory (pre-copy's first
    /// round): they are cached while the cache has room, and evict nothing, so the pages
    /// the guest rewrites during the pass are not pushed out by the cold ones after them.
    pub fn set_first_pass(&mut self, first: bool) {
        self.filling = first;
    }

    /// The destination does not hold what was sent of `page` any more (it went as zero,
    /// freed, stored or stale): its next send is whole.
    pub fn forget(&mut self, page: u64) {
        if let Some(cache) = &mut self.cache {
            cache.forget(page);
        }
    }

    /// The destination could not decode what was sent of `page`: forget it, count it.
    pub fn resend(&mut self, page: u64) {
        self.forget(page);
        self.xbzrle.resent += 1;
        self.resent += 1;
    }

    /// Pages the destination asked for again.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    pub fn stats(&self) -> EncodeStats {
        EncodeStats {
            xbzrle: self.cache.is_some().then_some(self.xbzrle),
            compression: self.gate.as_ref().map(|g| CompressionStats {
                switched: g.switched,
                on: g.is_on(),
                ..self.lz4
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::delta::decode_into;
    use crate::migrate::message::{read_message, Message};

    fn frames(bytes: &[u8]) -> Vec<Message> {
        let mut r = bytes;
        let mut out = Vec::new();
        while !r.is_empty() {
            out.push(read_message(&mut r, None).unwrap());
        }
        out
    }

    #[test]
    fn sends_a_delta_for_a_cached_page_and_whole_pages_otherwise() {
        let mut enc = PageEncoder::new(
            EncoderConfig {
                xbzrle_cache: Some(1 << 20),
                compress: false,
            },
            4096,
        );
        let v1: Vec<u8> = (0..4096).map(|i| (i * 7 % 251) as u8).collect();
        let mut v2 = v1.clone();
        v2[100] ^= 0xff;
        v2[3000] = 9;
        let mut wire = Vec::new();
        let first = enc.send(&mut wire, 5, &v1).unwrap();
        let second = enc.send(&mut wire, 5, &v2).unwrap();
        assert_eq!(first, PAGE_FRAME + 4096);
        assert!(second < 64, "{second}");
        enc.resend(5);
        let third = enc.send(&mut wire, 5, &v2).unwrap();
        assert_eq!(third, first, "after a failed delta the page goes whole");
        let got = frames(&wire);
        let Message::EncodedPage {
            page: 5,
            checksum,
            encoding: Encoding::Xbzrle,
            body,
        } = &got[1]
        else {
            panic!("{:?}", got[1]);
        };
        let mut base = v1.clone();
        decode_into(Encoding::Xbzrle, body, *checksum, &mut base).unwrap();
        assert_eq!(base, v2);
        let mut wrong = v2.clone();
        assert!(decode_into(Encoding::Xbzrle, body, *checksum, &mut wrong).is_err());
        let s = enc.stats().xbzrle.unwrap();
        assert_eq!((s.pages, s.cache_miss, s.resent), (1, 2, 1));
        assert!(enc.stats().compression.is_none());
    }

    #[test]
    fn compresses_pages_that_shrink() {
        let mut enc = PageEncoder::new(
            EncoderConfig {
                xbzrle_cache: None,
                compress: true,
            },
            4096,
        );
        let page = vec![7u8; 4096];
        let mut wire = Vec::new();
        let n = enc.send(&mut wire, 1, &page).unwrap();
        assert!(n < 100, "{n}");
        let Message::EncodedPage {
            encoding: Encoding::Lz4,
            body,
            checksum,
            ..
        } = &frames(&wire)[0]
        else {
            panic!()
        };
        let mut back = vec![0; 4096];
        decode_into(Encoding::Lz4, body, *checksum, &mut back).unwrap();
        assert_eq!(back, page);
        assert_eq!(enc.stats().compression.unwrap().pages, 1);
    }
}
