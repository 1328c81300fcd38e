//! `pagewise serve` answering a memhog guest's faults from a swap device on NFS
//! (`nfs://127.0.0.1/...`, libnfs) served by a real NFS-Ganesha started by the test. The
//! device is made with `pagewise swapdev import IMAGE nfs://...` (the CLI on NFS too).
//!
//! Run: `cargo build --workspace --release && cargo test --release -p pagewise-tests --test
//! nfs_pager`

#[path = "common/nfs_server.rs"]
mod nfs_server;
mod pager_support;

use std::path::Path;
use std::process::Command;

use nfs_server::NfsServer;
use pager_support::{verified, Lab, SEED, ZERO_EVERY};
use pagewise_tools::daemon;

const PAGES: u64 = 2048;

#[test]
fn serve_answers_faults_from_a_device_on_nfs() {
    let lab = Lab::new();
    let server = NfsServer::start();
    let image = lab.path("nfs.img");
    daemon::run_checked(Command::new(&lab.memhog).args([
        "gen-image",
        "--pages",
        &PAGES.to_string(),
        "--seed",
        &SEED.to_string(),
        "--zero-every",
        &ZERO_EVERY.to_string(),
        "--out",
        image.to_str().unwrap(),
    ]))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let spec = server.spec("nfs-vm.swap");
    daemon::run_checked(
        Command::new(&lab.pagewise).args(daemon::import_args(&image, Path::new(&spec))),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(server.file("nfs-vm.swap").metadata().unwrap().len() > 0);

    let d = lab.serve(&[("nfsvm", Path::new(&spec))], "bubble");
    let out = lab.memhog(
        "nfsvm",
        PAGES,
        &[
            "--handshake",
            "pagewise",
            "--pattern",
            "random",
            "--threads",
            "2",
            "--passes",
            "2",
            "--write-ratio",
            "0.2",
        ],
    );
    let r = verified(&out, &d);
    // Faults waited for the pager, i.e. for reads over NFS (the device exists only in the
    // server's export; `nfs://` is no local path); bubbling prefetched the rest.
    assert!(r["first_touch_faults"].as_u64().unwrap() > 0, "{r}");
    assert!(r["pages_touched"].as_u64().unwrap() > PAGES / 2, "{r}");
    assert!(r["writes"].as_u64().unwrap() > 0, "{r}");
    drop(d);
    // The device on the server is intact after the daemon let go of it.
    let out = Command::new(&lab.pagewise)
        .args(["swapdev", "fsck", &spec])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "swapdev fsck {spec}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
