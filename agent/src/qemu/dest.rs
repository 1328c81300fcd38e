//! The destination QEMU's command line, made from the source's the way libvirt makes a
//! destination from the domain definition: the same machine, with every host-local path
//! rewritten into the destination daemon's own directory and `-incoming defer`.
//!
//! Rewritten (each recorded in [`DestCmdline::dest_paths`], source path -> destination path):
//! - `-object memory-backend-file,...,mem-path=P` -> `DIR/VM.ram`
//! - `-qmp unix:P,...` and `-monitor unix:P,...` -> `DIR/VM.qmp` / `DIR/VM.monitor`
//! - `-chardev socket,...,path=P` -> `DIR/VM-ID.sock`; `-chardev file,...,path=P` -> `DIR/VM-ID.log`
//! - `-serial file:P` -> `DIR/VM.serial`; `-D P` -> `DIR/VM.qemu.log`; `-pidfile P` -> `DIR/VM.pid`
//!
//! Kept as they are: the kernel, initrd, firmware and disk images (`-kernel`, `-initrd`,
//! `-bios`, `-drive file=`): they must be reachable at the same path on the destination
//! (shared storage), as with any QEMU migration. Removed: any `-incoming` (replaced by
//! `-incoming defer`). Refused: `-daemonize` (the destination daemon supervises its QEMU).

use std::path::{Path, PathBuf};

use super::cmdline::split_opts;

/// The rewritten command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestCmdline {
    pub argv: Vec<String>,
    /// Each rewritten source path and what it became.
    pub dest_paths: Vec<(String, String)>,
    /// The destination's guest RAM file and QMP socket (the daemon needs both).
    pub mem_path: PathBuf,
    pub qmp: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DestCmdlineError {
    #[error("the source's QEMU command line is empty")]
    Empty,
    #[error(
        "-daemonize: the destination daemon must supervise its QEMU; start the source without it"
    )]
    Daemonize,
    #[error("{option} has no value")]
    MissingValue { option: String },
    #[error("the source's command line has no memory-backend-file mem-path")]
    NoMemPath,
    #[error("VM name {0:?} cannot be used in a file name")]
    BadName(String),
}

/// The QMP socket of a QEMU command line (`-qmp unix:PATH,...`), the migration's handle on
/// the source QEMU.
pub fn qmp_socket(argv: &[String]) -> Option<PathBuf> {
    argv.windows(2).find_map(|w| {
        let opt = w[0].trim_start_matches('-');
        if opt != "qmp" || !w[0].starts_with('-') {
            return None;
        }
        let rest = w[1].strip_prefix("unix:")?;
        split_opts(rest).into_iter().next().map(PathBuf::from)
    })
}

/// Join option parts back, escaping commas as QEMU does (`,,`).
fn join_opts(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| p.replace(',', ",,"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rewrite `key=value` parts whose key is in `keys` with `to(value)`.
fn rewrite_keys(
    value: &str,
    keys: &[&str],
    to: &mut impl FnMut(&str, &[String]) -> Option<String>,
) -> String {
    let mut parts = split_opts(value);
    let snapshot = parts.clone();
    for p in parts.iter_mut() {
        if let Some((k, v)) = p.split_once('=') {
            if keys.contains(&k) {
                if let Some(new) = to(v, &snapshot) {
                    *p = format!("{k}={new}");
                }
            }
        }
    }
    join_opts(&parts)
}

fn id_of(parts: &[String]) -> String {
    parts
        .iter()
        .find_map(|p| p.strip_prefix("id="))
        .unwrap_or("dev")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Make the destination's command line for VM `vm` with its files under `dir`.
pub fn rewrite(argv: &[String], vm: &str, dir: &Path) -> Result<DestCmdline, DestCmdlineError> {
    if vm.is_empty() || vm.len() > 64 || vm.contains(['/', '\0']) || vm.starts_with('.') {
        return Err(DestCmdlineError::BadName(vm.into()));
    }
    let (program, args) = argv.split_first().ok_or(DestCmdlineError::Empty)?;
    let file = |name: String| dir.join(name).display().to_string();
    let mut out = vec![program.clone()];
    let mut dest_paths = Vec::new();
    let mut mem_path = None;
    let mut qmp = None;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let opt = arg.trim_start_matches('-');
        let takes_value = matches!(
            opt,
            "object" | "qmp" | "monitor" | "chardev" | "serial" | "D" | "pidfile" | "incoming"
        ) && arg.starts_with('-');
        if arg == "-daemonize" || arg == "--daemonize" {
            return Err(DestCmdlineError::Daemonize);
        }
        if !takes_value {
            out.push(arg.to_string());
            i += 1;
            continue;
        }
        let value = args
            .get(i + 1)
            .ok_or_else(|| DestCmdlineError::MissingValue { option: arg.into() })?
            .as_str();
        i += 2;
        let mut record = |from: &str, to: String| {
            dest_paths.push((from.to_string(), to.clone()));
            to
        };
        let new = match opt {
            "incoming" => continue,
            "object" if value.starts_with("memory-backend-file") => {
                rewrite_keys(value, &["mem-path"], &mut |v, _| {
                    let to = record(v, file(format!("{vm}.ram")));
                    mem_path = Some(PathBuf::from(&to));
                    Some(to)
                })
            }
            "qmp" | "monitor" => match value.strip_prefix("unix:") {
                Some(rest) => {
                    let mut parts = split_opts(rest);
                    let to = record(&parts[0], file(format!("{vm}.{opt}")));
                    if opt == "qmp" {
                        qmp = Some(PathBuf::from(&to));
                    }
                    parts[0] = to;
                    format!("unix:{}", join_opts(&parts))
                }
                None => value.to_string(),
            },
            "chardev" => {
                let parts = split_opts(value);
                let kind = parts.first().map(String::as_str).unwrap_or("");
                let suffix = match kind {
                    "socket" => "sock",
                    "file" | "pipe" => "log",
                    _ => "",
                };
                if suffix.is_empty() {
                    value.to_string()
                } else {
                    let id = id_of(&parts);
                    rewrite_keys(value, &["path"], &mut |v, _| {
                        Some(record(v, file(format!("{vm}-{id}.{suffix}"))))
                    })
                }
            }
            "serial" => match value.strip_prefix("file:") {
                Some(p) => format!("file:{}", record(p, file(format!("{vm}.serial")))),
                None => value.to_string(),
            },
            "D" => record(value, file(format!("{vm}.qemu.log"))),
            "pidfile" => record(value, file(format!("{vm}.pid"))),
            _ => value.to_string(),
        };
        out.push(arg.to_string());
        out.push(new);
    }
    out.push("-incoming".into());
    out.push("defer".into());
    Ok(DestCmdline {
        argv: out,
        dest_paths,
        mem_path: mem_path.ok_or(DestCmdlineError::NoMemPath)?,
        qmp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_qmp_socket_is_found() {
        let argv = v("qemu -m 1G -qmp unix:/run/q,,1.sock,server=on,wait=off");
        assert_eq!(qmp_socket(&argv), Some(PathBuf::from("/run/q,1.sock")));
        assert_eq!(qmp_socket(&v("qemu -qmp tcp:1.2.3.4:5")), None);
        assert_eq!(qmp_socket(&v("qemu -m 1G")), None);
    }

    #[test]
    fn host_local_paths_move_into_the_destination_directory() {
        let src = v("qemu-system-x86_64 -accel tcg -m 512M \
            -object memory-backend-file,id=mem,size=512M,mem-path=/dev/shm/vm1,share=on \
            -machine q35,memory-backend=mem -kernel /srv/vmlinuz -initrd /srv/initrd.gz \
            -serial file:/tmp/src/serial.log -qmp unix:/tmp/src/vm1.qmp,server=on,wait=off \
            -chardev socket,id=c0,path=/tmp/src/c0.sock,server=on -pidfile /tmp/src/q.pid \
            -D /tmp/src/qemu.log -incoming tcp:0:4444 -display none");
        let d = rewrite(&src, "vm1", Path::new("/run/pw/dst")).unwrap();
        assert_eq!(
            d.argv.join(" "),
            "qemu-system-x86_64 -accel tcg -m 512M \
             -object memory-backend-file,id=mem,size=512M,mem-path=/run/pw/dst/vm1.ram,share=on \
             -machine q35,memory-backend=mem -kernel /srv/vmlinuz -initrd /srv/initrd.gz \
             -serial file:/run/pw/dst/vm1.serial -qmp unix:/run/pw/dst/vm1.qmp,server=on,wait=off \
             -chardev socket,id=c0,path=/run/pw/dst/vm1-c0.sock,server=on -pidfile /run/pw/dst/vm1.pid \
             -D /run/pw/dst/vm1.qemu.log -display none -incoming defer"
        );
        assert_eq!(d.mem_path, PathBuf::from("/run/pw/dst/vm1.ram"));
        assert_eq!(d.qmp, Some(PathBuf::from("/run/pw/dst/vm1.qmp")));
        assert_eq!(
            d.dest_paths[0],
            (
                "/dev/shm/vm1".to_string(),
                "/run/pw/dst/vm1.ram".to_string()
            )
        );
        assert_eq!(d.dest_paths.len(), 6);
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(
            rewrite(
                &v("qemu -daemonize -object memory-backend-file,mem-path=/x"),
                "a",
                Path::new("/d")
            ),
            Err(DestCmdlineError::Daemonize)
        );
        assert_eq!(
            rewrite(&v("qemu -m 1G"), "a", Path::new("/d")),
            Err(DestCmdlineError::NoMemPath)
        );
        assert_eq!(
            rewrite(&v("qemu -qmp"), "a", Path::new("/d")),
            Err(DestCmdlineError::MissingValue {
                option: "-qmp".into()
            })
        );
        assert_eq!(
            rewrite(&v("qemu"), "../etc", Path::new("/d")),
            Err(DestCmdlineError::BadName("../etc".into()))
        );
        assert_eq!(
            rewrite(&[], "a", Path::new("/d")),
            Err(DestCmdlineError::Empty)
        );
    }

    #[test]
    fn commas_in_paths_survive_the_round_trip() {
        let d = rewrite(
            &v("qemu -object memory-backend-file,id=m,mem-path=/dev/shm/a,,b,share=on"),
            "vm",
            Path::new("/d"),
        )
        .unwrap();
        assert_eq!(d.dest_paths[0].0, "/dev/shm/a,b");
        assert_eq!(
            d.argv[2],
            "memory-backend-file,id=m,mem-path=/d/vm.ram,share=on"
        );
    }
}
