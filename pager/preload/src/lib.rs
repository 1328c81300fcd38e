//! `libpagewise_preload.so` — attach an unmodified VMM (QEMU) to the pagewise pager.
//!
//! Loaded with `LD_PRELOAD`, it wraps `mmap`/`mmap64`. When the process maps the configured
//! guest memory file (`PAGEWISE_MEM_PATH`, compared with the fd's `/proc/self/fd/N` link)
//! `MAP_SHARED`, it calls the real `mmap`, creates a userfaultfd, negotiates REMOVE events and
//! shmem MISSING/WP features, registers the mapping (`PAGEWISE_MODES`, default `missing,wp`),
//! and sends the pagewise handshake with `[uffd, memory file fd]` to the pager
//! (`PAGEWISE_SOCKET`), then waits for its answer. Every failure prints one line naming the
//! problem on stderr and ends the process with status 1: a VM must never run with guest RAM
//! that no pager serves. A load-time constructor checks the configuration and that the pager
//! is reachable before the VMM's `main` runs. After an attach, a watch thread waits for a
//! restarted pager and attaches again if the pager's connection ends without a word, or ends
//! the process (`watch.rs`). See `config.rs` for the variables.

// Unit tests build without the exported hooks and the constructor (they would take over the
// test binary), which leaves the code only they call unused there.
#![cfg_attr(test, allow(dead_code))]

mod attach;
mod config;
mod sys;
mod watch;
mod wire;

use std::cell::Cell;
use std::sync::OnceLock;

static CONFIG: OnceLock<config::Config> = OnceLock::new();

thread_local! {
    /// Set while this thread is inside our hook, so mmaps made by the hook itself pass through.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

fn die(message: &str) -> ! {
    sys::write_stderr(&format!(
        "pagewise-preload: error: {message}\npagewise-preload: refusing to run the VM with guest RAM that no pager serves\n"
    ));
    sys::exit_now()
}

fn hooked_mmap(
    addr: *mut libc::c_void,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    offset: i64,
) -> *mut libc::c_void {
    let mapped = sys::real_mmap(addr, len, prot, flags, fd, offset);
    if mapped == libc::MAP_FAILED || fd < 0 || IN_HOOK.get() {
        return mapped;
    }
    let Some(cfg) = CONFIG.get() else {
        return mapped;
    };
    IN_HOOK.set(true);
    let _errno = sys::ErrnoGuard::save();
    let is_guest_ram = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|target| target == cfg.mem_path)
        .unwrap_or(false);
    if is_guest_ram {
        let map_type = flags & 0x0f;
        if map_type != libc::MAP_SHARED && map_type != libc::MAP_SHARED_VALIDATE {
            die(&format!(
                "{} was mapped MAP_PRIVATE: the pager can only serve guest RAM mapped from a \
                 shared file (QEMU: -object memory-backend-file,...,share=on)",
                cfg.mem_path.display()
            ));
        }
        match attach::attach(cfg, fd, mapped as u64, len as u64, offset as u64) {
            Ok(a) => sys::write_stderr(&format!(
                "pagewise-preload: guest RAM {} ({} MiB at {:#x}, file offset {:#x}, page size {}) \
                 attached to the pager at {} as VM {:?}{} (modes {}, uffd features {:#x})\n",
                cfg.mem_path.display(),
                a.region.size >> 20,
                a.region.host_addr,
                a.region.file_offset,
                a.region.page_size,
                cfg.socket.display(),
                cfg.vm,
                a.swapdev.map(|s| format!(", swap device {s}")).unwrap_or_default(),
                cfg.mode_names.join(","),
                a.features
            )),
            Err(e) => die(&e),
        }
    }
    IN_HOOK.set(false);
    mapped
}

/// `mmap(2)` wrapper exported to the VMM.
///
/// # Safety
/// Same contract as libc's `mmap`; arguments are passed to it unchanged.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off_t,
) -> *mut libc::c_void {
    hooked_mmap(addr, len, prot, flags, fd, offset)
}

/// `mmap64` wrapper (the same function on 64-bit glibc).
///
/// # Safety
/// Same contract as libc's `mmap64`; arguments are passed to it unchanged.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut libc::c_void,
    len: libc::size_t,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: libc::off64_t,
) -> *mut libc::c_void {
    hooked_mmap(addr, len, prot, flags, fd, offset)
}

/// Runs when the library is loaded, before the VMM's `main`.
extern "C" fn on_load() {
    let lookup = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let cfg = config::from_env(&lookup).unwrap_or_else(|e| die(&e));
    if let Err(e) = attach::probe(&cfg) {
        die(&e);
    }
    let _ = CONFIG.set(cfg);
}

#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;
