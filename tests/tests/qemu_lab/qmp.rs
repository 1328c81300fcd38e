//! A minimal QMP client for tests: capabilities handshake, commands, status polling.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connect (retrying while QEMU starts up) and leave capabilities negotiation mode.
    pub fn connect(path: &Path, limit: Duration) -> Qmp {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < limit => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("QMP socket {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// Run a command; panics on a QMP error; returns `return`.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").expect("write QMP");
        loop {
            let reply = self.read_message();
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(err) = reply.get("error") {
                panic!("QMP {command} failed: {err}");
            }
            return reply.get("return").cloned().unwrap_or(Value::Null);
        }
    }

    /// Poll `query-migrate` until its status is one of `wanted` (panics on failure/timeout).
    pub fn wait_migration(&mut self, wanted: &[&str], limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let info = self.execute("query-migrate", json!({}));
            let status = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if wanted.contains(&status) {
                return info;
            }
            assert!(status != "failed", "migration failed: {info}");
            assert!(
                start.elapsed() < limit,
                "migration status {status} after {limit:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `query-status` → the run state ("running", "paused", "inmigrate", ...).
    pub fn run_state(&mut self) -> String {
        self.execute("query-status", json!({}))
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    }
}
