//! A migration connection: plain TCP, or TLS over TCP ([`super::tls`]). It offers what the
//! session code uses of a `TcpStream`: `Read`/`Write` (also through `&Link`), `try_clone`
//! so one thread reads while another writes, timeouts, `shutdown`, addresses. A TLS link's
//! clones share one TLS session; its socket options (timeouts, nodelay) are the socket's,
//! so they apply to every clone, as with `TcpStream::try_clone`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::tls::stream::TlsStream;
use super::tls::{handshake, TlsConfig, TlsError};

pub struct Link(Inner);

enum Inner {
    Plain(TcpStream),
    Tls(Arc<TlsStream>),
}

impl Link {
    /// A link without TLS.
    pub fn plain(tcp: TcpStream) -> Self {
        Self(Inner::Plain(tcp))
    }

    /// Accept TLS on `tcp` (the destination); the socket's read timeout bounds the wait.
    pub fn accept_tls(tcp: TcpStream, config: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self(Inner::Tls(Arc::new(handshake::accept(tcp, config)?))))
    }

    /// Open TLS on `tcp` to the host `name` (the source).
    pub fn connect_tls(
        tcp: TcpStream,
        config: &TlsConfig,
        name: ServerName<'static>,
    ) -> Result<Self, TlsError> {
        Ok(Self(Inner::Tls(Arc::new(handshake::connect(
            tcp, config, name,
        )?))))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.0, Inner::Tls(_))
    }

    fn tcp(&self) -> &TcpStream {
        match &self.0 {
            Inner::Plain(t) => t,
            Inner::Tls(t) => t.tcp(),
        }
    }

    /// Another handle on the same connection (for a reading thread beside a writing one).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(match &self.0 {
            Inner::Plain(t) => Inner::Plain(t.try_clone()?),
            Inner::Tls(t) => Inner::Tls(t.clone()),
        }))
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(d)
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(d)
    }

    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp().set_nodelay(on)
    }

    /// Notice a dead link within about `within`: TCP keepalive probes on an idle
    /// connection, and `TCP_USER_TIMEOUT` for data left unacknowledged (a cut cable, a
    /// peer host gone). Blocked reads and writes then fail, so post-copy can pause and
    /// recover instead of waiting forever on a connection that no longer goes anywhere.
    pub fn detect_dead_link(&self, within: Duration) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        let secs = within.as_secs().clamp(2, 3600) as u32;
        let fd = self.tcp();
        let probe = |r: nix::Result<()>| r.map_err(io::Error::from);
        probe(setsockopt(fd, sockopt::KeepAlive, &true))?;
        probe(setsockopt(fd, sockopt::TcpKeepIdle, &(secs / 2).max(1)))?;
        probe(setsockopt(fd, sockopt::TcpKeepInterval, &1))?;
        probe(setsockopt(fd, sockopt::TcpKeepCount, &(secs / 2).max(1)))?;
        probe(setsockopt(fd, sockopt::TcpUserTimeout, &(secs * 1000)))
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp().local_addr()
    }

    /// Shut the connection down; over TLS, the write side first says `close_notify`.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let Inner::Tls(t) = &self.0 {
            if how != Shutdown::Read {
                t.close_notify();
            }
        }
        self.tcp().shutdown(how)
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_tls() { "tls" } else { "tcp" };
        match self.peer_addr() {
            Ok(a) => write!(f, "Link({kind} {a})"),
            Err(_) => write!(f, "Link({kind})"),
        }
    }
}

impl Read for &Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.0 {
            Inner::Plain(t) => (&*t).read(buf),
            Inner::Tls(t) => t.read(buf),
        }
    }
}

impl Write for &Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &self.0 {
            Inner::Plain(t) => (&*t).write(buf),
            Inner::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &self.0 {
            Inner::Plain(t) => (&*t).flush(),
            Inner::Tls(t) => t.flush(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

#[cfg(test)]
mod tests;
