//! TLS for the migration link (rustls, TLS 1.3, userspace: these kernels have no `tls` ULP).
//! Both daemons present a certificate and verify the other's against one CA (`--tls-cert`,
//! `--tls-key`, `--tls-ca`): the destination demands a client certificate, the source
//! checks that the destination's certificate names the host it dialled. The pre-shared-key
//! handshake ([`super::auth`]) then runs inside TLS, so a peer must pass both.
//!
//! [`TlsConfig::from_files`] checks every file up front and names the one at fault;
//! [`handshake`] opens a connection and says why a peer was refused; [`stream`] is the
//! connection shared by a reading and a writing thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub mod handshake;
pub mod stream;

pub use handshake::{describe, Refusal};

/// Why a TLS configuration could not be made, or a TLS connection opened.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS certificate file {path}")]
    CertFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("reading the TLS private key file {path}")]
    KeyFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("reading the TLS CA file {path}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file {path} holds a certificate that cannot be a trust anchor")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate {cert} with the key {key} is not usable")]
    BadCertOrKey {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("no TLS configuration can be made of these files")]
    Config(#[source] rustls::Error),
    #[error("the CA file {path} cannot verify client certificates")]
    Verifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{0:?} is not a host name or IP address a certificate can be checked against")]
    ServerName(String),
    #[error("TLS refused: {why}")]
    Refused {
        why: Refusal,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "the peer does not speak TLS: it sent a plain migration Hello (its daemon needs \
         --tls-cert, --tls-key and --tls-ca)"
    )]
    PeerWithoutTls,
    #[error("the destination does not speak TLS; it answered in plain text: {answer}")]
    ServerWithoutTls { answer: String },
    #[error("the peer sent nothing during the TLS handshake for longer than the read timeout")]
    TimedOut,
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
    #[error("the connection failed during the TLS handshake")]
    Io(#[source] std::io::Error),
}

/// This host's certificate and key, and the CA both daemons' certificates come from.
#[derive(Clone)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    cert: PathBuf,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TlsConfig({})", self.cert.display())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// Load `cert` (PEM: this host's certificate, then any intermediates), `key` (PEM:
    /// PKCS#8, PKCS#1 or SEC1) and `ca` (PEM: one or more CA certificates). The key must
    /// belong to the certificate.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CertFile {
                path: cert.into(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::CertFile {
                path: cert.into(),
                source: rustls::pki_types::pem::Error::NoItemsFound,
            });
        }
        let private = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::KeyFile {
            path: key.into(),
            source,
        })?;
        let anchors = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| TlsError::CaFile {
                path: ca.into(),
                source,
            })?;
        if anchors.is_empty() {
            return Err(TlsError::CaFile {
                path: ca.into(),
                source: rustls::pki_types::pem::Error::NoItemsFound,
            });
        }
        let mut roots = RootCertStore::empty();
        for a in anchors {
            roots.add(a).map_err(|source| TlsError::BadCa {
                path: ca.into(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let unusable = |source: rustls::Error| match source {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                TlsError::KeyMismatch {
                    cert: cert.into(),
                    key: key.into(),
                }
            }
            source => TlsError::BadCertOrKey {
                cert: cert.into(),
                key: key.into(),
                source,
            },
        };
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|source| TlsError::Verifier {
                    path: ca.into(),
                    source,
                })?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(unusable)?;
        // No resumption: every connection proves its certificate afresh.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(unusable)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            cert: cert.into(),
        })
    }
}

/// The name the destination's certificate must carry, from the `HOST:PORT` the source
/// dials: an IP address (a certificate's IP SAN) or a DNS name.
pub fn server_name(to: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match to.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => to,
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(to.into()))
}

#[cfg(test)]
pub(crate) mod testpki;

#[cfg(test)]
mod tests;
