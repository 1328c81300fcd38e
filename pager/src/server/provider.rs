//! [`SwapdevProvider`]: which swap device serves which VM (the `pagewise serve` rules).
//!
//! * a per-VM spec (`--vm NAME=SOCKET:SPEC`) wins;
//! * else the single `--swapdev SPEC` serves any VM;
//! * else `--swapdev-dir DIR` serves VM `NAME` from `DIR/NAME.swap` (which must exist).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::{OpenOptions, SwapDevice};

use super::{OpenedSource, SourceProvider};
use crate::source::SwapdevSource;
use crate::vm::GuestLayout;

/// Maps VM names to swap-device specs and opens them.
#[derive(Debug, Clone, Default)]
pub struct SwapdevProvider {
    pub per_vm: HashMap<String, String>,
    pub single: Option<String>,
    pub dir: Option<PathBuf>,
    /// Host id the devices are opened (and acquired) as.
    pub host_id: String,
}

impl SwapdevProvider {
    /// The spec serving `vm`, by the rules in the module docs.
    pub fn spec_for(&self, vm: &str) -> Result<String, String> {
        if let Some(s) = self.per_vm.get(vm) {
            return Ok(s.clone());
        }
        if let Some(s) = &self.single {
            return Ok(s.clone());
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{vm}.swap"));
            if !path.exists() {
                return Err(format!(
                    "no swap device for VM {vm:?}: {} does not exist (create it with `pagewise swapdev create`)",
                    path.display()
                ));
            }
            return Ok(path.display().to_string());
        }
        Err(format!("no swap device configured for VM {vm:?}"))
    }
}

impl SourceProvider for SwapdevProvider {
    fn source_key(&self, vm: &str) -> Result<String, String> {
        self.spec_for(vm).map(|s| format!("swapdev {s}"))
    }

    fn open(&self, vm: &str, _layout: &GuestLayout) -> Result<OpenedSource, String> {
        let spec = self.spec_for(vm)?;
        let backend = open_backend(&spec, &SpecOptions::default())
            .map_err(|e| format!("opening swap device {spec}: {e}"))?;
        let device = SwapDevice::open(backend, OpenOptions::read_write(&self.host_id, true, false))
            .map_err(|e| format!("opening swap device {spec}: {e}"))?;
        let description = format!("swapdev {spec}");
        let device = Arc::new(Mutex::new(device));
        let source =
            SwapdevSource::new(device.clone(), description.clone()).map_err(|e| e.to_string())?;
        Ok(OpenedSource {
            source: Box::new(source),
            description,
            swapdev: Some(device),
        })
    }
}
