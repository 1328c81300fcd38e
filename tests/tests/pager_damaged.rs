//! A page whose copy on the swap device is damaged is never placed: an unmodified QEMU guest
//! (memverify) under `pagewise serve` has its cold pages evicted, the device file is then
//! damaged on disk (a byte flipped in every 4 KiB past its first MiB, as a failing disk or
//! a stray write would), and the guest goes on touching its pages. The first fault on a
//! damaged page must pause the VM (SIGSTOP to QEMU, the daemon's default
//! `--on-damaged-page pause`), the daemon's log and `pagewise stats` must name the page,
//! and the guest must never have been handed garbage (memverify reports no bad page).
//!
//! Run: `cargo test -p pagewise-tests --release --test pager_damaged`

mod qemu_lab;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_lab::*;

const RAM_MIB: u64 = 256;

/// Flip one byte in every 4 KiB of `path` past its first MiB; the number flipped.
fn damage(path: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the swap device file");
    let len = f.metadata().unwrap().len();
    let mut flipped = 0;
    let mut at = 1 << 20;
    while at < len {
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at + 123)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0x5a;
        f.seek(SeekFrom::Start(at + 123)).unwrap();
        f.write_all(&b).unwrap();
        flipped += 1;
        at += 4096;
    }
    f.sync_all().unwrap();
    flipped
}

/// The state letter of process `pid` in /proc (R, S, T...).
fn proc_state(pid: i64) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(") ")
        .next()
        .and_then(|s| s.chars().next())
        .unwrap_or('?')
}

#[test]
fn a_damaged_page_pauses_the_vm_names_the_page_and_is_never_placed() {
    let mut vm = start_under_daemon(
        "dmg",
        RAM_MIB,
        "memverify.mib=96 memverify.hot_mib=8 memverify.hot_rate_mibs=2 \
         memverify.verify_secs=3 memverify.duration_secs=120",
        &[],
    );
    vm.guest
        .wait_for("memverify: pass 1 ", Duration::from_secs(180));
    let out = vm.evict(&["--target-rss", "48M", "--json"]);
    eprintln!("evicted: {out}");
    let flipped = damage(&vm.guest.device);
    eprintln!("flipped {flipped} bytes of {}", vm.guest.device.display());

    // memverify's next verification pass faults its evicted pages back in.
    let start = Instant::now();
    let record = loop {
        let stats = vm.stats();
        if !stats["damaged"].is_null() {
            break stats;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no damaged page reported: {stats}\n{}",
            vm.daemon.proc.output()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let damaged = &record["damaged"];
    eprintln!("damaged: {damaged}");
    let page = damaged["page"].as_u64().expect("the page is named");
    assert!(
        damaged["error"]
            .as_str()
            .unwrap_or_default()
            .contains("checksum"),
        "{damaged}"
    );
    let pid = record["pid"].as_i64().unwrap();
    assert_eq!(damaged["paused_pid"].as_i64(), Some(pid), "{damaged}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(comm.starts_with("qemu"), "paused pid {pid} is {comm:?}");
    let start = Instant::now();
    while proc_state(pid) != 'T' && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(proc_state(pid), 'T', "QEMU is not stopped");
    assert!(
        record["metrics"]["pages_damaged"].as_u64().unwrap_or(0) >= 1,
        "{record}"
    );
    let log = vm.daemon.proc.output();
    assert!(
        log.lines()
            .any(|l| l.contains("a guest thread waits on a damaged page")
                && l.contains(&format!("page={page}"))),
        "the daemon's log does not name page {page}:\n{log}"
    );

    // Paused, the guest stays as it was: still attached, no bad page seen, no progress.
    let serial = vm.guest.serial_text();
    std::thread::sleep(Duration::from_secs(3));
    assert!(vm.guest.qemu.running(), "QEMU ended");
    assert_eq!(vm.guest.serial_text(), serial, "a paused guest printed");
    assert!(
        !serial.contains("BAD "),
        "the guest saw a bad page:\n{serial}"
    );
    assert!(!serial.contains("RESULT=FAIL"), "{serial}");
    eprintln!(
        "page {page} damaged, QEMU {pid} paused, {} faults held",
        damaged["faults_held"]
    );
}
