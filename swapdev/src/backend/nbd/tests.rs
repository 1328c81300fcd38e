//! Handshake and transmission tests against a scripted server on a socketpair.

use super::proto::*;
use super::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;

/// The server side of a socketpair, with helpers to play a scripted NBD server.
struct Script {
    s: UnixStream,
}

impl Script {
    fn greet(&mut self, hs_flags: u16) {
        self.s.write_all(&NBD_MAGIC.to_be_bytes()).unwrap();
        self.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
        self.s.write_all(&hs_flags.to_be_bytes()).unwrap();
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    fn client_flags(&mut self) -> u32 {
        u32::from_be_bytes(self.read_n(4).try_into().unwrap())
    }

    /// Read one option; returns (option, data).
    fn option(&mut self) -> (u32, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(&h[0..8], b"IHAVEOPT");
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        (opt, self.read_n(len as usize))
    }

    fn reply(&mut self, opt: u32, rep: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&rep.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    fn info_export(&mut self, size: u64, flags: u16) {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(OPT_GO, REP_INFO, &d);
    }

    fn info_block_size(&mut self, min: u32, pref: u32, max: u32) {
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(OPT_GO, REP_INFO, &d);
    }
}

/// Run `server` on one end of a socketpair and the handshake on the other.
fn handshake_with(
    export: &str,
    server: impl FnOnce(&mut Script) + Send + 'static,
) -> Result<ExportInfo, BackendError> {
    let (mut client, srv) = UnixStream::pair().unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = thread::spawn(move || {
        let mut script = Script { s: srv };
        server(&mut script);
        // Dropping the script closes the server side.
    });
    let res = handshake::negotiate(&mut client, export, "test-server");
    drop(client);
    t.join().expect("scripted server panicked");
    res
}

pub(super) const FLAGS_RW: u16 = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_TRIM;

#[test]
fn go_with_info_and_block_size() {
    let info = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(s.client_flags(), CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES);
        let (opt, data) = s.option();
        assert_eq!(opt, OPT_GO);
        assert_eq!(data, encode_go_data("swap", &[INFO_BLOCK_SIZE]));
        s.info_export(1 << 30, FLAGS_RW);
        s.info_block_size(512, 4096, 1 << 20);
        s.reply(OPT_GO, 2 /* NBD_REP_SERVER: ignored */ + 1000, b"");
    });
    // An unknown non-error reply type is a protocol error, not silently accepted.
    let err = info.unwrap_err();
    assert!(
        err.to_string().contains("unexpected option reply type"),
        "{err}"
    );

    let info = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.client_flags();
        s.option();
        s.info_export(1 << 30, FLAGS_RW);
        s.info_block_size(512, 4096, 1 << 20);
        s.reply(OPT_GO, REP_ACK, b"");
    })
    .unwrap();
    assert_eq!(info.size, 1 << 30);
    assert!(info.can_flush() && info.can_trim() && !info.read_only());
    assert_eq!(
        (info.min_block, info.preferred_block, info.max_block),
        (512, 4096, 1 << 20)
    );
}

#[test]
fn bad_greeting_magic() {
    let err = handshake_with("swap", |s| {
        s.s.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
    })
    .unwrap_err();
    assert!(matches!(err, BackendError::Protocol(_)), "{err:?}");
    assert!(err.to_string().contains("not an NBD server"), "{err}");
}

#[test]
fn oldstyle_server_is_refused() {
    let err = handshake_with("swap", |s| {
        s.s.write_all(&NBD_MAGIC.to_be_bytes()).unwrap();
        s.s.write_all(&OLDSTYLE_MAGIC.to_be_bytes()).unwrap();
    })
    .unwrap_err();
    assert!(err.to_string().contains("oldstyle"), "{err}");
}

#[test]
fn server_without_fixed_newstyle() {
    let err = handshake_with("swap", |s| s.greet(0)).unwrap_err();
    assert!(
        err.to_string()
            .contains("server does not support fixed newstyle"),
        "{err}"
    );
}

#[test]
fn truncated_option_reply() {
    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        // Half an option reply header, then hang up.
        s.s.write_all(&OPT_REPLY_MAGIC.to_be_bytes()).unwrap();
        s.s.write_all(&OPT_GO.to_be_bytes()[..2]).unwrap();
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("closed the connection while reading the NBD_OPT_GO reply"),
        "{msg}"
    );
}

#[test]
fn bad_option_reply_magic_and_wrong_info_length() {
    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.s.write_all(&[0xAA; 20]).unwrap();
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("option reply has bad magic"),
        "{err}"
    );

    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_INFO, &[0, 0, 1, 2, 3]);
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("NBD_INFO_EXPORT has 5 bytes"),
        "{err}"
    );

    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.info_block_size(3, 4096, 1 << 20);
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("inconsistent block sizes"),
        "{err}"
    );
}

#[test]
fn ack_without_export_info() {
    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_ACK, b"");
    })
    .unwrap_err();
    assert!(err.to_string().contains("without NBD_INFO_EXPORT"), "{err}");
}

#[test]
fn unknown_export_and_other_errors() {
    let err = handshake_with("nope", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_ERR_UNKNOWN, b"Export 'nope' not present");
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("export 'nope' not found on server"), "{msg}");
    assert!(msg.contains("not present"), "{msg}");

    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_ERR_TLS_REQD, b"");
    })
    .unwrap_err();
    assert!(err.to_string().contains("requires TLS"), "{err}");

    let err = handshake_with("swap", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_ERR_POLICY, b"go away");
    })
    .unwrap_err();
    assert!(err.to_string().contains("NBD_REP_ERR_POLICY"), "{err}");
}

#[test]
fn go_unsupported_falls_back_to_export_name() {
    let info = handshake_with("old", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE); // no NO_ZEROES: 124 zero bytes follow the reply
        assert_eq!(s.client_flags(), CLIENT_FIXED_NEWSTYLE);
        let (opt, _) = s.option();
        assert_eq!(opt, OPT_GO);
        s.reply(OPT_GO, REP_ERR_UNSUP, b"");
        let (opt, name) = s.option();
        assert_eq!((opt, name.as_slice()), (OPT_EXPORT_NAME, &b"old"[..]));
        s.s.write_all(&(8u64 << 20).to_be_bytes()).unwrap();
        s.s.write_all(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes())
            .unwrap();
        s.s.write_all(&[0u8; EXPORT_NAME_ZEROES]).unwrap();
    })
    .unwrap();
    assert_eq!(info.size, 8 << 20);
    assert!(info.read_only() && !info.can_flush());

    let err = handshake_with("old", |s| {
        s.greet(FLAG_FIXED_NEWSTYLE);
        s.client_flags();
        s.option();
        s.reply(OPT_GO, REP_ERR_UNSUP, b"");
        s.option();
        // Unknown export with EXPORT_NAME: the server just hangs up.
    })
    .unwrap_err();
    assert!(err.to_string().contains("export 'old' not found"), "{err}");
}

#[test]
fn invalid_export_name_is_refused_before_sending() {
    let (mut client, _srv) = UnixStream::pair().unwrap();
    let err = handshake::negotiate(&mut client, "a\0b", "x").unwrap_err();
    assert!(err.to_string().contains("invalid NBD export name"), "{err}");
}

/// A scripted transmission-phase server over `size` bytes of memory: it reads `batch`
/// requests, then answers them in reverse order. Returns the final memory.
/// A server that says a fixed sequence of bytes and swallows whatever the client writes.
struct FixedServer {
    says: std::io::Cursor<Vec<u8>>,
}

impl Read for FixedServer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.says.read(buf)
    }
}

impl Write for FixedServer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn greeting() -> Vec<u8> {
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

fn option_reply(rep: u32, data: &[u8]) -> Vec<u8> {
    let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&rep.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// An option reply announcing the largest payload and sending 10 bytes of it fails as a
/// closed connection. The client allocates the payload as it arrives (it allocated the
/// announced 64 KiB first; the nbd_handshake fuzz target bounds the heap by what was sent).
#[test]
fn option_reply_shorter_than_announced_fails_as_closed() {
    let mut says = greeting();
    let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&REP_INFO.to_be_bytes());
    m.extend_from_slice(&MAX_OPTION_REPLY.to_be_bytes());
    m.extend_from_slice(&[0u8; 10]);
    says.extend_from_slice(&m);
    let mut server = FixedServer {
        says: std::io::Cursor::new(says),
    };
    let err = handshake::negotiate(&mut server, "swap", "fixture").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("fixture closed the connection while reading the NBD_OPT_GO reply"),
        "{msg}"
    );
}

proptest::proptest! {
    /// Whatever a server says after a valid greeting, negotiation returns (never panics), and
    /// any failure is a Protocol or Setup error naming the server.
    #[test]
    fn negotiation_survives_arbitrary_server_bytes(
        tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)
    ) {
        let mut says = greeting();
        says.extend_from_slice(&tail);
        let mut server = FixedServer { says: std::io::Cursor::new(says) };
        if let Err(e) = handshake::negotiate(&mut server, "swap", "fixture") {
            let msg = e.to_string();
            proptest::prop_assert!(msg.contains("fixture"), "{}", msg);
        }
    }

    /// Every truncation of a valid reply sequence is an error, never a wrong success.
    #[test]
    fn truncated_valid_replies_fail(cut in 0usize..60) {
        let mut says = greeting();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 20).to_be_bytes());
        info.extend_from_slice(&FLAGS_RW.to_be_bytes());
        says.extend_from_slice(&option_reply(REP_INFO, &info));
        says.extend_from_slice(&option_reply(REP_ACK, &[]));
        let full = says.len();
        let mut server = FixedServer { says: std::io::Cursor::new(says.clone()) };
        proptest::prop_assert!(handshake::negotiate(&mut server, "swap", "fixture").is_ok());
        says.truncate(full - 1 - cut.min(full - 19));
        let mut server = FixedServer { says: std::io::Cursor::new(says) };
        let err = handshake::negotiate(&mut server, "swap", "fixture").unwrap_err();
        proptest::prop_assert!(err.to_string().contains("closed the connection"), "{}", err);
    }
}

mod transmission;
