//! The heartbeat: `memverify: hb N` every interval, from a thread of its own (the workload's
//! verify passes block its own loop for seconds). A host reading the console stamps each
//! line as it appears, so the longest gap across a migration is the pause the guest lived
//! through (the guest's own clocks stop while QEMU has it paused, so it cannot measure
//! that itself).

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

/// The line for beat `n`.
pub fn line(n: u64) -> String {
    format!("memverify: hb {n}\n")
}

/// Start beating on a duplicate of stdout (the workload holds stdout's lock for its whole
/// run); each line is one write. Without a duplicate there is no heartbeat (said once).
pub fn spawn(every: Duration) {
    let out = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("memverify: no heartbeat: duplicating stdout: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            let mut out = out;
            for n in 1u64.. {
                std::thread::sleep(every);
                if out.write_all(line(n).as_bytes()).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("memverify: no heartbeat: {e}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_line_is_stable() {
        assert_eq!(super::line(7), "memverify: hb 7\n");
    }
}
