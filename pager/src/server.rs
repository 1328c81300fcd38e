//! The multi-VM pager daemon: attach listeners (each connection is one VM), a fault-loop
//! thread per VM, a registry of attached VMs, and the control socket ([`control`]).
//!
//! One VM's failure (bad handshake, source error, VMM exit) tears down only that VM.

pub mod control;
pub mod provider;

pub use provider::SwapdevProvider;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::attach::protocol::HandshakeError;
use crate::attach::server::{accept_vm, reply, AttachError, AttachedVm, Naming};
use crate::fault_loop::{FaultLoop, FaultLoopConfig};
use crate::source::PageSource;
use crate::vm::{GuestLayout, Vm};

/// A page source opened for one VM.
pub struct OpenedSource {
    pub source: Box<dyn PageSource>,
    /// Shown in logs, `pagewise stats` and the attach reply.
    pub description: String,
    /// The swap device behind the source, if it is one (shared with the evictor).
    pub swapdev: Option<Arc<Mutex<swapdev::SwapDevice>>>,
}

/// Opens the page source for a VM by name (the CLI maps names to swap devices).
pub trait SourceProvider: Send + Sync {
    /// A stable identity of the store that would serve `vm` (e.g. the swap-device spec).
    /// Two attached VMs may never share one: the daemon refuses the second.
    fn source_key(&self, vm: &str) -> Result<String, String>;
    fn open(&self, vm: &str, layout: &GuestLayout) -> Result<OpenedSource, String>;
}

/// Daemon-wide settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub fault_loop: FaultLoopConfig,
    /// Prefetch policy name (`crate::prefetch::by_name`).
    pub prefetch: String,
    /// Longest wait for a complete handshake after a connection is accepted.
    pub handshake_timeout: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            fault_loop: FaultLoopConfig::default(),
            prefetch: "none".into(),
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// One attached VM in the registry.
pub struct VmEntry {
    pub vm: Arc<Vm>,
    pub flavour: &'static str,
    pub prefetch: String,
    /// [`SourceProvider::source_key`] of the store serving it.
    pub source_key: String,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the VMM's attach connection, to tell whether it has gone.
    connection: Option<OwnedFd>,
}

impl VmEntry {
    /// The VMM closed its attach connection (its fault loop may not have noticed yet).
    fn vmm_gone(&self) -> bool {
        let Some(c) = &self.connection else {
            return false;
        };
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        let mut fds = [PollFd::new(c.as_fd(), rdhup)];
        match poll(&mut fds, PollTimeout::ZERO) {
            // Unknown bits (POLLRDHUP) make revents() None.
            Ok(_) => fds[0]
                .revents()
                .is_none_or(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | rdhup)),
            Err(_) => false,
        }
    }
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// The daemon: shared by listener threads, fault loops and the control socket.
pub struct Daemon {
    config: DaemonConfig,
    provider: Arc<dyn SourceProvider>,
    vms: Mutex<HashMap<String, VmEntry>>,
    stop: EventFd,
    stopping: std::sync::atomic::AtomicBool,
    commands: control::CommandRegistry,
}

/// Bind a Unix socket at `path`, replacing a stale socket file (never a regular file).
pub fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
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
    UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        path: path.into(),
        source,
    })
}

impl Daemon {
    pub fn new(
        config: DaemonConfig,
        provider: Arc<dyn SourceProvider>,
    ) -> Result<Arc<Self>, DaemonError> {
        crate::prefetch::by_name(&config.prefetch, 1)
            .map_err(|e| DaemonError::Setup(e.to_string()))?;
        let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| DaemonError::Setup(format!("eventfd: {e}")))?;
        let daemon = Arc::new(Self {
            config,
            provider,
            vms: Mutex::new(HashMap::new()),
            stop,
            stopping: std::sync::atomic::AtomicBool::new(false),
            commands: control::CommandRegistry::default(),
        });
        control::register_builtin_commands(&daemon.commands);
        Ok(daemon)
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The control-socket command registry (other components add commands here).
    pub fn commands(&self) -> &control::CommandRegistry {
        &self.commands
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
                tracing::warn!(pid = peer.pid, uid = peer.uid, %e, "attach refused");
                if wants_reply {
                    reply(&stream, Err(&e.to_string()));
                }
                return;
            }
        };
        tracing::info!(vm = %attached.name, flavour = attached.flavour, pid = attached.peer.pid,
            uid = attached.peer.uid, regions = attached.layout.regions().len(),
            bytes = attached.layout.span_bytes(), "attach request");
        let wants_reply = attached.wants_reply;
        match self.start_vm(attached, &stream) {
            Ok(description) => {
                if wants_reply {
                    reply(&stream, Ok(&description));
                }
            }
            Err(e) => {
                tracing::warn!(%e, "attach refused");
                if wants_reply {
                    reply(&stream, Err(&e));
                }
            }
        }
    }

    /// Open the source, check sizes, register the VM and start its fault loop.
    fn start_vm(self: &Arc<Self>, a: AttachedVm, stream: &UnixStream) -> Result<String, String> {
        let name = a.name.clone();
        let key = self.provider.source_key(&name)?;
        self.reap_departed(&name, &key);
        Self::check_free(&self.lock(), &name, &key)?;
        let opened = self.provider.open(&name, &a.layout)?;
        let src_bytes = opened.source.capacity_pages() * opened.source.page_size() as u64;
        if opened.source.page_size() != a.layout.page_size() {
            return Err(format!(
                "page size mismatch: the VM uses {} bytes, {} has {} bytes",
                a.layout.page_size(),
                opened.description,
                opened.source.page_size()
            ));
        }
        a.layout
            .check_fits(&opened.description, src_bytes)
            .map_err(|e| e.to_string())?;
        let prefetch = crate::prefetch::by_name(&self.config.prefetch, a.layout.pages())
            .map_err(|e| e.to_string())?;
        let connection: OwnedFd = stream
            .try_clone()
            .map_err(|e| format!("duplicating the attach socket: {e}"))?
            .into();
        let watch = connection.try_clone().ok();
        let mut vm = Vm::new(name.clone(), a.uffd, a.layout, a.memory_file, a.peer);
        vm.wp_registered = a.wp_registered;
        vm.source_description = opened.description.clone();
        vm.swapdev = opened.swapdev.clone();
        let vm = Arc::new(vm);
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let fault_loop = FaultLoop::new(
            vm.clone(),
            opened.source,
            prefetch,
            self.config.fault_loop,
            stop.clone(),
            Some(connection),
        )
        .map_err(|e| format!("starting the fault loop: {}", crate::error_chain(&e)))?;
        let mut vms = self.lock();
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err("the pager is shutting down".into());
        }
        // Checked again under the lock that the insert below holds.
        Self::check_free(&vms, &name, &key)?;
        let daemon = Arc::downgrade(self);
        let thread_name = name.clone();
        let thread_vm = vm.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-{name}"))
            .spawn(move || {
                match fault_loop.run() {
                    Ok(exit) => tracing::info!(vm = %thread_name, ?exit, "VM detached"),
                    Err(e) => tracing::error!(vm = %thread_name, %e, "VM torn down"),
                }
                if let Some(dev) = &thread_vm.swapdev {
                    let flushed = dev.lock().unwrap_or_else(|p| p.into_inner()).flush();
                    if let Err(e) = flushed {
                        tracing::error!(vm = %thread_name, %e, "flushing the swap device at detach failed");
                    }
                }
                if let Some(d) = daemon.upgrade() {
                    // Only our own entry: a new VM may have taken the name meanwhile.
                    let mut vms = d.lock();
                    if vms
                        .get(&thread_name)
                        .is_some_and(|e| Arc::ptr_eq(&e.vm, &thread_vm))
                    {
                        vms.remove(&thread_name);
                    }
                }
            })
            .map_err(|e| format!("spawning the fault loop: {e}"))?;
        vms.insert(
            name,
            VmEntry {
                vm,
                flavour: a.flavour,
                prefetch: self.config.prefetch.clone(),
                source_key: key,
                stop,
                thread: Some(thread),
                connection: watch,
            },
        );
        Ok(opened.description)
    }

    /// Refuse a second VM with the same name or the same backing store.
    /// A VMM that exited and re-attaches at once may find its old VM (same name or same
    /// device) still registered because the fault loop has not seen the hang-up yet: stop
    /// such VMs now, so the new attach is not refused.
    fn reap_departed(&self, name: &str, key: &str) {
        let gone: Vec<VmEntry> = {
            let mut vms = self.lock();
            let names: Vec<String> = vms
                .iter()
                .filter(|(n, e)| (n.as_str() == name || e.source_key == key) && e.vmm_gone())
                .map(|(n, _)| n.clone())
                .collect();
            names.iter().filter_map(|n| vms.remove(n)).collect()
        };
        for e in gone {
            tracing::info!(vm = %e.vm.name, "previous VMM gone; detaching before the new attach");
            Self::stop_entry(e);
        }
    }

    fn check_free(vms: &HashMap<String, VmEntry>, name: &str, key: &str) -> Result<(), String> {
        if vms.contains_key(name) {
            return Err(format!("VM {name:?} is already attached"));
        }
        if let Some((other, _)) = vms.iter().find(|(_, e)| e.source_key == key) {
            return Err(format!(
                "{key} already serves VM {other:?}; one VM per swap device"
            ));
        }
        Ok(())
    }

    /// Detach one VM: stop its fault loop and wait for it.
    pub fn detach(&self, name: &str) -> bool {
        let entry = self.lock().remove(name);
        match entry {
            Some(e) => {
                Self::stop_entry(e);
                true
            }
            None => false,
        }
    }

    fn stop_entry(mut e: VmEntry) {
        let _ = e.stop.write(1);
        if let Some(t) = e.thread.take() {
            let _ = t.join();
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
