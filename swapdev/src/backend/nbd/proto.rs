//! NBD wire constants and fixed-size message encodings (all integers big-endian).
//!
//! Only what this client uses: fixed-newstyle negotiation with `NBD_OPT_GO` (falling back to
//! `NBD_OPT_EXPORT_NAME`), and simple replies in the transmission phase.

/// "NBDMAGIC": first 8 bytes from every server.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation follows; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle servers send this instead of IHAVEOPT.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

// Information types (NBD_OPT_GO / NBD_REP_INFO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;

/// Padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was agreed.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest option reply payload accepted (the spec caps strings at 4096 bytes).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest export name the spec allows.
pub const MAX_NAME_LEN: usize = 4096;

/// Is this option reply type an error?
pub fn is_error_reply(rep: u32) -> bool {
    rep & REP_ERR_BIT != 0
}

/// A readable name for an option reply error type.
pub fn error_reply_name(rep: u32) -> String {
    match rep {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by server policy)".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option)".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (server requires TLS)".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server is shutting down)".into(),
        REP_ERR_BLOCK_SIZE_REQD => {
            "NBD_REP_ERR_BLOCK_SIZE_REQD (server requires block size negotiation)".into()
        }
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too big)".into(),
        other => format!("unknown error reply {other:#x}"),
    }
}

/// Transmission-phase commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Read = 0,
    Write = 1,
    Disc = 2,
    Flush = 3,
    Trim = 4,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disconnect",
            Command::Flush => "flush",
            Command::Trim => "trim",
        }
    }
}

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Encode a transmission request header.
pub fn encode_request(cmd: Command, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&0u16.to_be_bytes()); // command flags
    h[6..8].copy_from_slice(&(cmd as u16).to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// A reply header that is not a simple reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error(
        "NBD server sent a reply with bad magic {magic:#010x} (expected simple reply magic \
         {SIMPLE_REPLY_MAGIC:#010x})"
    )]
    BadMagic { magic: u32 },
}

/// Decode a simple reply header; anything else (e.g. a structured reply) is a protocol error.
pub fn decode_simple_reply(h: &[u8; SIMPLE_REPLY_LEN]) -> Result<SimpleReply, ReplyError> {
    let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ReplyError::BadMagic { magic });
    }
    Ok(SimpleReply {
        error: u32::from_be_bytes(h[4..8].try_into().expect("4 bytes")),
        cookie: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
    })
}

/// Encode an option request: IHAVEOPT, option, length, data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Data of an NBD_OPT_GO asking for `name`, with the given information requests.
pub fn encode_go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for info in infos {
        d.extend_from_slice(&info.to_be_bytes());
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout() {
        let h = encode_request(Command::Write, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[6..8], &[0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(u64::from_be_bytes(h[16..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_be_bytes(h[24..28].try_into().unwrap()), 512);
    }

    #[test]
    fn reply_header_round_trip_and_bad_magic() {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&5u32.to_be_bytes());
        h[8..16].copy_from_slice(&99u64.to_be_bytes());
        assert_eq!(
            decode_simple_reply(&h).unwrap(),
            SimpleReply {
                error: 5,
                cookie: 99
            }
        );
        // A structured reply (magic 0x668e33ef) is not something we negotiated.
        h[0..4].copy_from_slice(&0x668e_33efu32.to_be_bytes());
        let err = decode_simple_reply(&h).unwrap_err();
        assert_eq!(err, ReplyError::BadMagic { magic: 0x668e_33ef });
        assert!(err.to_string().contains("bad magic 0x668e33ef"), "{err}");
    }

    #[test]
    fn go_data_layout() {
        let d = encode_go_data("swap", &[INFO_BLOCK_SIZE]);
        assert_eq!(d, [0, 0, 0, 4, b's', b'w', b'a', b'p', 0, 1, 0, 3]);
        let o = encode_option(OPT_GO, &d);
        assert_eq!(&o[0..8], b"IHAVEOPT");
        assert_eq!(u32::from_be_bytes(o[8..12].try_into().unwrap()), OPT_GO);
        assert_eq!(u32::from_be_bytes(o[12..16].try_into().unwrap()), 12);
    }
}
