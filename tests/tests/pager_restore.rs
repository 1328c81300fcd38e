//! Snapshot restore (issue 11) on the real kernel: a raw Firecracker-style memory file
//! served as it is (never written, shared by two VMs, refused at the wrong size), and
//! `pagewise serve`'s default policy restoring with far fewer waits than one page per fault.

mod pager_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use pager_support::{verified, Lab, SEED, ZERO_EVERY};
use pagewise_tools::daemon;

const PAGES: u64 = 4096;

/// A verifiable raw image of `pages` pages at `path` (what a snapshot's memory file holds).
fn raw_image(lab: &Lab, path: &Path, pages: u64) {
    daemon::run_checked(Command::new(&lab.memhog).args([
        "gen-image",
        "--pages",
        &pages.to_string(),
        "--seed",
        &SEED.to_string(),
        "--zero-every",
        &ZERO_EVERY.to_string(),
        "--out",
        path.to_str().unwrap(),
    ]))
    .unwrap_or_else(|e| panic!("{e:#}"));
}

fn first_touch_share(report: &serde_json::Value) -> f64 {
    let waits = report["first_touch_faults"].as_u64().unwrap() as f64;
    let touched = report["pages_touched"].as_u64().unwrap() as f64;
    waits / touched.max(1.0)
}

#[test]
fn a_raw_snapshot_is_served_read_only_to_two_vms_and_refused_at_the_wrong_size() {
    let lab = Lab::new();
    let snapshot = lab.path("vm.mem");
    raw_image(&lab, &snapshot, PAGES);
    let before = std::fs::read(&snapshot).unwrap();
    // Read-only on disk too: serving it must not need write access.
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o444)).unwrap();
    let named = format!("raw:{}", snapshot.display());
    // fc1 and fc2: the same file, named raw.
    let mut d = lab.serve(
        &[("fc1", Path::new(&named)), ("fc2", Path::new(&named))],
        "",
    );
    for (vm, pattern) in [("fc1", "random"), ("fc2", "seq")] {
        let out = lab.memhog(
            vm,
            PAGES,
            &[
                "--handshake",
                "firecracker",
                "--regions",
                "2",
                "--pattern",
                pattern,
            ],
        );
        let r = verified(&out, &d);
        assert_eq!(r["mismatches"], 0, "{vm}");
        assert!(
            r["pages_touched"].as_u64().unwrap() > PAGES / 2,
            "{vm}: {r}"
        );
    }
    // Both at once: a snapshot serves its clones side by side.
    let cmds: Vec<_> = ["fc1", "fc2"]
        .iter()
        .map(|vm| {
            lab.memhog_cmd(vm, PAGES, &["--regions", "2", "--pattern", "random"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in cmds {
        verified(&c.wait_with_output().unwrap(), &d);
    }
    // A VM whose memory is larger than the file: refused, naming both sizes.
    let out = lab.memhog("fc1", PAGES + 16, &["--handshake", "pagewise"]);
    assert!(!out.status.success(), "a too-large VM was served");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("holds {} bytes", PAGES * 4096))
            && stderr.contains(&format!("{} bytes", (PAGES + 16) * 4096)),
        "{stderr}"
    );
    // Smaller too (the file is some other VM's snapshot).
    let out = lab.memhog("fc2", PAGES - 16, &["--handshake", "pagewise"]);
    assert!(!out.status.success(), "a too-small VM was served");
    assert!(d.alive(), "{}", d.log_text());
    drop(d);
    assert_eq!(
        std::fs::read(&snapshot).unwrap(),
        before,
        "the snapshot was written"
    );
}

#[test]
fn the_default_policy_restores_with_few_waits_where_one_page_per_fault_waits_on_every_page() {
    let lab = Lab::new();
    let dev = lab.device("d", PAGES);
    let args = ["--pattern", "random", "--regions", "2"];
    let d = lab.serve(&[("d", &dev)], "");
    let defaults = verified(&lab.memhog("d", PAGES, &args), &d);
    drop(d);
    let d = lab.serve(&[("d", &dev)], "none");
    let none = verified(&lab.memhog("d", PAGES, &args), &d);
    drop(d);
    let (ours, one) = (first_touch_share(&defaults), first_touch_share(&none));
    assert!(
        one > 0.9,
        "one page per fault waited on only {one:.2} of pages"
    );
    assert!(
        ours < 0.5,
        "the defaults waited on {ours:.2} of first touches (none: {one:.2})"
    );
}
