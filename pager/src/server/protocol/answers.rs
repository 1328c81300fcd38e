//! The answers' payloads: the VMs listed, their statistics, evictions and censuses.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;
use crate::evict::service::EvictStats;
use crate::evict::{EvictProgress, EvictReport};
use crate::metrics::MetricsSnapshot;

/// Whether a listed VM is serving or waiting for its VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    Attached,
    Prepared,
}

/// One VM of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedVm {
    pub vm: String,
    pub status: VmStatus,
    /// The VMM's pid (attached VMs).
    pub pid: Option<i32>,
    pub source: String,
    pub pages: u64,
}

/// The `stats` answer (`pagewise stats --json` prints exactly this).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatsReport {
    pub vms: Vec<VmStats>,
    /// Migrations to or from this host (the migration engine's status objects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub migrations: Vec<Value>,
}

/// Pages per state, by the lowercase state names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateCounts {
    pub missing: u64,
    pub present: u64,
    pub inflight: u64,
    pub evicting: u64,
    pub evicted: u64,
    pub removed: u64,
    pub zero: u64,
}

impl StateCounts {
    /// From a census indexed like [`PageState::ALL`].
    pub fn from_census(c: &[usize; 7]) -> Self {
        let g = |s: PageState| c[s as usize] as u64;
        Self {
            missing: g(PageState::Missing),
            present: g(PageState::Present),
            inflight: g(PageState::InFlight),
            evicting: g(PageState::Evicting),
            evicted: g(PageState::Evicted),
            removed: g(PageState::Removed),
            zero: g(PageState::Zero),
        }
    }
}

/// Pages per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RouteCounts {
    pub local: u64,
    pub swapdev: u64,
    pub remote: u64,
    pub zero: u64,
}

impl RouteCounts {
    /// From a census indexed like [`Route::ALL`].
    pub fn from_census(c: &[usize; 4]) -> Self {
        let g = |r: Route| c[r as usize] as u64;
        Self {
            local: g(Route::Local),
            swapdev: g(Route::Swapdev),
            remote: g(Route::Remote),
            zero: g(Route::Zero),
        }
    }
}

/// One VM's statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStats {
    pub vm: String,
    pub flavour: String,
    pub pid: i32,
    pub uid: u32,
    pub source: String,
    pub prefetch: String,
    pub page_size: u64,
    pub pages: u64,
    pub wp_registered: bool,
    pub attached_secs: u64,
    pub states: StateCounts,
    pub dirty_pages: u64,
    pub fault_latency_p50_us: Option<u64>,
    pub fault_latency_p99_us: Option<u64>,
    pub fault_latency_mean_us: Option<f64>,
    pub metrics: MetricsSnapshot,
    /// Eviction and working-set figures, for VMs being tracked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eviction: Option<EvictStats>,
    /// The first damaged page a guest thread of the VM waited on (the VM is paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<crate::damage::DamagedPage>,
}

/// The current or last eviction of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvictJobStatus {
    pub vm: String,
    pub running: bool,
    pub goal: Option<EvictGoal>,
    pub progress: EvictProgress,
    pub report: Option<EvictReport>,
    pub error: Option<String>,
    pub elapsed_ms: Option<u64>,
}

/// Working-set and eviction figures of one VM (`wss`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmEviction {
    pub vm: String,
    pub eviction: EvictStats,
}

/// The `census` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CensusReport {
    pub vm: String,
    pub pages: u64,
    pub page_size: u64,
    pub states: StateCounts,
    pub routes: RouteCounts,
    /// Runs of equal state inside the requested window (when asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<StateRange>>,
    /// Set when the runs stopped at [`MAX_CENSUS_RANGES`]: ask again from this page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page: Option<u64>,
}
