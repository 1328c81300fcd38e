//! `Message::decode` of any command on any payload: an error, or a message whose encoding is
//! exactly that payload (the wire has one encoding per message, so nothing is lost or
//! invented in a round trip).
#![no_main]

use agent::migrate::frame::Command;
use agent::migrate::message::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let command = Command::ALL[pick as usize % Command::ALL.len()];
    if let Ok(m) = Message::decode(command, payload) {
        assert_eq!(m.command(), command);
        assert_eq!(
            m.payload(),
            payload,
            "{command:?} does not encode back to its payload"
        );
        assert!(
            payload.len() <= command.max_len(),
            "{command:?} decoded above its cap"
        );
    }
});
