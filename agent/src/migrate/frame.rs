//! The migration wire's frame: a 16-byte header, then `length` payload bytes.
//!
//! ```text
//! offset size field
//!      0    4 magic    b"PWMG"
//!      4    2 version  protocol version of this frame (LE)
//!      6    2 command  what the payload is ([`Command`], LE); 0 is reserved as invalid
//!      8    4 flags    reserved, must be 0 in version 1 (LE)
//!     12    4 length   payload bytes (LE), at most the command's own cap
//! ```
//!
//! Pure encode/decode, no I/O: the caller reads [`HEADER_LEN`] bytes, calls
//! [`FrameHeader::decode`] (which refuses a bad magic, an unknown version or command, set
//! flags and a length over the command's cap before anything is allocated), then reads
//! exactly `length` more bytes and hands them to [`crate::migrate::message::Message::decode`].
//!
//! **Versions.** A change to any frame or payload layout bumps [`VERSION`]; a peer accepts
//! [`MIN_VERSION`]..=[`VERSION`] and the two sides settle on one version in their hellos.
//! Version 2 added `EncodedPage` and `Resend`, version 3 `Resume`. Every frame is stamped with this build's
//! [`VERSION`] (writers do not carry the agreed one), so a build accepts only its own
//! version: an older peer is refused at the hellos with both version ranges named.

/// The frame magic.
pub const MAGIC: [u8; 4] = *b"PWMG";
/// The protocol version this build speaks.
pub const VERSION: u16 = 3;
/// The oldest version this build still accepts.
pub const MIN_VERSION: u16 = 3;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;
/// The largest guest page the wire carries (2 MiB huge pages).
pub const MAX_PAGE_SIZE: usize = 2 << 20;
/// Longest string field (a reason, a name, one QEMU argument).
pub const MAX_STR: usize = 4096;
/// Longest report (the destination's figures and timeline, JSON).
pub const MAX_REPORT: usize = 1 << 20;
/// Most QEMU arguments in a setup message.
pub const MAX_ARGS: usize = 512;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Opens a connection: versions, channel, nonce, session id.
    Hello = 1,
    /// HMAC of both nonces under the pre-shared key.
    AuthProof = 2,
    /// The peer refuses (a reason follows); the connection ends.
    Refuse = 3,
    /// Source -> destination: the VM to prepare (layout, mode, QEMU command line).
    Setup = 4,
    /// Destination -> source: prepared and its QEMU started.
    SetupOk = 5,
    /// One guest page with its checksum.
    Page = 6,
    /// A run of all-zero guest pages (no bytes).
    ZeroPages = 7,
    /// A run of pages the guest freed: never sent, read as zero.
    FreedPages = 8,
    /// Destination -> source (urgent channel): a guest thread waits on this page.
    PageRequest = 9,
    /// Source -> destination: a pre-copy round is complete.
    RoundEnd = 10,
    /// Source -> destination: the source is paused; device state follows through QEMU.
    Switchover = 11,
    /// Source -> destination: every page has been sent (or routed elsewhere).
    Done = 12,
    /// Either side: the migration is abandoned (a reason follows).
    Abort = 13,
    /// Destination -> source: pages received and placed (acknowledgement of a range).
    Ack = 14,
    /// Source -> destination (urgent channel): the requested page was already pushed on the
    /// bulk channel; it arrives there (so no page crosses the link twice).
    PageInBulk = 15,
    /// Source -> destination: pages whose pre-copied copy went stale (written after it was
    /// sent); the destination drops them and routes them to the source.
    StalePages = 16,
    /// Source -> destination (agile): pages whose current copy is in the shared swap device;
    /// they never cross the link.
    StoredPages = 17,
    /// Destination -> source: the switchover is applied (routes set, sources installed):
    /// the source may let QEMU move the devices.
    Ready = 18,
    /// Destination -> source: the destination's figures at the end (a JSON object).
    Report = 19,
    /// Source -> destination (agile): the shared swap device is released (flushed, no longer
    /// written here): acquire it.
    Released = 20,
    /// A guest page encoded (an XBZRLE delta against the copy sent before, or lz4) with the
    /// checksum of the page it decodes to. Version 2.
    EncodedPage = 21,
    /// Destination -> source (bulk channel, before the switchover): an encoded page did not
    /// decode to its checksum here; send it whole. Version 2.
    Resend = 22,
    /// Source -> destination (bulk channel, first frame): reconnect the post-copy of a
    /// session whose link broke. The destination answers with `Ack` runs of every page it
    /// holds, then `Ready` (or `Report` if it had finished, `Refuse` if it knows no such
    /// paused migration). Version 3.
    Resume = 23,
}

impl Command {
    pub const ALL: [Command; 23] = [
        Command::Hello,
        Command::AuthProof,
        Command::Refuse,
        Command::Setup,
        Command::SetupOk,
        Command::Page,
        Command::ZeroPages,
        Command::FreedPages,
        Command::PageRequest,
        Command::RoundEnd,
        Command::Switchover,
        Command::Done,
        Command::Abort,
        Command::Ack,
        Command::PageInBulk,
        Command::StalePages,
        Command::StoredPages,
        Command::Ready,
        Command::Report,
        Command::Released,
        Command::EncodedPage,
        Command::Resend,
        Command::Resume,
    ];

    pub fn from_u16(v: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| *c as u16 == v)
    }

    /// The largest payload this command may carry.
    pub fn max_len(self) -> usize {
        match self {
            Command::Hello => 56,
            Command::AuthProof => 32,
            Command::Refuse | Command::Abort => 2 + MAX_STR,
            Command::Report => 4 + MAX_REPORT,
            Command::Setup => 256 * 1024,
            Command::SetupOk => 8 + 2 + MAX_STR,
            Command::Resume => 16 + 2 + MAX_STR,
            Command::Page => 12 + MAX_PAGE_SIZE,
            Command::EncodedPage => 16 + MAX_PAGE_SIZE,
            Command::ZeroPages
            | Command::FreedPages
            | Command::Ack
            | Command::StalePages
            | Command::StoredPages => 16,
            Command::PageRequest | Command::PageInBulk | Command::Resend => 8,
            Command::RoundEnd => 20,
            Command::Switchover | Command::Done | Command::Ready | Command::Released => 0,
        }
    }
}

/// A frame header that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {found:02x?} (not a pagewise migration peer?)")]
    BadMagic { found: [u8; 4] },
    #[error(
        "frame version {found} is not supported (this build speaks {MIN_VERSION}..={VERSION})"
    )]
    UnsupportedVersion { found: u16 },
    #[error("frame version {found} differs from the version {agreed} agreed for this connection")]
    VersionChanged { found: u16, agreed: u16 },
    #[error("unknown command {found}")]
    UnknownCommand { found: u16 },
    #[error("frame flags {found:#x} are set; version 1 defines none")]
    UnknownFlags { found: u32 },
    #[error("{command:?} frame of {length} bytes exceeds its cap of {cap} bytes")]
    TooLong {
        command: Command,
        length: u32,
        cap: usize,
    },
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub command: Command,
    pub length: u32,
}

impl FrameHeader {
    pub fn new(command: Command, length: usize) -> Self {
        Self {
            version: VERSION,
            command,
            length: length as u32,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.command as u16).to_le_bytes());
        // flags (8..12) stay zero in version 1.
        b[12..16].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Check every field before the payload is read or allocated.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let le32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = le16(4);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let command =
            Command::from_u16(le16(6)).ok_or(FrameError::UnknownCommand { found: le16(6) })?;
        let flags = le32(8);
        if flags != 0 {
            return Err(FrameError::UnknownFlags { found: flags });
        }
        let length = le32(12);
        if length as usize > command.max_len() {
            return Err(FrameError::TooLong {
                command,
                length,
                cap: command.max_len(),
            });
        }
        Ok(Self {
            version,
            command,
            length,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_are_pinned() {
        let h = FrameHeader::new(Command::Page, 4108);
        assert_eq!(
            h.encode(),
            [b'P', b'W', b'M', b'G', 3, 0, 6, 0, 0, 0, 0, 0, 0x0c, 0x10, 0, 0]
        );
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }

    #[test]
    fn command_numbers_are_pinned_and_zero_is_invalid() {
        let numbers: Vec<u16> = Command::ALL.iter().map(|c| *c as u16).collect();
        assert_eq!(numbers, (1..=23).collect::<Vec<u16>>());
        assert_eq!(Command::from_u16(0), None);
        assert_eq!(Command::from_u16(24), None);
    }

    #[test]
    fn refuses_each_bad_field() {
        let good = FrameHeader::new(Command::PageRequest, 8).encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            FrameHeader::decode(&b)
        };
        assert_eq!(with(0, b'X'), Err(FrameError::BadMagic { found: *b"XWMG" }));
        assert_eq!(with(4, 4), Err(FrameError::UnsupportedVersion { found: 4 }));
        assert_eq!(with(4, 2), Err(FrameError::UnsupportedVersion { found: 2 }));
        assert_eq!(with(4, 0), Err(FrameError::UnsupportedVersion { found: 0 }));
        assert_eq!(with(6, 0), Err(FrameError::UnknownCommand { found: 0 }));
        assert_eq!(with(7, 1), Err(FrameError::UnknownCommand { found: 265 }));
        assert_eq!(with(9, 1), Err(FrameError::UnknownFlags { found: 0x100 }));
        assert_eq!(
            with(12, 9),
            Err(FrameError::TooLong {
                command: Command::PageRequest,
                length: 9,
                cap: 8
            })
        );
        let mut huge = good;
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[6] = Command::Page as u8;
        assert!(matches!(
            FrameHeader::decode(&huge),
            Err(FrameError::TooLong { .. })
        ));
    }
}
