//! A post-copy that loses its link, more than once: the migration link (a veth pair between
//! the lab's two hosts) is taken down while the guest's pages are still crossing. Both
//! daemons must notice (keepalive and TCP_USER_TIMEOUT: within ~8 s), pause the post-copy
//! (vCPUs that fault on a missing page wait; the rest of the guest runs), reconnect by
//! themselves once the link is back (the destination says which pages it holds, the source
//! sends the rest, pending demand requests are asked again), survive a link that flaps
//! during the recovery, and resume by hand with `pagewise migrate --resume`. The guest must
//! finish verifying on the destination with 0 bad pages.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use migration_lab::{dest_path, in_ns, migration_status as status, wait_status, MigrationLab};
use qemu_lab::{assert_memverify_passed, pagewise_bin};
use serde_json::Value;

const RAM_MIB: u64 = 256;

/// Set the lab's migration link `up` or down on `host`'s end of the veth pair.
fn link(lab: &MigrationLab, host: &str, up: bool) {
    let dev = format!("{}-m{}", lab.lab.prefix, if host == "src" { 0 } else { 1 });
    let state = if up { "up" } else { "down" };
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.lab.ns(host),
            "ip",
            "link",
            "set",
            &dev,
        ])
        .arg(state)
        .output()
        .expect("run ip link set");
    assert!(
        out.status.success(),
        "ip link set {dev} {state}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("link {dev} {state}");
}

fn phase(s: &Value) -> &str {
    s["status"].as_str().unwrap_or("")
}

#[test]
fn postcopy_survives_link_cuts_and_resumes_by_itself_or_by_hand() {
    cut_three_times("pwmcut", "postcopy");
}

#[test]
fn agile_survives_link_cuts_after_its_switchover() {
    cut_three_times("pwmcuta", "agile");
}

/// Migrate a verifying guest in `mode` on a 20 Mbit/s link (a 96 MiB verifying set takes
/// ~40 s to push: time for three cuts) and cut the link three times after the switchover.
fn cut_three_times(prefix: &str, mode: &str) {
    let (lab, mut guest) = MigrationLab::with_verifying_guest(
        prefix,
        "20mbit",
        mode,
        RAM_MIB,
        "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=4 memverify.duration_secs=150",
        "64M",
    );
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let migrate = lab
        .migrate_command(&to, "vm1", mode, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pagewise migrate");
    let logs = || lab.logs();
    let (src, dst) = (lab.src.socket.clone(), lab.dst.socket.clone());
    let long = Duration::from_secs(120);
    let paused = |s: &Value| phase(s) == "postcopy-paused";

    // Agile pushes only what the guest wrote lately: cut it early.
    let started = if mode == "agile" { 100 } else { 1000 };
    // Cut 1, on the source's end, while post-copy pushes: both sides pause.
    wait_status(&src, "post-copy", long, logs, |s| {
        phase(s) == "postcopy-active" && s["pages_pushed"].as_u64().unwrap_or(0) > started
    });
    link(&lab, "src", false);
    let cut = Instant::now();
    wait_status(&src, "source paused", Duration::from_secs(30), logs, paused);
    wait_status(
        &dst,
        "destination paused",
        Duration::from_secs(30),
        logs,
        paused,
    );
    eprintln!(
        "both sides paused {:.1}s after the cut",
        cut.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    // The link returns: the source reconnects by itself (it retries every second).
    link(&lab, "src", true);
    wait_status(&src, "recovered once", long, logs, |s| {
        s["recoveries"].as_u64().unwrap_or(0) >= 1 && !paused(s)
    });

    // Cut 2, on the destination's end; the link flaps (back for a moment, then down
    // again) while the source is reconnecting; then it stays down until a manual resume.
    link(&lab, "dst", false);
    wait_status(
        &src,
        "source paused again",
        Duration::from_secs(30),
        logs,
        paused,
    );
    link(&lab, "dst", true);
    std::thread::sleep(Duration::from_millis(700));
    link(&lab, "dst", false);
    std::thread::sleep(Duration::from_secs(10));
    let s = status(&src, "vm1");
    assert!(
        paused(&s) || phase(&s) == "postcopy-recover",
        "the source is not paused with its link down: {s}\n{}",
        logs()
    );
    link(&lab, "dst", true);
    let resume = in_ns(&lab.lab.ns("src"), &pagewise_bin())
        .args(["migrate", "--socket"])
        .arg(&src)
        .args(["--vm", "vm1", "--resume", "--json"])
        .output()
        .expect("run pagewise migrate --resume");
    let resumed: Value = serde_json::from_slice(&resume.stdout).unwrap_or_default();
    assert!(
        resume.status.success(),
        "migrate --resume failed: {resumed}\n{}\n{}",
        String::from_utf8_lossy(&resume.stderr),
        logs()
    );
    assert_eq!(resumed["status"], "completed", "{resumed}");

    let out = migrate
        .wait_with_output()
        .expect("wait for pagewise migrate");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(
        out.status.success(),
        "pagewise migrate failed: {report}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    assert_eq!(report["status"], "completed", "{report}");
    let cuts = report["link_cuts"].as_u64().unwrap_or(0);
    let recoveries = report["recoveries"].as_u64().unwrap_or(0);
    assert!(cuts >= 2, "link cuts {cuts}: {report}");
    assert_eq!(recoveries, cuts, "every cut recovered: {report}");
    assert!(
        report["paused_for_link_ms"].as_u64().unwrap_or(0) >= 3000,
        "{report}"
    );
    let dst_report = status(&dst, "vm1");
    eprintln!(
        "destination: status {} link_cuts {} recoveries {} paused_for_link_ms {}",
        dst_report["status"],
        dst_report["link_cuts"],
        dst_report["recoveries"],
        dst_report["paused_for_link_ms"]
    );
    assert!(
        dst_report["recoveries"].as_u64().unwrap_or(0) >= 2,
        "{dst_report}"
    );

    let serial = dest_path(&report, &guest.serial);
    let text = migration_lab::wait_done(&serial, Duration::from_secs(300), logs);
    assert_memverify_passed(&text);
    let exit = guest.qemu.wait(Duration::from_secs(20));
    eprintln!("source QEMU exited: {exit}");
    eprintln!(
        "source: link_cuts {cuts} recoveries {recoveries} paused_for_link_ms {} \
         total-time {} ms pages_pushed {}",
        report["paused_for_link_ms"], report["total-time"], report["pages_pushed"]
    );
}
