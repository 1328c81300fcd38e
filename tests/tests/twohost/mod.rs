//! The two-host lab (`tools/lab/twohost.sh`) from tests: bring it up under a unique prefix,
//! run code inside one of its hosts, tear it down on drop.

use std::path::PathBuf;
use std::process::Command;

/// A running lab; `down` on drop.
pub struct TwoHost {
    pub prefix: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tools/lab/twohost.sh")
}

/// Run the lab script with `args`; returns (success, stdout + stderr).
pub fn run_script(args: &[&str]) -> (bool, String) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("running tools/lab/twohost.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

impl TwoHost {
    /// Up with a link of `rate` (tc tbf syntax, e.g. "80mbit").
    pub fn up(prefix: &str, rate: &str) -> Self {
        let (ok, text) = run_script(&["up", "--prefix", prefix, "--rate", rate]);
        assert!(ok, "twohost.sh up failed: {text}");
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// The namespace name of `host` ("src", "dst" or "store").
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Run `f` on a new thread inside `host`'s network namespace.
    #[allow(dead_code)] // used by some of the test binaries that include this module
    pub fn on<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
    }
}

impl Drop for TwoHost {
    fn drop(&mut self) {
        let _ = run_script(&["down", "--prefix", &self.prefix]);
    }
}

/// Whether namespace `name` exists.
#[allow(dead_code)] // used by some of the test binaries that include this module
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}
