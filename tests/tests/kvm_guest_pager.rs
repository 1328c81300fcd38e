//! A real KVM vCPU whose EPT faults reach `pagewise serve` through userfaultfd: the guest
//! sums a word of each data page and must get the image's sum.

mod pager_support;

use pager_support::{Lab, SEED, ZERO_EVERY};

#[test]
fn kvm_vcpu_faults_are_served_from_the_swap_device() {
    let lab = Lab::new();
    let dev = lab.device("kvm", 256);
    let d = lab.serve(&[("kvm", &dev)], "none");
    for handshake in ["firecracker", "pagewise"] {
        let out = std::process::Command::new(&lab.kvm_guest)
            .arg("--socket")
            .arg(lab.socket("kvm"))
            .args(["--handshake", handshake, "--vm", "kvm", "--json"])
            .args([
                "--seed",
                &SEED.to_string(),
                "--zero-every",
                &ZERO_EVERY.to_string(),
            ])
            .args(["--first", "1", "--count", "127", "--step", "2"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{handshake}: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.log_text()
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["ok"], true);
        assert_eq!(r["sum"], r["expected"]);
    }
}
