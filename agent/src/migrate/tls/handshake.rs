//! Opening a TLS connection over an accepted or dialled TCP stream, and saying in words why
//! a peer was refused.
//!
//! A peer that speaks the migration protocol without TLS is recognised by its first byte
//! (a frame starts with `P` of `PWMG`, a TLS record with 0x16): the destination reads its
//! Hello and answers with a plain `Refuse` naming the options it lacks, so such a source
//! reports why instead of a garbled handshake; a source that dials a destination without
//! TLS reads that destination's plain refusal and reports it.

use std::io::Write;
use std::net::TcpStream;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConnection, Connection, ServerConnection};

use super::stream::TlsStream;
use super::{TlsConfig, TlsError};
use crate::migrate::message::{read_message, write_message, Message};

/// What the plain refusal sent to a source without TLS says.
pub const PLAIN_REFUSAL: &str = "this migration endpoint requires TLS: start the source \
                                 daemon with --tls-cert, --tls-key and --tls-ca";

/// Why TLS failed, in the terms an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer's certificate does not chain to our CA.
    UnknownCa,
    /// The peer's certificate has expired or is not valid yet.
    Expired,
    NotYetValid,
    /// The destination's certificate does not name the address dialled.
    WrongName,
    /// The certificate is not meant for TLS client or server authentication.
    WrongPurpose,
    /// The peer's certificate is malformed or otherwise unacceptable.
    BadCertificate,
    /// The peer presented no certificate (the destination demands one).
    NoCertificate,
    /// The peer rejected our certificate.
    TheyRejectUs,
    /// The peer wanted a certificate we did not send.
    TheyWantACertificate,
    /// The peer sent something that is not TLS 1.3.
    NotTls,
    /// No protocol version or cipher suite in common.
    Incompatible,
    /// The peer ended the session with another alert.
    Alert,
    /// Anything else.
    Other,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::UnknownCa => "the peer's certificate is not signed by our CA (--tls-ca)",
            Refusal::Expired => "the peer's certificate has expired",
            Refusal::NotYetValid => "the peer's certificate is not valid yet",
            Refusal::WrongName => {
                "the peer's certificate does not name the address we dialled (its subject \
                 alternative names must hold it)"
            }
            Refusal::WrongPurpose => {
                "the peer's certificate is not for TLS server and client authentication \
                 (extended key usage)"
            }
            Refusal::BadCertificate => "the peer's certificate is not acceptable",
            Refusal::NoCertificate => {
                "the peer presented no certificate (both daemons need --tls-cert and --tls-key)"
            }
            Refusal::TheyRejectUs => {
                "the peer rejected our certificate (is it signed by the CA the peer trusts?)"
            }
            Refusal::TheyWantACertificate => "the peer wants a certificate from us",
            Refusal::NotTls => "the peer does not speak TLS 1.3",
            Refusal::Incompatible => "no TLS version or cipher suite in common with the peer",
            Refusal::Alert => "the peer ended the TLS session with an alert",
            Refusal::Other => "the TLS session failed",
        })
    }
}

/// The operator's reading of a rustls error.
pub fn describe(e: &rustls::Error) -> Refusal {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Refusal::UnknownCa,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Refusal::Expired,
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Refusal::NotYetValid
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Refusal::WrongName
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                Refusal::WrongPurpose
            }
            _ => Refusal::BadCertificate,
        },
        E::NoCertificatesPresented => Refusal::NoCertificate,
        E::AlertReceived(a) => match a {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied => Refusal::TheyRejectUs,
            AlertDescription::CertificateRequired => Refusal::TheyWantACertificate,
            AlertDescription::ProtocolVersion | AlertDescription::HandshakeFailure => {
                Refusal::Incompatible
            }
            _ => Refusal::Alert,
        },
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => Refusal::NotTls,
        E::InappropriateHandshakeMessage { .. } => Refusal::NotTls,
        E::PeerIncompatible(_) => Refusal::Incompatible,
        _ => Refusal::Other,
    }
}

/// `e` as the error a failed TLS step returns.
pub(super) fn refused(e: rustls::Error) -> TlsError {
    TlsError::Refused {
        why: describe(&e),
        source: e,
    }
}

/// An I/O error of `complete_io`: a rustls error inside, a timeout, or the socket's own.
fn io_failure(e: std::io::Error) -> TlsError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return refused(tls.clone());
    }
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => TlsError::TimedOut,
        std::io::ErrorKind::UnexpectedEof => TlsError::Closed,
        _ => TlsError::Io(e),
    }
}

/// The first byte waiting on `tcp` (the socket's read timeout bounds the wait).
fn first_byte(tcp: &TcpStream) -> Result<u8, TlsError> {
    let mut b = [0u8; 1];
    loop {
        return match tcp.peek(&mut b) {
            Ok(0) => Err(TlsError::Closed),
            Ok(_) => Ok(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => Err(io_failure(e)),
        };
    }
}

/// The first byte of a migration frame (`PWMG`).
const PLAIN_FRAME: u8 = b'P';

/// Run the handshake of `conn` over `tcp` to its end.
fn complete(mut conn: Connection, tcp: TcpStream) -> Result<TlsStream, TlsError> {
    let mut io = &tcp;
    while conn.is_handshaking() {
        match conn.complete_io(&mut io) {
            Ok((0, 0)) if conn.is_handshaking() => return Err(TlsError::Closed),
            Ok(_) => {}
            Err(e) => return Err(io_failure(e)),
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut io).map_err(TlsError::Io)?;
    }
    io.flush().map_err(TlsError::Io)?;
    Ok(TlsStream::new(tcp, conn))
}

/// The accepting side (the destination): demand TLS and a certificate from our CA.
pub fn accept(mut tcp: TcpStream, config: &TlsConfig) -> Result<TlsStream, TlsError> {
    if first_byte(&tcp)? == PLAIN_FRAME {
        // Read its Hello before answering, so the answer is not lost to a reset.
        let _ = read_message(&mut tcp, None);
        let _ = write_message(&mut tcp, &Message::Refuse(PLAIN_REFUSAL.into()));
        return Err(TlsError::PeerWithoutTls);
    }
    let conn = ServerConnection::new(config.server.clone()).map_err(refused)?;
    complete(Connection::Server(conn), tcp)
}

/// The dialling side (the source): verify the destination's certificate against our CA and
/// `name`, and present ours.
pub fn connect(
    mut tcp: TcpStream,
    config: &TlsConfig,
    name: ServerName<'static>,
) -> Result<TlsStream, TlsError> {
    let mut conn = ClientConnection::new(config.client.clone(), name).map_err(refused)?;
    while conn.wants_write() {
        conn.write_tls(&mut &tcp).map_err(TlsError::Io)?;
    }
    if first_byte(&tcp)? == PLAIN_FRAME {
        let answer = match read_message(&mut tcp, None) {
            Ok(Message::Refuse(r)) => r,
            Ok(other) => format!("{:?}", other.command()),
            Err(e) => pager::error_chain(&e),
        };
        return Err(TlsError::ServerWithoutTls { answer });
    }
    complete(Connection::Client(conn), tcp)
}
