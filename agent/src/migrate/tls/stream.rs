//! One TLS connection used by a reading thread and a writing thread at once (the urgent
//! channel: requests one way, answers the other), as a `TcpStream` and its `try_clone` are.
//!
//! The rustls state sits behind one lock that is held only to encrypt, decrypt and move
//! bytes between buffers, never across a blocking socket call:
//! * a reader takes the read lock (readers queue behind each other), decrypts what rustls
//!   already holds, and otherwise reads the socket **without** the state lock, then feeds
//!   the bytes in;
//! * a writer takes the write lock (it orders the records on the socket), encrypts under
//!   the state lock into its own buffer, and writes that buffer to the socket without the
//!   state lock.
//!
//! So a reader blocked on a silent peer never stops a writer, and the reverse. Records the
//! reader's side makes (an alert) are sent by whoever next holds the write lock; the reader
//! sends them itself when no writer does. A write that failed part-way leaves the stream
//! unusable for writes (its record sequence is broken); later writes report it. The end of
//! the TCP stream without a TLS `close_notify` reads as the end of the stream, as on plain
//! TCP: every migration frame is length-prefixed, so a cut inside one is still caught.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard};

use rustls::Connection;

use super::handshake::refused;

/// Largest ciphertext rustls buffers before a write goes to the socket.
const SEND_BUFFER: usize = 256 * 1024;
/// One socket read.
const READ_CHUNK: usize = 64 * 1024;

pub struct TlsStream {
    tcp: TcpStream,
    conn: Mutex<Connection>,
    reading: Mutex<Reading>,
    writing: Mutex<Writing>,
}

/// Ciphertext read from the socket and not yet taken by rustls.
struct Reading {
    buf: Vec<u8>,
    start: usize,
    /// The socket reached its end; `fed`: rustls has been told.
    eof: bool,
    fed: bool,
}

struct Writing {
    out: Vec<u8>,
    /// Why writing stopped (a socket write failed part-way).
    broken: Option<io::ErrorKind>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TLS failure as the `io::Error` the stream's readers and writers see; its message says
/// why in words (see [`super::Refusal`]).
fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, refused(e))
}

impl TlsStream {
    pub(super) fn new(tcp: TcpStream, mut conn: Connection) -> Self {
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Self {
            tcp,
            conn: Mutex::new(conn),
            reading: Mutex::new(Reading {
                buf: Vec::with_capacity(READ_CHUNK),
                start: 0,
                eof: false,
                fed: false,
            }),
            writing: Mutex::new(Writing {
                out: Vec::with_capacity(SEND_BUFFER + 4096),
                broken: None,
            }),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Move every record rustls wants sent into `w.out` and write it to the socket.
    fn send(&self, w: &mut Writing, conn: Option<MutexGuard<'_, Connection>>) -> io::Result<()> {
        if let Some(kind) = w.broken {
            return Err(io::Error::new(
                kind,
                "an earlier write on this TLS connection failed part-way",
            ));
        }
        {
            let mut c = conn.unwrap_or_else(|| lock(&self.conn));
            while c.wants_write() {
                c.write_tls(&mut w.out)?;
            }
        }
        if w.out.is_empty() {
            return Ok(());
        }
        let r = (&self.tcp).write_all(&w.out);
        w.out.clear();
        if let Err(e) = &r {
            w.broken = Some(e.kind());
        }
        r
    }

    /// Send what the reader's side made, unless a writer holds the write lock (it sends it
    /// with its own records).
    fn send_from_reader(&self) {
        if let Ok(mut w) = self.writing.try_lock() {
            let _ = self.send(&mut w, None);
        }
    }

    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut r = lock(&self.reading);
        loop {
            let (outcome, wants_write) = {
                let mut c = lock(&self.conn);
                let processed = self.feed(&mut r, &mut c);
                let outcome = match processed {
                    Err(e) => Some(Err(tls_io_error(e))),
                    Ok(()) => match c.reader().read(buf) {
                        Ok(n) => Some(Ok(n)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        // The TCP end without close_notify: the end, as on plain TCP.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Some(Ok(0)),
                        Err(e) => Some(Err(e)),
                    },
                };
                (outcome, c.wants_write())
            };
            if wants_write {
                self.send_from_reader();
            }
            if let Some(o) = outcome {
                return o;
            }
            if r.fed {
                return Ok(0);
            }
            if r.start < r.buf.len() {
                return Err(io::Error::other(
                    "TLS: received bytes rustls neither takes nor decrypts",
                ));
            }
            // rustls took every byte and wants more: read the socket, unlocked.
            r.buf.clear();
            r.start = 0;
            r.buf.resize(READ_CHUNK, 0);
            let n = loop {
                match (&self.tcp).read(&mut r.buf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            match n {
                Ok(n) => {
                    r.buf.truncate(n);
                    r.eof = n == 0;
                }
                Err(e) => {
                    r.buf.clear();
                    return Err(e);
                }
            }
        }
    }

    /// Hand rustls the ciphertext read so far (as much as it takes) and process it.
    fn feed(&self, r: &mut Reading, c: &mut Connection) -> Result<(), rustls::Error> {
        while r.start < r.buf.len() {
            let mut rest = &r.buf[r.start..];
            match c.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(n) => r.start += n,
                // Its plaintext buffer is full: the caller reads that first.
                Err(_) => break,
            }
            c.process_new_packets()?;
        }
        if r.eof && !r.fed && r.start == r.buf.len() {
            let _ = c.read_tls(&mut &[][..]);
            r.fed = true;
        }
        c.process_new_packets()?;
        Ok(())
    }

    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut w = lock(&self.writing);
        let mut c = lock(&self.conn);
        let n = c.writer().write(buf)?;
        self.send(&mut w, Some(c))?;
        Ok(n)
    }

    pub fn flush(&self) -> io::Result<()> {
        let mut w = lock(&self.writing);
        let mut c = lock(&self.conn);
        c.writer().flush()?;
        self.send(&mut w, Some(c))
    }

    /// Send `close_notify` (unless a writer is busy: then the TCP shutdown alone ends it).
    pub fn close_notify(&self) {
        if let Ok(mut w) = self.writing.try_lock() {
            let c = {
                let mut c = lock(&self.conn);
                c.send_close_notify();
                c
            };
            let _ = self.send(&mut w, Some(c));
        }
    }
}
