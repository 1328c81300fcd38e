//! The daemon's migration hook: the control requests `migrate`, `migrate_status` and
//! `migrate_cancel` are answered by a [`MigrationService`] the binary installs
//! ([`super::Daemon::set_migration`]); the migration itself (wire, peers, QMP) lives in the
//! `agent` crate, which depends on this one, not the other way round.
//!
//! A VM being migrated is not evicted (the eviction request is refused while
//! [`MigrationService::is_migrating`]): the source reads resident pages from the memory file,
//! and an eviction punching one between the read of its state and the read of its bytes
//! would send zeros.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::source::BoxError;

/// `migrate`: move VM `vm` to the migration endpoint `to` (`HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    pub vm: String,
    pub to: String,
    /// `precopy`, `postcopy` or `agile`.
    pub mode: String,
    /// Bytes per second the migration may use (pre-copy and push); none: the link's.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Longest pause the pre-copy may plan for, in milliseconds.
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Switch a pre-copy that has not converged to post-copy after this many milliseconds.
    #[serde(default)]
    pub postcopy_after_ms: Option<u64>,
    /// XBZRLE deltas for pages sent again, with a cache of this many bytes on the source.
    #[serde(default)]
    pub xbzrle_cache: Option<u64>,
    /// lz4 for pages sent whole, while it pays.
    #[serde(default)]
    pub compress: bool,
    /// The order of pre-copy rounds: `address` (default) or `microwiper`.
    #[serde(default)]
    pub order: Option<String>,
}

/// What the daemon asks of the migration engine. Answers are JSON objects (the engine's
/// report type, which this crate does not know).
pub trait MigrationService: Send + Sync {
    /// Start migrating; answers at once with the first status.
    fn start(&self, request: MigrateRequest) -> Result<Value, BoxError>;
    /// The running or last migration of `vm` (on either host).
    fn status(&self, vm: &str) -> Result<Value, BoxError>;
    /// Ask the running migration of `vm` to stop (only before switchover).
    fn cancel(&self, vm: &str) -> Result<Value, BoxError>;
    /// Make the paused post-copy of `vm` (its link broke) try to reconnect now.
    fn resume(&self, vm: &str) -> Result<Value, BoxError>;
    /// Whether `vm` is being migrated (to or from this host).
    fn is_migrating(&self, vm: &str) -> bool;
    /// Every migration this daemon knows, for `stats`.
    fn overview(&self) -> Vec<Value>;
    /// VM `vm`'s VMM (pid `vmm_pid`) attached again after its pager went away: settle what
    /// a migration the gone daemon was running left behind in it (in the background).
    fn reattached(&self, vm: &str, vmm_pid: i32);
}
