//! Backend spec strings: a file path, or an NBD URI in qemu's syntax.
//!
//! - `/var/lib/pw/vm1.swap` (or any path without a `scheme://`): a [`FileBackend`].
//! - `nbd://HOST[:PORT][/EXPORT]` (also `nbd+tcp://`): NBD over TCP, port 10809 by default,
//!   IPv6 hosts in brackets (`nbd://[::1]:10809/swap`).
//! - `nbd+unix:///EXPORT?socket=/path/to.sock`: NBD over a Unix socket.
//!
//! - `nfs://SERVER/EXPORT/PATH`: a file in an NFSv3 export, through libnfs ([`NfsBackend`]).
//!   `/EXPORT/PATH` is one absolute path on the server; the export is the longest one the
//!   server lists that contains it. Ports come from the server's rpcbind.
//!
//! An empty export name (`nbd://host` or `nbd+unix:///?socket=...`) selects the server's
//! default export. Export names may be percent-encoded.

use std::fmt;
use std::path::PathBuf;

use super::file::{DirectMode, FileBackend, OpenOptions, DEFAULT_QUEUE_DEPTH};
use super::nbd::{NbdAddress, NbdBackend, NbdOptions};
use super::nfs::NfsBackend;
use super::{Backend, BackendError};

/// The IANA port for NBD.
pub const NBD_DEFAULT_PORT: u16 = 10809;

/// How to open whatever a spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecOptions {
    /// Files: create if missing.
    pub create: bool,
    /// Files: open read-only (writes fail on the descriptor). NBD exports are opened as
    /// usual; a read-only user simply never writes.
    pub read_only: bool,
    /// Files: O_DIRECT policy.
    pub direct: DirectMode,
    /// Files: io_uring queue depth.
    pub queue_depth: u32,
    /// NBD: connection tuning.
    pub nbd: NbdOptions,
}

impl Default for SpecOptions {
    fn default() -> Self {
        Self {
            create: false,
            read_only: false,
            direct: DirectMode::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            nbd: NbdOptions::default(),
        }
    }
}

/// A parsed spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    File(PathBuf),
    Nbd {
        address: NbdAddress,
        export: String,
    },
    /// `path`: absolute on the server, export included.
    Nfs {
        server: String,
        path: String,
    },
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::File(path) => write!(f, "file {}", path.display()),
            BackendSpec::Nbd { address, export } => {
                write!(f, "nbd export '{export}' at {address}")
            }
            BackendSpec::Nfs { server, path } => write!(f, "nfs file {path} on {server}"),
        }
    }
}

fn invalid(spec: &str, why: impl fmt::Display) -> BackendError {
    BackendError::Setup(format!(
        "invalid backend spec '{spec}': {why} (expected a file path, nbd://HOST[:PORT]/EXPORT, \
         nbd+unix:///EXPORT?socket=PATH or nfs://SERVER/EXPORT/PATH)"
    ))
}

/// Parse a spec string (see the module docs).
pub fn parse_spec(spec: &str) -> Result<BackendSpec, BackendError> {
    if spec.trim().is_empty() {
        return Err(invalid(spec, "it is empty"));
    }
    let Some((scheme, rest)) = spec.split_once("://") else {
        return Ok(BackendSpec::File(PathBuf::from(spec)));
    };
    let scheme_like = !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_like {
        return Ok(BackendSpec::File(PathBuf::from(spec)));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "nbd" | "nbd+tcp" => parse_tcp(spec, rest),
        "nbd+unix" => parse_unix(spec, rest),
        "nfs" => parse_nfs(spec, rest),
        other => Err(invalid(spec, format!("unsupported scheme '{other}'"))),
    }
}

/// Split `authority/path?query` into its three parts.
fn split_uri(rest: &str) -> (&str, &str, Option<&str>) {
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..], query),
        None => (before_query, "", query),
    }
}

fn parse_tcp(spec: &str, rest: &str) -> Result<BackendSpec, BackendError> {
    let (authority, path, query) = split_uri(rest);
    if let Some(q) = query {
        return Err(invalid(
            spec,
            format!("unexpected query '{q}' for NBD over TCP"),
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(spec, "unterminated '[' in IPv6 host"))?;
        match after {
            "" => (host, None),
            p if p.starts_with(':') => (host, Some(&p[1..])),
            other => {
                return Err(invalid(
                    spec,
                    format!("unexpected '{other}' after IPv6 host"),
                ))
            }
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(spec, "missing host"));
    }
    let port = match port {
        None => NBD_DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid(spec, format!("bad port '{p}'")))?,
    };
    Ok(BackendSpec::Nbd {
        address: NbdAddress::Tcp {
            host: host.to_string(),
            port,
        },
        export: percent_decode(spec, path)?,
    })
}

fn parse_unix(spec: &str, rest: &str) -> Result<BackendSpec, BackendError> {
    let (authority, path, query) = split_uri(rest);
    if !authority.is_empty() {
        return Err(invalid(
            spec,
            format!(
                "nbd+unix takes no host (got '{authority}'); write nbd+unix:///EXPORT?socket=PATH"
            ),
        ));
    }
    let mut socket = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("socket", value)) if !value.is_empty() => {
                socket = Some(percent_decode(spec, value)?);
            }
            _ => {
                return Err(invalid(
                    spec,
                    format!("unsupported query parameter '{pair}'"),
                ))
            }
        }
    }
    let socket = socket.ok_or_else(|| invalid(spec, "missing ?socket=PATH"))?;
    Ok(BackendSpec::Nbd {
        address: NbdAddress::Unix(PathBuf::from(socket)),
        export: percent_decode(spec, path)?,
    })
}

fn parse_nfs(spec: &str, rest: &str) -> Result<BackendSpec, BackendError> {
    let (server, path, query) = split_uri(rest);
    if let Some(q) = query {
        return Err(invalid(spec, format!("unexpected query '{q}' for NFS")));
    }
    if server.is_empty() {
        return Err(invalid(spec, "missing NFS server"));
    }
    if server.contains(':') || server.contains('@') {
        return Err(invalid(
            spec,
            format!("NFS server '{server}' must be a bare host (ports come from its rpcbind)"),
        ));
    }
    let path = percent_decode(spec, path)?;
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if comps.len() < 2 || path.ends_with('/') {
        return Err(invalid(spec, "NFS needs /EXPORT/PATH naming a file"));
    }
    if comps.iter().any(|c| *c == "." || *c == "..") {
        return Err(invalid(spec, "NFS path must not contain '.' or '..'"));
    }
    Ok(BackendSpec::Nfs {
        server: server.to_string(),
        path: format!("/{}", comps.join("/")),
    })
}

fn percent_decode(spec: &str, s: &str) -> Result<String, BackendError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| invalid(spec, format!("bad percent escape in '{s}'")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid(spec, format!("'{s}' decodes to invalid UTF-8")))
}

/// Open the backend a spec names.
pub fn open_backend(spec: &str, opts: &SpecOptions) -> Result<Box<dyn Backend>, BackendError> {
    match parse_spec(spec)? {
        BackendSpec::File(path) => {
            let file_opts = OpenOptions {
                create: opts.create,
                read_only: opts.read_only,
                direct: opts.direct,
                queue_depth: opts.queue_depth,
            };
            Ok(Box::new(FileBackend::open(path, file_opts)?))
        }
        BackendSpec::Nbd { address, export } => {
            Ok(Box::new(NbdBackend::connect(address, &export, opts.nbd)?))
        }
        BackendSpec::Nfs { server, path } => {
            let b: NfsBackend = super::nfs::open(&server, &path, opts.create)?;
            Ok(Box::new(b))
        }
    }
}

/// A human description of what a spec names, without opening it.
pub fn describe_spec(spec: &str) -> Result<String, BackendError> {
    Ok(parse_spec(spec)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(address: NbdAddress, export: &str) -> BackendSpec {
        BackendSpec::Nbd {
            address,
            export: export.into(),
        }
    }

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn file_paths() {
        let p = parse_spec("/var/lib/x.swap").unwrap();
        assert_eq!(p, BackendSpec::File("/var/lib/x.swap".into()));
        assert_eq!(
            parse_spec("rel/dir/x.swap").unwrap(),
            BackendSpec::File("rel/dir/x.swap".into())
        );
        // Not a scheme: a path that happens to contain "://".
        assert_eq!(
            parse_spec("/odd/a://b").unwrap(),
            BackendSpec::File("/odd/a://b".into())
        );
        assert_eq!(describe_spec("/x").unwrap(), "file /x");
    }

    #[test]
    fn nbd_tcp_uris() {
        assert_eq!(
            parse_spec("nbd://127.0.0.1:10900/swap").unwrap(),
            nbd(tcp("127.0.0.1", 10900), "swap")
        );
        assert_eq!(
            parse_spec("nbd://storage.example").unwrap(),
            nbd(tcp("storage.example", NBD_DEFAULT_PORT), "")
        );
        assert_eq!(
            parse_spec("nbd+tcp://[::1]:9000/vm%201").unwrap(),
            nbd(tcp("::1", 9000), "vm 1")
        );
        assert_eq!(
            parse_spec("NBD://h/a/b").unwrap(),
            nbd(tcp("h", NBD_DEFAULT_PORT), "a/b")
        );
        assert_eq!(
            describe_spec("nbd://[::1]:9000/x").unwrap(),
            "nbd export 'x' at tcp [::1]:9000"
        );
    }

    #[test]
    fn nbd_unix_uris() {
        assert_eq!(
            parse_spec("nbd+unix:///swap?socket=/run/pw/swap.sock").unwrap(),
            nbd(NbdAddress::Unix("/run/pw/swap.sock".into()), "swap")
        );
        assert_eq!(
            parse_spec("nbd+unix://?socket=/s.sock").unwrap(),
            nbd(NbdAddress::Unix("/s.sock".into()), "")
        );
        assert_eq!(
            describe_spec("nbd+unix:///e?socket=/s").unwrap(),
            "nbd export 'e' at unix socket /s"
        );
    }

    #[test]
    fn nfs_uris() {
        assert_eq!(
            parse_spec("nfs://127.0.0.1/srv/nfs/vm%201.swap").unwrap(),
            BackendSpec::Nfs {
                server: "127.0.0.1".into(),
                path: "/srv/nfs/vm 1.swap".into()
            }
        );
        assert_eq!(
            parse_spec("NFS://filer//a//b").unwrap(),
            BackendSpec::Nfs {
                server: "filer".into(),
                path: "/a/b".into()
            }
        );
        assert_eq!(
            describe_spec("nfs://filer/a/b").unwrap(),
            "nfs file /a/b on filer"
        );
    }

    #[test]
    fn bad_specs_have_clear_errors() {
        let cases = [
            ("", "it is empty"),
            ("http://x/y", "unsupported scheme 'http'"),
            ("nbd://:10809/x", "missing host"),
            ("nbd://h:notaport/x", "bad port 'notaport'"),
            ("nbd://h:0/x", "bad port '0'"),
            ("nbd://h:99999/x", "bad port '99999'"),
            ("nbd://[::1/x", "unterminated '['"),
            ("nbd://h/x?socket=/s", "unexpected query"),
            ("nbd+unix:///swap", "missing ?socket=PATH"),
            (
                "nbd+unix:///swap?socket=",
                "unsupported query parameter 'socket='",
            ),
            ("nbd+unix://host/swap?socket=/s", "takes no host"),
            (
                "nbd+unix:///swap?socket=/s&tls=on",
                "unsupported query parameter 'tls=on'",
            ),
            ("nbd://h/bad%zz", "bad percent escape"),
            ("nbd://h/%ff", "invalid UTF-8"),
            ("nfs:///export/x", "missing NFS server"),
            ("nfs://h:2049/export/x", "must be a bare host"),
            ("nfs://h/export", "needs /EXPORT/PATH"),
            ("nfs://h/export/dir/", "needs /EXPORT/PATH"),
            ("nfs://h/export/../x", "'..'"),
            ("nfs://h/e/x?v=4", "unexpected query"),
        ];
        for (spec, want) in cases {
            let err = parse_spec(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
            assert!(err.contains("invalid backend spec"), "{spec}: {err}");
        }
    }

    #[test]
    fn open_file_spec_and_unreachable_nbd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.swap");
        let opts = SpecOptions {
            create: true,
            ..SpecOptions::default()
        };
        let mut b = open_backend(path.to_str().unwrap(), &opts).unwrap();
        b.grow(8192).unwrap();
        assert_eq!(b.size().unwrap(), 8192);
        assert!(b.describe().contains("a.swap"), "{}", b.describe());

        let sock = dir.path().join("nobody.sock");
        let spec = format!("nbd+unix:///swap?socket={}", sock.display());
        let err = open_backend(&spec, &opts).err().unwrap().to_string();
        assert!(
            err.contains("cannot connect to NBD server at unix socket")
                && err.contains("nobody.sock"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The parser never panics; a failure is always an "invalid backend spec" error.
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            if let Err(e) = parse_spec(&s) {
                prop_assert!(e.to_string().contains("invalid backend spec"));
            }
        }

        /// Built URIs parse back to what they were built from (names percent-encoded).
        #[test]
        fn built_uris_round_trip(
            host in "[a-z][a-z0-9.-]{0,20}",
            port in 1u16..,
            export in "[ -~]{0,30}",
            sock in "/[a-z0-9/._-]{1,40}",
        ) {
            let enc: String = export
                .bytes()
                .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect();
            let tcp = parse_spec(&format!("nbd://{host}:{port}/{enc}")).unwrap();
            prop_assert_eq!(tcp, BackendSpec::Nbd {
                address: NbdAddress::Tcp { host: host.clone(), port },
                export: export.clone(),
            });
            let unix = parse_spec(&format!("nbd+unix:///{enc}?socket={sock}")).unwrap();
            prop_assert_eq!(unix, BackendSpec::Nbd {
                address: NbdAddress::Unix(sock.clone().into()),
                export,
            });
        }
    }
}
