//! The guest's serial console: memverify's result lines, parsed as the log grows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

use super::procs::{tail, ChildGuard};

/// One memverify line of interest, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestLine {
    /// `memverify: pass N ... pass_ms=X`
    Pass { pass: u64, ms: f64 },
    /// `memverify: hot pass N pages=P hot_pass_ms=B wall_ms=W`
    HotPass {
        pass: u64,
        busy_ms: f64,
        wall_ms: f64,
    },
    /// `memverify: DONE ... bad_pages=B ... RESULT=R`
    Done { bad_pages: u64, pass: bool },
    /// `memverify: hb N` (memverify.heartbeat_ms)
    Heartbeat { n: u64 },
}

fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn parse_line(line: &str) -> Option<GuestLine> {
    let rest = line.trim_end_matches('\r').split("memverify: ").nth(1)?;
    let number = |s: &str| s.split_whitespace().next()?.parse::<u64>().ok();
    if let Some(r) = rest.strip_prefix("hb ") {
        return Some(GuestLine::Heartbeat { n: number(r)? });
    }
    if let Some(r) = rest.strip_prefix("hot pass ") {
        return Some(GuestLine::HotPass {
            pass: number(r)?,
            busy_ms: field(r, "hot_pass_ms")?,
            wall_ms: field(r, "wall_ms")?,
        });
    }
    if let Some(r) = rest.strip_prefix("pass ") {
        return Some(GuestLine::Pass {
            pass: number(r)?,
            ms: field(r, "pass_ms")?,
        });
    }
    if rest.starts_with("DONE ") {
        return Some(GuestLine::Done {
            bad_pages: field(rest, "bad_pages")? as u64,
            pass: rest.contains("RESULT=PASS"),
        });
    }
    None
}

/// The serial console log, read as it grows; every parsed line keeps the host time at which
/// it was first seen.
pub struct SerialLog {
    pub path: PathBuf,
    offset: u64,
    partial: String,
    pub lines: Vec<(Instant, GuestLine)>,
}

impl SerialLog {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: String::new(),
            lines: Vec::new(),
        }
    }

    pub fn poll(&mut self) -> anyhow::Result<()> {
        let Ok(mut f) = File::open(&self.path) else {
            return Ok(()); // QEMU has not created it yet
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let now = Instant::now();
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            if let Some(parsed) = parse_line(&line) {
                self.lines.push((now, parsed));
            }
        }
        Ok(())
    }

    /// Poll until `found` picks something from the lines, the guest dies or `limit` passes.
    pub fn wait_for<T>(
        &mut self,
        what: &str,
        limit: Duration,
        qemu: &mut ChildGuard,
        qemu_log: &Path,
        mut found: impl FnMut(&[(Instant, GuestLine)]) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            self.poll()?;
            if let Some(t) = found(&self.lines) {
                return Ok(t);
            }
            if let Err(e) = qemu.check_alive(qemu_log) {
                return Err(e.context(format!(
                    "waiting for {what}; guest console:\n{}",
                    tail(&self.path)
                )));
            }
            if Instant::now() > deadline {
                bail!(
                    "{what} did not appear on the guest console within {limit:?}:\n{}",
                    tail(&self.path)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The DONE line's bad-page count and verdict, once it appeared.
pub fn done_of(lines: &[(Instant, GuestLine)]) -> Option<(u64, bool)> {
    lines.iter().find_map(|(_, l)| match l {
        GuestLine::Done { bad_pages, pass } => Some((*bad_pages, *pass)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memverify_lines() {
        assert_eq!(
            parse_line(
                "memverify: pass 3 t=30.0s pages=65536 bad=0 hot_rewrites=61440 pass_ms=412\r\n"
            ),
            Some(GuestLine::Pass { pass: 3, ms: 412.0 })
        );
        assert_eq!(
            parse_line("[ 12.3] memverify: hot pass 2 pages=8192 hot_pass_ms=181.5 wall_ms=4003"),
            Some(GuestLine::HotPass {
                pass: 2,
                busy_ms: 181.5,
                wall_ms: 4003.0
            })
        );
        assert_eq!(
            parse_line("memverify: DONE passes=4 bad_pages=0 hot_rewrites=9 rewrites_skipped=0 RESULT=PASS"),
            Some(GuestLine::Done {
                bad_pages: 0,
                pass: true
            })
        );
        assert_eq!(
            parse_line("memverify: DONE passes=4 bad_pages=7 hot_rewrites=9 rewrites_skipped=0 RESULT=FAIL"),
            Some(GuestLine::Done {
                bad_pages: 7,
                pass: false
            })
        );
        assert_eq!(parse_line("memverify: filled 256 MiB in 0.9 s"), None);
        assert_eq!(
            parse_line("memverify: pass 3 t=1s pages=1 bad=0"),
            None,
            "no pass_ms"
        );
        assert_eq!(parse_line("guest: init up"), None);
    }
}
