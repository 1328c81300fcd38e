//! The attach library's hand-written reply parser (`pager/preload/src/wire.rs`, which runs
//! inside QEMU and reads what the pager sends): the input (after a control byte choosing
//! the read sizes) as the stream of `PWHR` reply frames a pager sends on the attach
//! connection, read with `read_next` until it ends or fails. Every frame's body must be
//! within `MAX_REPLY_BYTES`; the heap held is bounded by the input. When a frame's body is
//! exactly what the pager's serde type prints (`AttachReply`), the hand-written verdict
//! must agree with it: ok, error, swapdev, reattach and retry.
#![no_main]

#[allow(dead_code)] // only the reply side is fuzzed here
#[path = "../../pager/preload/src/wire.rs"]
mod wire;

use libfuzzer_sys::fuzz_target;
use pager::attach::protocol::AttachReply;
use pagewise_fuzz::{peak_during, Counting, Peer};
use wire::{parse_reply, read_next, Verdict, MAX_REPLY_BYTES};

#[global_allocator]
static ALLOC: Counting = Counting;

fuzz_target!(|data: &[u8]| {
    let [ctl, rest @ ..] = data else {
        return;
    };
    let mut peer = Peer::new(*ctl, rest);
    let (_, peak) = peak_during(|| {
        // Each frame takes at least 13 bytes: at most this many verdicts.
        for _ in 0..=rest.len() / 13 {
            match read_next(&mut peer) {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
    assert!(
        peak <= MAX_REPLY_BYTES + 2 * rest.len() + 4096,
        "{peak} bytes held for {} bytes",
        rest.len()
    );
    // The body alone against the pager's own type.
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let verdict = parse_reply(text);
    let Ok(reply) = serde_json::from_str::<AttachReply>(text) else {
        return;
    };
    if serde_json::to_string(&reply).ok().as_deref() != Some(text) {
        return;
    }
    let verdict = verdict.expect("a reply the pager prints parses");
    match verdict {
        Verdict::Accepted { swapdev, reattach } => {
            assert!(reply.ok, "{text}");
            assert_eq!(swapdev, reply.swapdev, "{text}");
            assert_eq!(reattach, reply.reattach, "{text}");
        }
        Verdict::Refused { error, retry } => {
            assert!(!reply.ok, "{text}");
            if let Some(e) = &reply.error {
                assert_eq!(&error, e, "{text}");
            }
            assert_eq!(retry, reply.retry, "{text}");
        }
    }
});
