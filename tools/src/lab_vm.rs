//! In-process lab guests for benchmarks and tests: guest memory registered with a real
//! userfaultfd and described as a pager [`Vm`], the way an attach would describe it.
//!
//! - [`MemfdVm`]: a shared memfd mapping registered MISSING|WP (QEMU-style shared memory;
//!   write tracking and eviction work on it), the memfd kept as the VM's memory file.
//! - [`AnonVm`]: an anonymous private mapping registered MISSING (Firecracker-style memory).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use anyhow::Context;
use pager::attach::protocol::GuestRegionUffdMapping;
use pager::vm::{GuestLayout, PeerInfo, Vm};
use uffd::{Features, RegisterMode, Uffd, UffdFlags};

/// Shared memory registered MISSING|WP.
pub struct MemfdVm {
    pub map: memmap2::MmapRaw,
    pub memfd: File,
    pub vm: Vm,
}

/// Anonymous memory registered MISSING.
pub struct AnonVm {
    pub map: memmap2::MmapMut,
    pub vm: Vm,
}

fn one_region(base: u64, len: u64, page_size: usize) -> anyhow::Result<GuestLayout> {
    Ok(GuestLayout::from_mappings(&[GuestRegionUffdMapping {
        base_host_virt_addr: base,
        size: len as usize,
        offset: 0,
        page_size,
        page_size_kib: 0,
    }])?)
}

fn nonblocking_uffd() -> anyhow::Result<Uffd> {
    Ok(Uffd::new(UffdFlags {
        nonblocking: true,
        ..Default::default()
    })?)
}

impl MemfdVm {
    /// `pages` pages of `page_size` in a fresh memfd named `name`, every page absent;
    /// `extra` features go to UFFDIO_API beside the ones write tracking needs.
    pub fn new(name: &str, pages: u64, page_size: usize, extra: Features) -> anyhow::Result<Self> {
        let len = pages * page_size as u64;
        let cname = std::ffi::CString::new(name).context("memfd name")?;
        let memfd = File::from(nix::sys::memfd::memfd_create(
            cname.as_c_str(),
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?);
        memfd.set_len(len)?;
        let map = memmap2::MmapOptions::new()
            .len(len as usize)
            .map_raw(&memfd)?;
        let uffd = nonblocking_uffd()?;
        uffd.api(
            Features::EVENT_REMOVE
                | Features::MISSING_SHMEM
                | Features::WP_HUGETLBFS_SHMEM
                | Features::WP_UNPOPULATED
                | extra,
        )?;
        let base = map.as_ptr() as u64;
        uffd.register(base, len, RegisterMode::MISSING | RegisterMode::WP)?;
        let layout = one_region(base, len, page_size)?;
        let mut vm = Vm::new(
            name.into(),
            uffd,
            layout,
            Some(OwnedFd::from(memfd.try_clone()?)),
            PeerInfo::default(),
        );
        vm.wp_registered = true;
        Ok(Self { map, memfd, vm })
    }

    /// The VM, shared (for a fault loop and the components around it), and the mapping.
    pub fn into_shared(self) -> (memmap2::MmapRaw, File, Arc<Vm>) {
        (self.map, self.memfd, Arc::new(self.vm))
    }
}

impl AnonVm {
    /// `pages` anonymous pages of `page_size`, every one absent.
    pub fn new(name: &str, pages: u64, page_size: usize) -> anyhow::Result<Self> {
        let len = pages * page_size as u64;
        let uffd = nonblocking_uffd()?;
        uffd.api(Features::EVENT_REMOVE)?;
        let map = memmap2::MmapMut::map_anon(len as usize)?;
        let base = map.as_ptr() as u64;
        uffd.register(base, len, RegisterMode::MISSING)?;
        let layout = one_region(base, len, page_size)?;
        let vm = Vm::new(name.into(), uffd, layout, None, PeerInfo::default());
        Ok(Self { map, vm })
    }
}
