//! Where the source reads one guest page: the memory file for resident pages, the VM's swap
//! device for evicted (and imported, never faulted) pages, nothing for pages no store holds
//! (zero) or the guest freed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use pager::page_state::PageState;
use pager::vm::Vm;
use swapdev::{PageData, SwapDevice};

use crate::migrate::bulk::SourcePage;

pub(super) struct SourcePages {
    vm: Arc<Vm>,
    memory: File,
    device: Option<Arc<Mutex<SwapDevice>>>,
}

fn io_error(e: swapdev::SwapError) -> std::io::Error {
    std::io::Error::other(e)
}

impl SourcePages {
    pub fn new(vm: Arc<Vm>) -> std::io::Result<Self> {
        let fd = vm.memory_file.as_ref().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "the VM has no memory file (only file-backed guests migrate)",
            )
        })?;
        let memory = File::from(fd.try_clone()?);
        Ok(Self {
            device: vm.swapdev.clone(),
            vm,
            memory,
        })
    }

    pub fn page_size(&self) -> usize {
        self.vm.layout.page_size()
    }

    pub fn memory(&self) -> &File {
        &self.memory
    }

    /// Whether the swap device holds page `p` (its copy is current while `p` is absent).
    pub fn stored(&self, p: u64) -> bool {
        self.device
            .as_ref()
            .is_some_and(|d| d.lock().unwrap_or_else(|e| e.into_inner()).contains(p))
    }

    /// Read page `p` into `buf`. With `stored_ok`, an absent page the swap device holds is
    /// answered [`SourcePage::Stored`] without reading it.
    pub fn read(&self, p: u64, buf: &mut [u8], stored_ok: bool) -> std::io::Result<SourcePage> {
        let offset = p * self.page_size() as u64;
        match self.vm.states.get(p) {
            PageState::Present | PageState::InFlight | PageState::Evicting => {
                self.memory.read_exact_at(buf, offset)?;
            }
            PageState::Removed => return Ok(SourcePage::Freed),
            PageState::Missing | PageState::Evicted | PageState::Zero => {
                let Some(dev) = &self.device else {
                    return Ok(SourcePage::Zero);
                };
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                if !dev.contains(p) {
                    return Ok(SourcePage::Zero);
                }
                if stored_ok {
                    return Ok(SourcePage::Stored);
                }
                match dev.read_page(p).map_err(io_error)? {
                    PageData::Data(data) => buf.copy_from_slice(data.as_slice()),
                    PageData::Zero | PageData::NotStored => return Ok(SourcePage::Zero),
                }
            }
        }
        Ok(if swapdev::is_zero_page(buf) {
            SourcePage::Zero
        } else {
            SourcePage::Data
        })
    }

    /// Pages whose placement is in flight (their bytes are not in the file yet).
    pub fn in_flight(&self) -> usize {
        self.vm.states.count(PageState::InFlight)
    }
}
