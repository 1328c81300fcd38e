//! memhog against the in-process minimal handler: both handshakes, both memory kinds,
//! writes, a mid-run discard, and a wrong image that must be caught.

use std::path::Path;
use std::process::{Command, Output};

use pagewise_tools::image::{write_image, ImageSpec, PAGE_SIZE};
use pagewise_tools::minipager::{MiniPager, MiniSource};
use std::sync::atomic::Ordering;

const PAGES: u64 = 512;

fn image(dir: &Path, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("image-{seed}"));
    write_image(
        &path,
        PAGES,
        ImageSpec {
            seed,
            zero_every: 7,
        },
    )
    .unwrap();
    path
}

fn memhog(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memhog"))
        .args(args)
        .output()
        .expect("running memhog")
}

fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "memhog output is not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn run_against_minipager(
    memory: &str,
    handshake: &str,
    extra: &[&str],
    served_seed: u64,
) -> (Output, MiniPager) {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), served_seed);
    let sock = dir.path().join("pager.sock");
    let pager =
        MiniPager::spawn(&sock, MiniSource::Image(std::fs::File::open(&img).unwrap())).unwrap();
    let pages = PAGES.to_string();
    let mut args = vec![
        "run",
        "--pages",
        &pages,
        "--memory",
        memory,
        "--socket",
        sock.to_str().unwrap(),
        "--handshake",
        handshake,
        "--seed",
        "1",
        "--zero-every",
        "7",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = memhog(&args);
    (out, pager)
}

#[test]
fn firecracker_anon_verifies_writes_and_discard() {
    let (out, pager) = run_against_minipager(
        "anon",
        "firecracker",
        &[
            "--pattern",
            "random",
            "--threads",
            "2",
            "--passes",
            "3",
            "--write-ratio",
            "0.3",
            "--remove",
            "100:50@1",
        ],
        1,
    );
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["removed_pages"], 50);
    assert!(r["writes"].as_u64().unwrap() > 0);
    let outcome = pager.join().unwrap();
    assert_eq!(outcome.handshake, "firecracker");
    assert_eq!(outcome.regions[0].size, PAGES as usize * PAGE_SIZE);
}

#[test]
fn pagewise_memfd_sequential_faults_every_page_once() {
    let (out, pager) = run_against_minipager("memfd", "pagewise", &["--passes", "2"], 1);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    assert_eq!(r["mismatches"], 0);
    assert_eq!(r["pages_touched"], PAGES);
    assert_eq!(r["first_touch_faults"], PAGES);
    assert_eq!(r["accesses"], 2 * PAGES);
    let faults = pager.stats.faults.load(Ordering::Relaxed);
    assert_eq!(faults, PAGES);
    assert_eq!(pager.join().unwrap().handshake, "pagewise");
}

#[test]
fn a_wrong_image_is_caught_and_named() {
    let (out, _pager) = run_against_minipager("anon", "firecracker", &[], 2);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MISMATCH page 0: expected version 0, found intact page 0 (seed 0x2)"),
        "{stderr}"
    );
    assert_eq!(json(&out)["mismatched_pages"], PAGES - PAGES / 7);
}

#[test]
fn prefill_baseline_and_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), 1);
    let pages = PAGES.to_string();
    let out = memhog(&[
        "run",
        "--pages",
        &pages,
        "--prefill",
        img.to_str().unwrap(),
        "--zero-every",
        "7",
        "--pattern",
        "zipf",
        "--passes",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    assert_eq!(r["first_touch_faults"], 0);
    assert!(r["prefill_seconds"].as_f64().unwrap() > 0.0);

    let out = memhog(&["run", "--pages", "64", "--prefill", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("has 2097152 bytes but the memory has 262144"));
    let out = memhog(&["run", "--pages", "64"]);
    assert_eq!(out.status.code(), Some(2));
    let out = memhog(&["check-image", "--zero-every", "7", img.to_str().unwrap()]);
    assert!(out.status.success());
    let out = memhog(&["check-image", "--zero-every", "3", img.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn kvm_guest_reads_pages_served_through_uffd() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    write_image(
        &img,
        256,
        ImageSpec {
            seed: 5,
            zero_every: 9,
        },
    )
    .unwrap();
    for (handshake, served) in [("firecracker", 5u64), ("pagewise", 5), ("firecracker", 6)] {
        let sock = dir.path().join(format!("kvm-{handshake}-{served}.sock"));
        let served_img = if served == 5 {
            img.clone()
        } else {
            let other = dir.path().join("other");
            write_image(
                &other,
                256,
                ImageSpec {
                    seed: served,
                    zero_every: 9,
                },
            )
            .unwrap();
            other
        };
        let pager = MiniPager::spawn(
            &sock,
            MiniSource::Image(std::fs::File::open(&served_img).unwrap()),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kvm_guest"))
            .args(["--socket", sock.to_str().unwrap(), "--handshake", handshake])
            .args(["--seed", "5", "--zero-every", "9", "--json"])
            .output()
            .unwrap();
        let r = json(&out);
        if served == 5 {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(r["ok"], true);
            // Every data page faulted once through the uffd (the code page was placed).
            assert_eq!(pager.stats.faults.load(Ordering::Relaxed), 255);
        } else {
            assert_eq!(out.status.code(), Some(1));
            assert_eq!(r["ok"], false);
        }
    }
}
