//! A handshake peer for `pager::attach::protocol::read_handshake`: the input in chunks of
//! chosen sizes, with a chosen number of fds (duplicates of /dev/null) on the first chunk.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use pager::attach::protocol::{ChunkSource, HandshakeError};
use pager::layout::GuestLayout;

use crate::Peer;

/// The input as chunks (see [`Peer::new`]) with `fds` fds on the first one.
pub struct Chunks<'a> {
    pub peer: Peer<'a>,
    pub fds: usize,
}

impl ChunkSource for Chunks<'_> {
    fn recv_chunk(&mut self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), HandshakeError> {
        static NULL: OnceLock<File> = OnceLock::new();
        let null = NULL.get_or_init(|| File::open("/dev/null").expect("/dev/null"));
        let c = self.peer.next_chunk(buf.len());
        buf[..c.len()].copy_from_slice(c);
        let fds = (0..std::mem::take(&mut self.fds))
            .map(|_| OwnedFd::from(null.try_clone().expect("dup /dev/null")))
            .collect();
        Ok((c.len(), fds))
    }
}

/// What every layout built from a handshake must satisfy: each region's first and last
/// page map to its addresses and back.
pub fn check_layout(layout: &GuestLayout) {
    let ps = layout.page_size() as u64;
    assert_eq!(layout.span_bytes(), layout.pages() * ps);
    for r in layout.regions() {
        let first = r.offset / ps;
        let last = (r.offset + r.size) / ps - 1;
        assert!(last < layout.pages());
        for (page, addr) in [(first, r.host_addr), (last, r.host_addr + r.size - ps)] {
            assert_eq!(layout.addr_of_page(page), Some(addr));
            assert_eq!(layout.page_of_addr(addr), Some(page));
            assert_eq!(layout.file_offset(page), Some(page * ps));
        }
    }
}
