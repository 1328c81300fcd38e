//! A userspace NBD client: a swap device on an export served by qemu-nbd, nbdkit, nbd-server...
//!
//! One connection, fixed-newstyle negotiation (`handshake`), then pipelined transmission with
//! simple replies (`engine`): every submitted request is split into commands of at most the
//! server's maximum payload, each with its own cookie; replies are matched by cookie and may
//! arrive in any order. The socket is non-blocking after the handshake and one `poll` loop
//! both sends queued requests and reads replies, so a server that stops reading until we read
//! its replies cannot deadlock us.
//!
//! Guarantees:
//! - `Flush` is sent only after every write and trim submitted before it has been replied to,
//!   so `NBD_CMD_FLUSH` covers them all. If the server does not advertise `SEND_FLUSH` (it has
//!   no volatile cache to flush) a flush completes at once after that drain.
//! - `Trim` is advisory: without `SEND_TRIM` it completes at once and changes nothing.
//! - Requests that cannot be served (past the end of the export, misaligned for the server's
//!   minimum block size, writes to a read-only export) are refused by `submit` with an error
//!   naming the export.
//! - If the connection breaks or the server violates the protocol, every outstanding request
//!   completes with a `BackendError::Protocol` naming the cause, and later submits fail.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Duration;

use super::{Backend, BackendError, IoCompletion, IoOp, IoRequest};
use crate::AlignedBuf;

mod engine;
pub mod handshake;
pub mod proto;
pub mod transport;

#[cfg(test)]
mod tests;

pub use handshake::ExportInfo;
pub use transport::NbdAddress;

use proto::Command;
use transport::Stream;

/// Bound on payload bytes (write data sent + read data expected) in flight by default.
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: usize = 8 * 1024 * 1024;
/// Largest trim sent in one command.
const MAX_TRIM_CHUNK: u64 = 1 << 30;

/// Connection tuning for [`NbdBackend::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// How long the server may stay silent while requests are outstanding before the
    /// connection is declared dead (`None`: wait forever).
    pub io_timeout: Option<Duration>,
    /// Payload bytes allowed in flight before `submit` waits for replies.
    pub max_bytes_in_flight: usize,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Some(Duration::from_secs(120)),
            max_bytes_in_flight: DEFAULT_MAX_BYTES_IN_FLIGHT,
        }
    }
}

/// What a request carries while its commands are outstanding.
enum SlotOp {
    Read(AlignedBuf),
    Write(AlignedBuf),
    Flush,
    Trim,
}

/// One caller request, possibly split into several NBD commands.
struct Slot {
    tag: u64,
    op: SlotOp,
    parts_left: usize,
    error: Option<BackendError>,
}

/// One NBD command in flight.
#[derive(Debug, Clone, Copy)]
struct Part {
    slot: usize,
    cmd: Command,
    offset: u64,
    /// Where this command's data sits in the slot's buffer.
    buf_off: usize,
    len: u32,
    /// The request (and its data) has been written to the socket completely.
    sent: bool,
}

impl Part {
    fn payload_bytes(&self) -> usize {
        match self.cmd {
            Command::Read | Command::Write => self.len as usize,
            _ => 0,
        }
    }
}

/// A request header (and for writes, its payload) waiting to be sent.
struct OutMsg {
    header: [u8; proto::REQUEST_LEN],
    /// For writes: (slot, buf_off, len) of the data following the header.
    payload: Option<(usize, usize, usize)>,
    sent: usize,
}

/// Where the reply reader is.
enum RxState {
    Header,
    /// Reading `remaining` more bytes of a READ reply's data for `cookie`.
    Payload {
        cookie: u64,
        filled: usize,
    },
}

/// An NBD export used as a backend. See the module docs for the guarantees.
pub struct NbdBackend {
    address: NbdAddress,
    info: ExportInfo,
    opts: NbdOptions,
    stream: Stream,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    parts: HashMap<u64, Part>,
    next_cookie: u64,
    outgoing: VecDeque<OutMsg>,
    /// Write data bytes in `outgoing` not yet fully sent.
    outgoing_payload: usize,
    rx_buf: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    rx_state: RxState,
    /// Payload bytes of commands not yet replied to.
    bytes_in_flight: usize,
    /// Write and trim commands not yet replied to (a flush waits for zero).
    writes_in_flight: usize,
    in_flight: usize,
    ready: VecDeque<IoCompletion>,
    /// Set once the connection is unusable; the reason.
    broken: Option<String>,
}

impl NbdBackend {
    /// Connect to `address` and negotiate `export`.
    pub fn connect(
        address: NbdAddress,
        export: &str,
        opts: NbdOptions,
    ) -> Result<Self, BackendError> {
        let mut stream = Stream::connect(&address, opts.connect_timeout)?;
        let setup = |e: io::Error| {
            BackendError::Setup(format!("cannot configure socket to {address}: {e}"))
        };
        stream
            .set_timeouts(Some(opts.handshake_timeout))
            .map_err(setup)?;
        let info = handshake::negotiate(&mut stream, export, &address.to_string())?;
        stream.set_timeouts(None).map_err(setup)?;
        stream.set_nonblocking(true).map_err(setup)?;
        tracing::debug!(%address, export, size = info.size, flags = info.flags, "NBD export attached");
        Ok(Self::with_stream(address, info, opts, stream))
    }

    fn with_stream(
        address: NbdAddress,
        info: ExportInfo,
        opts: NbdOptions,
        stream: Stream,
    ) -> Self {
        Self {
            address,
            info,
            opts,
            stream,
            slots: Vec::new(),
            free_slots: Vec::new(),
            parts: HashMap::new(),
            next_cookie: 1,
            outgoing: VecDeque::new(),
            outgoing_payload: 0,
            rx_buf: vec![0u8; engine::RX_BUF_LEN],
            rx_start: 0,
            rx_end: 0,
            rx_state: RxState::Header,
            bytes_in_flight: 0,
            writes_in_flight: 0,
            in_flight: 0,
            ready: VecDeque::new(),
            broken: None,
        }
    }

    /// What the server said about the export.
    pub fn export_info(&self) -> &ExportInfo {
        &self.info
    }

    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    fn refuse(
        &self,
        op: &'static str,
        offset: u64,
        kind: io::ErrorKind,
        why: String,
    ) -> BackendError {
        BackendError::Io {
            op,
            offset,
            source: io::Error::new(kind, why),
        }
    }

    /// Check a data request against the export's size, alignment and writability.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), BackendError> {
        let name = &self.info.name;
        if op != "read" && self.info.read_only() {
            let why = format!("NBD export '{name}' at {} is read-only", self.address);
            return Err(self.refuse(op, offset, io::ErrorKind::PermissionDenied, why));
        }
        let end = offset.checked_add(len);
        if end.is_none_or(|end| end > self.info.size) {
            let why = format!(
                "{op} of {len} bytes at offset {offset} extends past the end of NBD export \
                 '{name}' ({} bytes)",
                self.info.size
            );
            return Err(self.refuse(op, offset, io::ErrorKind::InvalidInput, why));
        }
        let min = self.info.min_block as u64;
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            let why = format!(
                "offset {offset} and length {len} must be multiples of NBD export '{name}''s \
                 minimum block size {min}"
            );
            return Err(self.refuse(op, offset, io::ErrorKind::InvalidInput, why));
        }
        Ok(())
    }

    fn alloc_slot(&mut self, slot: Slot) -> usize {
        match self.free_slots.pop() {
            Some(idx) => {
                self.slots[idx] = Some(slot);
                idx
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// Split a request into commands (offset, buf_off, len) of at most `chunk` bytes.
    fn split(offset: u64, len: u64, chunk: u64) -> Vec<(u64, usize, u32)> {
        let mut parts = Vec::with_capacity(len.div_ceil(chunk.max(1)) as usize);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk);
            parts.push((offset + done, done as usize, n as u32));
            done += n;
        }
        parts
    }

    /// Largest read/write payload in one command, a multiple of the minimum block size.
    fn max_payload(&self) -> u64 {
        let min = self.info.min_block as u64;
        let max = self.info.max_block as u64;
        (max / min * min).max(min)
    }

    fn complete_now(&mut self, tag: u64, buf: Option<AlignedBuf>) {
        self.in_flight += 1;
        self.ready.push_back(IoCompletion {
            tag,
            result: Ok(buf),
        });
    }
}

impl Backend for NbdBackend {
    fn submit(&mut self, req: IoRequest) -> Result<(), BackendError> {
        if let Some(why) = &self.broken {
            return Err(BackendError::Protocol(why.clone()));
        }
        let IoRequest { tag, offset, op } = req;
        let (op, cmd, len, chunk) = match op {
            IoOp::Read { buf } => {
                self.check("read", offset, buf.len() as u64)?;
                let len = buf.len() as u64;
                (SlotOp::Read(buf), Command::Read, len, self.max_payload())
            }
            IoOp::Write { buf } => {
                self.check("write", offset, buf.len() as u64)?;
                let len = buf.len() as u64;
                (SlotOp::Write(buf), Command::Write, len, self.max_payload())
            }
            IoOp::Trim { len } => {
                self.check("trim", offset, len)?;
                let min = self.info.min_block as u64;
                (SlotOp::Trim, Command::Trim, len, MAX_TRIM_CHUNK / min * min)
            }
            IoOp::Flush => {
                // Every earlier write and trim must be answered before the flush is sent.
                self.pump_until(|s| s.writes_in_flight == 0);
                if let Some(why) = &self.broken {
                    return Err(BackendError::Protocol(why.clone()));
                }
                if !self.info.can_flush() {
                    self.complete_now(tag, None);
                    return Ok(());
                }
                (SlotOp::Flush, Command::Flush, 0, 1)
            }
        };
        let skip = match &op {
            SlotOp::Read(_) | SlotOp::Write(_) => len == 0,
            SlotOp::Trim => len == 0 || !self.info.can_trim(),
            SlotOp::Flush => false,
        };
        if skip {
            let buf = match op {
                SlotOp::Read(b) | SlotOp::Write(b) => Some(b),
                _ => None,
            };
            self.complete_now(tag, buf);
            return Ok(());
        }
        let pieces = if cmd == Command::Flush {
            vec![(0, 0, 0)]
        } else {
            Self::split(offset, len, chunk)
        };
        let slot = self.alloc_slot(Slot {
            tag,
            op,
            parts_left: pieces.len(),
            error: None,
        });
        self.in_flight += 1;
        for (part_offset, buf_off, part_len) in pieces {
            let part = Part {
                slot,
                cmd,
                offset: part_offset,
                buf_off,
                len: part_len,
                sent: false,
            };
            self.queue_part(part);
        }
        Ok(())
    }

    fn complete(&mut self, out: &mut Vec<IoCompletion>, min: usize) -> Result<usize, BackendError> {
        let target = min.min(self.in_flight);
        self.pump_until(|s| s.ready.len() >= target);
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        self.in_flight -= n;
        Ok(n)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn size(&self) -> Result<u64, BackendError> {
        Ok(self.info.size)
    }

    fn grow(&mut self, len: u64) -> Result<(), BackendError> {
        if len <= self.info.size {
            return Ok(());
        }
        let why = format!(
            "NBD export '{}' at {} has a fixed size of {} bytes; cannot grow to {len}",
            self.info.name, self.address, self.info.size
        );
        Err(self.refuse("grow", len, io::ErrorKind::InvalidInput, why))
    }

    fn alignment(&self) -> usize {
        self.info.min_block as usize
    }

    fn describe(&self) -> String {
        let mut caps = vec![format!("{} bytes", self.info.size)];
        if self.info.read_only() {
            caps.push("read-only".into());
        }
        if self.info.can_flush() {
            caps.push("flush".into());
        }
        if self.info.can_trim() {
            caps.push("trim".into());
        }
        format!(
            "nbd export '{}' at {} ({})",
            self.info.name,
            self.address,
            caps.join(", ")
        )
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        self.disconnect();
    }
}
