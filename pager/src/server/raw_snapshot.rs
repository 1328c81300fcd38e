//! Raw memory snapshots (e.g. Firecracker's snapshot memory file) served as they are: no
//! `swapdev import` first, and the file is never written (it is opened read-only).
//!
//! A spec names a raw snapshot with the `raw:` prefix (`raw:/snap/vm.mem`,
//! `raw:nbd://host/export`); anything else is a swap device. The prefix is required rather
//! than guessed from the file: a swap device whose headers were damaged must fail to open
//! (and say so), not be served as raw bytes, and a file that is neither must be refused when
//! `serve` starts. The file must be exactly as large as the guest memory the VMM describes
//! (the end of its last region): a file of another size is the snapshot of another VM, and
//! serving it would hand the guest wrong pages.

use swapdev::backend::spec::{parse_spec, BackendSpec};

use super::{OpenedSource, ProviderError};
use crate::source::{ImageFileSource, PageSource};
use crate::vm::GuestLayout;

/// The prefix naming a raw snapshot in a spec.
pub const RAW_PREFIX: &str = "raw:";

/// What a spec serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    /// A swap device (the spec as given).
    SwapDevice(String),
    /// A raw snapshot; the spec without its `raw:` prefix.
    Raw(String),
}

/// The raw snapshot a spec names with the `raw:` prefix, if it does.
pub fn raw_target(spec: &str) -> Option<&str> {
    spec.strip_prefix(RAW_PREFIX)
}

/// Decide what `spec` serves: `raw:...` is a raw snapshot, anything else a swap device
/// (opened and checked as usual).
pub fn classify(spec: &str) -> Result<SpecKind, ProviderError> {
    match raw_target(spec) {
        Some("") => Err(ProviderError::RawEmpty {
            spec: spec.to_string(),
        }),
        Some(target) => Ok(SpecKind::Raw(target.to_string())),
        None => Ok(SpecKind::SwapDevice(spec.to_string())),
    }
}

/// Open the raw snapshot `target` (a path or a backend spec, without `raw:`) for a VM of
/// `layout`, checking its size against the guest memory.
pub fn open(target: &str, layout: &GuestLayout) -> Result<OpenedSource, ProviderError> {
    let page_size = layout.page_size();
    let expected = layout.span_bytes();
    let description = format!("raw snapshot {target}");
    let source_err = |source| ProviderError::Source {
        description: description.clone(),
        source,
    };
    let source = match parse_spec(target) {
        Ok(BackendSpec::File(path)) => ImageFileSource::open(&path, page_size, layout.pages()),
        _ => ImageFileSource::open_spec(target, page_size, layout.pages()),
    }
    .map_err(source_err)?;
    let len = source.image_len();
    if len != expected {
        return Err(ProviderError::RawSize {
            spec: target.to_string(),
            len,
            expected,
        });
    }
    Ok(OpenedSource {
        source: Box::new(source) as Box<dyn PageSource>,
        description,
        swapdev: None,
    })
}

/// Read-only check at start-up that a raw snapshot can be opened (the size is checked when
/// the VM attaches: only then are its regions known).
pub fn check_readable(target: &str) -> Result<(), ProviderError> {
    if let Ok(BackendSpec::File(path)) = parse_spec(target) {
        std::fs::File::open(&path).map_err(|source| ProviderError::RawProbe {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Region;
    use std::path::Path;
    use swapdev::format::header::DEVICE_MAGIC;

    fn layout(pages: u64) -> GuestLayout {
        GuestLayout::new(
            4096,
            vec![
                Region {
                    host_addr: 0x1000_0000,
                    size: pages / 2 * 4096,
                    offset: 0,
                },
                Region {
                    host_addr: 0x4000_0000,
                    size: (pages - pages / 2) * 4096,
                    offset: pages / 2 * 4096,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn only_the_prefix_names_a_raw_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        // A file without the device magic is still a swap device spec: opening it as one
        // fails with its own error (a damaged device is never served as raw bytes).
        let raw = dir.path().join("vm.mem");
        std::fs::write(&raw, vec![1u8; 8192]).unwrap();
        let dev = dir.path().join("vm.swap");
        let mut header = DEVICE_MAGIC.to_vec();
        header.resize(8192, 0);
        std::fs::write(&dev, header).unwrap();
        let s = |p: &Path| p.display().to_string();
        assert_eq!(classify(&s(&raw)).unwrap(), SpecKind::SwapDevice(s(&raw)));
        assert_eq!(classify(&s(&dev)).unwrap(), SpecKind::SwapDevice(s(&dev)));
        let named = format!("raw:{}", s(&raw));
        assert_eq!(classify(&named).unwrap(), SpecKind::Raw(s(&raw)));
        // The prefix wins even over the magic.
        let forced = format!("raw:{}", s(&dev));
        assert_eq!(classify(&forced).unwrap(), SpecKind::Raw(s(&dev)));
        let nbd = "nbd://127.0.0.1:10809/x";
        assert_eq!(classify(nbd).unwrap(), SpecKind::SwapDevice(nbd.into()));
        assert_eq!(
            classify("raw:nbd://h/x").unwrap(),
            SpecKind::Raw("nbd://h/x".into())
        );
        assert!(matches!(
            classify("raw:"),
            Err(ProviderError::RawEmpty { .. })
        ));
    }

    #[test]
    fn open_checks_the_size_against_the_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.mem");
        std::fs::write(&path, vec![7u8; 16 * 4096]).unwrap();
        let target = path.display().to_string();
        let opened = open(&target, &layout(16)).unwrap();
        assert!(opened.swapdev.is_none());
        assert_eq!(opened.source.capacity_pages(), 16);
        for pages in [15, 17] {
            let err = open(&target, &layout(pages)).err().unwrap();
            let text = err.to_string();
            assert!(
                matches!(err, ProviderError::RawSize { len, expected, .. }
                    if len == 16 * 4096 && expected == pages * 4096),
                "{text}"
            );
            assert!(text.contains("65536") && text.contains("vm.mem"), "{text}");
        }
        let missing = dir.path().join("none").display().to_string();
        assert!(open(&missing, &layout(16)).is_err());
        assert!(check_readable(&missing).is_err());
        assert!(check_readable(&target).is_ok());
    }
}
