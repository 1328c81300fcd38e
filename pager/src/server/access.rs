//! Who may use the daemon's Unix sockets (attach and control). Each socket is created mode
//! 0600 (0660 and owned by a group with `serve --socket-group`), and each connection's
//! SO_PEERCRED is checked before a byte of it is read: the daemon's own uid, the uids of
//! `--allow-uid`, and (with a socket group) peers whose group is that group are served;
//! anyone else is refused with a log line naming the peer and the rule.
//!
//! The mode is set on the socket before `bind` (Linux gives the socket file the socket
//! inode's mode, less the umask), so the file never exists with a wider mode; it is set
//! again on the path after `bind`, and the group's bits only once the group owns it.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::Mode;

/// The socket rules of a daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// The group owning the sockets (mode 0660); none: mode 0600.
    pub group: Option<u32>,
    /// Uids served besides the daemon's own.
    pub allowed_uids: Vec<u32>,
}

/// A connected peer, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Why a peer is not served, or a socket could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "pid {pid} (uid {uid}, gid {gid}) is not allowed: this daemon serves {rule} \
         (--allow-uid adds a uid)",
        pid = peer.pid, uid = peer.uid, gid = peer.gid
    )]
    NotAllowed { peer: PeerCred, rule: String },
    #[error("reading the peer's credentials (SO_PEERCRED)")]
    Credentials(#[source] nix::Error),
    #[error("creating the socket {path}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The credentials of the peer of `stream`.
pub fn peer_cred(stream: &UnixStream) -> Result<PeerCred, AccessError> {
    let c = getsockopt(stream, PeerCredentials).map_err(AccessError::Credentials)?;
    Ok(PeerCred {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

impl SocketAccess {
    /// The mode the sockets are created with.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// The uids served: the daemon's own, then `allowed_uids`.
    fn uids(&self) -> Vec<u32> {
        let mut uids = vec![nix::unistd::geteuid().as_raw()];
        for &u in &self.allowed_uids {
            if !uids.contains(&u) {
                uids.push(u);
            }
        }
        uids
    }

    /// Whether `peer` is served.
    pub fn check(&self, peer: PeerCred) -> Result<(), AccessError> {
        let uids = self.uids();
        if uids.contains(&peer.uid) || self.group == Some(peer.gid) {
            return Ok(());
        }
        let list: Vec<String> = uids.iter().map(u32::to_string).collect();
        let mut rule = format!("uid {}", list.join(", "));
        if let Some(g) = self.group {
            rule.push_str(&format!(" and group {g}"));
        }
        Err(AccessError::NotAllowed { peer, rule })
    }

    /// The peer of `stream`, if it is served.
    pub fn admit(&self, stream: &UnixStream) -> Result<PeerCred, AccessError> {
        let peer = peer_cred(stream)?;
        self.check(peer)?;
        Ok(peer)
    }

    /// Create a listening socket at `path` (no file may be there) with these rules' mode
    /// and group.
    pub fn listen(&self, path: &Path) -> Result<UnixListener, AccessError> {
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
        let failed = |source: std::io::Error| AccessError::Create {
            path: path.into(),
            source,
        };
        let errno = |e: nix::Error| failed(std::io::Error::from(e));
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(errno)?;
        // Owner-only from the start; a group's bits come once the group owns the file.
        nix::sys::stat::fchmod(fd.as_fd(), Mode::from_bits_truncate(0o600)).map_err(errno)?;
        let addr = nix::sys::socket::UnixAddr::new(path).map_err(errno)?;
        bind(fd.as_raw_fd(), &addr).map_err(errno)?;
        let set_mode = |mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)
        };
        let made = (|| {
            set_mode(0o600)?;
            if let Some(g) = self.group {
                std::os::unix::fs::chown(path, None, Some(g)).map_err(failed)?;
                set_mode(self.mode())?;
            }
            listen(&fd, Backlog::new(128).map_err(errno)?).map_err(errno)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(UnixListener::from(fd))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn sockets_are_created_owner_only_or_for_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.sock");
        let _l = SocketAccess::default().listen(&p).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        // A group of our own (the only one a non-root test may hand a file to).
        let gid = nix::unistd::getegid().as_raw();
        let q = dir.path().join("b.sock");
        let access = SocketAccess {
            group: Some(gid),
            allowed_uids: vec![],
        };
        let _l = access.listen(&q).unwrap();
        let m = std::fs::metadata(&q).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid));
        // The socket works.
        let s = UnixStream::connect(&q).unwrap();
        let peer = access.admit(&s).unwrap();
        assert_eq!((peer.uid, peer.pid), (me(), std::process::id() as i32));
    }

    #[test]
    fn peers_are_served_by_uid_or_group_and_others_refused_with_the_rule() {
        let access = SocketAccess {
            group: None,
            allowed_uids: vec![4242],
        };
        let peer = |uid, gid| PeerCred { pid: 77, uid, gid };
        assert!(access.check(peer(me(), 1)).is_ok());
        assert!(access.check(peer(4242, 1)).is_ok());
        let e = access.check(peer(5000, 5000)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "pid 77 (uid 5000, gid 5000) is not allowed: this daemon serves uid {}, 4242 \
                 (--allow-uid adds a uid)",
                me()
            )
        );
        let grouped = SocketAccess {
            group: Some(600),
            allowed_uids: vec![],
        };
        assert!(grouped.check(peer(5000, 600)).is_ok());
        assert_eq!(
            grouped.check(peer(5000, 5000)).unwrap_err().to_string(),
            format!(
                "pid 77 (uid 5000, gid 5000) is not allowed: this daemon serves uid {} and \
                 group 600 (--allow-uid adds a uid)",
                me()
            )
        );
    }
}
