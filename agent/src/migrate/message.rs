//! Typed migration messages: the payloads of [`Command`] frames, encoded little-endian with
//! fixed layouts (strings as a u16 length + UTF-8 bytes), decoded without trusting any
//! field: every length is checked against what is left and against its cap, every enum
//! byte against its known values, and trailing bytes are an error. A page's checksum is
//! verified by the decoder, so a page that decodes is a page that arrived intact.

use std::io::{Read, Write};

use super::delta::Encoding;
use super::frame::{
    Command, FrameError, FrameHeader, HEADER_LEN, MAX_ARGS, MAX_PAGE_SIZE, MAX_REPORT, MAX_STR,
};

/// Which of a migration's two connections this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Bulk pages (pre-copy rounds, active push).
    Bulk = 0,
    /// Demand-page requests and their answers, never behind bulk data.
    Urgent = 1,
}

/// How the VM moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Mode {
    Precopy = 0,
    Postcopy = 1,
    Agile = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub channel: Channel,
    /// Fresh random bytes for the challenge-response.
    pub nonce: [u8; 32],
    /// Names the migration both connections belong to.
    pub session: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    pub vm: String,
    pub mode: Mode,
    pub page_size: u32,
    pub pages: u64,
    /// The source QEMU's command line, as started under the source pager.
    pub qemu_argv: Vec<String>,
    /// The shared swap device both hosts reach (agile), if any.
    pub swapdev: Option<String>,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    AuthProof([u8; 32]),
    Refuse(String),
    Setup(Setup),
    SetupOk {
        qemu_pid: u64,
        incoming: String,
    },
    Page {
        page: u64,
        data: Vec<u8>,
    },
    ZeroPages {
        first: u64,
        count: u64,
    },
    FreedPages {
        first: u64,
        count: u64,
    },
    PageRequest {
        page: u64,
    },
    RoundEnd {
        round: u32,
        sent: u64,
        dirty: u64,
    },
    Switchover,
    Done,
    Abort(String),
    Ack {
        first: u64,
        count: u64,
    },
    PageInBulk {
        page: u64,
    },
    StalePages {
        first: u64,
        count: u64,
    },
    StoredPages {
        first: u64,
        count: u64,
    },
    Ready,
    Report(String),
    Released,
    /// `checksum`: of the page `body` decodes to.
    EncodedPage {
        page: u64,
        checksum: u32,
        encoding: Encoding,
        body: Vec<u8>,
    },
    Resend {
        page: u64,
    },
    /// Opens the bulk channel of a new pair of connections for a post-copy that lost its
    /// link: the migration `session` (its first pair's) of VM `vm`.
    Resume {
        session: [u8; 16],
        vm: String,
    },
}

/// A message that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the peer closed the connection")]
    Closed,
    #[error("the peer closed the connection inside a frame header ({got} of {HEADER_LEN} bytes)")]
    TruncatedHeader { got: usize },
    #[error(
        "the peer closed the connection inside a {command:?} frame ({got} of {length} payload bytes)"
    )]
    Truncated {
        command: Command,
        length: u32,
        got: usize,
    },
    #[error("the peer sent nothing for longer than the read timeout")]
    TimedOut,
    #[error("connection I/O")]
    Io(#[from] std::io::Error),
    #[error("bad frame header")]
    Frame(#[from] FrameError),
    #[error("malformed {command:?} payload: {why}")]
    Malformed { command: Command, why: &'static str },
    #[error(
        "page {page} arrived with checksum {found:#010x}, its content sums to {computed:#010x}"
    )]
    BadChecksum {
        page: u64,
        found: u32,
        computed: u32,
    },
}

/// Reads fields off a payload, refusing to run past its end.
struct Fields<'a> {
    rest: &'a [u8],
    command: Command,
}

impl<'a> Fields<'a> {
    fn bad(&self, why: &'static str) -> WireError {
        WireError::Malformed {
            command: self.command,
            why,
        }
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(self.bad(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1, "truncated")?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2, "truncated")?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4, "truncated")?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8, "truncated")?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        Ok(self.take(N, "truncated")?.try_into().expect("N bytes"))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > MAX_STR {
            return Err(self.bad("string longer than its cap"));
        }
        let b = self.take(len, "string runs past the payload")?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    /// A u32-length string of at most `cap` bytes.
    fn long_string(&mut self, cap: usize) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        if len > cap {
            return Err(self.bad("string longer than its cap"));
        }
        let b = self.take(len, "string runs past the payload")?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("string is not UTF-8"))
    }
    fn end(&self) -> Result<(), WireError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_capped(out, s, MAX_STR, 2);
}

/// `s` with a `width`-byte length, cut at `cap` bytes on a character boundary (so what
/// is sent still decodes as UTF-8).
fn put_capped(out: &mut Vec<u8>, s: &str, cap: usize, width: usize) {
    let mut end = s.len().min(cap);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u32).to_le_bytes()[..width]);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn run(out: &mut Vec<u8>, first: u64, count: u64) {
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
}

/// The checksum every page frame carries.
pub fn page_checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Message::Hello(_) => Command::Hello,
            Message::AuthProof(_) => Command::AuthProof,
            Message::Refuse(_) => Command::Refuse,
            Message::Setup(_) => Command::Setup,
            Message::SetupOk { .. } => Command::SetupOk,
            Message::Page { .. } => Command::Page,
            Message::ZeroPages { .. } => Command::ZeroPages,
            Message::FreedPages { .. } => Command::FreedPages,
            Message::PageRequest { .. } => Command::PageRequest,
            Message::RoundEnd { .. } => Command::RoundEnd,
            Message::Switchover => Command::Switchover,
            Message::Done => Command::Done,
            Message::Abort(_) => Command::Abort,
            Message::Ack { .. } => Command::Ack,
            Message::PageInBulk { .. } => Command::PageInBulk,
            Message::StalePages { .. } => Command::StalePages,
            Message::StoredPages { .. } => Command::StoredPages,
            Message::Ready => Command::Ready,
            Message::Report(_) => Command::Report,
            Message::Released => Command::Released,
            Message::EncodedPage { .. } => Command::EncodedPage,
            Message::Resend { .. } => Command::Resend,
            Message::Resume { .. } => Command::Resume,
        }
    }

    /// The payload bytes (no header).
    pub fn payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&h.min_version.to_le_bytes());
                out.extend_from_slice(&h.max_version.to_le_bytes());
                out.push(h.channel as u8);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(&h.nonce);
                out.extend_from_slice(&h.session);
            }
            Message::AuthProof(mac) => out.extend_from_slice(mac),
            Message::Refuse(reason) | Message::Abort(reason) => put_str(&mut out, reason),
            Message::Report(report) => put_capped(&mut out, report, MAX_REPORT, 4),
            Message::Setup(s) => {
                put_str(&mut out, &s.vm);
                out.push(s.mode as u8);
                out.extend_from_slice(&s.page_size.to_le_bytes());
                out.extend_from_slice(&s.pages.to_le_bytes());
                match &s.swapdev {
                    Some(spec) => {
                        out.push(1);
                        put_str(&mut out, spec);
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&(s.qemu_argv.len() as u16).to_le_bytes());
                for a in &s.qemu_argv {
                    put_str(&mut out, a);
                }
            }
            Message::Resume { session, vm } => {
                out.extend_from_slice(session);
                put_str(&mut out, vm);
            }
            Message::SetupOk { qemu_pid, incoming } => {
                out.extend_from_slice(&qemu_pid.to_le_bytes());
                put_str(&mut out, incoming);
            }
            Message::Page { page, data } => {
                out.extend_from_slice(&page.to_le_bytes());
                out.extend_from_slice(&page_checksum(data).to_le_bytes());
                out.extend_from_slice(data);
            }
            Message::ZeroPages { first, count }
            | Message::FreedPages { first, count }
            | Message::Ack { first, count }
            | Message::StalePages { first, count }
            | Message::StoredPages { first, count } => run(&mut out, *first, *count),
            Message::EncodedPage {
                page,
                checksum,
                encoding,
                body,
            } => {
                out.extend_from_slice(&page.to_le_bytes());
                out.extend_from_slice(&checksum.to_le_bytes());
                out.push(*encoding as u8);
                out.extend_from_slice(&[0; 3]);
                out.extend_from_slice(body);
            }
            Message::PageRequest { page }
            | Message::PageInBulk { page }
            | Message::Resend { page } => out.extend_from_slice(&page.to_le_bytes()),
            Message::RoundEnd { round, sent, dirty } => {
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&sent.to_le_bytes());
                out.extend_from_slice(&dirty.to_le_bytes());
            }
            Message::Switchover | Message::Done | Message::Ready | Message::Released => {}
        }
        out
    }

    /// Header + payload, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        let payload = self.payload();
        let mut out = FrameHeader::new(self.command(), payload.len())
            .encode()
            .to_vec();
        out.extend_from_slice(&payload);
        out
    }

    /// Decode the payload of a frame whose header was validated.
    pub fn decode(command: Command, payload: &[u8]) -> Result<Self, WireError> {
        let mut f = Fields {
            rest: payload,
            command,
        };
        let msg = match command {
            Command::Hello => {
                let min_version = f.u16()?;
                let max_version = f.u16()?;
                let channel = match f.u8()? {
                    0 => Channel::Bulk,
                    1 => Channel::Urgent,
                    _ => return Err(f.bad("unknown channel")),
                };
                if f.array::<3>()? != [0; 3] {
                    return Err(f.bad("reserved bytes are set"));
                }
                if min_version > max_version {
                    return Err(f.bad("min_version above max_version"));
                }
                Message::Hello(Hello {
                    min_version,
                    max_version,
                    channel,
                    nonce: f.array()?,
                    session: f.array()?,
                })
            }
            Command::AuthProof => Message::AuthProof(f.array()?),
            Command::Refuse => Message::Refuse(f.string()?),
            Command::Abort => Message::Abort(f.string()?),
            Command::Report => Message::Report(f.long_string(MAX_REPORT)?),
            Command::Setup => {
                let vm = f.string()?;
                let mode = match f.u8()? {
                    0 => Mode::Precopy,
                    1 => Mode::Postcopy,
                    2 => Mode::Agile,
                    _ => return Err(f.bad("unknown mode")),
                };
                let page_size = f.u32()?;
                if !page_size.is_power_of_two()
                    || !(4096..=MAX_PAGE_SIZE as u32).contains(&page_size)
                {
                    return Err(f.bad("page size is not a power of two in 4 KiB..=2 MiB"));
                }
                let pages = f.u64()?;
                let swapdev = match f.u8()? {
                    0 => None,
                    1 => Some(f.string()?),
                    _ => return Err(f.bad("bad swapdev flag")),
                };
                let argc = f.u16()? as usize;
                if argc > MAX_ARGS {
                    return Err(f.bad("more QEMU arguments than the cap"));
                }
                let qemu_argv = (0..argc).map(|_| f.string()).collect::<Result<_, _>>()?;
                Message::Setup(Setup {
                    vm,
                    mode,
                    page_size,
                    pages,
                    qemu_argv,
                    swapdev,
                })
            }
            Command::SetupOk => Message::SetupOk {
                qemu_pid: f.u64()?,
                incoming: f.string()?,
            },
            Command::Page => {
                let page = f.u64()?;
                let found = f.u32()?;
                let data = f.rest.to_vec();
                f.rest = &[];
                if !data.len().is_power_of_two() || !(4096..=MAX_PAGE_SIZE).contains(&data.len()) {
                    return Err(f.bad("page data is not a 4 KiB..=2 MiB power of two"));
                }
                let computed = page_checksum(&data);
                if computed != found {
                    return Err(WireError::BadChecksum {
                        page,
                        found,
                        computed,
                    });
                }
                Message::Page { page, data }
            }
            Command::ZeroPages
            | Command::FreedPages
            | Command::Ack
            | Command::StalePages
            | Command::StoredPages => {
                let (first, count) = (f.u64()?, f.u64()?);
                match command {
                    Command::ZeroPages => Message::ZeroPages { first, count },
                    Command::FreedPages => Message::FreedPages { first, count },
                    Command::Ack => Message::Ack { first, count },
                    Command::StalePages => Message::StalePages { first, count },
                    _ => Message::StoredPages { first, count },
                }
            }
            Command::Resume => Message::Resume {
                session: f.array()?,
                vm: f.string()?,
            },
            Command::Ready => Message::Ready,
            Command::Released => Message::Released,
            Command::PageRequest => Message::PageRequest { page: f.u64()? },
            Command::PageInBulk => Message::PageInBulk { page: f.u64()? },
            Command::Resend => Message::Resend { page: f.u64()? },
            Command::EncodedPage => {
                let page = f.u64()?;
                let checksum = f.u32()?;
                let encoding = Encoding::from_u8(f.u8()?).ok_or(f.bad("unknown page encoding"))?;
                if f.array::<3>()? != [0; 3] {
                    return Err(f.bad("reserved bytes are set"));
                }
                if f.rest.len() > MAX_PAGE_SIZE {
                    return Err(f.bad("encoded page longer than the largest page"));
                }
                let body = std::mem::take(&mut f.rest).to_vec();
                Message::EncodedPage {
                    page,
                    checksum,
                    encoding,
                    body,
                }
            }
            Command::RoundEnd => Message::RoundEnd {
                round: f.u32()?,
                sent: f.u64()?,
                dirty: f.u64()?,
            },
            Command::Switchover => Message::Switchover,
            Command::Done => Message::Done,
        };
        f.end()?;
        Ok(msg)
    }
}

/// Write one message.
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<(), WireError> {
    w.write_all(&msg.encode())?;
    Ok(())
}

/// Write one `Page` frame straight from `data` (no copy of the page).
pub fn write_page(w: &mut impl Write, page: u64, data: &[u8]) -> Result<(), WireError> {
    let head = FrameHeader::new(Command::Page, 12 + data.len()).encode();
    w.write_all(&head)?;
    w.write_all(&page.to_le_bytes())?;
    w.write_all(&page_checksum(data).to_le_bytes())?;
    w.write_all(data)?;
    Ok(())
}

/// Write one `EncodedPage` frame straight from `body`.
pub fn write_encoded_page(
    w: &mut impl Write,
    page: u64,
    checksum: u32,
    encoding: Encoding,
    body: &[u8],
) -> Result<(), WireError> {
    let head = FrameHeader::new(Command::EncodedPage, 16 + body.len()).encode();
    w.write_all(&head)?;
    w.write_all(&page.to_le_bytes())?;
    w.write_all(&checksum.to_le_bytes())?;
    w.write_all(&[encoding as u8, 0, 0, 0])?;
    w.write_all(body)?;
    Ok(())
}

/// Fill `buf` from `r`: how many bytes came before the end of the stream.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(WireError::TimedOut)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Read one message. `agreed` is the connection's version once the hellos settled it.
/// A read timeout on `r` ends it with [`WireError::TimedOut`]; the end of the stream
/// with [`WireError::Closed`] between frames, a `Truncated*` error inside one.
pub fn read_message(r: &mut impl Read, agreed: Option<u16>) -> Result<Message, WireError> {
    let mut head = [0u8; HEADER_LEN];
    match fill(r, &mut head)? {
        0 => return Err(WireError::Closed),
        HEADER_LEN => {}
        got => return Err(WireError::TruncatedHeader { got }),
    }
    let header = FrameHeader::decode(&head)?;
    if let Some(agreed) = agreed {
        if header.version != agreed {
            return Err(FrameError::VersionChanged {
                found: header.version,
                agreed,
            }
            .into());
        }
    }
    // The length was checked against the command's cap before this allocation.
    let mut payload = vec![0u8; header.length as usize];
    let got = fill(r, &mut payload)?;
    if got < payload.len() {
        return Err(WireError::Truncated {
            command: header.command,
            length: header.length,
            got,
        });
    }
    Message::decode(header.command, &payload)
}

#[cfg(test)]
mod tests;
