//! Checks a QEMU command line before it runs under the pager: guest RAM must come from one
//! `-object memory-backend-file,...,mem-path=FILE,share=on` used as the machine's RAM, with
//! FILE on tmpfs (/dev/shm) or hugetlbfs. Every refusal says what is wrong and how to fix it.

use std::path::{Path, PathBuf};

/// The guest RAM backend found on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRam {
    pub backend_id: String,
    pub mem_path: PathBuf,
    pub size: Option<String>,
}

/// Why a command line cannot run under the pager.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("no QEMU command given: pagewise vm run [OPTIONS] -- qemu-system-x86_64 ARGS...")]
    Empty,
    #[error(
        "-object memory-backend-file ... share=on missing: the pager can only serve guest RAM \
         mapped from a shared file; add -object memory-backend-file,id=mem,size=SIZE,\
         mem-path=/dev/shm/NAME,share=on -machine memory-backend=mem"
    )]
    NoFileBackend,
    #[error(
        "-object {kind} (id={id}): guest RAM would not come from a named shared file, which \
         the pager needs; use memory-backend-file,id={id},size=SIZE,mem-path=/dev/shm/NAME,share=on"
    )]
    WrongBackend { kind: String, id: String },
    #[error(
        "-object memory-backend-file,id={id}: share=on missing (got share={got}): QEMU would map \
         the file privately and the pager could never see the guest's pages; add share=on"
    )]
    NotShared { id: String, got: String },
    #[error("-object memory-backend-file,id={id}: mem-path= missing")]
    NoMemPath { id: String },
    #[error(
        "-object memory-backend-file,id={id}: mem-path={path} is a directory (QEMU would create \
         an anonymous temporary file the pager cannot recognise); give a file path such as \
         {path}/NAME"
    )]
    MemPathIsDir { id: String, path: String },
    #[error(
        "mem-path={path}: {why}; guest RAM must be on tmpfs (/dev/shm) or hugetlbfs for \
         userfaultfd to serve it"
    )]
    MemPathFilesystem { path: String, why: String },
    #[error(
        "more than one memory-backend-file ({ids}): pagewise vm run serves one guest RAM \
         file per VM"
    )]
    SeveralBackends { ids: String },
    #[error(
        "-object memory-backend-file,id={id} is not the guest's RAM: add memory-backend={id} \
         to -machine (or memdev={id} to -numa node)"
    )]
    BackendUnused { id: String },
    #[error(
        "{option} is not supported by pagewise vm run: use -object memory-backend-file,id=mem,\
         size=SIZE,mem-path=/dev/shm/NAME,share=on -machine memory-backend=mem"
    )]
    Unsupported { option: String },
    #[error("{option} {value}: {why}")]
    Malformed {
        option: String,
        value: String,
        why: String,
    },
}

/// Split a QEMU option value into its comma-separated parts (`,,` is a literal comma).
pub fn split_opts(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("non-empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

/// `key=value` pairs of an option value; a leading bare word becomes `(implied_key, word)`.
pub(crate) fn opts(value: &str, implied_key: &str) -> Vec<(String, String)> {
    split_opts(value)
        .into_iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => (implied_key.to_string(), p),
            None => (p, "on".to_string()),
        })
        .collect()
}

pub(crate) fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// QEMU's boolean spellings.
fn is_on(value: &str) -> bool {
    matches!(value, "on" | "yes" | "true" | "y")
}

/// The values of every occurrence of `names` (as `-opt VALUE` or `-opt=VALUE`).
pub fn option_values<'a>(argv: &'a [String], names: &[&str]) -> Vec<(String, &'a str)> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = argv[i].as_str();
        for name in names {
            let dashed = [format!("-{name}"), format!("--{name}")];
            if dashed.iter().any(|d| d == arg) {
                if let Some(v) = argv.get(i + 1) {
                    found.push((arg.to_string(), v.as_str()));
                    i += 1;
                }
            } else if let Some(v) = dashed.iter().find_map(|d| {
                arg.strip_prefix(d.as_str())
                    .and_then(|r| r.strip_prefix('='))
            }) {
                found.push((arg.split('=').next().unwrap_or(arg).to_string(), v));
            }
        }
        i += 1;
    }
    found
}

/// Statfs magic numbers of the filesystems that can hold guest RAM served by userfaultfd.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

fn check_filesystem(path: &Path) -> Result<(), CmdlineError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |why: String| CmdlineError::MemPathFilesystem {
        path: path.display().to_string(),
        why,
    };
    let st = nix::sys::statfs::statfs(dir)
        .map_err(|e| fail(format!("directory {} is not usable: {e}", dir.display())))?;
    let kind = st.filesystem_type().0 as i64;
    if kind == TMPFS_MAGIC || kind == HUGETLBFS_MAGIC {
        Ok(())
    } else {
        Err(fail(format!(
            "{} is on a filesystem of type {kind:#x}, not tmpfs or hugetlbfs",
            dir.display()
        )))
    }
}

/// Page size of guest RAM in `path`'s directory: the block size on hugetlbfs, else 4096
/// (tmpfs). The pager's layout uses it.
pub fn ram_page_size(path: &Path) -> Result<u64, CmdlineError> {
    check_filesystem(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let st = nix::sys::statfs::statfs(dir).map_err(|e| CmdlineError::MemPathFilesystem {
        path: path.display().to_string(),
        why: format!("directory {} is not usable: {e}", dir.display()),
    })?;
    if st.filesystem_type().0 as i64 == HUGETLBFS_MAGIC {
        Ok(st.block_size() as u64)
    } else {
        Ok(4096)
    }
}

/// Find and check the guest RAM backend of a QEMU command line (`argv[0]` is the program).
pub fn check(argv: &[String]) -> Result<GuestRam, CmdlineError> {
    let Some((_program, args)) = argv.split_first() else {
        return Err(CmdlineError::Empty);
    };
    if let Some((option, _)) = option_values(args, &["mem-path"]).into_iter().next() {
        return Err(CmdlineError::Unsupported { option });
    }
    let mut files = Vec::new();
    for (option, value) in option_values(args, &["object"]) {
        if value.trim_start().starts_with('{') {
            return Err(CmdlineError::Malformed {
                option,
                value: value.to_string(),
                why: "JSON -object syntax is not supported here; use key=value".into(),
            });
        }
        let pairs = opts(value, "qom-type");
        let kind = get(&pairs, "qom-type").unwrap_or("").to_string();
        let id = get(&pairs, "id").unwrap_or("?").to_string();
        match kind.as_str() {
            "memory-backend-file" => files.push((id, pairs)),
            "memory-backend-ram" | "memory-backend-memfd" | "memory-backend-epc" => {
                return Err(CmdlineError::WrongBackend { kind, id })
            }
            _ => {}
        }
    }
    let (id, pairs) = match files.len() {
        0 => return Err(CmdlineError::NoFileBackend),
        1 => files.pop().expect("one"),
        _ => {
            let ids: Vec<&str> = files.iter().map(|(id, _)| id.as_str()).collect();
            return Err(CmdlineError::SeveralBackends {
                ids: ids.join(", "),
            });
        }
    };
    let share = get(&pairs, "share").unwrap_or("off (the default)");
    if !is_on(share) {
        return Err(CmdlineError::NotShared {
            id,
            got: share.to_string(),
        });
    }
    let mem_path =
        get(&pairs, "mem-path").ok_or_else(|| CmdlineError::NoMemPath { id: id.clone() })?;
    let mem_path = PathBuf::from(mem_path);
    if mem_path.is_dir() {
        return Err(CmdlineError::MemPathIsDir {
            id,
            path: mem_path.display().to_string(),
        });
    }
    check_filesystem(&mem_path)?;
    let used_by_machine = option_values(args, &["machine", "M"])
        .iter()
        .any(|(_, v)| get(&opts(v, "type"), "memory-backend") == Some(id.as_str()));
    let used_by_numa = option_values(args, &["numa"])
        .iter()
        .any(|(_, v)| get(&opts(v, "type"), "memdev") == Some(id.as_str()));
    if !used_by_machine && !used_by_numa {
        return Err(CmdlineError::BackendUnused { id });
    }
    Ok(GuestRam {
        size: get(&pairs, "size").map(str::to_string),
        backend_id: id,
        mem_path,
    })
}

/// The command line of process `pid` (`/proc/PID/cmdline`), one string per argument.
pub fn of_process(pid: i32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Clock ticks after boot at which process `pid` started (field 22 of /proc/PID/stat): with
/// the pid, it names one process (a pid is reused, a start time with it is not).
pub fn started_at(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count from the last.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_is_read_and_a_gone_process_has_none() {
        let me = i32::try_from(std::process::id()).unwrap();
        let start = started_at(me).expect("this process's start time");
        assert_eq!(started_at(me), Some(start), "stable");
        assert!(started_at(1).is_some_and(|init| init <= start));
        assert_eq!(started_at(i32::MAX), None);
    }

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    const GOOD: &str = "qemu-system-x86_64 -accel tcg -m 512 -object \
        memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm1,share=on \
        -machine q35,memory-backend=mem -kernel k -display none";

    #[test]
    fn accepts_the_lab_command_line() {
        let ram = check(&argv(GOOD)).unwrap();
        assert_eq!(ram.backend_id, "mem");
        assert_eq!(ram.mem_path, PathBuf::from("/dev/shm/vm1"));
        assert_eq!(ram.size.as_deref(), Some("512M"));
        // -M, --object=, numa memdev and qom-type= spellings.
        let alt = "qemu --object=qom-type=memory-backend-file,id=r,mem-path=/dev/shm/a,share=yes \
                   -M pc -numa node,memdev=r";
        assert_eq!(check(&argv(alt)).unwrap().backend_id, "r");
    }

    #[test]
    fn refusals_name_the_problem() {
        let e = check(&argv("qemu-system-x86_64 -m 512 -kernel k")).unwrap_err();
        assert_eq!(e, CmdlineError::NoFileBackend);
        let text = e.to_string();
        assert!(text.starts_with("-object memory-backend-file ... share=on missing: the pager can only serve guest RAM mapped from a shared file"), "{text}");

        let e = check(&argv(&GOOD.replace(",share=on", ""))).unwrap_err();
        assert!(matches!(e, CmdlineError::NotShared { .. }), "{e}");
        assert!(e.to_string().contains("share=on missing"), "{e}");
        let e = check(&argv(&GOOD.replace("share=on", "share=off"))).unwrap_err();
        assert!(e.to_string().contains("got share=off"), "{e}");

        let e = check(&argv(&GOOD.replace("memory-backend=mem", "accel=tcg"))).unwrap_err();
        assert!(
            e.to_string().contains("add memory-backend=mem to -machine"),
            "{e}"
        );

        let e = check(&argv(
            &GOOD.replace("mem-path=/dev/shm/vm1", "mem-path=/dev/shm"),
        ))
        .unwrap_err();
        assert!(matches!(e, CmdlineError::MemPathIsDir { .. }), "{e}");

        let e = check(&argv(&GOOD.replace("/dev/shm/vm1", "/proc/vm1"))).unwrap_err();
        assert!(e.to_string().contains("not tmpfs or hugetlbfs"), "{e}");

        let e = check(&argv(
            &GOOD.replace("memory-backend-file", "memory-backend-ram"),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("memory-backend-ram"), "{e}");

        let two = format!("{GOOD} -object memory-backend-file,id=m2,mem-path=/dev/shm/b,share=on");
        assert!(matches!(
            check(&argv(&two)),
            Err(CmdlineError::SeveralBackends { .. })
        ));

        let e = check(&argv("qemu -mem-path /dev/shm/x")).unwrap_err();
        assert!(e.to_string().contains("-mem-path is not supported"), "{e}");
        assert_eq!(check(&[]), Err(CmdlineError::Empty));
    }

    #[test]
    fn option_values_split_like_qemu() {
        assert_eq!(split_opts("a=1,,2,b"), ["a=1,2", "b"]);
        let pairs = opts("memory-backend-file,id=x,share", "qom-type");
        assert_eq!(get(&pairs, "qom-type"), Some("memory-backend-file"));
        assert_eq!(get(&pairs, "share"), Some("on"));
    }
}
