//! Opening a migration connection: version negotiation and mutual authentication with a
//! pre-shared key, before any VM data moves.
//!
//! ```text
//! client (source)                                   server (destination)
//!   Hello{min,max,channel,nonce_c,session}  ─────▶
//!                                            ◀─────  Hello{min,max,channel,nonce_s,session}
//!                                                    (or Refuse: no common version)
//!   AuthProof(HMAC(key, "C" ‖ transcript))  ─────▶  verify, else Refuse + log why
//!                                            ◀─────  AuthProof(HMAC(key, "S" ‖ transcript))
//!   verify, else fail: the peer does not hold the key
//! ```
//! The transcript binds the agreed version, the channel, the session and both nonces, so a
//! proof cannot be replayed on another connection or reflected back (the role byte differs).
//! Proofs are compared in constant time (`hmac`'s `verify_slice`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::frame::{Command, MIN_VERSION, VERSION};
use super::message::{read_message, write_message, Channel, Hello, Message, WireError};

/// Shortest pre-shared key accepted.
pub const MIN_KEY_BYTES: usize = 16;
const LABEL: &[u8] = b"pagewise-migrate-auth-v1";

/// A pre-shared key.
#[derive(Clone)]
pub struct Psk(Vec<u8>);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Psk({} bytes)", self.0.len())
    }
}

/// Why a connection was not opened.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the pre-shared key file {path}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pre-shared key in {path} has {len} bytes; at least {MIN_KEY_BYTES} are needed")]
    KeyTooShort { path: PathBuf, len: usize },
    #[error("the connection failed during the handshake")]
    Wire(#[from] WireError),
    #[error("the peer refused the connection: {reason}")]
    Refused { reason: String },
    #[error("the peer sent {got:?} where the handshake expects {expected:?}")]
    Unexpected { expected: Command, got: Command },
    #[error(
        "no common protocol version: we speak {MIN_VERSION}..={VERSION}, the peer {min}..={max}"
    )]
    NoCommonVersion { min: u16, max: u16 },
    #[error("the peer answered for another {what}")]
    Mismatch { what: &'static str },
    #[error("the peer's proof of the pre-shared key is wrong (wrong key, or not our peer)")]
    BadProof,
}

impl Psk {
    pub fn new(key: Vec<u8>) -> Self {
        Self(key)
    }

    /// Read a key file: its bytes without a trailing newline, at least [`MIN_KEY_BYTES`].
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let mut key = std::fs::read(path).map_err(|source| AuthError::KeyFile {
            path: path.into(),
            source,
        })?;
        while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
            key.pop();
        }
        if key.len() < MIN_KEY_BYTES {
            return Err(AuthError::KeyTooShort {
                path: path.into(),
                len: key.len(),
            });
        }
        Ok(Self(key))
    }

    fn proof(&self, role: u8, version: u16, c: &Hello, s: &Hello) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(LABEL);
        mac.update(&[role]);
        mac.update(&version.to_le_bytes());
        mac.update(&[c.channel as u8]);
        mac.update(&c.session);
        mac.update(&c.nonce);
        mac.update(&s.nonce);
        mac
    }
}

/// An opened, authenticated connection's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub version: u16,
    pub channel: Channel,
    pub session: [u8; 16],
}

fn hello(channel: Channel, session: [u8; 16]) -> Hello {
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        channel,
        nonce,
        session,
    }
}

/// The version both sides speak, if any.
fn agree(peer: &Hello) -> Result<u16, AuthError> {
    let v = VERSION.min(peer.max_version);
    if v < MIN_VERSION.max(peer.min_version) {
        return Err(AuthError::NoCommonVersion {
            min: peer.min_version,
            max: peer.max_version,
        });
    }
    Ok(v)
}

fn expect_proof(m: Message) -> Result<[u8; 32], AuthError> {
    match m {
        Message::AuthProof(p) => Ok(p),
        Message::Refuse(reason) => Err(AuthError::Refused { reason }),
        other => Err(AuthError::Unexpected {
            expected: Command::AuthProof,
            got: other.command(),
        }),
    }
}

/// The connecting side (the source host).
pub fn open_client(
    s: &mut (impl Read + Write),
    key: &Psk,
    channel: Channel,
    session: [u8; 16],
) -> Result<Opened, AuthError> {
    let ours = hello(channel, session);
    write_message(s, &Message::Hello(ours.clone()))?;
    let theirs = match read_message(s, None)? {
        Message::Hello(h) => h,
        Message::Refuse(reason) => return Err(AuthError::Refused { reason }),
        other => {
            return Err(AuthError::Unexpected {
                expected: Command::Hello,
                got: other.command(),
            })
        }
    };
    if theirs.session != session {
        return Err(AuthError::Mismatch { what: "session" });
    }
    if theirs.channel != channel {
        return Err(AuthError::Mismatch { what: "channel" });
    }
    let version = agree(&theirs)?;
    let mine = key
        .proof(b'C', version, &ours, &theirs)
        .finalize()
        .into_bytes();
    write_message(s, &Message::AuthProof(mine.into()))?;
    let proof = expect_proof(read_message(s, Some(version))?)?;
    key.proof(b'S', version, &ours, &theirs)
        .verify_slice(&proof)
        .map_err(|_| AuthError::BadProof)?;
    Ok(Opened {
        version,
        channel,
        session,
    })
}

/// Read one handshake frame; a frame that cannot be accepted (bad magic, version, command,
/// length, payload) is refused with the reason before the error is returned, so a peer
/// learns why (a closed or silent peer is not written to).
fn read_refusing(s: &mut (impl Read + Write), agreed: Option<u16>) -> Result<Message, AuthError> {
    match read_message(s, agreed) {
        Ok(m) => Ok(m),
        Err(e @ (WireError::Frame(_) | WireError::Malformed { .. })) => {
            let _ = write_message(s, &Message::Refuse(pager::error_chain(&e)));
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The accepting side (the destination host). A peer that fails is told why in a Refuse
/// frame (never anything about the key) and the error says the same for the log.
pub fn open_server(s: &mut (impl Read + Write), key: &Psk) -> Result<Opened, AuthError> {
    let theirs = match read_refusing(s, None)? {
        Message::Hello(h) => h,
        other => {
            let e = AuthError::Unexpected {
                expected: Command::Hello,
                got: other.command(),
            };
            let _ = write_message(s, &Message::Refuse(e.to_string()));
            return Err(e);
        }
    };
    let version = match agree(&theirs) {
        Ok(v) => v,
        Err(e) => {
            let _ = write_message(s, &Message::Refuse(e.to_string()));
            return Err(e);
        }
    };
    let ours = hello(theirs.channel, theirs.session);
    write_message(s, &Message::Hello(ours.clone()))?;
    let proof = expect_proof(read_refusing(s, Some(version))?)?;
    if key
        .proof(b'C', version, &theirs, &ours)
        .verify_slice(&proof)
        .is_err()
    {
        let _ = write_message(
            s,
            &Message::Refuse("authentication failed: wrong pre-shared key".into()),
        );
        return Err(AuthError::BadProof);
    }
    let mine = key
        .proof(b'S', version, &theirs, &ours)
        .finalize()
        .into_bytes();
    write_message(s, &Message::AuthProof(mine.into()))?;
    Ok(Opened {
        version,
        channel: theirs.channel,
        session: theirs.session,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn key(k: &str) -> Psk {
        Psk::new(k.as_bytes().to_vec())
    }

    fn pair(
        client_key: Psk,
        server_key: Psk,
    ) -> (Result<Opened, AuthError>, Result<Opened, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || open_server(&mut b, &server_key));
        let client = open_client(&mut a, &client_key, Channel::Urgent, [3; 16]);
        drop(a);
        (client, server.join().unwrap())
    }

    #[test]
    fn both_sides_with_the_key_open_the_connection() {
        let (c, s) = pair(key("0123456789abcdef"), key("0123456789abcdef"));
        let want = Opened {
            version: VERSION,
            channel: Channel::Urgent,
            session: [3; 16],
        };
        assert_eq!(c.unwrap(), want);
        assert_eq!(s.unwrap(), want);
    }

    #[test]
    fn a_client_without_the_key_is_refused_and_told_so() {
        let (c, s) = pair(key("wrong-key-wrong-key"), key("0123456789abcdef"));
        assert!(matches!(s, Err(AuthError::BadProof)), "{s:?}");
        assert_eq!(
            c.unwrap_err().to_string(),
            "the peer refused the connection: authentication failed: wrong pre-shared key"
        );
    }

    #[test]
    fn a_server_without_the_key_is_not_trusted() {
        // A server that answers with a proof made under another key.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let theirs = match read_message(&mut b, None).unwrap() {
                Message::Hello(h) => h,
                _ => unreachable!(),
            };
            let ours = hello(theirs.channel, theirs.session);
            write_message(&mut b, &Message::Hello(ours.clone())).unwrap();
            let _ = read_message(&mut b, Some(VERSION)).unwrap();
            let forged = key("not-the-key-at-all").proof(b'S', 1, &theirs, &ours);
            let forged: [u8; 32] = forged.finalize().into_bytes().into();
            write_message(&mut b, &Message::AuthProof(forged)).unwrap();
        });
        let r = open_client(&mut a, &key("0123456789abcdef"), Channel::Bulk, [1; 16]);
        server.join().unwrap();
        assert!(matches!(r, Err(AuthError::BadProof)), "{r:?}");
    }

    #[test]
    fn a_reflected_proof_is_refused() {
        // The server echoes the client's own proof back: the role byte makes it wrong.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let theirs = match read_message(&mut b, None).unwrap() {
                Message::Hello(h) => h,
                _ => unreachable!(),
            };
            write_message(
                &mut b,
                &Message::Hello(hello(theirs.channel, theirs.session)),
            )
            .unwrap();
            let proof = read_message(&mut b, Some(VERSION)).unwrap();
            write_message(&mut b, &proof).unwrap();
        });
        let r = open_client(&mut a, &key("0123456789abcdef"), Channel::Bulk, [1; 16]);
        server.join().unwrap();
        assert!(matches!(r, Err(AuthError::BadProof)), "{r:?}");
    }

    #[test]
    fn no_common_version_is_refused_with_a_reason() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || open_server(&mut b, &key("0123456789abcdef")));
        let mut h = hello(Channel::Bulk, [0; 16]);
        h.min_version = VERSION + 1;
        h.max_version = VERSION + 3;
        write_message(&mut a, &Message::Hello(h)).unwrap();
        let answer = read_message(&mut a, None).unwrap();
        assert_eq!(
            answer,
            Message::Refuse(format!(
                "no common protocol version: we speak {MIN_VERSION}..={VERSION}, the peer {}..={}",
                VERSION + 1,
                VERSION + 3
            ))
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::NoCommonVersion { .. })
        ));
    }

    #[test]
    fn a_frame_that_is_no_hello_is_refused_with_why() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || open_server(&mut b, &key("0123456789abcdef")));
        a.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        assert_eq!(
            read_message(&mut a, None).unwrap(),
            Message::Refuse(
                "bad frame header: bad frame magic [47, 45, 54, 20] (not a pagewise migration peer?)"
                    .into()
            )
        );
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::Wire(WireError::Frame(_)))
        ));
    }

    #[test]
    fn key_files_are_trimmed_and_short_keys_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "0123456789abcdef\n").unwrap();
        assert_eq!(Psk::from_file(&p).unwrap().0, b"0123456789abcdef");
        std::fs::write(&p, "short\n").unwrap();
        assert_eq!(
            Psk::from_file(&p).unwrap_err().to_string(),
            format!(
                "the pre-shared key in {} has 5 bytes; at least 16 are needed",
                p.display()
            )
        );
    }
}
