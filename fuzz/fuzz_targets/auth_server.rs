//! The destination's side of the handshake (`open_server`) against a peer whose bytes are
//! the input: it refuses or fails with an error, never panics, and never opens (no input
//! holds a valid proof of the key).
#![no_main]

use std::io::{Read, Write};

use agent::migrate::auth::{open_server, Psk};
use libfuzzer_sys::fuzz_target;

struct Peer<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Peer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let key = Psk::new(b"fuzz-key-0123456789abcdef".to_vec());
    let mut peer = Peer {
        input: data,
        output: Vec::new(),
    };
    assert!(open_server(&mut peer, &key).is_err());
});
