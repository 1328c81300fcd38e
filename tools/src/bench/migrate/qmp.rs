//! A minimal QMP client for the QEMU rows (the bench drives QEMU's own migration itself).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    name: String,
}

impl Qmp {
    /// Connect (retrying while QEMU creates its socket, up to `limit`) and leave
    /// capabilities-negotiation mode.
    pub fn connect(path: &Path, limit: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to QMP {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            name: path.display().to_string(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            bail!("{}: no QMP greeting: {greeting}", qmp.name);
        }
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("{}: QMP connection closed", self.name);
        }
        serde_json::from_str(&line).with_context(|| format!("{}: bad QMP line {line}", self.name))
    }

    /// One command; its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        writeln!(self.writer, "{msg}")?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(anyhow!("{}: QMP {command} failed: {e}", self.name));
            }
        }
    }

    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> anyhow::Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }
}
