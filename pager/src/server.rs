//! The multi-VM pager daemon: attach listeners (each connection is one VM), a fault-loop
//! thread per VM, a registry of attached VMs (`registry.rs`), prepared incoming VMs
//! ([`prepare`]), and the control socket ([`control`], wire format in [`protocol`]).
//!
//! One VM's failure (bad handshake, source error, VMM exit, a panic in its fault loop) tears
//! down only that VM.

pub mod access;
pub mod client;
pub mod control;
pub mod error;
pub mod migration;
pub mod prepare;
pub mod protocol;
pub mod provider;
pub mod raw_snapshot;
pub mod reattach;
mod registry;
pub mod tracking;

pub use client::{ControlClient, ControlError};
pub use error::{DaemonError, ProviderError, StartError};
pub use provider::SwapdevProvider;
pub use registry::VmEntry;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::attach::protocol::HandshakeError;
use crate::attach::server::{accept_vm, reply, AttachError, Naming, Refusal};
use crate::evict::control::EvictRegistry;
use crate::fault_loop::FaultLoopConfig;
use crate::source::PageSource;
use crate::vm::{GuestLayout, Vm};
use error::render_chain;

/// A page source opened for one VM.
pub struct OpenedSource {
    pub source: Box<dyn PageSource>,
    /// Shown in logs, `pagewise stats` and the attach reply.
    pub description: String,
    /// The swap device behind the source, if it is one (shared with the evictor).
    pub swapdev: Option<Arc<Mutex<swapdev::SwapDevice>>>,
}

/// Opens the page source for a VM by name (the CLI maps names to swap devices).
///
/// `spec` is a per-VM override of the provider's rule (a prepared VM's swap-device spec);
/// a provider that cannot honour one answers [`ProviderError::OverrideUnsupported`].
pub trait SourceProvider: Send + Sync {
    /// A stable identity of the store that would serve `vm` (e.g. the swap-device spec).
    /// Two attached VMs may never share one: the daemon refuses the second.
    fn source_key(&self, vm: &str, spec: Option<&str>) -> Result<String, ProviderError>;
    fn open(
        &self,
        vm: &str,
        spec: Option<&str>,
        layout: &GuestLayout,
    ) -> Result<OpenedSource, ProviderError>;
}

/// Daemon-wide settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub fault_loop: FaultLoopConfig,
    /// Prefetch policy name (`crate::prefetch::by_name`).
    pub prefetch: String,
    /// Longest wait for a complete handshake after a connection is accepted.
    pub handshake_timeout: Duration,
    /// A control connection with no request for this long is closed (never one whose
    /// request is being handled).
    pub control_idle_timeout: Duration,
    /// Who may connect to the attach and control sockets.
    pub access: access::SocketAccess,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            fault_loop: FaultLoopConfig::default(),
            prefetch: "none".into(),
            handshake_timeout: Duration::from_secs(5),
            control_idle_timeout: protocol::IDLE_TIMEOUT,
            access: access::SocketAccess::default(),
        }
    }
}

/// The daemon: shared by listener threads, fault loops and the control socket.
pub struct Daemon {
    config: DaemonConfig,
    provider: Arc<dyn SourceProvider>,
    vms: Mutex<HashMap<String, VmEntry>>,
    /// Incoming VMs waiting for their VMM (`prepare`).
    prepared: Mutex<HashMap<String, Arc<prepare::PreparedVm>>>,
    stop: EventFd,
    stopping: std::sync::atomic::AtomicBool,
    /// Eviction commands, when eviction is enabled ([`crate::evict::control::start`]).
    evictor: OnceLock<Arc<EvictRegistry>>,
    /// Write tracking for control-socket consumers (`dirty_start` / `dirty_harvest`).
    tracking: tracking::Tracking,
    /// The migration engine, when the binary installed one.
    migration: OnceLock<Arc<dyn migration::MigrationService>>,
}

/// Bind a Unix socket at `path` with the default access (mode 0600), replacing a stale
/// socket file (never a regular file).
pub fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    bind_unix_with(path, &access::SocketAccess::default())
}

/// [`bind_unix`] with `access`'s mode and group.
pub fn bind_unix_with(
    path: &Path,
    access: &access::SocketAccess,
) -> Result<UnixListener, DaemonError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(DaemonError::Bind {
                path: path.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; refusing to replace it",
                ),
            });
        }
    }
    access.listen(path).map_err(|e| DaemonError::Bind {
        path: path.into(),
        source: match e {
            access::AccessError::Create { source, .. } => source,
            other => std::io::Error::other(other),
        },
    })
}

impl Daemon {
    pub fn new(
        config: DaemonConfig,
        provider: Arc<dyn SourceProvider>,
    ) -> Result<Arc<Self>, DaemonError> {
        crate::prefetch::by_name(&config.prefetch, 1).map_err(DaemonError::Prefetch)?;
        let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(DaemonError::EventFd)?;
        Ok(Arc::new(Self {
            config,
            provider,
            vms: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
            stop,
            stopping: std::sync::atomic::AtomicBool::new(false),
            evictor: OnceLock::new(),
            tracking: tracking::Tracking::default(),
            migration: OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// Enable the eviction requests (once; later calls are ignored).
    pub fn set_evictor(&self, evictor: Arc<EvictRegistry>) {
        let _ = self.evictor.set(evictor);
    }

    /// The eviction service, when enabled.
    pub fn evictor(&self) -> Option<&Arc<EvictRegistry>> {
        self.evictor.get()
    }

    /// Install the migration engine (once; later calls are ignored).
    pub fn set_migration(&self, service: Arc<dyn migration::MigrationService>) {
        let _ = self.migration.set(service);
    }

    /// The migration engine, when installed.
    pub fn migration(&self) -> Option<&Arc<dyn migration::MigrationService>> {
        self.migration.get()
    }

    /// Whether VM `name` is being migrated (eviction waits for the end).
    pub fn is_migrating(&self, name: &str) -> bool {
        self.migration().is_some_and(|m| m.is_migrating(name))
    }

    /// The attached VMs, by name.
    pub fn vms(&self) -> Vec<Arc<Vm>> {
        let mut v: Vec<_> = self.lock().values().map(|e| e.vm.clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        self.lock().get(name).map(|e| e.vm.clone())
    }

    /// Named write-tracking subscriptions of control-socket consumers.
    pub fn tracking(&self) -> &tracking::Tracking {
        &self.tracking
    }

    /// A handle to send orders to VM `name`'s running fault loop.
    pub fn controller(&self, name: &str) -> Option<crate::fault_loop::LoopController> {
        self.lock().get(name).map(|e| e.controller.clone())
    }

    /// Run `f` on the registry entry of every VM (for listings).
    pub fn with_entries<R>(&self, f: impl FnOnce(&HashMap<String, VmEntry>) -> R) -> R {
        f(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmEntry>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve attach connections on `listener` until [`Daemon::shutdown`]. Blocks; run it
    /// on its own thread per listening socket.
    pub fn serve_attach(self: &Arc<Self>, listener: UnixListener, naming: Naming) {
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::error!(%e, "listener set_nonblocking failed");
            return;
        }
        loop {
            let mut fds = [
                PollFd::new(listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.stop.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    tracing::error!(%e, "poll on the attach socket failed");
                    return;
                }
            }
            if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                return;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    let daemon = self.clone();
                    let naming = naming.clone();
                    // The handshake runs on its own thread: a slow or silent client must not
                    // hold up other VMs' attaches.
                    std::thread::spawn(move || daemon.attach(stream, &naming));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(%e, "accept failed"),
            }
        }
    }

    /// Handle one attach connection to completion of the handshake.
    pub fn attach(self: &Arc<Self>, stream: UnixStream, naming: &Naming) {
        if let Err(e) = self.config.access.admit(&stream) {
            tracing::warn!("refused attach connection: {}", render_chain(&e));
            return;
        }
        if let Err(e) = stream.set_nonblocking(false) {
            tracing::warn!(%e, "attach socket set_nonblocking(false) failed");
        }
        let attached = match accept_vm(&stream, naming, self.config.handshake_timeout) {
            Ok(a) => a,
            Err((e, wants_reply)) => {
                let peer = crate::attach::server::peer_info(&stream);
                if matches!(e, AttachError::Handshake(HandshakeError::Truncated(0))) {
                    // A connection closed without a byte: the preload library's load-time
                    // reachability probe (or a health check). Not an attach attempt.
                    tracing::debug!(
                        pid = peer.pid,
                        uid = peer.uid,
                        "probe connection (closed without a handshake)"
                    );
                    return;
                }
                let why = render_chain(&e);
                tracing::warn!(pid = peer.pid, uid = peer.uid, error = %why, "attach refused");
                if wants_reply {
                    reply(
                        &stream,
                        Err(Refusal {
                            why: &why,
                            retry: false,
                        }),
                    );
                }
                return;
            }
        };
        tracing::info!(vm = %attached.name, flavour = attached.flavour, pid = attached.peer.pid,
            uid = attached.peer.uid, regions = attached.layout.regions().len(),
            bytes = attached.layout.span_bytes(), "attach request");
        let wants_reply = attached.wants_reply;
        let reattach = attached.reattach;
        match self.start_vm(attached, &stream) {
            Ok(started) => {
                if wants_reply {
                    reply(&stream, Ok((&started.description, started.reattach)));
                }
            }
            Err(e) => {
                let why = render_chain(&e);
                // A re-attach of a VM whose device another host holds waits for it.
                let retry = reattach && e.may_pass();
                tracing::warn!(error = %why, retry, "attach refused");
                if wants_reply {
                    reply(&stream, Err(Refusal { why: &why, retry }));
                }
            }
        }
    }

    /// Stop accepting, stop every VM's loop and wait for them.
    pub fn shutdown(&self) {
        // Set under the registry lock, so no attach in progress can register a VM after
        // the registry was drained below.
        {
            let _registry = self.lock();
            self.stopping
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let _ = self.stop.write(1);
        let entries: Vec<VmEntry> = self.lock().drain().map(|(_, e)| e).collect();
        for e in entries {
            Self::stop_entry(e);
        }
    }

    /// Readable once shutdown was requested (for other threads' poll sets).
    pub fn stop_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stop.as_fd()
    }

    /// Block until `fd` is readable (true) or shutdown was requested (false). A failed poll
    /// is logged, naming `what`, and reads as shutdown: the caller's service loop ends.
    pub fn wait_readable(&self, fd: std::os::fd::BorrowedFd<'_>, what: &str) -> bool {
        loop {
            let mut fds = [
                PollFd::new(fd, PollFlags::POLLIN),
                PollFd::new(self.stop_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    tracing::error!(%e, "poll on the {what} failed");
                    return false;
                }
            }
            return fds[1].revents().is_none_or(|r| r.is_empty());
        }
    }
}
