//! Daemon life cycle: a VMM killed mid-run, two VMs at once, malformed handshakes. After
//! each, the daemon must still serve a VM correctly.

mod pager_support;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use pager::attach::protocol::{self, AttachRequest, GuestRegionUffdMapping};
use pager_support::{verified, Lab};

const PAGES: u64 = 1024;

#[test]
fn killed_vmm_is_cleaned_up_and_the_vm_can_attach_again() {
    let lab = Lab::new();
    let dev = lab.device("k", PAGES);
    let mut d = lab.serve(&[("k", &dev)], "bubble");
    let mut victim = lab
        .memhog_cmd(
            "k",
            PAGES,
            &[
                "--pattern",
                "random",
                "--duration-secs",
                "20",
                "--write-ratio",
                "0.3",
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    victim.kill().unwrap();
    victim.wait().unwrap();
    assert!(d.alive(), "daemon died with its VMM: {}", d.log_text());
    // The same VM attaches again (the old attach is gone) and reads the image intact: the
    // killed run's writes lived only in its own memory.
    let mut attached = false;
    for _ in 0..50 {
        let out = lab.memhog("k", PAGES, &["--passes", "1"]);
        if out.status.success() {
            verified(&out, &d);
            attached = true;
            break;
        }
        // The daemon may not have noticed the hang-up yet: retry briefly.
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(attached, "VM never re-attached: {}", d.log_text());
}

#[test]
fn two_vms_are_served_at_once() {
    let lab = Lab::new();
    let a = lab.device("a", PAGES);
    let b = lab.device("b", PAGES * 2);
    let d = lab.serve(&[("a", &a), ("b", &b)], "stride");
    let args = [
        "--pattern",
        "random",
        "--passes",
        "3",
        "--write-ratio",
        "0.2",
        "--threads",
        "2",
    ];
    let ca = lab.memhog_cmd("a", PAGES, &args).output();
    let hb = {
        let cmd = lab.memhog_cmd("b", PAGES * 2, &args);
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output()
        })
    };
    let (oa, ob) = (ca.unwrap(), hb.join().unwrap().unwrap());
    verified(&oa, &d);
    verified(&ob, &d);
}

fn region() -> GuestRegionUffdMapping {
    GuestRegionUffdMapping {
        base_host_virt_addr: 0x7f00_0000_0000,
        size: PAGES as usize * 4096,
        offset: 0,
        page_size: 4096,
        page_size_kib: 4096,
    }
}

/// Whether an I/O error just means the daemon already closed the connection.
fn closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// Send raw bytes (with `fds`) and return what the daemon answered before closing.
fn exchange(lab: &Lab, what: &str, bytes: &[u8], fds: &[i32]) -> Vec<u8> {
    let s = UnixStream::connect(lab.socket("m")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = if fds.is_empty() {
        (&s).write_all(bytes)
    } else {
        let iov = [std::io::IoSlice::new(bytes)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
        nix::sys::socket::sendmsg::<()>(
            s.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(std::io::Error::from)
    };
    if let Err(e) = sent {
        // The daemon may hang up before reading everything (oversized input).
        assert!(closed(&e), "{what}: sending failed: {e}");
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    // Closed within the timeout (EOF or reset), possibly after a refusal reply.
    match (&s).read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if closed(&e) => {}
        Err(e) => panic!(
            "{what}: the daemon did not close the connection ({e}); it sent {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
    answer
}

fn frame(version: u32, body: &[u8]) -> Vec<u8> {
    let mut m = b"PWHS".to_vec();
    m.extend_from_slice(&version.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

#[test]
fn malformed_handshakes_are_refused_and_the_daemon_keeps_serving() {
    let lab = Lab::new();
    let dev = lab.device("m", PAGES);
    let mut d = lab.serve(&[("m", &dev)], "none");
    let fd = std::fs::File::open("/dev/null").unwrap();
    let good = AttachRequest {
        vm: "m".into(),
        regions: vec![region()],
        memory_file: false,
        uffd_features: 0,
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    let good_body = serde_json::to_vec(&good).unwrap();
    let mut two_fds = good.clone();
    two_fds.memory_file = true;
    let cases: Vec<(&str, Vec<u8>, Vec<i32>)> = vec![
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![],
        ),
        ("bad version", frame(99, &good_body), vec![fd.as_raw_fd()]),
        (
            "oversized",
            frame(1, &vec![b' '; 200 * 1024]),
            vec![fd.as_raw_fd()],
        ),
        (
            "bad JSON",
            frame(1, b"{\"vm\": \"m\", \"regions\": ["),
            vec![fd.as_raw_fd()],
        ),
        (
            "wrong fd count",
            frame(1, &serde_json::to_vec(&two_fds).unwrap()),
            vec![fd.as_raw_fd()],
        ),
        ("no fd", frame(1, &good_body), vec![]),
        (
            "firecracker garbage JSON",
            b"[{\"base_host_virt_addr\": \"x\"}]".to_vec(),
            vec![fd.as_raw_fd()],
        ),
    ];
    for (what, bytes, fds) in &cases {
        let answer = exchange(&lab, what, bytes, fds);
        if !answer.is_empty() {
            // A pagewise reply: it must be a refusal with a reason.
            let body = &answer[12..];
            let reply: protocol::AttachReply = serde_json::from_slice(body)
                .unwrap_or_else(|e| panic!("{what}: unreadable reply {answer:?}: {e}"));
            assert!(!reply.ok, "{what}: accepted");
            assert!(
                reply.error.is_some_and(|e| !e.is_empty()),
                "{what}: no reason"
            );
        }
        assert!(d.alive(), "{what} killed the daemon: {}", d.log_text());
    }
    let log = d.log_text();
    assert!(
        log.contains("version 99"),
        "no reason logged for the bad version: {log}"
    );
    // Still serving.
    let out = lab.memhog("m", PAGES, &["--handshake", "pagewise"]);
    verified(&out, &d);
}

#[test]
fn an_fd_that_is_not_a_userfaultfd_is_refused() {
    let lab = Lab::new();
    let dev = lab.device("m", PAGES);
    let mut d = lab.serve(&[("m", &dev)], "none");
    let not_uffd = std::fs::File::open("/dev/zero").unwrap();
    let request = AttachRequest {
        vm: "m".into(),
        regions: vec![region()],
        memory_file: false,
        uffd_features: 0,
        modes: vec!["missing".into()],
        reattach: false,
        served_by: None,
    };
    let s = UnixStream::connect(lab.socket("m")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    protocol::send_request(&s, &request, not_uffd.as_raw_fd(), None).unwrap();
    let reply = protocol::recv_reply(&s).expect("a reply");
    assert!(
        !reply.ok,
        "/dev/zero was accepted as the VM's userfaultfd: {reply:?}"
    );
    assert!(d.alive());
}
