//! Where an NBD server lives and the byte stream to it (Unix socket or TCP).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{sendmsg, MsgFlags};

use crate::backend::BackendError;

/// The address of an NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A Unix stream socket, e.g. `qemu-nbd -k PATH`.
    Unix(PathBuf),
    /// A TCP host (name or address) and port.
    Tcp { host: String, port: u16 },
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Unix(path) => write!(f, "unix socket {}", path.display()),
            NbdAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp [{host}]:{port}")
            }
            NbdAddress::Tcp { host, port } => write!(f, "tcp {host}:{port}"),
        }
    }
}

/// A connected, blocking byte stream to the server.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Connect to `addr`, giving up on TCP after `timeout` per resolved address.
    pub fn connect(addr: &NbdAddress, timeout: Duration) -> Result<Self, BackendError> {
        let fail = |e: io::Error| {
            BackendError::Setup(format!("cannot connect to NBD server at {addr}: {e}"))
        };
        match addr {
            NbdAddress::Unix(path) => UnixStream::connect(path).map(Stream::Unix).map_err(fail),
            NbdAddress::Tcp { host, port } => {
                let mut last = io::Error::new(
                    io::ErrorKind::NotFound,
                    "host name resolved to no addresses",
                );
                for sa in (host.as_str(), *port).to_socket_addrs().map_err(fail)? {
                    match TcpStream::connect_timeout(&sa, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(fail)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(fail(last))
            }
        }
    }

    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// `sendmsg` with `MSG_NOSIGNAL`: a peer that hung up yields EPIPE, never SIGPIPE.
    pub fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.as_fd().as_raw_fd();
        sendmsg::<()>(fd, bufs, &[], MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
    }

    /// Send all of `data` (blocking socket), without SIGPIPE.
    pub fn send_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.send_vectored(&[IoSlice::new(data)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.send_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}
