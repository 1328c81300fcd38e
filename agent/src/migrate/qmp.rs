//! A QMP client for driving QEMU's side of a migration (device state only): capabilities,
//! `migrate`, `query-migrate` polling, `migrate-continue`, `quit`. Events that arrive while
//! a command waits are kept for [`Qmp::take_events`].

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest QMP line accepted (QEMU's replies here are a few KiB).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to the QMP socket {path} (waited {waited:?})")]
    Connect {
        path: PathBuf,
        waited: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection I/O")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("QMP sent a line that is not JSON ({len} bytes)")]
    Malformed { len: usize },
    #[error("QMP sent a line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the peer did not greet like QMP: {greeting}")]
    NotGreeting { greeting: String },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("migration ended in status {status:?} while waiting for {wanted:?}{}", error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    MigrationFailed {
        status: String,
        wanted: Vec<String>,
        error: Option<String>,
    },
    #[error("timed out after {0:?} waiting for the migration status")]
    Timeout(Duration),
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    /// Connect (retrying while QEMU starts, up to `wait`) and leave negotiation mode.
    pub fn connect(path: &Path, wait: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= wait => {
                    return Err(QmpError::Connect {
                        path: path.into(),
                        waited: start.elapsed(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        Self::over(stream)
    }

    /// Speak QMP over an already connected stream.
    pub fn over(stream: UnixStream) -> Result<Self, QmpError> {
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_value()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::NotGreeting {
                greeting: greeting.to_string(),
            });
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_value(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if n > MAX_LINE {
            return Err(QmpError::TooLong);
        }
        serde_json::from_slice(&line).map_err(|_| QmpError::Malformed { len: n })
    }

    /// Run `command`; its `return` value, or the error QEMU gave.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}")?;
        loop {
            let reply = self.read_value()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(e) = reply.get("error") {
                let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.into(),
                    class: text("class"),
                    desc: text("desc"),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Events seen so far (and forget them).
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Turn migration capabilities on or off.
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({"capability": c, "state": on}))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }

    /// Poll `query-migrate` until its status is one of `wanted`; a `failed` or `cancelled`
    /// status (not wanted) is an error carrying QEMU's error text.
    pub fn wait_status(&mut self, wanted: &[&str], timeout: Duration) -> Result<Value, QmpError> {
        let start = Instant::now();
        loop {
            let info = self.execute("query-migrate", json!({}))?;
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if wanted.contains(&status) {
                return Ok(info);
            }
            if matches!(status, "failed" | "cancelled") {
                return Err(QmpError::MigrationFailed {
                    status: status.into(),
                    wanted: wanted.iter().map(|s| s.to_string()).collect(),
                    error: info
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                });
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout(timeout));
            }
            // Short: the pause and its end are timed by these polls (the downtime figure).
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};

    use super::*;

    /// A scripted QMP peer: greets, then answers each command line from `answers` in order.
    fn peer(answers: Vec<&'static str>) -> (UnixStream, std::thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut w = b.try_clone().unwrap();
            let mut r = BufReader::new(b);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim().to_string());
                writeln!(w, "{answer}").unwrap();
            }
            seen
        });
        (a, t)
    }

    #[test]
    fn commands_events_and_errors() {
        let (s, t) = peer(vec![
            r#"{"return": {}}"#,
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no such thing\"}}",
        ]);
        let mut q = Qmp::over(s).unwrap();
        let e = q.execute("frobnicate", json!({"x": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "QMP command frobnicate failed: GenericError: no such thing"
        );
        assert_eq!(q.take_events().len(), 1);
        drop(q);
        let seen = t.join().unwrap();
        assert!(seen[0].contains("qmp_capabilities"));
        assert!(seen[1].contains(r#""execute":"frobnicate""#), "{seen:?}");
    }

    #[test]
    fn a_failed_migration_is_reported_with_qemus_reason() {
        let (s, t) = peer(vec![
            r#"{"return": {}}"#,
            r#"{"return": {"status": "active"}}"#,
            r#"{"return": {"status": "failed", "error-desc": "Unable to write to socket"}}"#,
        ]);
        let mut q = Qmp::over(s).unwrap();
        let e = q
            .wait_status(&["pre-switchover"], Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "migration ended in status \"failed\" while waiting for [\"pre-switchover\"] (Unable to write to socket)"
        );
        drop(q);
        t.join().unwrap();
    }

    #[test]
    fn a_peer_that_is_not_qmp_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut w = b.try_clone().unwrap();
        writeln!(w, r#"{{"hello": 1}}"#).unwrap();
        assert!(matches!(Qmp::over(a), Err(QmpError::NotGreeting { .. })));
        drop(b);
    }
}
