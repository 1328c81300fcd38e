//! Pinned bytes for every message (a reordered field breaks a test, not a peer), round trips,
//! and the decoder's refusals: every truncation, trailing bytes, bad enum bytes, a flipped
//! page byte. Property tests feed it arbitrary bytes: it must answer with an error, never panic.

use proptest::prelude::*;

use super::*;
use crate::migrate::frame::VERSION;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            channel: Channel::Urgent,
            nonce: [0xaa; 32],
            session: [0x11; 16],
        }),
        Message::AuthProof([0x5c; 32]),
        Message::Refuse("bad key".into()),
        Message::Setup(Setup {
            vm: "vm1".into(),
            mode: Mode::Agile,
            page_size: 4096,
            pages: 0x20000,
            qemu_argv: vec!["qemu".into(), "-m".into(), "512M".into()],
            swapdev: Some("nbd://10.0.0.3:10809/vm1".into()),
        }),
        Message::SetupOk {
            qemu_pid: 4242,
            incoming: "tcp:10.0.0.2:4444".into(),
        },
        Message::Page {
            page: 7,
            data: vec![0x42; 4096],
        },
        Message::ZeroPages {
            first: 16,
            count: 8,
        },
        Message::FreedPages {
            first: 100,
            count: 1,
        },
        Message::PageRequest { page: 0x1234 },
        Message::RoundEnd {
            round: 3,
            sent: 1000,
            dirty: 12,
        },
        Message::Switchover,
        Message::Done,
        Message::Abort("link lost".into()),
        Message::Ack {
            first: 0,
            count: 512,
        },
        Message::PageInBulk { page: 0x1234 },
        Message::StalePages { first: 3, count: 2 },
        Message::StoredPages {
            first: 0x100,
            count: 0x10,
        },
        Message::Ready,
        Message::Report("{}".into()),
        Message::Released,
        Message::EncodedPage {
            page: 9,
            checksum: 0xdead_beef,
            encoding: Encoding::Xbzrle,
            body: vec![2, 1, 0xff],
        },
        Message::Resend { page: 0x77 },
        Message::Resume {
            session: [0x22; 16],
            vm: "vm1".into(),
        },
    ]
}

/// ASCII text as hex (the pinned layouts below spell out every other byte).
fn a(text: &str) -> String {
    hex(text.as_bytes())
}

#[test]
fn payload_bytes_are_pinned() {
    let pinned: Vec<String> = vec![
        // Hello: min, max, channel, 3 reserved, nonce, session
        format!(
            "0100 0100 01 000000 {} {}",
            "aa".repeat(32),
            "11".repeat(16)
        ),
        "5c".repeat(32),
        format!("0700 {}", a("bad key")),
        // Setup: vm, mode, page size, pages, swapdev flag + spec, argc, args
        format!(
            "0300 {} 02 00100000 0000020000000000 01 1800 {} 0300 0400 {} 0200 {} 0400 {}",
            a("vm1"),
            a("nbd://10.0.0.3:10809/vm1"),
            a("qemu"),
            a("-m"),
            a("512M")
        ),
        format!("9210000000000000 1100 {}", a("tcp:10.0.0.2:4444")),
        // Page: index, crc32c of the data, data
        format!("0700000000000000 {} {}", PAGE_42_CRC, "42".repeat(4096)),
        "1000000000000000 0800000000000000".into(),
        "6400000000000000 0100000000000000".into(),
        "3412000000000000".into(),
        "03000000 e803000000000000 0c00000000000000".into(),
        String::new(),
        String::new(),
        format!("0900 {}", a("link lost")),
        "0000000000000000 0002000000000000".into(),
        "3412000000000000".into(),
        "0300000000000000 0200000000000000".into(),
        "0001000000000000 1000000000000000".into(),
        String::new(),
        format!("02000000 {}", a("{}")),
        String::new(),
        // EncodedPage: index, crc32c of the decoded page, encoding, 3 reserved, body
        "0900000000000000 efbeadde 01 000000 0201ff".into(),
        "7700000000000000".into(),
        // Resume: the paused session's id, the VM's name
        format!("{} 0300 {}", "22".repeat(16), a("vm1")),
    ];
    assert_eq!(
        pinned.len(),
        sample_messages().len(),
        "one pinned layout per message"
    );
    for (m, want) in sample_messages().iter().zip(pinned) {
        let want: String = want.split_whitespace().collect();
        let got = hex(&m.payload());
        assert!(
            got == want,
            "{:?}: got {}.., want {}..",
            m.command(),
            &got[..got.len().min(80)],
            &want[..want.len().min(80)]
        );
    }
}

/// crc32c of 4096 bytes of 0x42, little-endian, as the Page frame carries it.
const PAGE_42_CRC: &str = "0258bd6f";

#[test]
fn a_whole_frame_is_header_then_payload() {
    let bytes = Message::PageRequest { page: 1 }.encode();
    assert_eq!(
        hex(&bytes),
        "50574d470300090000000000080000000100000000000000"
    );
}

#[test]
fn every_message_round_trips_through_a_stream() {
    let mut wire = Vec::new();
    for m in sample_messages() {
        write_message(&mut wire, &m).unwrap();
    }
    let mut r = &wire[..];
    for m in sample_messages() {
        assert_eq!(read_message(&mut r, Some(VERSION)).unwrap(), m);
    }
    assert!(matches!(
        read_message(&mut r, Some(VERSION)),
        Err(WireError::Closed)
    ));
}

#[test]
fn every_truncation_is_refused() {
    for m in sample_messages() {
        let payload = m.payload();
        // An encoded page's body has no length of its own: a shorter one is caught when it
        // is decoded against the page's checksum (delta::decode_into).
        let fixed = match m {
            Message::EncodedPage { .. } => 16,
            _ => payload.len(),
        };
        for cut in 0..fixed {
            let r = Message::decode(m.command(), &payload[..cut]);
            assert!(
                r.is_err(),
                "{:?} cut at {cut} decoded as {r:?}",
                m.command()
            );
        }
    }
}

#[test]
fn trailing_bytes_and_bad_enum_bytes_are_refused() {
    let mut p = Message::PageRequest { page: 1 }.payload();
    p.push(0);
    assert_eq!(
        Message::decode(Command::PageRequest, &p)
            .unwrap_err()
            .to_string(),
        "malformed PageRequest payload: trailing bytes"
    );
    let mut hello = sample_messages()[0].payload();
    hello[4] = 7;
    assert_eq!(
        Message::decode(Command::Hello, &hello)
            .unwrap_err()
            .to_string(),
        "malformed Hello payload: unknown channel"
    );
    let Message::Setup(mut s) = sample_messages()[3].clone() else {
        unreachable!()
    };
    s.page_size = 3000;
    assert_eq!(
        Message::decode(Command::Setup, &Message::Setup(s).payload())
            .unwrap_err()
            .to_string(),
        "malformed Setup payload: page size is not a power of two in 4 KiB..=2 MiB"
    );
}

#[test]
fn a_flipped_page_byte_is_caught_by_the_checksum() {
    let mut p = Message::Page {
        page: 9,
        data: vec![7; 4096],
    }
    .payload();
    p[12 + 100] ^= 1;
    match Message::decode(Command::Page, &p) {
        Err(WireError::BadChecksum { page: 9, .. }) => {}
        other => panic!("expected a checksum error for page 9, got {other:?}"),
    }
}

#[test]
fn a_frame_of_another_version_mid_connection_is_refused() {
    let bytes = Message::Done.encode();
    assert!(read_message(&mut &bytes[..], Some(VERSION)).is_ok());
    assert!(matches!(
        read_message(&mut &bytes[..], Some(VERSION - 1)),
        Err(WireError::Frame(FrameError::VersionChanged {
            found: VERSION,
            agreed
        })) if agreed == VERSION - 1
    ));
    let mut old = bytes.clone();
    old[4] = 1;
    assert!(matches!(
        read_message(&mut &old[..], Some(VERSION)),
        Err(WireError::Frame(FrameError::UnsupportedVersion {
            found: 1
        }))
    ));
}

proptest! {
    #[test]
    fn arbitrary_payloads_never_panic(cmd in 1u16..=22, bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let command = Command::from_u16(cmd).unwrap();
        let _ = Message::decode(command, &bytes);
    }

    #[test]
    fn arbitrary_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut r = &bytes[..];
        while read_message(&mut r, None).is_ok() {}
    }

    #[test]
    fn pages_and_setups_round_trip(page in any::<u64>(), fill in any::<u8>(), shift in 12u32..=21,
                                   vm in "[a-z0-9-]{0,40}", args in proptest::collection::vec(".{0,30}", 0..20)) {
        let m = Message::Page { page, data: vec![fill; 1 << shift] };
        prop_assert_eq!(Message::decode(Command::Page, &m.payload()).unwrap(), m);
        let s = Message::Setup(Setup { vm, mode: Mode::Precopy, page_size: 4096, pages: page,
            qemu_argv: args, swapdev: None });
        prop_assert_eq!(Message::decode(Command::Setup, &s.payload()).unwrap(), s);
    }
}

#[test]
fn a_stream_cut_inside_a_frame_says_where() {
    let bytes = Message::PageRequest { page: 1 }.encode();
    assert_eq!(
        read_message(&mut &bytes[..7], None)
            .unwrap_err()
            .to_string(),
        "the peer closed the connection inside a frame header (7 of 16 bytes)"
    );
    assert_eq!(
        read_message(&mut &bytes[..20], None)
            .unwrap_err()
            .to_string(),
        "the peer closed the connection inside a PageRequest frame (4 of 8 payload bytes)"
    );
    assert!(matches!(
        read_message(&mut &bytes[..0], None),
        Err(WireError::Closed)
    ));
}

#[test]
fn a_read_timeout_is_its_own_error() {
    struct Stalled;
    impl std::io::Read for Stalled {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::WouldBlock.into())
        }
    }
    assert!(matches!(
        read_message(&mut Stalled, None),
        Err(WireError::TimedOut)
    ));
}

#[test]
fn a_page_above_the_largest_page_size_is_refused_by_the_decoder_too() {
    // The frame cap stops it on a stream; a payload decoded on its own is checked as well.
    let payload = Message::Page {
        page: 0,
        data: vec![0; 2 * MAX_PAGE_SIZE],
    }
    .payload();
    assert_eq!(
        Message::decode(Command::Page, &payload)
            .unwrap_err()
            .to_string(),
        "malformed Page payload: page data is not a 4 KiB..=2 MiB power of two"
    );
}
