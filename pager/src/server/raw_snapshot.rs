//! Raw memory snapshots (e.g. Firecracker's snapshot memory file) served as they are: no
//! `swapdev import` first, and the file is never written (it is opened read-only).
//!
//! A spec names a raw snapshot with the `raw:` prefix (`raw:/snap/vm.mem`,
//! `raw:nbd://host/export`); [`classify`] also recognises a plain local path whose file
//! has the swap-device magic in neither header copy (bytes 0 and 4096). Files found by the
//! `--swapdev-dir` rule are always swap devices. The file must be exactly as large as the
//! guest memory the VMM describes (the end of its last region): a file of another size is
//! the snapshot of another VM, and serving it would hand the guest wrong pages.

use swapdev::backend::spec::{parse_spec, BackendSpec};
use swapdev::format::header::DEVICE_MAGIC;

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

/// Decide what `spec` serves: `raw:...` is a raw snapshot; a local file that does not
/// begin with the swap-device magic is one too; anything else (network specs, swap
/// devices, missing files) is a swap device, opened and checked as usual.
pub fn classify(spec: &str) -> Result<SpecKind, ProviderError> {
    if let Some(target) = raw_target(spec) {
        if target.is_empty() {
            return Err(ProviderError::RawEmpty {
                spec: spec.to_string(),
            });
        }
        return Ok(SpecKind::Raw(target.to_string()));
    }
    let Ok(BackendSpec::File(path)) = parse_spec(spec) else {
        return Ok(SpecKind::SwapDevice(spec.to_string()));
    };
    let is_device = match std::fs::File::open(&path) {
        // Not there or unreadable: the swap-device path reports it with its own error.
        Err(_) => true,
        Ok(f) => {
            // Either header copy (A at 0, B at 4096): a torn copy A must not make a swap
            // device look raw.
            let mut device = false;
            for at in HEADER_COPIES {
                match magic_at(&f, at) {
                    Ok(found) => device |= found,
                    Err(source) => return Err(ProviderError::RawProbe { path, source }),
                }
            }
            device
        }
    };
    Ok(if is_device {
        SpecKind::SwapDevice(spec.to_string())
    } else {
        SpecKind::Raw(spec.to_string())
    })
}

/// Where the swap device's two header copies begin.
const HEADER_COPIES: [u64; 2] = [0, 4096];

/// Whether the device magic is at byte `at` of `f` (a file shorter than that: no).
fn magic_at(f: &std::fs::File, at: u64) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; DEVICE_MAGIC.len()];
    match f.read_exact_at(&mut magic, at) {
        Ok(()) => Ok(magic == DEVICE_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
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
    fn classify_by_prefix_and_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("vm.mem");
        std::fs::write(&raw, vec![1u8; 8192]).unwrap();
        let dev = dir.path().join("vm.swap");
        let mut header = DEVICE_MAGIC.to_vec();
        header.resize(8192, 0);
        std::fs::write(&dev, header).unwrap();
        // Copy A torn, copy B intact: still a swap device.
        let torn = dir.path().join("torn.swap");
        let mut header = vec![0u8; 4096];
        header.extend_from_slice(&DEVICE_MAGIC);
        header.resize(3 * 4096, 0);
        std::fs::write(&torn, header).unwrap();
        let tiny = dir.path().join("tiny");
        std::fs::write(&tiny, b"abc").unwrap();
        let s = |p: &Path| p.display().to_string();
        assert_eq!(classify(&s(&raw)).unwrap(), SpecKind::Raw(s(&raw)));
        assert_eq!(classify(&s(&dev)).unwrap(), SpecKind::SwapDevice(s(&dev)));
        assert_eq!(classify(&s(&tiny)).unwrap(), SpecKind::Raw(s(&tiny)));
        assert_eq!(classify(&s(&torn)).unwrap(), SpecKind::SwapDevice(s(&torn)));
        // The prefix wins even over the magic.
        let forced = format!("raw:{}", s(&dev));
        assert_eq!(classify(&forced).unwrap(), SpecKind::Raw(s(&dev)));
        let missing = s(&dir.path().join("none"));
        assert_eq!(classify(&missing).unwrap(), SpecKind::SwapDevice(missing));
        let nbd = "nbd://127.0.0.1:10809/x";
        assert_eq!(classify(nbd).unwrap(), SpecKind::SwapDevice(nbd.into()));
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
