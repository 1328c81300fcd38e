//! A tiny KVM guest whose vCPU faults are served through userfaultfd.
//!
//! One memory slot over anonymous memory (Firecracker's layout) registered MISSING with a
//! uffd that reports kernel-mode faults (KVM touches guest memory from the kernel), handed
//! to a pager with either handshake. Guest page 0 holds a few hand-assembled real-mode
//! instructions, placed with UFFDIO_COPY before the uffd leaves this process; every other
//! page comes from the pager. The vCPU adds the little-endian u32 at byte 24 of each data
//! page (the first word of the image's pseudo-random stream, see [`crate::image`]) and
//! reports the 32-bit sum on ports 0x10 (low half) and 0x12 (high half), then halts.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use serde::Serialize;
use uffd::PlaceMode;

use crate::image::{page_word, Expected, ImageSpec, PAGE_SIZE};
use crate::memhog::attach::{self, HandshakeKind};
use crate::memhog::memory::{Backing, GuestMemory};

/// Real mode reaches the first MiB: data pages must be below page 256.
pub const MAX_REAL_MODE_PAGE: u64 = 255;
const PORT_LOW: u16 = 0x10;
const PORT_HIGH: u16 = 0x12;

/// Which guest pages the vCPU reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReadSet {
    pub first: u64,
    pub count: u64,
    pub step: u64,
}

impl ReadSet {
    fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.count).map(move |k| self.first + k * self.step)
    }

    fn validate(&self, guest_pages: u64) -> anyhow::Result<()> {
        if self.first == 0 {
            bail!("guest page 0 holds the code; data pages start at 1");
        }
        if self.count == 0 || self.count > u16::MAX as u64 || self.step == 0 {
            bail!("read set needs 1..=65535 pages and a step of at least 1");
        }
        let last = self.first + (self.count - 1) * self.step;
        if last > MAX_REAL_MODE_PAGE || last >= guest_pages {
            bail!(
                "last data page {last} is beyond the guest ({guest_pages} pages) or real mode's \
                 reach (page {MAX_REAL_MODE_PAGE})"
            );
        }
        Ok(())
    }
}

/// The guest program for `set`, at guest address 0 (CS = 0, IP = 0).
pub fn guest_code(set: ReadSet) -> Vec<u8> {
    let count = set.count as u16;
    let first_seg = (set.first * 0x100) as u16;
    let step_seg = (set.step * 0x100) as u16;
    let mut c = vec![
        0x31,
        0xC0, // xor ax, ax
        0x31,
        0xD2, // xor dx, dx
        0xB9,
        0,
        0, // mov cx, count
        0xBB,
        0,
        0, // mov bx, first segment
        0x8E,
        0xDB, // L: mov ds, bx
        0x03,
        0x06,
        0x18,
        0x00, // add ax, [0x18]
        0x13,
        0x16,
        0x1A,
        0x00, // adc dx, [0x1a]
        0x81,
        0xC3,
        0,
        0, // add bx, step segment
        0xE2,
        0xF0, // loop L (-16)
        0xE7,
        PORT_LOW as u8, // out 0x10, ax
        0x89,
        0xD0, // mov ax, dx
        0xE7,
        PORT_HIGH as u8, // out 0x12, ax
        0xF4,            // hlt
    ];
    c[5..7].copy_from_slice(&count.to_le_bytes());
    c[8..10].copy_from_slice(&first_seg.to_le_bytes());
    c[22..24].copy_from_slice(&step_seg.to_le_bytes());
    c
}

/// The sum the guest must report if every page came from the image `spec`.
pub fn expected_sum(set: ReadSet, spec: ImageSpec) -> u32 {
    set.pages().fold(0u32, |acc, p| {
        let word = match spec.image_page(p) {
            Expected::Zero => 0,
            Expected::Version(v) => page_word(p, spec.seed, v, 3) as u32,
        };
        acc.wrapping_add(word)
    })
}

/// What the run saw.
#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    pub read_set: ReadSet,
    pub sum: u32,
    pub expected: u32,
    pub ok: bool,
    pub exits: u64,
    pub run_seconds: f64,
}

/// Run the guest over `guest_pages` pages served by the pager at `socket`.
pub fn run(
    socket: &Path,
    kind: &HandshakeKind,
    guest_pages: u64,
    set: ReadSet,
    spec: ImageSpec,
) -> anyhow::Result<GuestReport> {
    set.validate(guest_pages)?;
    // Declared before the VM so it is dropped after it.
    let mem = GuestMemory::new(guest_pages, Backing::Anon)?;
    let kvm = Kvm::new().context("opening /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let (uffd, features) = attach::register(&mem, false)?;
    let mut code_page = vec![0u8; PAGE_SIZE];
    let code = guest_code(set);
    code_page[..code.len()].copy_from_slice(&code);
    uffd.copy_from(mem.addr(), &code_page, PlaceMode::default())
        .context("placing the code page")?;
    let _attached = attach::handshake(&mem, socket, kind, &uffd, features, false)?;
    drop(uffd);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem.len() as u64,
        userspace_addr: mem.addr(),
        flags: 0,
    };
    // SAFETY: the region is our live mapping `mem`, which outlives the VM (declared before it,
    // so dropped after it), and slot 0 is not used otherwise.
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs()?;
    for seg in [
        &mut sregs.cs,
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.ss,
        &mut sregs.fs,
        &mut sregs.gs,
    ] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs)?;
    let (mut low, mut high) = (None, None);
    let mut exits = 0u64;
    let t = Instant::now();
    loop {
        exits += 1;
        match vcpu.run().context("KVM_RUN")? {
            VcpuExit::IoOut(PORT_LOW, data) if data.len() == 2 => {
                low = Some(u16::from_le_bytes([data[0], data[1]]))
            }
            VcpuExit::IoOut(PORT_HIGH, data) if data.len() == 2 => {
                high = Some(u16::from_le_bytes([data[0], data[1]]))
            }
            VcpuExit::Hlt => break,
            other => bail!("unexpected vCPU exit {other:?} after {exits} exits"),
        }
    }
    let run_seconds = t.elapsed().as_secs_f64();
    let (Some(low), Some(high)) = (low, high) else {
        bail!("the guest halted without reporting its sum");
    };
    let sum = (high as u32) << 16 | low as u32;
    let expected = expected_sum(set, spec);
    Ok(GuestReport {
        read_set: set,
        sum,
        expected,
        ok: sum == expected,
        exits,
        run_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_encodes_its_parameters() {
        let c = guest_code(ReadSet {
            first: 2,
            count: 300,
            step: 3,
        });
        assert_eq!(&c[4..7], &[0xB9, 0x2C, 0x01]);
        assert_eq!(&c[7..10], &[0xBB, 0x00, 0x02]);
        assert_eq!(&c[20..24], &[0x81, 0xC3, 0x00, 0x03]);
        // The loop jumps back to `mov ds, bx` at offset 10.
        assert_eq!(26 + (c[25] as i8) as isize, 10);
        assert_eq!(*c.last().unwrap(), 0xF4);
    }

    #[test]
    fn read_sets_are_checked() {
        let ok = ReadSet {
            first: 1,
            count: 255,
            step: 1,
        };
        assert!(ok.validate(256).is_ok());
        assert!(ok.validate(200).is_err());
        assert!(ReadSet { first: 0, ..ok }.validate(256).is_err());
        assert!(ReadSet { step: 2, ..ok }.validate(1024).is_err());
    }

    #[test]
    fn zero_pages_add_nothing() {
        let spec = ImageSpec {
            seed: 3,
            zero_every: 1,
        };
        let set = ReadSet {
            first: 1,
            count: 10,
            step: 1,
        };
        assert_eq!(expected_sum(set, spec), 0);
    }
}
