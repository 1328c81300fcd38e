//! memhog over `pagewise serve` and a swap device made from a known image: every page it
//! reads must be the image's (or its own later writes, or zeros after a discard).

mod pager_support;

use pager_support::{verified, Lab};

const PAGES: u64 = 2048;

#[test]
fn firecracker_handshake_random_reads_and_writes_verify() {
    let lab = Lab::new();
    let dev = lab.device("fc", PAGES);
    let d = lab.serve(&[("fc", &dev)], "none");
    let out = lab.memhog(
        "fc",
        PAGES,
        &[
            "--handshake",
            "firecracker",
            "--pattern",
            "random",
            "--threads",
            "2",
            "--passes",
            "3",
            "--write-ratio",
            "0.2",
        ],
    );
    let r = verified(&out, &d);
    assert!(r["writes"].as_u64().unwrap() > 0);
    assert!(r["pages_touched"].as_u64().unwrap() > PAGES / 2);
}

#[test]
fn pagewise_handshake_with_memfd_scans_every_page() {
    let lab = Lab::new();
    let dev = lab.device("pw", PAGES);
    let d = lab.serve(&[("pw", &dev)], "none");
    let out = lab.memhog(
        "pw",
        PAGES,
        &[
            "--handshake",
            "pagewise",
            "--memory",
            "memfd",
            "--passes",
            "2",
        ],
    );
    let r = verified(&out, &d);
    assert_eq!(r["pages_touched"], PAGES);
    // One page per fault: every page's first touch waited for the pager.
    assert_eq!(r["first_touch_faults"], PAGES);
}

#[test]
fn discarded_pages_read_as_zeros_afterwards() {
    let lab = Lab::new();
    let dev = lab.device("rm", PAGES);
    let d = lab.serve(&[("rm", &dev)], "none");
    for (handshake, memory) in [("firecracker", "anon"), ("pagewise", "memfd")] {
        let out = lab.memhog(
            "rm",
            PAGES,
            &[
                "--handshake",
                handshake,
                "--memory",
                memory,
                "--passes",
                "2",
                "--write-ratio",
                "0.5",
                "--remove",
                "100:300@1",
            ],
        );
        let r = verified(&out, &d);
        assert_eq!(r["removed_pages"], 300);
    }
}

#[test]
fn prefetch_policies_cut_demand_faults_on_a_scan() {
    let lab = Lab::new();
    let dev = lab.device("pf", PAGES);
    for policy in ["bubble", "stride", "bubble+stride"] {
        let d = lab.serve(&[("pf", &dev)], policy);
        let out = lab.memhog("pf", PAGES, &["--passes", "1"]);
        let r = verified(&out, &d);
        let faults = r["first_touch_faults"].as_u64().unwrap();
        assert!(
            faults < PAGES / 2,
            "{policy}: {faults} of {PAGES} first touches faulted"
        );
        drop(d);
    }
}

#[test]
fn write_protect_registration_with_writes_verifies() {
    let lab = Lab::new();
    let dev = lab.device("wp", PAGES);
    let d = lab.serve(&[("wp", &dev)], "bubble");
    for memory in ["memfd", "anon"] {
        let out = lab.memhog(
            "wp",
            PAGES,
            &[
                "--handshake",
                "pagewise",
                "--memory",
                memory,
                "--wp",
                "--pattern",
                "random",
                "--threads",
                "2",
                "--passes",
                "2",
                "--write-ratio",
                "0.5",
            ],
        );
        let r = verified(&out, &d);
        assert!(r["writes"].as_u64().unwrap() > 0, "{memory}");
    }
}
