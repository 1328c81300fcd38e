//! The transmission phase: queue commands, send them with vectored writes, read simple replies
//! incrementally (header, then READ data straight into the request's buffer) and match them
//! to their commands by cookie. Everything is non-blocking; `pump_until` polls for progress.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::AsFd;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::proto::{self, Command, REQUEST_LEN, SIMPLE_REPLY_LEN};
use super::{NbdBackend, OutMsg, Part, RxState, Slot, SlotOp};
use crate::backend::{BackendError, IoCompletion};

/// Receive buffer size: many small replies per `read`.
pub(super) const RX_BUF_LEN: usize = 256 * 1024;
/// Most I/O vectors per `writev`.
const MAX_IOV: usize = 64;
/// Queued messages (or payload bytes) that trigger sending before `complete` is called.
const SEND_BATCH_MSGS: usize = 32;
const SEND_BATCH_BYTES: usize = 256 * 1024;
/// Read READ data directly into the destination when at least this much is still expected.
const DIRECT_READ_MIN: usize = 16 * 1024;

type Fatal = String;

impl NbdBackend {
    /// Queue one command; sends when a batch has accumulated, and waits for replies first if
    /// the bytes-in-flight bound would be exceeded.
    pub(super) fn queue_part(&mut self, part: Part) {
        if self.broken.is_some() {
            return;
        }
        let bytes = part.payload_bytes();
        let max = self.opts.max_bytes_in_flight;
        if self.bytes_in_flight > 0 && self.bytes_in_flight + bytes > max {
            self.pump_until(|s| s.bytes_in_flight == 0 || s.bytes_in_flight + bytes <= max);
            if self.broken.is_some() {
                return; // fail_all has already completed this request with the cause.
            }
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        self.parts.insert(cookie, part);
        self.bytes_in_flight += bytes;
        if matches!(part.cmd, Command::Write | Command::Trim) {
            self.writes_in_flight += 1;
        }
        let payload =
            (part.cmd == Command::Write).then_some((part.slot, part.buf_off, part.len as usize));
        let bytes_to_send = payload.map_or(0, |p| p.2);
        self.outgoing.push_back(OutMsg {
            header: proto::encode_request(part.cmd, cookie, part.offset, part.len),
            payload,
            sent: 0,
        });
        self.outgoing_payload += bytes_to_send;
        if self.outgoing.len() >= SEND_BATCH_MSGS || self.outgoing_payload >= SEND_BATCH_BYTES {
            self.pump_until(|_| true);
        }
    }

    /// Send queued commands and read replies until `done` holds, the connection fails
    /// (then every outstanding request has completed with the cause), or nothing is left
    /// outstanding.
    pub(super) fn pump_until(&mut self, done: impl Fn(&Self) -> bool) {
        loop {
            if self.broken.is_some() {
                return;
            }
            if let Err(why) = self.send_some().and_then(|()| self.recv_some()) {
                self.fail_all(why);
                return;
            }
            if done(self) || self.parts.is_empty() {
                return;
            }
            if let Err(why) = self.wait_io() {
                self.fail_all(why);
                return;
            }
        }
    }

    /// Block until the socket is readable (or writable, when there is something to send).
    fn wait_io(&mut self) -> Result<(), Fatal> {
        let mut flags = PollFlags::POLLIN;
        if !self.outgoing.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        let timeout = match self.opts.io_timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
        match poll(&mut fds, timeout) {
            Ok(0) => Err(format!(
                "NBD server at {} did not respond for {:?} with {} commands outstanding",
                self.address,
                self.opts.io_timeout.unwrap_or_default(),
                self.parts.len()
            )),
            Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(format!(
                "poll on the connection to {} failed: {e}",
                self.address
            )),
        }
    }

    /// Write as much of the outgoing queue as the socket takes without blocking.
    fn send_some(&mut self) -> Result<(), Fatal> {
        while !self.outgoing.is_empty() {
            let written = {
                let Self {
                    stream,
                    outgoing,
                    slots,
                    address,
                    ..
                } = self;
                let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV);
                for msg in outgoing.iter() {
                    if iov.len() + 2 > MAX_IOV {
                        break;
                    }
                    if msg.sent < REQUEST_LEN {
                        iov.push(IoSlice::new(&msg.header[msg.sent..]));
                    }
                    if let Some((slot, off, len)) = msg.payload {
                        let data = match slots.get(slot).and_then(|s| s.as_ref()) {
                            Some(Slot {
                                op: SlotOp::Write(buf),
                                ..
                            }) => &buf[off..off + len],
                            _ => {
                                return Err(format!(
                                    "internal: data of a queued write to {address} is gone"
                                ))
                            }
                        };
                        let skip = msg.sent.saturating_sub(REQUEST_LEN);
                        iov.push(IoSlice::new(&data[skip..]));
                    }
                }
                match stream.write_vectored(&iov) {
                    Ok(0) => return Err(format!("NBD server at {address} stopped accepting data")),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(format!("sending to NBD server at {address} failed: {e}"))
                    }
                }
            };
            self.advance_outgoing(written);
        }
        Ok(())
    }

    fn advance_outgoing(&mut self, mut written: usize) {
        while written > 0 {
            let msg = self
                .outgoing
                .front_mut()
                .expect("wrote more than was queued");
            let total = REQUEST_LEN + msg.payload.map_or(0, |p| p.2);
            let step = written.min(total - msg.sent);
            msg.sent += step;
            written -= step;
            if msg.sent == total {
                let cookie = u64::from_be_bytes(msg.header[8..16].try_into().expect("8 bytes"));
                self.outgoing_payload -= total - REQUEST_LEN;
                self.outgoing.pop_front();
                if let Some(part) = self.parts.get_mut(&cookie) {
                    part.sent = true;
                }
            }
        }
    }

    /// Read and process every reply byte available without blocking.
    fn recv_some(&mut self) -> Result<(), Fatal> {
        loop {
            self.process_buffered()?;
            let direct = self.direct_read_target();
            let result = match direct {
                Some((slot, from, to)) => {
                    let Some(Some(Slot {
                        op: SlotOp::Read(buf),
                        ..
                    })) = self.slots.get_mut(slot)
                    else {
                        unreachable!("direct_read_target checked the slot")
                    };
                    self.stream.read(&mut buf[from..to])
                }
                None => {
                    if self.rx_start == self.rx_end {
                        self.rx_start = 0;
                        self.rx_end = 0;
                    } else if self.rx_end == self.rx_buf.len() {
                        self.rx_buf.copy_within(self.rx_start..self.rx_end, 0);
                        self.rx_end -= self.rx_start;
                        self.rx_start = 0;
                    }
                    self.stream.read(&mut self.rx_buf[self.rx_end..])
                }
            };
            match result {
                Ok(0) => {
                    return Err(format!(
                        "NBD server at {} closed the connection with {} commands outstanding",
                        self.address,
                        self.parts.len()
                    ))
                }
                Ok(n) => match direct {
                    Some(_) => {
                        if let RxState::Payload { filled, .. } = &mut self.rx_state {
                            *filled += n;
                        }
                    }
                    None => self.rx_end += n,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(format!(
                        "receiving from NBD server at {} failed: {e}",
                        self.address
                    ))
                }
            }
        }
    }

    /// When a large READ payload is expected and nothing is buffered, read it in place:
    /// (slot, from, to) in the slot's buffer.
    fn direct_read_target(&self) -> Option<(usize, usize, usize)> {
        let RxState::Payload { cookie, filled } = self.rx_state else {
            return None;
        };
        if self.rx_start != self.rx_end {
            return None;
        }
        let part = self.parts.get(&cookie)?;
        let remaining = part.len as usize - filled;
        (remaining >= DIRECT_READ_MIN).then_some((
            part.slot,
            part.buf_off + filled,
            part.buf_off + part.len as usize,
        ))
    }

    /// Consume complete reply headers and READ data from the receive buffer.
    fn process_buffered(&mut self) -> Result<(), Fatal> {
        loop {
            match self.rx_state {
                RxState::Header => {
                    if self.rx_end - self.rx_start < SIMPLE_REPLY_LEN {
                        return Ok(());
                    }
                    let mut h = [0u8; SIMPLE_REPLY_LEN];
                    h.copy_from_slice(
                        &self.rx_buf[self.rx_start..self.rx_start + SIMPLE_REPLY_LEN],
                    );
                    self.rx_start += SIMPLE_REPLY_LEN;
                    let reply = proto::decode_simple_reply(&h)
                        .map_err(|e| format!("{e} from {}", self.address))?;
                    let Some(part) = self.parts.get(&reply.cookie).copied() else {
                        return Err(format!(
                            "NBD server at {} replied to unknown cookie {:#x}",
                            self.address, reply.cookie
                        ));
                    };
                    if !part.sent {
                        return Err(format!(
                            "NBD server at {} replied to cookie {:#x} before it was sent",
                            self.address, reply.cookie
                        ));
                    }
                    if reply.error != 0 {
                        let err = BackendError::Io {
                            op: part.cmd.name(),
                            offset: part.offset,
                            source: io::Error::from_raw_os_error(reply.error as i32),
                        };
                        self.finish_part(reply.cookie, Err(err));
                    } else if part.cmd == Command::Read {
                        self.rx_state = RxState::Payload {
                            cookie: reply.cookie,
                            filled: 0,
                        };
                    } else {
                        self.finish_part(reply.cookie, Ok(()));
                    }
                }
                RxState::Payload { cookie, filled } => {
                    let part = self.parts[&cookie];
                    let remaining = part.len as usize - filled;
                    if remaining == 0 {
                        self.rx_state = RxState::Header;
                        self.finish_part(cookie, Ok(()));
                        continue;
                    }
                    let n = remaining.min(self.rx_end - self.rx_start);
                    if n == 0 {
                        return Ok(());
                    }
                    let Some(Some(Slot {
                        op: SlotOp::Read(buf),
                        ..
                    })) = self.slots.get_mut(part.slot)
                    else {
                        return Err(format!("internal: READ cookie {cookie:#x} lost its buffer"));
                    };
                    let at = part.buf_off + filled;
                    buf[at..at + n].copy_from_slice(&self.rx_buf[self.rx_start..self.rx_start + n]);
                    self.rx_start += n;
                    self.rx_state = RxState::Payload {
                        cookie,
                        filled: filled + n,
                    };
                }
            }
        }
    }

    /// One command answered: account for it and complete its request when it was the last.
    fn finish_part(&mut self, cookie: u64, result: Result<(), BackendError>) {
        let part = self.parts.remove(&cookie).expect("finished a known cookie");
        self.bytes_in_flight -= part.payload_bytes();
        if matches!(part.cmd, Command::Write | Command::Trim) {
            self.writes_in_flight -= 1;
        }
        let slot = self.slots[part.slot]
            .as_mut()
            .expect("part of a live request");
        if let Err(e) = result {
            slot.error.get_or_insert(e);
        }
        slot.parts_left -= 1;
        if slot.parts_left > 0 {
            return;
        }
        let slot = self.slots[part.slot].take().expect("live request");
        self.free_slots.push(part.slot);
        let result = match slot.error {
            Some(e) => Err(e),
            None => Ok(match slot.op {
                SlotOp::Read(b) | SlotOp::Write(b) => Some(b),
                SlotOp::Flush | SlotOp::Trim => None,
            }),
        };
        self.ready.push_back(IoCompletion {
            tag: slot.tag,
            result,
        });
    }

    /// The connection is unusable: complete every outstanding request with `why`.
    pub(super) fn fail_all(&mut self, why: Fatal) {
        tracing::warn!(address = %self.address, reason = %why, "NBD connection failed");
        self.parts.clear();
        self.outgoing.clear();
        self.outgoing_payload = 0;
        self.bytes_in_flight = 0;
        self.writes_in_flight = 0;
        self.rx_state = RxState::Header;
        for idx in 0..self.slots.len() {
            if let Some(slot) = self.slots[idx].take() {
                self.free_slots.push(idx);
                self.ready.push_back(IoCompletion {
                    tag: slot.tag,
                    result: Err(BackendError::Protocol(why.clone())),
                });
            }
        }
        self.stream.shutdown();
        self.broken = Some(why);
    }

    /// Let outstanding commands finish, then say goodbye (NBD_CMD_DISC) and close.
    pub(super) fn disconnect(&mut self) {
        self.pump_until(|s| s.parts.is_empty());
        if self.broken.is_some() {
            return;
        }
        let disc = proto::encode_request(Command::Disc, 0, 0, 0);
        let sent = self
            .stream
            .set_nonblocking(false)
            .and_then(|()| {
                self.stream
                    .set_timeouts(Some(std::time::Duration::from_secs(5)))
            })
            .and_then(|()| self.stream.write_all(&disc));
        if let Err(e) = sent {
            tracing::debug!(address = %self.address, error = %e, "NBD_CMD_DISC not sent");
        }
        self.stream.shutdown();
        self.broken = Some("disconnected".into());
    }
}
