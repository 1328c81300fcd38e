//! [`SwapdevProvider`]: which swap device serves which VM (the `pagewise serve` rules).
//!
//! * a per-VM spec (`--vm NAME=SOCKET:SPEC`) wins;
//! * else the single `--swapdev SPEC` serves any VM;
//! * else `--swapdev-dir DIR` serves VM `NAME` from `DIR/NAME.swap` (which must exist).
//!
//! A spec may name a raw snapshot instead of a swap device (`raw:PATH`): it is served
//! read-only ([`super::raw_snapshot`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use swapdev::backend::spec::{open_backend, SpecOptions};
use swapdev::{OpenOptions, SwapDevice};

use super::raw_snapshot::{self, SpecKind};
use super::{OpenedSource, ProviderError, SourceProvider};
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
    pub fn spec_for(&self, vm: &str) -> Result<String, ProviderError> {
        if let Some(s) = self.per_vm.get(vm) {
            return Ok(s.clone());
        }
        if let Some(s) = &self.single {
            return Ok(s.clone());
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{vm}.swap"));
            if !path.exists() {
                return Err(ProviderError::DeviceMissing {
                    vm: vm.into(),
                    path,
                });
            }
            return Ok(path.display().to_string());
        }
        Err(ProviderError::NotConfigured { vm: vm.into() })
    }

    /// `spec` when given (a prepared VM's override), else the rule for `vm`.
    fn chosen(&self, vm: &str, spec: Option<&str>) -> Result<String, ProviderError> {
        match spec {
            Some(s) => Ok(s.to_string()),
            None => self.spec_for(vm),
        }
    }

    /// What serves `vm`: a spec given per VM, as the single device or as an override may
    /// name a raw snapshot; `DIR/NAME.swap` is always a swap device (a damaged one must
    /// fail to open, never be served as raw bytes).
    fn chosen_kind(&self, vm: &str, spec: Option<&str>) -> Result<SpecKind, ProviderError> {
        let named = spec.is_some() || self.per_vm.contains_key(vm) || self.single.is_some();
        let spec = self.chosen(vm, spec)?;
        if named {
            raw_snapshot::classify(&spec)
        } else {
            Ok(SpecKind::SwapDevice(spec))
        }
    }
}

impl SourceProvider for SwapdevProvider {
    fn source_key(&self, vm: &str, spec: Option<&str>) -> Result<String, ProviderError> {
        Ok(match self.chosen_kind(vm, spec)? {
            SpecKind::SwapDevice(s) => format!("swapdev {s}"),
            // Read-only: one snapshot may serve several VMs (clones) at once.
            SpecKind::Raw(target) => format!("raw {target} for {vm}"),
        })
    }

    fn open(
        &self,
        vm: &str,
        spec: Option<&str>,
        layout: &GuestLayout,
    ) -> Result<OpenedSource, ProviderError> {
        let spec = match self.chosen_kind(vm, spec)? {
            SpecKind::SwapDevice(s) => s,
            SpecKind::Raw(target) => return raw_snapshot::open(&target, layout),
        };
        let backend = open_backend(&spec, &SpecOptions::default()).map_err(|source| {
            ProviderError::Backend {
                spec: spec.clone(),
                source,
            }
        })?;
        let device = SwapDevice::open(backend, OpenOptions::read_write(&self.host_id, true, false))
            .map_err(|source| ProviderError::Device {
                spec: spec.clone(),
                source,
            })?;
        let description = format!("swapdev {spec}");
        let device = Arc::new(Mutex::new(device));
        let source = SwapdevSource::new(device.clone(), description.clone()).map_err(|source| {
            ProviderError::Source {
                description: description.clone(),
                source,
            }
        })?;
        Ok(OpenedSource {
            source: Box::new(source),
            description,
            swapdev: Some(device),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.swap"), b"").unwrap();
        let p = SwapdevProvider {
            per_vm: HashMap::from([("fixed".to_string(), "/dev/x".to_string())]),
            dir: Some(dir.path().into()),
            ..Default::default()
        };
        assert_eq!(p.source_key("fixed", None).unwrap(), "swapdev /dev/x");
        // Not a swap device, but from the directory rule: never taken as a raw snapshot.
        assert!(p.source_key("a", None).unwrap().ends_with("/a.swap"));
        assert!(p.source_key("a", None).unwrap().starts_with("swapdev "));
        let e = p.source_key("b", None).unwrap_err();
        assert!(matches!(e, ProviderError::DeviceMissing { .. }), "{e}");
        assert_eq!(
            p.source_key("b", Some("nbd://h:1/e")).unwrap(),
            "swapdev nbd://h:1/e"
        );
        let none = SwapdevProvider::default();
        assert!(matches!(
            none.source_key("z", None),
            Err(ProviderError::NotConfigured { .. })
        ));
    }
}
