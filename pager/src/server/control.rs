//! The control socket: one JSON request per connection, one JSON response.
//!
//! Request: a JSON object with a `"cmd"` string and command-specific fields, ended by a
//! newline or by the client shutting down its write side, e.g. `{"cmd":"stats","vm":null}`.
//! Response (one line): `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.
//! Commands live in a [`CommandRegistry`]; other components register theirs
//! (`daemon.commands().register("evict", handler)`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{json, Value};

use super::Daemon;
use crate::page_state::PageState;
use crate::vm::Vm;

/// Largest request accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A command handler: gets the daemon and the whole request object.
pub type CommandHandler = Arc<dyn Fn(&Daemon, &Value) -> Result<Value, String> + Send + Sync>;

/// Commands by name.
#[derive(Default)]
pub struct CommandRegistry {
    handlers: RwLock<HashMap<String, CommandHandler>>,
}

impl CommandRegistry {
    /// Add (or replace) the handler for `cmd`.
    pub fn register(
        &self,
        cmd: &str,
        handler: impl Fn(&Daemon, &Value) -> Result<Value, String> + Send + Sync + 'static,
    ) {
        self.handlers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cmd.to_string(), Arc::new(handler));
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn get(&self, cmd: &str) -> Option<CommandHandler> {
        self.handlers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(cmd)
            .cloned()
    }
}

/// Answer one request (already parsed).
pub fn dispatch(daemon: &Daemon, request: &Value) -> Value {
    let result = match request.get("cmd").and_then(Value::as_str) {
        None => Err("request has no \"cmd\" string".to_string()),
        Some(cmd) => match daemon.commands.get(cmd) {
            Some(h) => h(daemon, request),
            None => Err(format!(
                "unknown command {cmd:?}; known: {}",
                daemon.commands.names().join(", ")
            )),
        },
    };
    match result {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// The `"vm"` field of a request: `None` when absent or null.
pub fn vm_field(request: &Value) -> Result<Option<&str>, String> {
    match request.get("vm") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("\"vm\" must be a string or null, got {other}")),
    }
}

/// Look up the VM a request names (required).
pub fn require_vm(daemon: &Daemon, request: &Value) -> Result<Arc<Vm>, String> {
    let name = vm_field(request)?.ok_or("this command needs \"vm\": NAME")?;
    daemon
        .vm(name)
        .ok_or_else(|| format!("no VM named {name:?} is attached"))
}

/// The stats object of one VM.
pub fn vm_stats(vm: &Vm, flavour: &str, prefetch: &str) -> Value {
    let m = vm.metrics.snapshot();
    let census = vm.states.census();
    let states: serde_json::Map<String, Value> = PageState::ALL
        .iter()
        .map(|s| (format!("{s:?}").to_lowercase(), json!(census[*s as usize])))
        .collect();
    json!({
        "vm": vm.name,
        "flavour": flavour,
        "pid": vm.peer.pid,
        "uid": vm.peer.uid,
        "source": vm.source_description,
        "prefetch": prefetch,
        "page_size": vm.page_size(),
        "pages": vm.layout.pages(),
        "wp_registered": vm.wp_registered,
        "attached_secs": vm.attached_at.elapsed().map(|d| d.as_secs()).unwrap_or(0),
        "states": states,
        "dirty_pages": vm.dirty.count(),
        "fault_latency_p50_us": m.fault_latency.quantile_us(0.5),
        "fault_latency_p99_us": m.fault_latency.quantile_us(0.99),
        "fault_latency_mean_us": m.fault_latency.mean_us(),
        "metrics": m,
    })
}

/// The `stats` result: `{"vms": [vm_stats...]}` for every VM or only `only`.
pub fn all_stats(daemon: &Daemon, only: Option<&str>) -> Result<Value, String> {
    let vms: Vec<Value> = daemon.with_entries(|entries| {
        let mut names: Vec<&String> = entries.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter(|n| only.is_none_or(|o| o == n.as_str()))
            .map(|n| {
                let e = &entries[n];
                vm_stats(&e.vm, e.flavour, &e.prefetch)
            })
            .collect()
    });
    if let (Some(name), true) = (only, vms.is_empty()) {
        return Err(format!("no VM named {name:?} is attached"));
    }
    Ok(json!({ "vms": vms }))
}

/// `ping`, `list`, `stats`, `detach`, `commands`.
pub fn register_builtin_commands(reg: &CommandRegistry) {
    reg.register("ping", |_, _| Ok(json!("pong")));
    reg.register("commands", |d, _| Ok(json!(d.commands.names())));
    reg.register("list", |d, _| {
        Ok(json!(d
            .vms()
            .iter()
            .map(
                |vm| json!({"vm": vm.name, "pid": vm.peer.pid, "source": vm.source_description,
                "pages": vm.layout.pages()})
            )
            .collect::<Vec<_>>()))
    });
    reg.register("stats", |d, req| all_stats(d, vm_field(req)?));
    reg.register("detach", |d, req| {
        let name = vm_field(req)?.ok_or("detach needs \"vm\": NAME")?;
        if d.detach(name) {
            Ok(json!({"detached": name}))
        } else {
            Err(format!("no VM named {name:?} is attached"))
        }
    });
}

/// Read one request from `stream` (bounded size and time).
fn read_request(stream: &mut UnixStream) -> Result<Value, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_BYTES {
            return Err(format!("request larger than {MAX_REQUEST_BYTES} bytes"));
        }
        if buf.contains(&b'\n') {
            break;
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    serde_json::from_slice(line).map_err(|e| format!("malformed request JSON: {e}"))
}

/// Serve the control socket until the daemon shuts down.
pub fn serve_control(daemon: &Arc<Daemon>, listener: UnixListener) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(%e, "control socket set_nonblocking failed");
        return;
    }
    while daemon.wait_readable(listener.as_fd(), "control socket") {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(%e, "control accept failed");
                continue;
            }
        };
        let daemon = daemon.clone();
        std::thread::spawn(move || {
            let _ = stream.set_nonblocking(false);
            let response = match read_request(&mut stream) {
                Ok(req) => dispatch(&daemon, &req),
                Err(e) => json!({"ok": false, "error": e}),
            };
            let mut line = response.to_string();
            line.push('\n');
            if let Err(e) = stream.write_all(line.as_bytes()) {
                tracing::debug!(%e, "control client went away");
            }
        });
    }
}

/// Client side: send `request`, return the `result` (or the daemon's error).
pub fn request(socket: &std::path::Path, request: &Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("reading the response: {e}"))?;
    let v: Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("malformed response {out:?}: {e}"))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("daemon returned an error without a message")
            .to_string())
    }
}
