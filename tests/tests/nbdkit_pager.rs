//! `pagewise serve` answering a memhog guest's faults from a swap device on an nbdkit export
//! (memory plugin: the device lives only in nbdkit's RAM), made with
//! `pagewise swapdev import IMAGE nbd+unix:///...`.
//!
//! Run: `cargo build --workspace --release && cargo test --release -p pagewise-tests --test
//! nbdkit_pager`

#[path = "common/nbdkit_server.rs"]
mod nbdkit_server;
mod pager_support;

use std::path::Path;
use std::process::Command;

use nbdkit_server::{NbdkitServer, Plugin, Setup};
use pager_support::{verified, Lab, SEED, ZERO_EVERY};
use pagewise_tools::daemon;

const PAGES: u64 = 2048;

#[test]
fn serve_answers_faults_from_a_device_on_nbdkit() {
    let lab = Lab::new();
    let server = NbdkitServer::unix(
        &Setup::new(Plugin::Memory(64 << 20), "vm"),
        &lab.path("nbdkit.sock"),
        &lab.path("nbdkit.log"),
    );
    let image = lab.path("vm.img");
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
    let spec = server.spec();
    daemon::run_checked(
        Command::new(&lab.pagewise).args(daemon::import_args(&image, Path::new(&spec))),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log_text()));

    let d = lab.serve(&[("nbdkitvm", Path::new(&spec))], "none");
    let out = lab.memhog(
        "nbdkitvm",
        PAGES,
        &[
            "--handshake",
            "firecracker",
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
    assert!(r["pages_touched"].as_u64().unwrap() > PAGES / 2, "{r}");
    // No prefetch: every page's first touch was a fault answered with a read from nbdkit.
    assert_eq!(r["first_touch_faults"], r["pages_touched"], "{r}");
    drop(d);
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
