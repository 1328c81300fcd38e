use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::testpki::{HostFiles, Pki};
use super::*;
use crate::migrate::auth::{open_client, open_server, AuthError, Psk};
use crate::migrate::link::Link;
use crate::migrate::message::Channel;

fn config(f: &HostFiles) -> TlsConfig {
    TlsConfig::from_files(&f.cert, &f.key, &f.ca).unwrap()
}

fn key() -> Psk {
    Psk::new(b"0123456789abcdef".to_vec())
}

/// A source dialling `127.0.0.1` and a destination accepting, each with TLS or not, then
/// the PSK handshake inside: (the source's outcome, the destination's), as error chains.
fn migrate_link(
    source: Option<TlsConfig>,
    destination: Option<TlsConfig>,
) -> (Result<(), String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut link = match &destination {
            Some(c) => {
                Link::accept_tls(s.try_clone().unwrap(), c).map_err(|e| pager::error_chain(&e))?
            }
            None => Link::plain(s.try_clone().unwrap()),
        };
        let r = open_server(&mut link, &key()).map_err(|e| pager::error_chain(&e));
        // Keep the socket open until the source has read our answer.
        std::thread::sleep(Duration::from_millis(200));
        drop(s);
        r.map(|_| ())
    });
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let client = (|| {
        let mut link = match &source {
            Some(c) => Link::connect_tls(s, c, server_name("127.0.0.1:7600").unwrap())
                .map_err(|e| pager::error_chain(&e))?,
            None => Link::plain(s),
        };
        open_client(&mut link, &key(), Channel::Bulk, [7; 16])
            .map(|_| ())
            .map_err(|e| pager::error_chain(&e))
    })();
    (client, server.join().unwrap())
}

struct Hosts {
    _dir: tempfile::TempDir,
    src: TlsConfig,
    dst: TlsConfig,
    /// A source with a certificate of another CA (that trusts only its own CA).
    stranger: TlsConfig,
    /// A destination certificate without the address the source dials.
    misnamed: TlsConfig,
}

fn hosts() -> Hosts {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("pagewise test CA");
    let other = Pki::new("another CA");
    Hosts {
        src: config(&pki.host(dir.path(), "src", &["127.0.0.1"])),
        dst: config(&pki.host(dir.path(), "dst", &["127.0.0.1"])),
        stranger: config(&other.host(dir.path(), "stranger", &["127.0.0.1"])),
        misnamed: config(&pki.host(dir.path(), "misnamed", &["10.9.9.9", "elsewhere.test"])),
        _dir: dir,
    }
}

#[test]
fn both_with_certificates_of_one_ca_and_the_key_open_the_link() {
    let h = hosts();
    let (c, s) = migrate_link(Some(h.src), Some(h.dst));
    assert_eq!(c, Ok(()));
    assert_eq!(s, Ok(()));
}

#[test]
fn a_source_with_a_certificate_of_another_ca_is_refused() {
    let h = hosts();
    let (c, s) = migrate_link(Some(h.stranger), Some(h.dst));
    // TLS 1.3: the source sees the destination's certificate first; its CA does not sign
    // that either, so the source ends the handshake and the destination is told why.
    assert_eq!(
        c.unwrap_err(),
        "TLS refused: the peer's certificate is not signed by our CA (--tls-ca): invalid peer \
         certificate: UnknownIssuer"
    );
    assert_eq!(
        s.unwrap_err(),
        "TLS refused: the peer rejected our certificate (is it signed by the CA the peer \
         trusts?): received fatal alert: UnknownCA"
    );
}

#[test]
fn a_destination_that_rejects_our_certificate_says_so_on_the_first_read() {
    // The source trusts the destination's CA, the destination does not trust the source's.
    let dir = tempfile::tempdir().unwrap();
    let (pki, other) = (Pki::new("ours"), Pki::new("theirs"));
    let dst = pki.host(dir.path(), "dst", &["127.0.0.1"]);
    let src = other.host(dir.path(), "src", &["127.0.0.1"]);
    let src = TlsConfig::from_files(&src.cert, &src.key, &dst.ca).unwrap();
    let (c, s) = migrate_link(Some(src), Some(config(&dst)));
    assert_eq!(
        s.unwrap_err(),
        "TLS refused: the peer's certificate is not signed by our CA (--tls-ca): invalid peer \
         certificate: UnknownIssuer"
    );
    assert_eq!(
        c.unwrap_err(),
        "the connection failed during the handshake: connection I/O: TLS refused: the peer \
         rejected our certificate (is it signed by the CA the peer trusts?): received fatal \
         alert: UnknownCA"
    );
}

#[test]
fn a_destination_whose_certificate_does_not_name_the_address_is_refused() {
    let h = hosts();
    let (c, s) = migrate_link(Some(h.src), Some(h.misnamed));
    assert!(
        c.as_ref().unwrap_err().starts_with(
            "TLS refused: the peer's certificate does not name the address we dialled (its \
             subject alternative names must hold it): invalid peer certificate: certificate not \
             valid for name \"127.0.0.1\""
        ),
        "{c:?}"
    );
    assert!(s.is_err(), "{s:?}");
}

#[test]
fn a_source_without_tls_is_told_what_it_lacks() {
    let h = hosts();
    let (c, s) = migrate_link(None, Some(h.dst));
    assert_eq!(
        s.unwrap_err(),
        "the peer does not speak TLS: it sent a plain migration Hello (its daemon needs \
         --tls-cert, --tls-key and --tls-ca)"
    );
    assert_eq!(
        c.unwrap_err(),
        format!(
            "the peer refused the connection: {}",
            handshake::PLAIN_REFUSAL
        )
    );
}

#[test]
fn a_destination_without_tls_is_named_as_such() {
    let h = hosts();
    let (c, s) = migrate_link(Some(h.src), None);
    assert_eq!(
        c.unwrap_err(),
        "the destination does not speak TLS; it answered in plain text: bad frame header: bad \
         frame magic [16, 03, 01, 00] (not a pagewise migration peer?)"
    );
    assert!(s.is_err(), "{s:?}");
}

#[test]
fn the_pre_shared_key_is_still_checked_inside_tls() {
    let h = hosts();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = h.dst.clone();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut link = Link::accept_tls(s, &dst).unwrap();
        let r = open_server(&mut link, &key());
        std::thread::sleep(Duration::from_millis(200));
        r
    });
    let mut link = Link::connect_tls(
        TcpStream::connect(addr).unwrap(),
        &h.src,
        server_name(&addr.to_string()).unwrap(),
    )
    .unwrap();
    let wrong = Psk::new(b"not-the-right-key!".to_vec());
    let c = open_client(&mut link, &wrong, Channel::Urgent, [1; 16]);
    assert_eq!(
        c.unwrap_err().to_string(),
        "the peer refused the connection: authentication failed: wrong pre-shared key"
    );
    assert!(matches!(server.join().unwrap(), Err(AuthError::BadProof)));
}

fn load(cert: &Path, key: &Path, ca: &Path) -> String {
    pager::error_chain(&TlsConfig::from_files(cert, key, ca).unwrap_err())
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("files CA");
    let a = pki.host(dir.path(), "a", &["127.0.0.1"]);
    let b = pki.host(dir.path(), "b", &["127.0.0.1"]);
    let missing = dir.path().join("missing.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no PEM here\n").unwrap();
    let d = |p: &Path| p.display().to_string();
    assert!(
        load(&missing, &a.key, &a.ca).starts_with(&format!(
            "reading the TLS certificate file {}: ",
            d(&missing)
        )),
        "{}",
        load(&missing, &a.key, &a.ca)
    );
    assert_eq!(
        load(&empty, &a.key, &a.ca),
        format!(
            "reading the TLS certificate file {}: no items found",
            d(&empty)
        )
    );
    assert_eq!(
        load(&a.cert, &empty, &a.ca),
        format!(
            "reading the TLS private key file {}: no items found",
            d(&empty)
        )
    );
    assert_eq!(
        load(&a.cert, &a.key, &empty),
        format!("reading the TLS CA file {}: no items found", d(&empty))
    );
    assert_eq!(
        load(&a.cert, &b.key, &a.ca),
        format!(
            "the private key in {} does not belong to the certificate in {}",
            d(&b.key),
            d(&a.cert)
        )
    );
    // A key file given as the certificate: no certificate in it.
    assert_eq!(
        load(&a.key, &a.key, &a.ca),
        format!(
            "reading the TLS certificate file {}: no items found",
            d(&a.key)
        )
    );
}

#[test]
fn server_names_come_from_the_address_dialled() {
    assert_eq!(
        server_name("10.77.0.2:7600").unwrap(),
        ServerName::try_from("10.77.0.2").unwrap()
    );
    assert_eq!(
        server_name("[::1]:7600").unwrap(),
        ServerName::try_from("::1").unwrap()
    );
    assert_eq!(
        server_name("dst.example:7600").unwrap(),
        ServerName::try_from("dst.example").unwrap()
    );
    assert_eq!(
        server_name("bad name:1").unwrap_err().to_string(),
        "\"bad name:1\" is not a host name or IP address a certificate can be checked against"
    );
}
