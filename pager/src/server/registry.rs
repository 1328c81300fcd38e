//! The registry of attached VMs and prepared (incoming) VMs: starting a VM's fault loop,
//! tearing it down (also when the loop panics), detaching, and `prepare`/`unprepare`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::error::{render_chain, StartError};
use super::prepare::{check_layout_spec, check_ranges, PrepareError, PreparedVm};
use super::protocol::{ListedVm, PrepareSpec, Response, VmStatus};
use super::Daemon;
use crate::attach::protocol::{send_reply, AttachReply};
use crate::attach::server::{valid_vm_name, AttachedVm};
use crate::fault_loop::FaultLoop;
use crate::vm::Vm;

/// One attached VM in the registry.
pub struct VmEntry {
    pub vm: Arc<Vm>,
    pub flavour: &'static str,
    pub prefetch: String,
    /// [`super::SourceProvider::source_key`] of the store serving it.
    pub source_key: String,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// A duplicate of the VMM's attach connection, to tell whether it has gone. Dropped with
    /// the entry, so a torn-down VM's VMM sees its connection close.
    connection: Option<OwnedFd>,
    /// Orders into the VM's running fault loop (place pushed pages, install a source,
    /// pause/resume, report).
    pub controller: crate::fault_loop::LoopController,
}

/// What [`Daemon::start_vm`] tells the attaching VMM.
pub(super) struct Started {
    /// The source's description (the attach reply's `swapdev`).
    pub description: String,
    /// Whether a re-attach could serve the VM (not while pages are routed to another host).
    pub reattach: bool,
}

impl VmEntry {
    /// Send a pagewise VMM a reply frame on its attach connection (its watch thread reads
    /// them: a new `reattach`, or why the VM is torn down). Firecracker VMMs expect nothing.
    fn tell(&self, reply: &AttachReply) {
        if self.flavour != "pagewise" {
            return;
        }
        if let Some(c) = &self.connection {
            tell(c, &self.vm.name, reply);
        }
    }

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

/// [`VmEntry::tell`] on a connection fd.
fn tell(connection: &OwnedFd, vm: &str, reply: &AttachReply) {
    if let Err(e) = send_reply(connection, reply) {
        tracing::debug!(vm, %e, "could not tell the VMM (it may be gone)");
    }
}

/// The frame telling a VMM why its VM was torn down (it then exits instead of waiting).
fn goodbye(why: String) -> AttachReply {
    AttachReply {
        ok: false,
        error: Some(why),
        swapdev: None,
        reattach: false,
        retry: false,
    }
}

/// The text of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-text panic payload)".into())
}

impl Daemon {
    fn prepared_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PreparedVm>>> {
        self.prepared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open the source, check sizes, register the VM and start its fault loop. A re-attach
    /// (the VMM's pager went away) rebuilds the page states first and wakes every waiting
    /// fault after (`reattach.rs`).
    pub(super) fn start_vm(
        self: &Arc<Self>,
        a: AttachedVm,
        stream: &UnixStream,
    ) -> Result<Started, StartError> {
        let name = a.name.clone();
        let prepared = self.prepared_lock().get(&name).cloned();
        match &prepared {
            Some(p) if a.reattach && !p.for_reattach => {
                return Err(StartError::ReattachPrepared { vm: name })
            }
            Some(p) if !a.reattach && p.for_reattach => {
                return Err(StartError::PreparedForReattach { vm: name })
            }
            _ => {}
        }
        if let Some(p) = &prepared {
            p.check_layout(&a.layout)
                .map_err(|source| StartError::LayoutMismatch {
                    vm: name.clone(),
                    source,
                })?;
        }
        let spec = prepared.as_ref().and_then(|p| p.swapdev.as_deref());
        let key = self.provider.source_key(&name, spec)?;
        self.reap_departed(&name, &key);
        self.check_free(&self.lock(), &name, &key)?;
        let opened = self.provider.open(&name, spec, &a.layout)?;
        let src_bytes = opened.source.capacity_pages() * opened.source.page_size() as u64;
        if opened.source.page_size() != a.layout.page_size() {
            return Err(StartError::PageSizeMismatch {
                vm_page_size: a.layout.page_size() as u64,
                source_name: opened.description,
                source_page_size: opened.source.page_size() as u64,
            });
        }
        a.layout
            .check_fits(&opened.description, src_bytes)
            .map_err(StartError::DoesNotFit)?;
        if let Some(was) = a.served_by.as_ref().filter(|_| a.reattach) {
            if *was != opened.description {
                return Err(StartError::ReattachOtherStore {
                    vm: name,
                    was: was.clone(),
                    now: opened.description,
                });
            }
        }
        let prefetch = crate::prefetch::by_name(&self.config.prefetch, a.layout.pages())?;
        let connection: OwnedFd = stream.try_clone().map_err(StartError::DupSocket)?.into();
        let watch = connection.try_clone().ok();
        // For the last word to a pagewise VMM whose loop fails (it then exits, not waits).
        let last_word = (a.flavour == "pagewise")
            .then(|| connection.try_clone().ok())
            .flatten();
        let mut vm = Vm::new(name.clone(), a.uffd, a.layout, a.memory_file, a.peer);
        vm.wp_registered = a.wp_registered;
        vm.source_description = opened.description.clone();
        vm.swapdev = opened.swapdev.clone();
        if let Some(p) = &prepared {
            // Before the fault loop exists: no fault can see the pages change.
            p.apply(&vm).map_err(|source| StartError::Seeds {
                vm: name.clone(),
                source,
            })?;
        }
        if a.reattach {
            let rebuilt =
                super::reattach::rebuild_states(&vm).map_err(|source| StartError::Rebuild {
                    vm: name.clone(),
                    source,
                })?;
            tracing::info!(vm = %name, present = rebuilt.present, evicted = rebuilt.evicted,
                zero = rebuilt.zero, missing = rebuilt.missing, holes_known = rebuilt.holes_known,
                "re-attach: page states rebuilt from the memory file and the swap device");
        }
        let vm = Arc::new(vm);
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(StartError::EventFd)?,
        );
        // A prepared VM keeps its routes (pages routed to a source not installed yet wait for
        // it); otherwise every page goes to the one source.
        let fault_loop = if prepared.is_some() {
            FaultLoop::with_sources(
                vm.clone(),
                vec![opened.source],
                prefetch,
                self.config.fault_loop,
                stop.clone(),
                Some(connection),
            )
        } else {
            FaultLoop::new(
                vm.clone(),
                opened.source,
                prefetch,
                self.config.fault_loop,
                stop.clone(),
                Some(connection),
            )
        }
        .map_err(StartError::FaultLoop)?;
        let controller = fault_loop.controller();
        let mut vms = self.lock();
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StartError::ShuttingDown);
        }
        // Checked again under the lock that the insert below holds.
        self.check_free(&vms, &name, &key)?;
        let daemon = Arc::downgrade(self);
        let thread_vm = vm.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-{name}"))
            .spawn(move || {
                // A panic in the loop must not leave a dead entry holding the device's key,
                // nor the VMM's connection open: it ends like any failed loop.
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| fault_loop.run()));
                let vm_name = &thread_vm.name;
                let failure = match outcome {
                    Ok(Ok(exit)) => {
                        tracing::info!(vm = %vm_name, ?exit, "VM detached");
                        None
                    }
                    Ok(Err(e)) => {
                        let why = render_chain(&e);
                        tracing::error!(vm = %vm_name, error = %why, "VM torn down");
                        Some(why)
                    }
                    Err(payload) => {
                        let why = panic_message(payload.as_ref());
                        tracing::error!(vm = %vm_name, panic = %why,
                            "the VM's fault loop panicked; VM torn down");
                        Some(format!("its fault loop panicked: {why}"))
                    }
                };
                if let (Some(why), Some(c)) = (failure, &last_word) {
                    tell(c, vm_name, &goodbye(why));
                }
                Self::end_of_loop(&daemon, &thread_vm);
            })
            .map_err(StartError::Spawn)?;
        if let Some(p) = &prepared {
            let mut pending = self.prepared_lock();
            if pending.get(&name).is_some_and(|q| Arc::ptr_eq(p, q)) {
                pending.remove(&name);
            }
        }
        // A VM prepared for its VMM's re-attach goes on with a migration a journal
        // describes: a pager restarted again would do the same.
        let reattach = prepared.as_ref().is_none_or(|p| p.for_reattach);
        let woken = a.reattach.then(|| vm.clone());
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
                controller,
            },
        );
        drop(vms);
        if let Some(vm) = woken {
            // The loop runs: every fault the gone pager read and never answered is delivered
            // again (and reaches it) once its thread wakes and touches the page.
            if let Err(e) = super::reattach::wake_all(&vm) {
                tracing::warn!(vm = %vm.name, error = %crate::error_chain(&e),
                    "re-attach: waking the waiting faults failed");
            }
            if let Some(m) = self.migration.get() {
                m.reattached(&vm.name, vm.peer.pid);
            }
        }
        Ok(Started {
            description: opened.description,
            reattach,
        })
    }

    /// Tell VM `name`'s VMM whether a re-attach could serve it if this pager went away
    /// (false while some of its pages are on a migration's other host); false when no such
    /// VM is attached.
    pub fn set_reattach(&self, name: &str, allowed: bool) -> bool {
        let vms = self.lock();
        let Some(e) = vms.get(name) else {
            return false;
        };
        e.tell(&AttachReply {
            ok: true,
            error: None,
            swapdev: Some(e.vm.source_description.clone()),
            reattach: allowed,
            retry: false,
        });
        true
    }

    /// After a VM's loop ended (any way): flush its swap device, remove its entry (closing
    /// the daemon's copy of the VMM's connection).
    fn end_of_loop(daemon: &std::sync::Weak<Self>, vm: &Arc<Vm>) {
        if let Some(dev) = &vm.swapdev {
            let flushed = dev.lock().unwrap_or_else(|p| p.into_inner()).flush();
            if let Err(e) = flushed {
                tracing::error!(vm = %vm.name, error = %render_chain(&e),
                    "flushing the swap device at detach failed");
            }
        }
        if let Some(d) = daemon.upgrade() {
            // Only our own entry: a new VM may have taken the name meanwhile.
            let mine = {
                let mut vms = d.lock();
                if vms.get(&vm.name).is_some_and(|e| Arc::ptr_eq(&e.vm, vm)) {
                    vms.remove(&vm.name)
                } else {
                    None
                }
            };
            // Dropped outside the lock: its join handle is our own thread (detached here).
            drop(mine);
        }
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

    /// The name and the store are free: no attached VM has either, and no other prepared VM
    /// reserved the store.
    fn check_free(
        &self,
        vms: &HashMap<String, VmEntry>,
        name: &str,
        key: &str,
    ) -> Result<(), StartError> {
        if vms.contains_key(name) {
            return Err(StartError::AlreadyAttached { vm: name.into() });
        }
        if let Some((other, _)) = vms.iter().find(|(_, e)| e.source_key == key) {
            return Err(StartError::DeviceInUse {
                key: key.into(),
                other: other.clone(),
            });
        }
        if let Some((other, _)) = self
            .prepared_lock()
            .iter()
            .find(|(n, p)| n.as_str() != name && p.source_key == key)
        {
            return Err(StartError::DeviceInUse {
                key: key.into(),
                other: other.clone(),
            });
        }
        Ok(())
    }

    /// Detach one VM: tell its VMM (which then exits rather than wait for a pager), stop
    /// its fault loop and wait for it.
    pub fn detach(&self, name: &str) -> bool {
        let entry = self.lock().remove(name);
        match entry {
            Some(e) => {
                e.tell(&goodbye(format!("VM {name:?} was detached from the pager")));
                Self::stop_entry(e);
                true
            }
            None => false,
        }
    }

    pub(super) fn stop_entry(mut e: VmEntry) {
        let _ = e.stop.write(1);
        if let Some(t) = e.thread.take() {
            let _ = t.join();
        }
    }

    /// Register an incoming VM (`prepare`): checked now (name, layout, ranges, store), applied
    /// when its VMM attaches.
    pub fn prepare(&self, spec: PrepareSpec) -> Result<Response, PrepareError> {
        self.prepare_for(spec, false)
    }

    /// [`Self::prepare`] for a VM whose VMM waits to attach again (its pager was restarted
    /// after a migration's switchover, with pages still routed elsewhere): only that VMM's
    /// re-attach takes it.
    pub fn prepare_reattach(&self, spec: PrepareSpec) -> Result<Response, PrepareError> {
        self.prepare_for(spec, true)
    }

    fn prepare_for(&self, spec: PrepareSpec, for_reattach: bool) -> Result<Response, PrepareError> {
        let vm = spec.vm;
        if !valid_vm_name(&vm) {
            return Err(PrepareError::BadName(vm));
        }
        let (regions, pages) =
            check_layout_spec(&spec.layout).map_err(|source| PrepareError::Layout {
                vm: vm.clone(),
                source,
            })?;
        check_ranges(&spec.states, &spec.routes, pages).map_err(|source| PrepareError::Seeds {
            vm: vm.clone(),
            source,
        })?;
        let source_key = self
            .provider
            .source_key(&vm, spec.swapdev.as_deref())
            .map_err(|source| PrepareError::Provider {
                vm: vm.clone(),
                source,
            })?;
        let vms = self.lock();
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(PrepareError::ShuttingDown);
        }
        if vms.contains_key(&vm) {
            return Err(PrepareError::AlreadyAttached { vm });
        }
        if let Some((other, _)) = vms.iter().find(|(_, e)| e.source_key == source_key) {
            return Err(PrepareError::DeviceInUse {
                key: source_key,
                other: other.clone(),
                status: "attached",
            });
        }
        let mut pending = self.prepared_lock();
        if pending.contains_key(&vm) {
            return Err(PrepareError::AlreadyPrepared { vm });
        }
        if let Some((other, _)) = pending.iter().find(|(_, p)| p.source_key == source_key) {
            return Err(PrepareError::DeviceInUse {
                key: source_key,
                other: other.clone(),
                status: "prepared",
            });
        }
        tracing::info!(vm = %vm, pages, source = %source_key, "VM prepared");
        pending.insert(
            vm.clone(),
            Arc::new(PreparedVm {
                name: vm.clone(),
                page_size: spec.layout.page_size,
                regions,
                pages,
                swapdev: spec.swapdev,
                source_key: source_key.clone(),
                states: spec.states,
                routes: spec.routes,
                for_reattach,
            }),
        );
        Ok(Response::Prepared {
            vm,
            pages,
            source: source_key,
        })
    }

    /// Forget a prepared VM; false when none has that name.
    pub fn unprepare(&self, name: &str) -> bool {
        self.prepared_lock().remove(name).is_some()
    }

    /// The prepared VMs, for `list`.
    pub fn prepared_list(&self) -> Vec<ListedVm> {
        self.prepared_lock()
            .values()
            .map(|p| ListedVm {
                vm: p.name.clone(),
                status: VmStatus::Prepared,
                pid: None,
                source: p.source_key.clone(),
                pages: p.pages,
            })
            .collect()
    }
}
