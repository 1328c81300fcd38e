//! The migration endpoint of a real `pagewise serve` under a hostile peer
//! (`tools/hostile`): each misbehaviour gets its exact error, in the frame the peer
//! receives and in the daemon's log line, and after each one the endpoint still completes
//! a valid authenticated handshake. Loopback only, no QEMU (a setup naming a QEMU that does
//! not exist must fail cleanly, before any switchover).

mod qemu_lab;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command as Cmd;
use std::time::{Duration, Instant};

use agent::migrate::auth::Psk;
use agent::migrate::frame::{Command, MIN_VERSION, VERSION};
use pagewise_hostile as hostile;
use pagewise_hostile::{End, Endpoint, Outcome};
use qemu_lab::Proc;

const KEY: &str = "hostile-test-key-0123456789abcdef";

/// A `pagewise serve --migrate-listen` on a free loopback port, its files in a temp dir and
/// its incoming-VM directory under /dev/shm (both removed on drop).
struct Daemon {
    proc: Proc,
    addr: SocketAddr,
    migrate_dir: PathBuf,
    swapdev_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("psk");
        std::fs::write(&key, format!("{KEY}\n")).unwrap();
        let swapdev_dir = dir.path().join("swap");
        std::fs::create_dir(&swapdev_dir).unwrap();
        let migrate_dir = PathBuf::from(format!(
            "/dev/shm/pagewise-hostile-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let (bin, preload) = (qemu_lab::pagewise_bin(), qemu_lab::preload_lib());
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap()
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut cmd = Cmd::new(&bin);
            cmd.arg("serve")
                .arg("--socket")
                .arg(dir.path().join("pw.sock"))
                .arg("--swapdev-dir")
                .arg(&swapdev_dir)
                .arg("--migrate-listen")
                .arg(addr.to_string())
                .arg("--psk-file")
                .arg(&key)
                .arg("--migrate-dir")
                .arg(&migrate_dir)
                .arg("--preload")
                .arg(&preload)
                .env("NO_COLOR", "1")
                .env_remove("RUST_LOG");
            let mut proc = Proc::spawn("pagewise-serve", cmd, dir.path());
            let start = Instant::now();
            while proc.running() && start.elapsed() < Duration::from_secs(20) {
                if proc.output().contains("migration endpoint on") {
                    return Daemon {
                        proc,
                        addr,
                        migrate_dir,
                        swapdev_dir,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let out = proc.output();
            assert!(
                out.contains("binding"),
                "pagewise serve did not start:\n{out}"
            );
        }
        panic!("no free port for the migration endpoint");
    }

    fn endpoint(&self, patience: Duration) -> Endpoint {
        Endpoint {
            addr: self.addr,
            key: Psk::new(KEY.as_bytes().to_vec()),
            patience,
        }
    }

    /// The daemon's log line naming `peer` that contains `needle` (waits for it).
    fn log_line(&mut self, peer: Option<SocketAddr>, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.proc.output();
            let hit = log.lines().find(|l| {
                l.contains(needle) && peer.is_none_or(|p| l.contains(&format!(" {p}: ")))
            });
            if let Some(l) = hit {
                return l.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no log line with {needle:?} for peer {peer:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint survived: the daemon runs and a valid handshake completes.
    fn survives(&mut self) {
        assert!(
            self.proc.running(),
            "the daemon died:\n{}",
            self.proc.output()
        );
        let opened = hostile::handshake(&self.endpoint(Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("no valid handshake after the scenario: {e:?}"));
        assert_eq!(opened.version, VERSION);
    }

    /// The daemon's peak virtual memory (VmPeak, KiB).
    fn vm_peak_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmPeak:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmPeak")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        let _ = std::fs::remove_dir_all(&self.migrate_dir);
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const QUICK: Duration = Duration::from_secs(5);

/// Run `scenario`, check the reason the peer got and the daemon's log line for it, and
/// that the endpoint survived. Returns the outcome for further checks.
fn refused_with(
    scenario: fn(&Endpoint) -> Result<Outcome, hostile::HostileError>,
    reason: &str,
    log: &str,
) -> (Daemon, Outcome) {
    let mut d = Daemon::start();
    let out = scenario(&d.endpoint(QUICK)).expect("the scenario runs");
    assert_eq!(out.refusal(), Some(reason), "{out}");
    assert_eq!(out.end, End::Closed, "{out}");
    d.log_line(None, log);
    d.survives();
    (d, out)
}

#[test]
fn a_peer_without_the_key_is_refused() {
    let (mut d, out) = refused_with(
        hostile::wrong_key,
        "authentication failed: wrong pre-shared key",
        "the peer's proof of the pre-shared key is wrong (wrong key, or not our peer)",
    );
    assert_eq!(out.commands(), [Command::Hello, Command::Refuse], "{out}");
    d.log_line(Some(out.local), "refused migration peer");
}

#[test]
fn a_hello_with_no_common_version_is_refused() {
    let reason =
        format!("no common protocol version: we speak {MIN_VERSION}..={VERSION}, the peer 99..=99");
    let (mut d, out) = refused_with(hostile::no_common_version, &reason, &reason);
    assert_eq!(out.commands(), [Command::Refuse], "{out}");
    let line = d.log_line(Some(out.local), &reason);
    assert!(line.contains("refused migration peer"), "{line}");
}

#[test]
fn a_bad_magic_is_refused() {
    let reason =
        "bad frame header: bad frame magic [47, 45, 54, 20] (not a pagewise migration peer?)";
    let (mut d, out) = refused_with(hostile::bad_magic, reason, reason);
    d.log_line(
        Some(out.local),
        &format!("the connection failed during the handshake: {reason}"),
    );
}

#[test]
fn a_frame_of_a_future_version_is_refused() {
    let reason = format!(
        "bad frame header: frame version 99 is not supported (this build speaks {MIN_VERSION}..={VERSION})"
    );
    let (mut d, out) = refused_with(hostile::future_frame_version, &reason, &reason);
    d.log_line(Some(out.local), &reason);
}

#[test]
fn a_length_over_the_cap_is_refused_from_the_header_alone() {
    let mut d = Daemon::start();
    let peak = d.vm_peak_kib();
    let out = hostile::oversized_header(&d.endpoint(QUICK)).unwrap();
    // Refused at once: the endpoint neither made room for the 4 GiB nor waited for them.
    let grown = d.vm_peak_kib().saturating_sub(peak);
    assert!(
        grown < 1 << 20,
        "the daemon's peak mapping grew by {grown} KiB"
    );
    let reason = "bad frame header: Hello frame of 4294967295 bytes exceeds its cap of 56 bytes";
    assert_eq!(out.refusal(), Some(reason), "{out}");
    assert_eq!(out.end, End::Closed, "{out}");
    assert!(out.elapsed < Duration::from_secs(2), "{out}");
    d.log_line(Some(out.local), reason);
    d.survives();
}

#[test]
fn a_header_cut_short_is_logged() {
    let mut d = Daemon::start();
    let out = hostile::truncated_header(&d.endpoint(QUICK)).unwrap();
    assert_eq!(out.commands(), [], "{out}");
    assert_eq!(out.end, End::Closed, "{out}");
    d.log_line(
        Some(out.local),
        "the connection failed during the handshake: the peer closed the connection inside a frame header (7 of 16 bytes)",
    );
    d.survives();
}

#[test]
fn a_frame_cut_short_is_logged() {
    let mut d = Daemon::start();
    let out = hostile::truncated_frame(&d.endpoint(QUICK)).unwrap();
    assert_eq!(out.commands(), [], "{out}");
    assert_eq!(out.end, End::Closed, "{out}");
    d.log_line(
        Some(out.local),
        "the peer closed the connection inside a Hello frame (20 of 56 payload bytes)",
    );
    d.survives();
}

#[test]
fn a_silent_peer_is_timed_out_while_others_are_served() {
    let mut d = Daemon::start();
    let ep = d.endpoint(hostile::STALL_PATIENCE);
    let staller = std::thread::spawn(move || hostile::stall(&ep).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    // Served meanwhile: a stalled handshake holds no one else up.
    d.survives();
    let out = staller.join().unwrap();
    assert_eq!(out.end, End::Closed, "{out}");
    assert_eq!(out.commands(), [], "{out}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&out.elapsed),
        "the handshake timeout is 10 s: {out}"
    );
    d.log_line(
        Some(out.local),
        "the connection failed during the handshake: the peer sent nothing for longer than the read timeout",
    );
    d.survives();
}

#[test]
fn a_page_before_the_setup_is_refused() {
    let reason = "the source sent Page while the destination was waiting for Setup";
    let (mut d, out) = refused_with(hostile::page_before_setup, reason, reason);
    assert_eq!(
        out.commands(),
        [Command::Hello, Command::AuthProof, Command::Refuse],
        "{out}"
    );
    d.log_line(
        Some(out.local),
        &format!("migration from {}: {reason}", out.local),
    );
}

#[test]
fn a_resume_of_a_migration_nobody_paused_is_refused() {
    let reason = "no migration of VM \"vm1\" with this session is known here";
    let (mut d, out) = refused_with(
        hostile::resume_unknown,
        reason,
        &format!("refused to resume a migration: {reason}"),
    );
    assert_eq!(
        out.commands(),
        [Command::Hello, Command::AuthProof, Command::Refuse],
        "{out}"
    );
    d.log_line(
        Some(out.local),
        &format!("migration from {}: refused to resume", out.local),
    );
}

#[test]
fn a_setup_over_its_cap_is_refused() {
    let reason = "bad frame header: Setup frame of 262145 bytes exceeds its cap of 262144 bytes";
    let (mut d, out) = refused_with(hostile::oversized_setup, reason, reason);
    d.log_line(
        Some(out.local),
        &format!("migration from {}: {reason}", out.local),
    );
}

/// A setup the destination refuses: the reason in an Abort, the same in the daemon's
/// `incoming migration failed` line, and nothing of the VM left behind.
fn bad_setup(scenario: fn(&Endpoint) -> Result<Outcome, hostile::HostileError>, reason: &str) {
    let (d, out) = refused_with(
        scenario,
        reason,
        &format!("incoming migration failed: {reason}"),
    );
    assert_eq!(
        out.commands(),
        [Command::Hello, Command::AuthProof, Command::Abort],
        "{out}"
    );
    let left: Vec<String> = files_in(&d.migrate_dir)
        .into_iter()
        .filter(|f| !f.ends_with(".qemu.out"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "left in --migrate-dir");
    assert_eq!(
        files_in(&d.swapdev_dir),
        Vec::<String>::new(),
        "left in --swapdev-dir"
    );
}

#[test]
fn a_setup_with_a_bad_vm_name_is_refused() {
    bad_setup(hostile::bad_vm_name, r#"invalid VM name "../etc""#);
}

#[test]
fn a_setup_whose_size_overflows_is_refused() {
    bad_setup(
        hostile::guest_size_overflow,
        "a guest of 18446744073709551615 pages of 4096 bytes is larger than this host accepts",
    );
}

#[test]
fn a_setup_over_the_size_limit_is_refused() {
    bad_setup(
        hostile::guest_too_large,
        "a guest of 524289 pages of 2097152 bytes is larger than this host accepts",
    );
}

#[test]
fn a_setup_without_mem_path_is_refused() {
    bad_setup(
        hostile::no_mem_path,
        "the source's QEMU command line: the source's command line has no memory-backend-file mem-path",
    );
}

#[test]
fn a_setup_without_qmp_is_refused() {
    bad_setup(
        hostile::no_qmp,
        "the source's QEMU command line has no -qmp unix: socket",
    );
}

#[test]
fn a_destination_that_cannot_start_qemu_fails_before_switchover() {
    bad_setup(
        hostile::missing_qemu,
        "the destination QEMU: starting /nonexistent/qemu: No such file or directory (os error 2)",
    );
}

#[test]
fn half_a_session_starts_nothing() {
    let mut d = Daemon::start();
    let out = hostile::lone_channel(&d.endpoint(Duration::from_secs(3))).unwrap();
    assert_eq!(out.end, End::Silent, "{out}");
    assert_eq!(
        out.commands(),
        [Command::Hello, Command::AuthProof],
        "{out}"
    );
    assert_eq!(files_in(&d.migrate_dir), Vec::<String>::new());
    assert_eq!(files_in(&d.swapdev_dir), Vec::<String>::new());
    d.survives();
}

#[test]
fn a_half_whose_other_half_never_comes_is_refused_after_the_pairing_window() {
    let mut d = Daemon::start();
    let ep = d.endpoint(QUICK);
    let half = hostile::lone_half(&ep).unwrap();
    std::thread::sleep(Duration::from_secs(31));
    // The next connection sweeps the halves older than the window.
    d.survives();
    let out = half.finish(Instant::now());
    assert_eq!(
        out.refusal(),
        Some("the other connection of this session did not arrive within 30s"),
        "{out}"
    );
    assert_eq!(out.end, End::Closed, "{out}");
}

#[test]
fn a_second_urgent_connection_for_one_session_is_refused() {
    let reason = "a second Urgent connection for one session";
    let (mut d, out) = refused_with(hostile::two_urgent, reason, reason);
    assert_eq!(
        out.commands(),
        [Command::Hello, Command::AuthProof, Command::Refuse],
        "{out}"
    );
    d.log_line(
        Some(out.local),
        &format!("refused migration peer {}: {reason}", out.local),
    );
}

#[test]
fn a_setup_for_a_vm_prepared_here_is_refused_and_the_vm_stays() {
    let mut d = Daemon::start();
    let control = d._dir.path().join("pw.sock.stats");
    let mut client = pager::server::ControlClient::connect(&control).unwrap();
    let spec: pager::server::protocol::PrepareSpec = serde_json::from_value(serde_json::json!({
        "vm": "busy",
        "layout": {"page_size": 4096, "regions": [{"offset": 0, "size": 1048576}]},
        "swapdev": "/nonexistent/busy.swap",
    }))
    .unwrap();
    let r = client
        .call(&pager::server::protocol::Request::Prepare(spec))
        .unwrap();
    assert_eq!(r.kind(), "prepared", "{r:?}");
    let out = hostile::setup(
        &d.endpoint(QUICK),
        &hostile::valid_setup("busy", "/nonexistent/qemu"),
    )
    .unwrap();
    assert_eq!(
        out.refusal(),
        Some(r#"VM "busy" is already served here"#),
        "{out}"
    );
    d.log_line(
        None,
        r#"incoming migration failed: VM "busy" is already served here"#,
    );
    // The VM that was here is untouched.
    let listed = client
        .call(&pager::server::protocol::Request::List)
        .unwrap();
    let text = format!("{listed:?}");
    assert!(text.contains("busy") && text.contains("Prepared"), "{text}");
    d.survives();
}

#[test]
fn a_swap_device_left_by_an_earlier_vm_of_the_name_is_kept() {
    let mut d = Daemon::start();
    let earlier = d.swapdev_dir.join("hostile-noqemu.swap");
    std::fs::write(&earlier, b"an earlier VM's pages").unwrap();
    let out = hostile::missing_qemu(&d.endpoint(QUICK)).unwrap();
    assert!(
        out.refusal()
            .is_some_and(|r| r.contains("starting /nonexistent/qemu")),
        "{out}"
    );
    // Set aside while the migration ran, put back when it failed.
    assert_eq!(
        files_in(&d.swapdev_dir),
        vec!["hostile-noqemu.swap".to_string()]
    );
    assert_eq!(std::fs::read(&earlier).unwrap(), b"an earlier VM's pages");
    d.survives();
}
