//! Unit tests that need no server (the backend itself is tested against a real NFS-Ganesha
//! in tests/tests/nfs_backend.rs).

use super::locate::{split_export, split_parent};

fn v(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

#[test]
fn longest_export_at_a_component_boundary() {
    let exports = v(&["/srv", "/srv/vm", "/srv/vmx/", "/data"]);
    assert_eq!(
        split_export("/srv/vm/a/b.swap", &exports),
        Some(("/srv/vm".into(), "/a/b.swap".into()))
    );
    // "/srv/vmx/" (trailing slash) matches "/srv/vmx/..." but not "/srv/vmxy/...".
    assert_eq!(
        split_export("/srv/vmx/c.swap", &exports),
        Some(("/srv/vmx".into(), "/c.swap".into()))
    );
    assert_eq!(
        split_export("/srv/vmxy/c.swap", &exports),
        Some(("/srv".into(), "/vmxy/c.swap".into()))
    );
    assert_eq!(split_export("/other/x", &exports), None);
    // The export itself is not a file.
    assert_eq!(split_export("/data", &exports), None);
    assert_eq!(split_export("/data/", &exports), None);
    assert_eq!(
        split_export("/x/y", &v(&["/"])),
        Some(("/".into(), "/x/y".into()))
    );
}

#[test]
fn parent_directory_fallback() {
    assert_eq!(
        split_parent("/a/b/c.swap"),
        ("/a/b".into(), "/c.swap".into())
    );
    assert_eq!(split_parent("/c.swap"), ("/".into(), "/c.swap".into()));
}
