//! The pagewise attach handshake (`read_handshake` on a stream starting with `PWHS`): in
//! chunks of 1..=63 bytes or whole, with 0..=3 fds (first byte). The second byte picks the
//! framing: bit 7 clear frames the rest as the JSON body (version 1, or `byte >> 1` when
//! bit 0 is clear; the length field off by `(byte >> 4 & 7) - 4` bytes); bit 7 set sends the
//! rest as it is after the magic. Accepted only with the fds the request announces and a
//! body within the limit; the request survives a JSON round trip; its regions, when they
//! make a `GuestLayout`, map each first and last page to its address and back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pager::attach::protocol::{
    read_handshake, AttachRequest, Handshake, MAX_HANDSHAKE_BYTES, PROTOCOL_VERSION, REQUEST_MAGIC,
};
use pager::attach::server::valid_vm_name;
use pager::layout::GuestLayout;
use pagewise_fuzz::attach::{check_layout, Chunks};
use pagewise_fuzz::{peak_during, Counting, Peer};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let [ctl, frame, rest @ ..] = data else {
        return;
    };
    let mut stream = Vec::with_capacity(rest.len() + 12);
    stream.extend_from_slice(REQUEST_MAGIC);
    if frame & 0x80 == 0 {
        let version = if frame & 1 != 0 {
            PROTOCOL_VERSION
        } else {
            u32::from(frame >> 1)
        };
        let len = (rest.len() as i64 + i64::from(frame >> 4 & 7) - 4).max(0) as u32;
        stream.extend_from_slice(&version.to_le_bytes());
        stream.extend_from_slice(&len.to_le_bytes());
    }
    stream.extend_from_slice(rest);
    let fds = (ctl >> 6) as usize;
    let mut src = Chunks {
        peer: Peer::new(*ctl, &stream),
        fds,
    };
    let (result, peak) = peak_during(|| read_handshake(&mut src));
    let bound = MAX_HANDSHAKE_BYTES + 1 + 16 * stream.len() + 4096;
    assert!(
        peak <= bound,
        "{peak} bytes held for {} bytes",
        stream.len()
    );
    let Ok(handshake) = result else {
        return;
    };
    let Handshake::Pagewise {
        request,
        memory_file,
        ..
    } = handshake
    else {
        panic!("a stream starting with PWHS is a pagewise handshake");
    };
    assert_eq!(fds, 1 + usize::from(request.memory_file));
    assert_eq!(memory_file.is_some(), request.memory_file);
    let json = serde_json::to_vec(&request).expect("request serializes");
    let back: AttachRequest = serde_json::from_slice(&json).expect("and parses");
    assert_eq!(back, request);
    let _ = valid_vm_name(&request.vm);
    if let Ok(layout) = GuestLayout::from_mappings(&request.regions) {
        check_layout(&layout);
    }
});
