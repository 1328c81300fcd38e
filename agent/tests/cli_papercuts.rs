//! Papercuts a new user hits, run against the real binary: size arguments take K/M/G
//! suffixes (`swapdev create --size 512M`, `--page-size 2M`), and `serve` refuses to start
//! with a named swap device it cannot open, naming the option and the device, or beside an
//! incoming migration's journal without the migration engine.

use std::process::Command;

fn pagewise(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagewise"))
        .args(args)
        .output()
        .expect("running pagewise");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn swapdev_create_takes_size_suffixes() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("vm1.swap");
    let dev = dev.to_str().unwrap();
    let (ok, text) = pagewise(&["swapdev", "create", dev, "--size", "512M"]);
    assert!(ok, "{text}");
    let (ok, text) = pagewise(&["swapdev", "inspect", dev, "--json"]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["capacity_pages"], 131072, "{v}");

    let huge = dir.path().join("huge.swap");
    let (ok, text) = pagewise(&[
        "swapdev",
        "create",
        huge.to_str().unwrap(),
        "--size",
        "4M",
        "--page-size",
        "2M",
    ]);
    assert!(ok, "{text}");
    let (_, text) = pagewise(&["swapdev", "inspect", huge.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["capacity_pages"].as_u64(), v["page_size"].as_u64()),
        (Some(2), Some(2 << 20)),
        "{v}"
    );

    let (ok, text) = pagewise(&["swapdev", "create", dev, "--size", "12Q", "--force"]);
    assert!(!ok);
    assert!(text.contains("12Q"), "the refusal names the value: {text}");
}

#[test]
fn serve_refuses_a_named_device_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pager.sock");
    let (ok, text) = pagewise(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--swapdev",
        "/no/such/file.swap",
    ]);
    assert!(!ok, "serve started with a missing device: {text}");
    assert!(
        text.contains("--swapdev") && text.contains("/no/such/file.swap"),
        "{text}"
    );
    let not_a_device = dir.path().join("junk");
    std::fs::write(&not_a_device, vec![7u8; 1 << 16]).unwrap();
    let spec = format!(
        "fc1={}:{}",
        dir.path().join("fc1.sock").display(),
        not_a_device.display()
    );
    let (ok, text) = pagewise(&["serve", "--socket", sock.to_str().unwrap(), "--vm", &spec]);
    assert!(
        !ok,
        "serve started with a file that is no swap device: {text}"
    );
    assert!(
        text.contains("--vm fc1") && text.contains("not a usable swap device"),
        "{text}"
    );
}

/// A destination daemon killed after a switchover left a journal: a daemon started without
/// the migration engine (no `--psk-file`) would serve that VM's re-attach as an ordinary VM
/// (the pages still on the source reading as zeros), so it refuses to start and says why.
#[test]
fn serve_without_the_migration_engine_refuses_an_incoming_journal() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pager.sock");
    let journals = dir.path().join("journal");
    std::fs::create_dir(&journals).unwrap();
    std::fs::write(journals.join("vm1.incoming"), b"PWDJRNL1").unwrap();
    let (ok, text) = pagewise(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--swapdev-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok, "serve started beside an incoming journal: {text}");
    assert!(
        text.contains("vm1.incoming") && text.contains("--psk-file"),
        "{text}"
    );
}
