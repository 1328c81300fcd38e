//! The typed control client: `ControlClient::connect(path)?.call(&Request)?`.
//!
//! One connection serves any number of calls, answered in order. A call waits for its answer
//! as long as the daemon takes (an `evict` with `wait` may take minutes) unless a timeout was
//! set with [`ControlClient::set_timeout`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{ProtocolError, Request, Response, MAX_REQUEST_BYTES};

/// Largest answer read (a full `census` with its runs is a few MiB).
const MAX_RESPONSE_BYTES: u64 = MAX_REQUEST_BYTES as u64 * 64;

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("connecting to the control socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O")]
    Io(#[source] std::io::Error),
    #[error("the daemon closed the connection before answering")]
    Closed,
    #[error("the daemon's answer is malformed")]
    Malformed(#[source] ProtocolError),
    /// The daemon answered with an error (its message includes the causes).
    #[error("the daemon refused: {message}")]
    Daemon { message: String },
    #[error("the daemon answered {got:?} to a {expected:?} request")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// A connection to the daemon's control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
            path: path.into(),
            source,
        })?;
        let writer = stream.try_clone().map_err(ControlError::Io)?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Longest wait for an answer (default: none, wait as long as the operation takes).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), ControlError> {
        self.writer
            .set_read_timeout(timeout)
            .map_err(ControlError::Io)
    }

    /// Send one raw request line (tests and `pagewise stats --request`; one line: a newline
    /// inside would make two requests) and read the answer.
    pub fn call_raw(&mut self, line: &str) -> Result<Response, ControlError> {
        let mut line = line.trim_end().to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(ControlError::Io)?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_RESPONSE_BYTES)
            .read_until(b'\n', &mut answer)
            .map_err(ControlError::Io)?;
        if n == 0 {
            return Err(ControlError::Closed);
        }
        if answer.last() != Some(&b'\n') {
            return Err(ControlError::Malformed(ProtocolError::ResponseTooLarge {
                limit: MAX_RESPONSE_BYTES,
            }));
        }
        Response::decode(&answer).map_err(ControlError::Malformed)
    }

    /// Send `request`, wait for its answer; a daemon error answer is [`ControlError::Daemon`].
    pub fn call(&mut self, request: &Request) -> Result<Response, ControlError> {
        match self.call_raw(&request.encode())? {
            Response::Error { message } => Err(ControlError::Daemon { message }),
            r => Ok(r),
        }
    }
}

/// Match the one response variant a request expects, else [`ControlError::Unexpected`]:
/// `expect_response!(client.call(&req)?, Response::Stats(s) => s, "stats")`.
#[macro_export]
macro_rules! expect_response {
    ($resp:expr, $pat:pat => $out:expr, $expected:literal) => {
        match $resp {
            $pat => Ok($out),
            other => Err($crate::server::client::ControlError::Unexpected {
                expected: $expected,
                got: other.kind(),
            }),
        }
    };
}

impl ControlClient {
    /// `stats` of every VM or one.
    pub fn stats(
        &mut self,
        vm: Option<&str>,
    ) -> Result<super::protocol::StatsReport, ControlError> {
        let r = self.call(&Request::Stats {
            vm: vm.map(str::to_string),
        })?;
        expect_response!(r, Response::Stats(s) => s, "stats")
    }

    /// `evict_status` of a VM.
    pub fn evict_status(
        &mut self,
        vm: &str,
    ) -> Result<super::protocol::EvictJobStatus, ControlError> {
        let r = self.call(&Request::EvictStatus { vm: vm.into() })?;
        expect_response!(r, Response::EvictStatus(s) => s, "evict_status")
    }
}
