//! TLS on the migration link: a real QEMU guest moved between the two lab hosts over TLS
//! (both daemons with `--tls-cert/--tls-key/--tls-ca`), and a TLS endpoint of a real
//! `pagewise serve` (loopback) refusing each kind of peer with its exact log line: a
//! certificate of another CA, a peer that trusts another CA, no TLS, the wrong key inside
//! TLS. After every refusal the endpoint still opens a valid connection. Bad files stop
//! `serve` with an error naming them.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::migrate::auth::{open_client, Psk};
use agent::migrate::link::Link;
use agent::migrate::message::Channel;
use agent::migrate::tls::{server_name, TlsConfig};
use migration_lab::pki::{HostFiles, Pki};
use migration_lab::{dest_path, MigrationLab};
use qemu_lab::Proc;

const KEY: &str = "tls-test-key-0123456789abcdef";

/// A `pagewise serve --migrate-listen` with TLS on a free loopback port.
struct Endpoint {
    proc: Proc,
    addr: SocketAddr,
    migrate_dir: PathBuf,
    dir: tempfile::TempDir,
    pki: Pki,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.migrate_dir);
    }
}

fn serve_command(dir: &Path, addr: &str, migrate_dir: &Path, tls: &[String]) -> Command {
    let key = dir.join("psk");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    let swapdev_dir = dir.join("swap");
    let _ = std::fs::create_dir(&swapdev_dir);
    let mut cmd = Command::new(qemu_lab::pagewise_bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(dir.join("pw.sock"))
        .arg("--swapdev-dir")
        .arg(&swapdev_dir)
        .args(["--migrate-listen", addr, "--psk-file"])
        .arg(&key)
        .arg("--migrate-dir")
        .arg(migrate_dir)
        .arg("--preload")
        .arg(qemu_lab::preload_lib())
        .args(tls)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    cmd
}

impl Endpoint {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("endpoint test CA");
        let tls = pki.host(dir.path(), "endpoint", &["127.0.0.1"]).args();
        let migrate_dir = PathBuf::from(format!(
            "/dev/shm/pagewise-tls-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let cmd = serve_command(dir.path(), &addr.to_string(), &migrate_dir, &tls);
            let mut proc = Proc::spawn("pagewise-serve", cmd, dir.path());
            let start = Instant::now();
            while proc.running() && start.elapsed() < Duration::from_secs(20) {
                if proc
                    .output()
                    .contains(&format!("migration endpoint on {addr} (TLS)"))
                {
                    return Endpoint {
                        proc,
                        addr,
                        migrate_dir,
                        dir,
                        pki,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = proc.output();
            assert!(
                out.contains("binding"),
                "pagewise serve did not start:\n{out}"
            );
        }
        panic!("no free port for the migration endpoint");
    }

    /// The daemon's log line refusing `peer`.
    fn refusal(&mut self, peer: SocketAddr) -> String {
        let needle = format!("refused migration peer {peer}: ");
        let start = Instant::now();
        loop {
            let log = self.proc.output();
            if let Some(l) = log.lines().find(|l| l.contains(&needle)) {
                let why = &l[l.find(&needle).unwrap() + needle.len()..];
                // tracing appends the fields: ` peer=...`.
                return why
                    .rsplit_once(" peer=")
                    .map_or(why, |(w, _)| w)
                    .to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no refusal of {peer} logged:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client whose files are `files` (None: plain TCP), with `key`: (our address, the
    /// handshake's outcome as an error chain).
    fn dial(&self, files: Option<&HostFiles>, key: &str) -> (SocketAddr, Result<(), String>) {
        let tcp = TcpStream::connect(self.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let local = tcp.local_addr().unwrap();
        let chain = |e: &dyn std::error::Error| pagewise_hostile::error_chain(e);
        let r = (|| {
            let mut link = match files {
                None => Link::plain(tcp),
                Some(f) => {
                    let c = TlsConfig::from_files(&f.cert, &f.key, &f.ca).unwrap();
                    let name = server_name(&self.addr.to_string()).unwrap();
                    Link::connect_tls(tcp, &c, name).map_err(|e| chain(&e))?
                }
            };
            open_client(
                &mut link,
                &Psk::new(key.as_bytes().to_vec()),
                Channel::Bulk,
                rand::random(),
            )
            .map(|_| ())
            .map_err(|e| chain(&e))
        })();
        (local, r)
    }

    /// The endpoint still serves: a client of its CA with the key opens a connection.
    fn survives(&mut self) {
        assert!(
            self.proc.running(),
            "the daemon died:\n{}",
            self.proc.output()
        );
        let good = self.pki.host(self.dir.path(), "good", &["127.0.0.1"]);
        let (_, r) = self.dial(Some(&good), KEY);
        assert_eq!(r, Ok(()), "{}", self.proc.output());
    }
}

#[test]
fn a_source_with_a_certificate_of_another_ca_is_refused() {
    let mut ep = Endpoint::start();
    // Its certificate comes from another CA; it trusts the endpoint's.
    let other = Pki::new("another CA");
    let mut files = other.host(ep.dir.path(), "stranger", &["127.0.0.1"]);
    files.ca = ep.pki.host(ep.dir.path(), "unused", &[]).ca;
    let (local, r) = ep.dial(Some(&files), KEY);
    assert_eq!(
        ep.refusal(local),
        "TLS refused: the peer's certificate is not signed by our CA (--tls-ca): invalid peer \
         certificate: UnknownIssuer"
    );
    assert_eq!(
        r.unwrap_err(),
        "the connection failed during the handshake: connection I/O: TLS refused: the peer \
         rejected our certificate (is it signed by the CA the peer trusts?): received fatal \
         alert: UnknownCA"
    );
    ep.survives();
}

#[test]
fn a_source_that_trusts_another_ca_refuses_the_endpoint_and_says_why() {
    let mut ep = Endpoint::start();
    let other = Pki::new("another CA");
    let files = other.host(ep.dir.path(), "stranger", &["127.0.0.1"]);
    let (local, r) = ep.dial(Some(&files), KEY);
    assert_eq!(
        r.unwrap_err(),
        "TLS refused: the peer's certificate is not signed by our CA (--tls-ca): invalid peer \
         certificate: UnknownIssuer"
    );
    assert_eq!(
        ep.refusal(local),
        "TLS refused: the peer rejected our certificate (is it signed by the CA the peer \
         trusts?): received fatal alert: UnknownCA"
    );
    ep.survives();
}

#[test]
fn a_source_without_tls_is_refused_and_told_what_it_lacks() {
    let mut ep = Endpoint::start();
    let (local, r) = ep.dial(None, KEY);
    assert_eq!(
        ep.refusal(local),
        "the peer does not speak TLS: it sent a plain migration Hello (its daemon needs \
         --tls-cert, --tls-key and --tls-ca)"
    );
    assert_eq!(
        r.unwrap_err(),
        "the peer refused the connection: this migration endpoint requires TLS: start the \
         source daemon with --tls-cert, --tls-key and --tls-ca"
    );
    ep.survives();
}

#[test]
fn inside_tls_a_source_without_the_key_is_refused() {
    let mut ep = Endpoint::start();
    let files = ep.pki.host(ep.dir.path(), "keyless", &["127.0.0.1"]);
    let (local, r) = ep.dial(Some(&files), "not-the-key-of-this-endpoint");
    assert_eq!(
        ep.refusal(local),
        "the peer's proof of the pre-shared key is wrong (wrong key, or not our peer)"
    );
    assert_eq!(
        r.unwrap_err(),
        "the peer refused the connection: authentication failed: wrong pre-shared key"
    );
    ep.survives();
}

/// `serve` with these TLS arguments: its error output (it must fail).
fn serve_fails(tls: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let migrate_dir = PathBuf::from(format!("/dev/shm/pagewise-tls-bad-{}", std::process::id()));
    let out = serve_command(dir.path(), "127.0.0.1:0", &migrate_dir, tls)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&migrate_dir);
    assert!(!out.status.success(), "serve started with {tls:?}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn serve_names_the_tls_file_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("files CA");
    let a = pki.host(dir.path(), "a", &["127.0.0.1"]);
    let b = pki.host(dir.path(), "b", &["127.0.0.1"]);
    let missing = dir.path().join("missing.crt");
    let mut args = a.args();
    args[1] = missing.display().to_string();
    let err = serve_fails(&args);
    assert!(
        err.contains(&format!(
            "pagewise: error: --tls-cert/--tls-key/--tls-ca: reading the TLS certificate file \
             {}: ",
            missing.display()
        )),
        "{err}"
    );
    let mut args = a.args();
    args[3] = b.key.display().to_string();
    let err = serve_fails(&args);
    assert!(
        err.contains(&format!(
            "pagewise: error: --tls-cert/--tls-key/--tls-ca: the private key in {} does not \
             belong to the certificate in {}",
            b.key.display(),
            a.cert.display()
        )),
        "{err}"
    );
    // All three or none.
    let err = serve_fails(&a.args()[..2]);
    assert!(err.contains("--tls-key"), "{err}");
}

const RAM_MIB: u64 = 256;
const GUEST: &str = "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
                     memverify.verify_secs=4 memverify.duration_secs=40";

#[test]
fn postcopy_over_tls_moves_a_verifying_qemu_guest() {
    let lab = MigrationLab::with_tls("pwmtls", "800mbit");
    for d in [&lab.src, &lab.dst] {
        assert!(
            d.proc.output().contains(":7600 (TLS)"),
            "{}",
            d.proc.output()
        );
    }
    let mut guest = lab.start_guest("vm1", RAM_MIB, GUEST);
    qemu_lab::wait_for_text(
        &guest.serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut guest.qemu,
    );
    // Post-copy: the urgent channel's demand requests and answers cross one TLS session
    // from two threads on each side while the push fills the bulk one.
    let (ok, report, text) = lab.migrate("vm1", "postcopy", &[]);
    assert!(ok, "migrate over TLS failed:\n{text}\n{}", lab.logs());
    assert_eq!(report["status"], "completed", "{report}");
    assert!(report["pages_pushed"].as_u64().unwrap() > 0, "{report}");
    let serial = dest_path(&report, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(240), || lab.logs());
    qemu_lab::assert_memverify_passed(&text);
    guest.qemu.wait(Duration::from_secs(20));
    assert!(!guest.mem.0.exists(), "the source RAM file is still there");
    assert!(
        !lab.logs().contains("refused migration peer"),
        "{}",
        lab.logs()
    );
    eprintln!("postcopy over TLS: {report}");
}
