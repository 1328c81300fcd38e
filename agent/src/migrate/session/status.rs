//! A migration's status and final report. Where QEMU's `query-migrate` has a field of the
//! same meaning it has QEMU's name (`status`, `total-time`, `downtime`, `setup-time`,
//! `ram.transferred` ...); pagewise's own figures are snake_case.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::migrate::message::Mode;
use crate::migrate::precopy::{Round, StopRule};

/// Which end of the migration this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Source,
    Destination,
}

/// Where a migration is (QEMU's status names where they mean the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Setup,
    /// Pre-copy rounds.
    Active,
    /// The source guest is paused; the final set and the switchover.
    PreSwitchover,
    /// The guest runs on the destination; the rest of its pages follow.
    PostcopyActive,
    /// Post-copy lost its link: faults on pages still on the source wait, the rest of the
    /// guest runs; the source dials again (QEMU's name).
    PostcopyPaused,
    /// A new link is being set up for a paused post-copy (QEMU's name).
    PostcopyRecover,
    Completed,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed | Phase::Cancelled)
    }

    /// The name the status shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Active => "active",
            Phase::PreSwitchover => "pre-switchover",
            Phase::PostcopyActive => "postcopy-active",
            Phase::PostcopyPaused => "postcopy-paused",
            Phase::PostcopyRecover => "postcopy-recover",
            Phase::Completed => "completed",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }
}

/// QEMU's `ram` object, in pagewise's terms.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes written to the migration connections.
    pub transferred: u64,
    /// Bytes of guest RAM the destination does not hold yet (an estimate while running).
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Zero pages (sent as counts, no bytes).
    pub duplicate: u64,
    /// Pages sent with their bytes.
    pub normal: u64,
    /// Megabits per second over the migration so far.
    pub mbps: f64,
    /// Write-tracking harvests (pre-copy rounds after the first, plus the final one).
    pub dirty_sync_count: u64,
    /// Demand page requests the source answered after the switchover.
    pub postcopy_requests: u64,
}

/// Where a VM's pages were when its migration began (source side).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Census {
    /// In guest memory.
    pub resident: u64,
    /// Of those, holding exactly their copy in the VM's own swap device (read back from it
    /// and not written since).
    pub device_copies: u64,
    /// Only in the swap device.
    pub evicted: u64,
}

/// Status while running, report when over.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStatus {
    pub vm: String,
    pub role: Role,
    pub mode: Option<Mode>,
    /// The other host (its migration endpoint, or the connecting address).
    pub peer: String,
    pub status: Phase,
    /// Milliseconds since the start (to the end, once over).
    #[serde(rename = "total-time")]
    pub total_time: u64,
    /// Milliseconds from the start to the first pre-copy page.
    #[serde(rename = "setup-time")]
    pub setup_time: u64,
    /// Milliseconds the guest was paused (source paused -> destination running), as pagewise
    /// measured it.
    pub downtime: Option<u64>,
    /// QEMU's own downtime figure (device state only).
    pub qemu_downtime_ms: Option<u64>,
    pub ram: RamStats,
    /// The rule that ended the pre-copy rounds.
    pub stop_rule: Option<StopRule>,
    pub rounds: Vec<Round>,
    /// Pages whose current copy was in the shared swap device: never sent (agile).
    pub pages_stored: u64,
    /// Pages the guest freed: never sent.
    pub pages_freed: u64,
    /// Pre-copied pages written again before the switchover and fetched after it.
    pub pages_stale: u64,
    /// Pages pushed after the switchover.
    pub pages_pushed: u64,
    /// Resident pages the guest was writing when agile began: left out of its first round
    /// (they cross once, after the switchover).
    pub pages_held_back: u64,
    /// XBZRLE figures (QEMU's `xbzrle-cache` names), when it was on.
    #[serde(rename = "xbzrle-cache", skip_serializing_if = "Option::is_none")]
    pub xbzrle: Option<crate::migrate::delta::XbzrleStats>,
    /// Wire lz4 figures, when it was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<crate::migrate::delta::CompressionStats>,
    /// Pages the destination could not decode and that were sent again whole.
    pub pages_resent: u64,
    /// Times post-copy lost its link, and times it got it back.
    pub link_cuts: u64,
    pub recoveries: u64,
    /// Milliseconds post-copy spent paused for want of a link.
    pub paused_for_link_ms: u64,
    /// On a destination that gave up waiting for its source: every page only the source
    /// held, as runs `[first, count]` (lost unless the source host comes back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pages_lost: Vec<[u64; 2]>,
    /// Agile rolled back after handing the shared swap device over: whether this host
    /// took it back (it owns it again) or not (it only reads it; the log says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swapdev_reclaimed: Option<bool>,
    /// A source daemon restarted after the switchover runs this migration on from its
    /// journal (the one that began it died).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub restarted: bool,
    /// The VM's pages when the migration began, by where their copy was.
    pub census: Option<Census>,
    /// Milliseconds from the start until the source held none of the VM's RAM.
    pub source_released_ms: Option<u64>,
    pub dest_qemu_pid: Option<u64>,
    /// Each rewritten source path and the destination's path for it.
    pub dest_paths: BTreeMap<String, String>,
    /// The destination's figures (demand faults and their latency, blocktime, pages from
    /// the swap device), as it reported them.
    pub destination: Option<Value>,
    /// What failed, when it did.
    pub error: Option<String>,
    /// Unix-epoch milliseconds: the start, the source's pause, the guest running again.
    pub started_at_ms: u64,
    pub paused_at_ms: Option<u64>,
    pub resumed_at_ms: Option<u64>,
    /// The source's counters over time (every 200 ms).
    pub timeline: Vec<super::timeline::SourceSample>,
    /// The destination's demand faults and their latency over time (on the destination).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dest_timeline: Vec<super::timeline::DestSample>,
}
