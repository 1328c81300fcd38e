//! Eviction through the real daemon and CLI: `pagewise serve` with a swap device, memhog
//! attached with the pagewise handshake (memfd + MISSING|WP) running a hot/cold pattern that
//! verifies every page it reads, and `pagewise evict` / `pagewise stats` talking to the
//! control socket while it runs. memhog must see no wrong content; evicted pages must come
//! back from the swap device; the stats must show the eviction and the working set.

mod pager_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use pager::server::protocol::{EvictTarget, Request, Response};
use pager::server::ControlClient;
use pager_support::{verified, Lab};

const PAGES: u64 = 4096;

fn pagewise(lab: &Lab, args: &[&str]) -> std::process::Output {
    Command::new(&lab.pagewise)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running pagewise")
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn evict_while_memhog_runs_and_every_page_verifies() {
    let lab = Lab::new();
    let dev = lab.device("ev", PAGES);
    let d = lab.serve(&[("ev", &dev)], "none");
    let stats_sock = lab.path("stats.sock");
    let sock = stats_sock.to_str().unwrap();

    let hog = lab
        .memhog_cmd(
            "ev",
            PAGES,
            &[
                "--handshake",
                "pagewise",
                "--memory",
                "memfd",
                "--wp",
                "--pattern",
                "hotcold:256:0.9",
                "--threads",
                "2",
                "--duration-secs",
                "12",
                "--write-ratio",
                "0.3",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning memhog");

    // Let memhog fault in a good part of its memory and the sampler take a few samples. The
    // checks below finish within ~6 s; memhog runs 12 s so the VM is still attached even on
    // a loaded machine.
    std::thread::sleep(Duration::from_millis(2500));
    let out = pagewise(
        &lab,
        &[
            "evict",
            "--vm",
            "ev",
            "--socket",
            sock,
            "--target-rss",
            "1M",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&ok(&out, "evict --target-rss")).unwrap();
    let evicted = report["progress"]["evicted"].as_u64().unwrap()
        + report["progress"]["zero"].as_u64().unwrap();
    assert!(evicted > 256, "evicted only {evicted} pages: {report}");
    // Non-TTY progress: plain lines on stderr.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("evict: "),
        "no progress lines: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    std::thread::sleep(Duration::from_millis(1500));
    let out = pagewise(
        &lab,
        &["evict", "--vm", "ev", "--socket", sock, "--cold-for", "1"],
    );
    let text = ok(&out, "evict --cold-for");
    assert!(text.contains("VM ev: evicted"), "{text}");

    // The typed client: an eviction answered only when it is done (`wait`), then another
    // request on the same connection.
    let mut client = ControlClient::connect(&stats_sock).unwrap();
    match client
        .call(&Request::Evict {
            vm: "ev".into(),
            goal: EvictTarget::TargetRssBytes(512 << 10),
            batch_pages: Some(64),
            wait: true,
        })
        .unwrap()
    {
        Response::EvictStatus(st) => {
            assert!(!st.running && st.error.is_none(), "{st:?}");
            assert!(st.report.is_some(), "{st:?}");
        }
        other => panic!("evict with wait answered {other:?}"),
    }
    assert!(matches!(
        client.call(&Request::Ping).unwrap(),
        Response::Pong { .. }
    ));

    // Refaults are counted at the tracker's next sample (1 s interval): poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let e = loop {
        let out = pagewise(&lab, &["stats", "--socket", sock, "--vm", "ev", "--json"]);
        let stats: serde_json::Value = serde_json::from_str(&ok(&out, "stats --json")).unwrap();
        let e = stats["vms"][0]["eviction"].clone();
        assert!(e.is_object(), "no eviction stats: {stats}");
        if e["wss"]["refaults_total"].as_u64().unwrap() > 0 {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refault counted: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(e["wss"]["wss_pages"].as_u64().is_some(), "{e}");
    assert!(
        e["wss"]["evictions_total"].as_u64().unwrap() >= evicted,
        "{e}"
    );
    let table = ok(
        &pagewise(&lab, &["stats", "--socket", sock, "--vm", "ev"]),
        "stats",
    );
    assert!(table.contains("working set:"), "{table}");

    let out = hog.wait_with_output().expect("memhog");
    let r = verified(&out, &d);
    assert!(r["writes"].as_u64().unwrap() > 0, "{r}");
    eprintln!(
        "evicted {evicted}, refaults {}, wss {}, memhog accesses {}",
        e["wss"]["refaults_total"], e["wss"]["wss_pages"], r["accesses"]
    );
}

#[test]
fn evict_refuses_a_vm_without_write_protect() {
    let lab = Lab::new();
    let dev = lab.device("nowp", 256);
    let _d = lab.serve(&[("nowp", &dev)], "none");
    let sock = lab.path("stats.sock");
    let mut hog = lab
        .memhog_cmd(
            "nowp",
            256,
            &[
                "--handshake",
                "pagewise",
                "--memory",
                "memfd",
                "--duration-secs",
                "2",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning memhog");
    std::thread::sleep(Duration::from_millis(700));
    let out = pagewise(
        &lab,
        &[
            "evict",
            "--vm",
            "nowp",
            "--socket",
            sock.to_str().unwrap(),
            "--auto",
        ],
    );
    let _ = hog.wait();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("write-protect"), "{err}");
}
