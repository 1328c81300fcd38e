//! A hostile migration peer: one function per misbehaviour against a migration endpoint
//! (`pagewise serve --migrate-listen`), each returning what the endpoint did about it: every
//! frame it sent back on that connection and how the connection ended. The tests
//! (`tests/tests/migrate_hostile.rs`) drive each one against a real daemon and assert the
//! exact error; `hostile-peer` runs them by hand.
//!
//! Valid parts (hellos, proofs, setups) are made with the agent's own codec and handshake;
//! the bad bytes are built here by hand, so the codec's own checks cannot tidy them up.
//! Each scenario sends no more than the endpoint will read before it gives up, so its
//! answer is never lost to a reset.

use std::io::{Cursor, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use agent::migrate::auth::{open_client, AuthError, Opened, Psk};
use agent::migrate::frame::{Command, FrameHeader, HEADER_LEN, VERSION};
use agent::migrate::message::{
    read_message, write_message, Channel, Hello, Message, Mode, Setup, WireError,
};

mod scenarios;
pub use scenarios::*;

/// The endpoint under attack.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The endpoint's real pre-shared key (scenarios past the handshake need it).
    pub key: Psk,
    /// How long the endpoint may stay silent before a scenario calls it [`End::Silent`].
    pub patience: Duration,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The endpoint closed it (end of stream).
    Closed,
    /// The endpoint reset it.
    Reset,
    /// Still open: nothing arrived for the endpoint's patience.
    Silent,
    /// Another error while reading.
    Error(String),
}

/// What the endpoint did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// This peer's address: the daemon's log names a peer by it.
    pub local: SocketAddr,
    /// Every whole frame the endpoint sent on this connection, in order (handshake frames
    /// included).
    pub frames: Vec<Message>,
    /// Why the bytes after the last whole frame did not decode, if any were left.
    pub garbage: Option<String>,
    pub end: End,
    /// From the misbehaviour to the end of the connection.
    pub elapsed: Duration,
}

impl Outcome {
    /// The reason of the first `Refuse` or `Abort` frame.
    pub fn refusal(&self) -> Option<&str> {
        self.frames.iter().find_map(|m| match m {
            Message::Refuse(r) | Message::Abort(r) => Some(r.as_str()),
            _ => None,
        })
    }

    /// The commands of the frames received, in order.
    pub fn commands(&self) -> Vec<Command> {
        self.frames.iter().map(Message::command).collect()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "from {}: received {:?}", self.local, self.commands())?;
        if let Some(r) = self.refusal() {
            write!(f, ", reason {r:?}")?;
        }
        if let Some(g) = &self.garbage {
            write!(f, ", undecodable: {g}")?;
        }
        write!(f, ", then {:?} after {:?}", self.end, self.elapsed)
    }
}

/// A scenario that could not be played out (not the endpoint's answer to it).
#[derive(Debug, thiserror::Error)]
pub enum HostileError {
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the socket")]
    Io(#[from] std::io::Error),
    #[error("a handshake the scenario needs was refused")]
    Handshake(#[from] AuthError),
    #[error("writing a frame")]
    Wire(#[from] WireError),
}

/// `e` and its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A stream that keeps every byte it reads, so the frames of a handshake run by the
/// agent's own code are seen too.
struct Tap {
    stream: TcpStream,
    got: Vec<u8>,
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.got.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// One connection to the endpoint.
pub struct Conn {
    tap: Tap,
    local: SocketAddr,
    patience: Duration,
}

impl Conn {
    pub fn connect(ep: &Endpoint) -> Result<Self, HostileError> {
        let stream =
            TcpStream::connect_timeout(&ep.addr, Duration::from_secs(5)).map_err(|source| {
                HostileError::Connect {
                    addr: ep.addr,
                    source,
                }
            })?;
        stream.set_nodelay(true)?;
        // The agent's handshake reads with this too: a dead endpoint fails it, never hangs.
        stream.set_read_timeout(Some(ep.patience))?;
        Ok(Self {
            local: stream.local_addr()?,
            tap: Tap {
                stream,
                got: Vec::new(),
            },
            patience: ep.patience,
        })
    }

    /// Run the agent's own client handshake with `key`.
    pub fn open(
        &mut self,
        key: &Psk,
        channel: Channel,
        session: [u8; 16],
    ) -> Result<Opened, AuthError> {
        open_client(&mut self.tap, key, channel, session)
    }

    /// Write bytes as they are. A write the endpoint no longer reads is not an error of the
    /// scenario: what the endpoint did is in the outcome.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.tap.stream.write_all(bytes);
    }

    /// Write one message with the agent's codec.
    pub fn send(&mut self, msg: &Message) {
        let _ = write_message(&mut self.tap.stream, msg);
    }

    /// Say nothing more (half-close).
    pub fn shut_write(&mut self) {
        let _ = self.tap.stream.shutdown(Shutdown::Write);
    }

    /// Read until the endpoint closes or stays silent for the patience; decode what came.
    pub fn finish(mut self, since: Instant) -> Outcome {
        let _ = self.tap.stream.set_read_timeout(Some(self.patience));
        let mut buf = [0u8; 64 * 1024];
        let end = loop {
            match self.tap.read(&mut buf) {
                Ok(0) => break End::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break End::Silent
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break End::Reset,
                Err(e) => break End::Error(e.to_string()),
            }
        };
        let elapsed = since.elapsed();
        let (frames, garbage) = decode_all(&self.tap.got);
        Outcome {
            local: self.local,
            frames,
            garbage,
            end,
            elapsed,
        }
    }
}

/// Every whole frame in `bytes`, and why the rest (if any) did not decode.
pub fn decode_all(bytes: &[u8]) -> (Vec<Message>, Option<String>) {
    let mut r = Cursor::new(bytes);
    let mut frames = Vec::new();
    loop {
        match read_message(&mut r, None) {
            Ok(m) => frames.push(m),
            Err(WireError::Closed) if r.position() as usize == bytes.len() => {
                return (frames, None)
            }
            Err(e) => return (frames, Some(error_chain(&e))),
        }
    }
}

/// A fresh random session id.
pub fn session() -> [u8; 16] {
    rand::random()
}

/// A hello as the agent's client sends it (its own nonce), for hand-built handshakes.
pub fn hello(channel: Channel, session: [u8; 16], min: u16, max: u16) -> Hello {
    Hello {
        min_version: min,
        max_version: max,
        channel,
        nonce: rand::random(),
        session,
    }
}

/// A frame header with any fields (a valid one is [`FrameHeader::encode`]'s layout).
pub fn raw_header(magic: [u8; 4], version: u16, command: u16, flags: u32, length: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(&magic);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&command.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    b
}

/// A header of `command` with the current version and `length`, valid but for the length.
pub fn header(command: Command, length: u32) -> Vec<u8> {
    let mut h = FrameHeader::new(command, 0).encode().to_vec();
    h[12..16].copy_from_slice(&length.to_le_bytes());
    h
}

/// A well-formed setup for VM `vm` whose QEMU is `program` (16 MiB of 4 KiB pages,
/// post-copy, RAM in a named memory-backend-file and a QMP socket, as `vm run` needs).
pub fn valid_setup(vm: &str, program: &str) -> Setup {
    let argv = [
        program,
        "-accel",
        "tcg",
        "-m",
        "16",
        "-object",
        "memory-backend-file,id=mem,size=16M,mem-path=/dev/shm/hostile-source.ram,share=on",
        "-machine",
        "q35,memory-backend=mem",
        "-qmp",
        "unix:/tmp/hostile-source.qmp,server=on,wait=off",
        "-display",
        "none",
    ];
    Setup {
        vm: vm.into(),
        mode: Mode::Postcopy,
        page_size: 4096,
        pages: (16 << 20) / 4096,
        qemu_argv: argv.iter().map(|s| s.to_string()).collect(),
        swapdev: None,
    }
}

/// A version no build speaks.
pub const ALIEN_VERSION: u16 = 99;
const _: () = assert!(ALIEN_VERSION > VERSION);
