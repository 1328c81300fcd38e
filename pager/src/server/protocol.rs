//! The control protocol on the wire: typed [`Request`]s and [`Response`]s.
//!
//! # Wire format (version [`PROTOCOL_VERSION`])
//!
//! A Unix stream socket carrying **newline-delimited JSON**: each message is one JSON object
//! on one line (at most [`MAX_REQUEST_BYTES`] for a request). A client may send any number of
//! requests on one connection; the daemon answers each, **in order**, with one response line.
//! Every message carries the protocol version in `"v"`; a request with another version (or
//! none) is answered with an error and the connection stays open. Requests are tagged by
//! `"op"`, responses by `"kind"`; unknown fields are refused (a misspelt option is an error,
//! not silently ignored).
//!
//! ```text
//! -> {"v":1,"op":"ping"}
//! <- {"v":1,"kind":"pong","version":1}
//! -> {"v":1,"op":"stats","vm":"vm1"}
//! <- {"v":1,"kind":"stats","vms":[{"vm":"vm1","flavour":"pagewise","pages":512,...}]}
//! -> {"v":1,"op":"evict","vm":"vm1","goal":{"target_rss_bytes":1048576},"wait":true}
//! <- (when the eviction has finished, however long it takes)
//!    {"v":1,"kind":"evict_status","running":false,"report":{...},...}
//! -> {"v":1,"op":"census","vm":"vm1","ranges":{"first_page":0}}
//! <- {"v":1,"kind":"census","vm":"vm1","pages":512,"states":{"missing":500,...},...}
//! -> {"v":1,"op":"frobnicate"}
//! <- {"v":1,"kind":"error","message":"malformed request: unknown variant `frobnicate`, ..."}
//! ```
//!
//! The daemon never times a request out: a long operation (`evict` with `"wait":true`) is
//! answered when it is done. Only a connection idle between requests is closed, after
//! [`IDLE_TIMEOUT`].
//!
//! Page ranges are `{"first_page":F,"count":N,...}`; every range is checked against the VM
//! (`first_page + count` overflow-checked, at most the VM's pages) before it touches a table.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::evict::EvictGoal;
use crate::page_state::PageState;
use crate::route::Route;

mod answers;
pub use answers::*;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request line accepted (a `prepare` with many ranges fits comfortably).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// A connection with no request for this long is closed by the daemon (the default of
/// `DaemonConfig::control_idle_timeout`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Most ranges one `census` answer lists (the answer says where to continue).
pub const MAX_CENSUS_RANGES: usize = 65536;

/// A request to the daemon.
///
/// Reserved for other components' APIs (not implemented here): `dirty` (export a VM's dirty
/// set) and `release` (flush and release a VM's swap device to another host). They are new
/// variants of this enum and of [`Response`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check: answered with [`Response::Pong`].
    Ping,
    /// The ops this daemon answers: [`Response::Commands`].
    Commands,
    /// Attached and prepared VMs: [`Response::List`].
    List,
    /// Counters of every VM or one: [`Response::Stats`].
    Stats {
        #[serde(default)]
        vm: Option<String>,
    },
    /// Stop serving a VM: [`Response::Detached`].
    Detach { vm: String },
    /// Evict toward `goal`; with `wait` the answer is the final [`Response::EvictStatus`],
    /// else [`Response::EvictStarted`] at once.
    Evict {
        vm: String,
        goal: EvictTarget,
        #[serde(default)]
        batch_pages: Option<u64>,
        #[serde(default)]
        wait: bool,
    },
    /// The current or last eviction of a VM: [`Response::EvictStatus`].
    EvictStatus { vm: String },
    /// Ask the running eviction to stop after its batch: [`Response::EvictCancelled`].
    EvictCancel { vm: String },
    /// Working-set figures of one VM (tracking starts here) or of every tracked VM.
    Wss {
        #[serde(default)]
        vm: Option<String>,
    },
    /// Prepare an incoming VM before its VMM attaches: [`Response::Prepared`].
    Prepare(PrepareSpec),
    /// Forget a prepared VM: [`Response::Unprepared`].
    Unprepare { vm: String },
    /// Change page states (absent pages only) and routes of an attached VM:
    /// [`Response::Seeded`].
    Seed {
        vm: String,
        #[serde(default)]
        states: Vec<StateRange>,
        #[serde(default)]
        routes: Vec<RouteRange>,
    },
    /// Page-state and route census of an attached VM: [`Response::Census`].
    Census {
        vm: String,
        /// Also list per-page states as runs, from this window.
        #[serde(default)]
        ranges: Option<RangeWindow>,
    },
    /// Start tracking an attached VM's writes for `consumer` (the whole guest is
    /// write-protected): [`Response::DirtyStarted`].
    DirtyStart {
        vm: String,
        consumer: String,
        /// Pages that become resident through a fault count as written (pre-copy needs it).
        #[serde(default)]
        placed_counts_as_written: bool,
    },
    /// `consumer`'s pages written since its last harvest, protected again:
    /// [`Response::DirtySet`].
    DirtyHarvest { vm: String, consumer: String },
    /// Stop `consumer`'s tracking: [`Response::DirtyStopped`].
    DirtyStop { vm: String, consumer: String },
    /// Flush an attached VM's swap device and release its ownership (the daemon keeps
    /// running and keeps reading it; writes to it are refused from now on), so another host
    /// can acquire it: [`Response::SwapdevReleased`].
    SwapdevRelease { vm: String },
    /// Migrate an attached VM to another host: [`Response::Migration`] (its first status).
    Migrate(super::migration::MigrateRequest),
    /// The running or last migration of a VM: [`Response::Migration`].
    MigrateStatus { vm: String },
    /// Stop a migration before its switchover: [`Response::Migration`].
    MigrateCancel { vm: String },
    /// Reconnect a post-copy that lost its link now: [`Response::Migration`].
    MigrateResume { vm: String },
}

impl Request {
    /// The `"op"` name of every request, for `commands`.
    pub const OPS: &'static [&'static str] = &[
        "ping",
        "commands",
        "list",
        "stats",
        "detach",
        "evict",
        "evict_status",
        "evict_cancel",
        "wss",
        "prepare",
        "unprepare",
        "seed",
        "census",
        "dirty_start",
        "dirty_harvest",
        "dirty_stop",
        "swapdev_release",
        "migrate",
        "migrate_status",
        "migrate_cancel",
        "migrate_resume",
    ];
}

/// What an eviction aims for (exactly one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EvictTarget {
    /// Coldest first until the VM's resident memory is at most this many bytes.
    TargetRssBytes(u64),
    /// Every page not written and not faulted in for this many seconds.
    ColdForSecs(f64),
    /// Down to the working-set estimate plus a margin.
    Auto {
        #[serde(default)]
        margin_percent: Option<u32>,
        #[serde(default)]
        min_margin_pages: Option<u64>,
    },
}

/// A guest layout as the migration agent knows it: regions by memory-file offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    pub page_size: u64,
    pub regions: Vec<RegionSpec>,
}

/// One region: byte offset in the memory file / swap device, and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    pub offset: u64,
    pub size: u64,
}

/// The `prepare` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareSpec {
    pub vm: String,
    pub layout: LayoutSpec,
    /// Swap-device spec serving the VM instead of the daemon's rule for its name.
    #[serde(default)]
    pub swapdev: Option<String>,
    /// Initial page states (absent states only), applied before the fault loop starts.
    #[serde(default)]
    pub states: Vec<StateRange>,
    /// Initial routes (every other page: `swapdev`).
    #[serde(default)]
    pub routes: Vec<RouteRange>,
}

/// `count` pages from `first_page` in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRange {
    pub first_page: u64,
    pub count: u64,
    #[serde(with = "state_name")]
    pub state: PageState,
}

/// `count` pages from `first_page` routed to `route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRange {
    pub first_page: u64,
    pub count: u64,
    pub route: Route,
}

/// Which pages a census lists as runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeWindow {
    #[serde(default)]
    pub first_page: u64,
    /// Pages from `first_page` (default: to the end).
    #[serde(default)]
    pub count: Option<u64>,
}

/// Lowercase names of page states on the wire (as in `stats`).
pub mod state_name {
    use super::PageState;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn name(s: PageState) -> &'static str {
        match s {
            PageState::Missing => "missing",
            PageState::Present => "present",
            PageState::InFlight => "inflight",
            PageState::Evicting => "evicting",
            PageState::Evicted => "evicted",
            PageState::Removed => "removed",
            PageState::Zero => "zero",
        }
    }

    pub fn serialize<S: Serializer>(s: &PageState, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(name(*s))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<PageState, D::Error> {
        let s = String::deserialize(de)?;
        PageState::ALL
            .into_iter()
            .find(|p| name(*p) == s)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "unknown page state {s:?}: expected one of missing, present, inflight, \
                     evicting, evicted, removed, zero"
                ))
            })
    }
}

/// The daemon's answer to one [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong {
        version: u32,
    },
    Commands {
        ops: Vec<String>,
    },
    List {
        vms: Vec<ListedVm>,
    },
    Stats(StatsReport),
    Detached {
        vm: String,
    },
    EvictStarted {
        vm: String,
        goal: EvictGoal,
    },
    EvictStatus(EvictJobStatus),
    EvictCancelled {
        cancelling: bool,
    },
    Wss {
        vms: Vec<VmEviction>,
    },
    Prepared {
        vm: String,
        pages: u64,
        source: String,
    },
    Unprepared {
        vm: String,
    },
    Seeded {
        vm: String,
        states_set: u64,
        routes_set: u64,
    },
    Census(CensusReport),
    DirtyStarted {
        vm: String,
        consumer: String,
        pages: u64,
    },
    DirtySet(super::tracking::DirtySet),
    DirtyStopped {
        vm: String,
        consumer: String,
    },
    SwapdevReleased {
        vm: String,
        /// The device's generation after the release (the next owner acquires above it).
        generation: u64,
    },
    /// A migration's status or report (the migration engine's JSON).
    Migration(Value),
    /// The request failed; `message` names the problem and its causes.
    Error {
        message: String,
    },
}

impl Response {
    /// The `"kind"` tag, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Pong { .. } => "pong",
            Self::Commands { .. } => "commands",
            Self::List { .. } => "list",
            Self::Stats(_) => "stats",
            Self::Detached { .. } => "detached",
            Self::EvictStarted { .. } => "evict_started",
            Self::EvictStatus(_) => "evict_status",
            Self::EvictCancelled { .. } => "evict_cancelled",
            Self::Wss { .. } => "wss",
            Self::Prepared { .. } => "prepared",
            Self::Unprepared { .. } => "unprepared",
            Self::Seeded { .. } => "seeded",
            Self::Census(_) => "census",
            Self::DirtyStarted { .. } => "dirty_started",
            Self::DirtySet(_) => "dirty_set",
            Self::DirtyStopped { .. } => "dirty_stopped",
            Self::SwapdevReleased { .. } => "swapdev_released",
            Self::Migration(_) => "migration",
            Self::Error { .. } => "error",
        }
    }
}

/// A line that is not a valid message of this protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the message is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("the message is not a JSON object")]
    NotAnObject,
    #[error("the message has no protocol version \"v\" (this daemon speaks {PROTOCOL_VERSION})")]
    MissingVersion,
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { got: Value },
    #[error("malformed request")]
    BadRequest(#[source] serde_json::Error),
    #[error("malformed request: unknown field `{field}`")]
    UnknownField { field: String },
    #[error("malformed response")]
    BadResponse(#[source] serde_json::Error),
    #[error("the message is larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("the answer is larger than {limit} bytes")]
    ResponseTooLarge { limit: u64 },
    #[error("the message is not UTF-8")]
    NotUtf8,
}

/// One message as a line: `{"v":N,` then the message's own fields (in declaration order)
/// and a newline.
fn encode<T: Serialize>(msg: &T) -> String {
    // Our own types always serialize (string keys, finite floats).
    let body = serde_json::to_string(msg)
        .unwrap_or_else(|e| format!("{{\"unserializable\":{:?}}}", e.to_string()));
    let rest = body.strip_prefix('{').unwrap_or("}");
    let sep = if rest == "}" { "" } else { "," };
    format!("{{\"v\":{PROTOCOL_VERSION}{sep}{rest}\n")
}

/// Parse a line into its object, checking and removing the version.
fn decode_envelope(line: &[u8]) -> Result<Value, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::NotUtf8)?;
    let value: Value = serde_json::from_str(text.trim()).map_err(ProtocolError::Json)?;
    let Value::Object(mut obj) = value else {
        return Err(ProtocolError::NotAnObject);
    };
    match obj.remove("v") {
        None => Err(ProtocolError::MissingVersion),
        Some(v) if v.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => Ok(Value::Object(obj)),
        Some(got) => Err(ProtocolError::UnsupportedVersion { got }),
    }
}

impl Request {
    /// The request as one line of the wire format.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// Parse one request line (without or with its newline).
    pub fn decode(line: &[u8]) -> Result<Self, ProtocolError> {
        let value = decode_envelope(line)?;
        let request: Self =
            serde_json::from_value(value.clone()).map_err(ProtocolError::BadRequest)?;
        // Field-less ops (`ping`, `list`, ...) do not refuse extra fields by themselves: any
        // top-level field the request does not have is unknown.
        let known = serde_json::to_value(&request).unwrap_or(Value::Null);
        if let (Value::Object(given), Value::Object(known)) = (&value, &known) {
            if let Some(field) = given.keys().find(|k| !known.contains_key(*k)) {
                return Err(ProtocolError::UnknownField {
                    field: field.clone(),
                });
            }
        }
        Ok(request)
    }
}

impl Response {
    /// The response as one line of the wire format.
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// Parse one response line.
    pub fn decode(line: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_value(decode_envelope(line)?).map_err(ProtocolError::BadResponse)
    }
}

#[cfg(test)]
mod tests;
