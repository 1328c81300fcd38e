//! The daemon's Unix sockets: created 0600 (0660 for `--socket-group`), and every attach
//! and control connection checked against SO_PEERCRED. The daemon runs as `nobody` here and
//! root (who passes the file mode) connects: refused, with the log line and the control
//! reply naming the peer and the rule, until `--allow-uid 0` lets it in.

mod qemu_lab;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_lab::{pagewise_bin, wait_for_text, Proc};

const NOBODY: u32 = 65534;

/// `pagewise serve` as `nobody` in a directory of its own, with `extra` arguments.
fn serve_as_nobody(dir: &Path, extra: &[&str]) -> Proc {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs the daemon as nobody: run it as root"
    );
    std::fs::create_dir_all(dir.join("swap")).unwrap();
    for d in [dir.to_path_buf(), dir.join("swap")] {
        std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(pagewise_bin());
    cmd.args(["serve", "--socket"])
        .arg(dir.join("pw.sock"))
        .arg("--swapdev-dir")
        .arg(dir.join("swap"))
        .args(extra)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .uid(NOBODY)
        .gid(NOBODY);
    // Its output goes elsewhere: the directory is nobody's.
    let logs = tempfile::tempdir().unwrap().keep();
    let mut proc = Proc::spawn("serve-nobody", cmd, &logs);
    let err = proc.stderr_path.clone();
    wait_for_text(&err, "listening on", Duration::from_secs(20), &mut proc);
    proc
}

fn stats(dir: &Path) -> std::process::Output {
    Command::new(pagewise_bin())
        .args(["stats", "--socket"])
        .arg(dir.join("pw.sock"))
        .output()
        .unwrap()
}

/// The first line of the daemon's log containing `needle` (waits for it).
fn log_line(proc: &Proc, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let log = proc.output();
        if let Some(l) = log.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no log line with {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mode_and_owner(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(p).unwrap();
    (m.mode() & 0o777, m.uid(), m.gid())
}

#[test]
fn sockets_are_owner_only_and_other_uids_are_refused_with_why() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("d");
    let daemon = serve_as_nobody(&home, &[]);
    let (attach, control) = (home.join("pw.sock"), home.join("pw.sock.stats"));
    assert_eq!(mode_and_owner(&attach), (0o600, NOBODY, NOBODY));
    assert_eq!(mode_and_owner(&control), (0o600, NOBODY, NOBODY));

    // Root passes the file mode, not the daemon's check.
    let out = stats(&home);
    assert!(!out.status.success());
    let rule = "is not allowed: this daemon serves uid 65534 (--allow-uid adds a uid)";
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the daemon refused: refused: pid ") && stderr.contains(rule),
        "{stderr}"
    );
    let line = log_line(&daemon, "refused control connection: ");
    assert!(line.contains(&format!("(uid 0, gid 0) {rule}")), "{line}");

    let mut s = UnixStream::connect(&attach).unwrap();
    let _ = s.write_all(b"[]");
    let pid = std::process::id();
    let line = log_line(&daemon, "refused attach connection: ");
    assert!(
        line.contains(&format!(
            "refused attach connection: pid {pid} (uid 0, gid 0) {rule}"
        )),
        "{line}"
    );
}

#[test]
fn an_allowed_uid_and_a_socket_group_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("d");
    let _daemon = serve_as_nobody(&home, &["--allow-uid", "root", "--socket-group", "65534"]);
    assert_eq!(
        mode_and_owner(&home.join("pw.sock")),
        (0o660, NOBODY, NOBODY)
    );
    assert_eq!(
        mode_and_owner(&home.join("pw.sock.stats")),
        (0o660, NOBODY, NOBODY)
    );
    let out = stats(&home);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_users_and_groups_stop_serve() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(pagewise_bin())
        .args(["serve", "--socket"])
        .arg(dir.path().join("pw.sock"))
        .arg("--swapdev-dir")
        .arg(dir.path())
        .args(["--socket-group", "no-such-group-pw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("pagewise: error: --socket-group no-such-group-pw: no such group"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
