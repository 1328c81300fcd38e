//! Configuration from the environment (read once, by the load-time constructor).
//!
//! | variable            | meaning                                                          |
//! |---------------------|------------------------------------------------------------------|
//! | `PAGEWISE_MEM_PATH` | the guest memory file to catch (QEMU's `mem-path=`); required    |
//! | `PAGEWISE_SOCKET`   | the pager's attach socket (`pagewise serve --socket`); required  |
//! | `PAGEWISE_VM`       | VM name sent in the handshake; default: the memory file's name   |
//! | `PAGEWISE_MODES`    | uffd registration modes, comma separated: `missing`, `wp`, `minor`; default `missing,wp` |
//! | `PAGEWISE_TIMEOUT_SECS` | how long to wait for the pager's reply; default 30           |
//! | `PAGEWISE_ON_PAGER_EXIT` | `wait` (default): when the pager's connection ends without a word, wait for a restarted pager and attach again (faulting threads wait meanwhile), ending the VMM after `PAGEWISE_PAGER_WAIT_SECS`; `exit`: end the VMM at once; `hang`: let faults block |
//! | `PAGEWISE_PAGER_WAIT_SECS` | how long `wait` waits for the pager to come back; default 60 |
//! | `PAGEWISE_SWAPDEV`  | optional: the swap device the pager must answer with; another one stops the VM |

use std::path::{Path, PathBuf};
use std::time::Duration;

use uffd::RegisterMode;

use crate::watch::OnPagerExit;

/// The variables, by name.
pub const ENV_MEM_PATH: &str = "PAGEWISE_MEM_PATH";
pub const ENV_SOCKET: &str = "PAGEWISE_SOCKET";
pub const ENV_VM: &str = "PAGEWISE_VM";
pub const ENV_MODES: &str = "PAGEWISE_MODES";
pub const ENV_TIMEOUT: &str = "PAGEWISE_TIMEOUT_SECS";
pub const ENV_SWAPDEV: &str = "PAGEWISE_SWAPDEV";
pub const ENV_ON_PAGER_EXIT: &str = "PAGEWISE_ON_PAGER_EXIT";
pub const ENV_PAGER_WAIT: &str = "PAGEWISE_PAGER_WAIT_SECS";

/// How long `wait` waits for a restarted pager unless `PAGEWISE_PAGER_WAIT_SECS` says.
pub const DEFAULT_PAGER_WAIT: Duration = Duration::from_secs(60);

/// What the library does, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The memory file, with its directory resolved (symlinks, `..`), as `/proc/self/fd/N`
    /// shows it.
    pub mem_path: PathBuf,
    pub socket: PathBuf,
    pub vm: String,
    /// Mode names in the order given (sent to the pager).
    pub mode_names: Vec<String>,
    pub modes: RegisterMode,
    pub timeout: Duration,
    /// The swap device the pager must report for this VM, if the operator named one.
    pub expected_swapdev: Option<String>,
    pub on_pager_exit: OnPagerExit,
    /// How long [`OnPagerExit::Wait`] waits for the pager to come back.
    pub pager_wait: Duration,
}

/// Look up one variable; `None` when unset or empty.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Parse the configuration; every error names the variable and what is wrong with it.
pub fn from_env(get: Lookup<'_>) -> Result<Config, String> {
    let mem = get(ENV_MEM_PATH).ok_or_else(|| {
        format!(
            "{ENV_MEM_PATH} is not set: set it to the guest memory file (QEMU's \
             memory-backend-file mem-path=), or remove libpagewise_preload.so from LD_PRELOAD"
        )
    })?;
    let mem_path = resolve_mem_path(Path::new(&mem))?;
    let socket = get(ENV_SOCKET).ok_or_else(|| {
        format!(
            "{ENV_SOCKET} is not set: set it to the pager's socket (pagewise serve --socket PATH)"
        )
    })?;
    let vm = match get(ENV_VM) {
        Some(vm) => vm,
        None => mem_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if vm.is_empty() || vm.len() > 255 || vm.chars().any(|c| c.is_control()) {
        return Err(format!(
            "{ENV_VM}={vm:?}: a VM name must be 1..255 characters without control characters"
        ));
    }
    let modes_text = get(ENV_MODES).unwrap_or_else(|| "missing,wp".to_string());
    let (mode_names, modes) = parse_modes(&modes_text)?;
    let timeout = positive_secs(get, ENV_TIMEOUT, Duration::from_secs(30))?;
    let pager_wait = positive_secs(get, ENV_PAGER_WAIT, DEFAULT_PAGER_WAIT)?;
    Ok(Config {
        mem_path,
        socket: PathBuf::from(socket),
        vm,
        mode_names,
        modes,
        timeout,
        expected_swapdev: get(ENV_SWAPDEV),
        on_pager_exit: OnPagerExit::parse(get(ENV_ON_PAGER_EXIT).as_deref())?,
        pager_wait,
    })
}

/// A positive whole number of seconds from variable `name`, `default` when unset. At most a
/// day: a bound, so that adding it to a clock cannot overflow.
fn positive_secs(get: Lookup<'_>, name: &str, default: Duration) -> Result<Duration, String> {
    match get(name) {
        None => Ok(default),
        Some(t) => match t.parse::<u64>() {
            Ok(secs) if secs > 0 && secs <= 86_400 => Ok(Duration::from_secs(secs)),
            _ => Err(format!(
                "{name}={t:?} is not a number of seconds from 1 to 86400"
            )),
        },
    }
}

/// The path as the kernel will report it for an open fd: absolute, directory canonicalized.
/// The file itself may not exist yet (QEMU creates it).
fn resolve_mem_path(path: &Path) -> Result<PathBuf, String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{ENV_MEM_PATH}={}: names no file", path.display()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = std::fs::canonicalize(&dir).map_err(|e| {
        format!(
            "{ENV_MEM_PATH}={}: directory {} is not usable: {e}",
            path.display(),
            dir.display()
        )
    })?;
    let full = dir.join(name);
    if full.is_dir() {
        return Err(format!(
            "{ENV_MEM_PATH}={} is a directory: QEMU would create a hidden temporary file there; \
             give mem-path= and {ENV_MEM_PATH} a file path such as /dev/shm/vm1",
            path.display()
        ));
    }
    Ok(full)
}

/// Parse `missing,wp,minor` (any order, at least one).
pub fn parse_modes(text: &str) -> Result<(Vec<String>, RegisterMode), String> {
    let mut bits = 0;
    let mut names = Vec::new();
    for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let mode = RegisterMode::from_name(word).ok_or_else(|| {
            format!("{ENV_MODES}={text:?}: unknown mode {word:?} (known: missing, wp, minor)")
        })?;
        if bits & mode.bits() == 0 {
            bits |= mode.bits();
            names.push(word.to_string());
        }
    }
    if bits == 0 {
        return Err(format!("{ENV_MODES}={text:?}: names no mode"));
    }
    Ok((names, RegisterMode(bits)))
}

/// Whether the swap device the pager named is the one expected: the same text, or the same
/// file once the daemon's `swapdev ` prefix and a `file:` prefix are dropped and both paths
/// are resolved.
pub fn same_swapdev(expected: &str, reported: &str) -> bool {
    let reported = reported.strip_prefix("swapdev ").unwrap_or(reported);
    if expected == reported {
        return true;
    }
    let as_path = |s: &str| {
        let p = s.strip_prefix("file:").unwrap_or(s);
        std::fs::canonicalize(p).ok()
    };
    matches!((as_path(expected), as_path(reported)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn defaults_and_resolution() {
        let dir = std::env::temp_dir();
        let mem = dir.join("pw-preload-cfg-test");
        let get = env(&[
            (ENV_MEM_PATH, mem.to_str().unwrap()),
            (ENV_SOCKET, "/run/pw.sock"),
        ]);
        let cfg = from_env(&get).unwrap();
        assert_eq!(
            cfg.mem_path,
            std::fs::canonicalize(&dir)
                .unwrap()
                .join("pw-preload-cfg-test")
        );
        assert_eq!(cfg.vm, "pw-preload-cfg-test");
        assert_eq!(cfg.mode_names, ["missing", "wp"]);
        assert_eq!(
            cfg.modes.bits(),
            RegisterMode::MISSING.bits() | RegisterMode::WP.bits()
        );
        assert_eq!(cfg.timeout, Duration::from_secs(30));
        assert_eq!(cfg.on_pager_exit, OnPagerExit::Wait);
        assert_eq!(cfg.pager_wait, DEFAULT_PAGER_WAIT);
    }

    #[test]
    fn every_error_names_its_variable() {
        let e = from_env(&env(&[(ENV_SOCKET, "/s")])).unwrap_err();
        assert!(e.contains(ENV_MEM_PATH), "{e}");
        let e = from_env(&env(&[(ENV_MEM_PATH, "/dev/shm/x")])).unwrap_err();
        assert!(e.contains(ENV_SOCKET), "{e}");
        let e = from_env(&env(&[
            (ENV_MEM_PATH, "/nonexistent-dir/x"),
            (ENV_SOCKET, "/s"),
        ]))
        .unwrap_err();
        assert!(e.contains("/nonexistent-dir"), "{e}");
        let e = from_env(&env(&[(ENV_MEM_PATH, "/tmp"), (ENV_SOCKET, "/s")])).unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = from_env(&env(&[
            (ENV_MEM_PATH, "/dev/shm/x"),
            (ENV_SOCKET, "/s"),
            (ENV_MODES, "missing,dirty"),
        ]))
        .unwrap_err();
        assert!(e.contains("\"dirty\""), "{e}");
        let e = from_env(&env(&[
            (ENV_MEM_PATH, "/dev/shm/x"),
            (ENV_SOCKET, "/s"),
            (ENV_TIMEOUT, "0"),
        ]))
        .unwrap_err();
        assert!(e.contains(ENV_TIMEOUT), "{e}");
        for bad in ["0", "-1", "86401", "soon"] {
            let e = from_env(&env(&[
                (ENV_MEM_PATH, "/dev/shm/x"),
                (ENV_SOCKET, "/s"),
                (ENV_PAGER_WAIT, bad),
            ]))
            .unwrap_err();
            assert!(e.contains(ENV_PAGER_WAIT) && e.contains(bad), "{e}");
        }
        let e = from_env(&env(&[
            (ENV_MEM_PATH, "/dev/shm/x"),
            (ENV_SOCKET, "/s"),
            (ENV_VM, "a\nb"),
        ]))
        .unwrap_err();
        assert!(e.contains(ENV_VM), "{e}");
    }

    #[test]
    fn swapdev_comparison() {
        assert!(same_swapdev(
            "nbd+unix:///swap?socket=/s",
            "nbd+unix:///swap?socket=/s"
        ));
        assert!(same_swapdev("/tmp", "file:/tmp/"));
        assert!(same_swapdev("/tmp", "swapdev /tmp"));
        assert!(!same_swapdev("/tmp", "/var"));
        assert!(!same_swapdev("/nonexistent-a", "/nonexistent-b"));
    }

    #[test]
    fn modes_parse() {
        let (names, m) = parse_modes("wp, missing,wp").unwrap();
        assert_eq!(names, ["wp", "missing"]);
        assert_eq!(m.bits(), 3);
        assert!(parse_modes(",").is_err());
    }
}
