//! The source daemon dies (kill -9) during a post-copy and never comes back: the
//! destination pauses the post-copy, waits for it up to its `--recover-timeout`, then fails
//! the migration with a report that lists exactly which pages only the source held; those
//! pages are still in the guest's RAM file on the source host.

mod migration_lab;
mod qemu_lab;
mod twohost;

use std::process::Stdio;
use std::time::Duration;

use migration_lab::{wait_status, MigrationLab};
use qemu_lab::wait_for_text;

#[test]
fn a_source_gone_for_good_leaves_a_report_of_exactly_the_pages_it_held() {
    let lab =
        MigrationLab::with_destination_args("pwmlost", "20mbit", &["--recover-timeout", "10"]);
    let mut guest = lab.start_guest(
        "vm1",
        256,
        "memverify.mib=96 memverify.hot_mib=16 memverify.hot_rate_mibs=4 \
         memverify.verify_secs=4 memverify.duration_secs=150",
    );
    wait_for_text(
        &guest.serial,
        "memverify: pass 1 ",
        Duration::from_secs(180),
        &mut guest.qemu,
    );
    let to = format!("{}:{}", migration_lab::DST_IP, migration_lab::PORT);
    let mut migrate = lab
        .migrate_command(&to, "vm1", "postcopy", &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagewise migrate");
    let (src, dst) = (lab.src.socket.clone(), lab.dst.socket.clone());
    wait_status(
        &src,
        "pushing",
        Duration::from_secs(120),
        || lab.logs(),
        |s| s["status"] == "postcopy-active" && s["pages_pushed"].as_u64().unwrap_or(0) > 1000,
    );

    // kill -9 of the source daemon, for good.
    // (`ip netns exec` execs `pagewise serve`: the child is the daemon.)
    let daemon = i32::try_from(lab.src.proc.child.id()).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the source daemon");
    let paused = wait_status(
        &dst,
        "destination paused",
        Duration::from_secs(30),
        || lab.logs(),
        |s| s["status"] == "postcopy-paused",
    );
    assert_eq!(paused["link_cuts"], 1, "{paused}");
    let failed = wait_status(
        &dst,
        "destination gave up",
        Duration::from_secs(60),
        || lab.logs(),
        |s| s["status"] == "failed",
    );
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("pages only the source holds are lost"),
        "{failed}"
    );
    let runs = failed["pages_lost"].as_array().expect("pages_lost listed");
    let listed: u64 = runs.iter().map(|r| r[1].as_u64().unwrap()).sum();
    assert!(listed > 0, "{failed}");
    // Runs in ascending order, not touching, inside the guest.
    let pages = (256u64 << 20) / 4096;
    let mut end = 0;
    for r in runs {
        let (first, count) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        assert!(count > 0 && (end == 0 || first > end), "{r} after {end}");
        end = first + count;
        assert!(end <= pages, "{r} beyond {pages} pages");
    }
    assert!(
        error.contains(&format!("{listed} pages only the source holds")),
        "the error and the list disagree ({listed} listed): {error}"
    );
    // Those pages are still on the source host, in the guest's RAM file (its QEMU, told
    // during the migration that a re-attach could not serve it, ends with its pager).
    assert!(guest.mem.0.exists(), "the source RAM file is gone");
    let held = std::fs::metadata(&guest.mem.0).unwrap().len();
    assert_eq!(held, 256 << 20, "the source RAM file shrank");
    eprintln!("lost {listed} pages in {} runs: {error}", runs.len());
    // `pagewise migrate` lost its daemon too: it ends with an error.
    let exit = migrate.wait().expect("wait for pagewise migrate");
    assert!(
        !exit.success(),
        "pagewise migrate succeeded without its daemon"
    );
}
