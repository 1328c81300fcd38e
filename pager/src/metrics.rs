//! Per-VM counters, updated lock-free by the fault loop and read by the stats socket.

pub mod histogram;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use histogram::{HistogramSnapshot, LatencyHistogram};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Counters of one VM. All `Relaxed` atomics: cheap on the fault path.
        #[derive(Debug, Default)]
        pub struct VmMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Demand-fault latency: message read -> page placed / thread woken.
            pub fault_latency: LatencyHistogram,
        }

        /// A copy of a VM's counters.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
            pub fault_latency: HistogramSnapshot,
        }

        impl VmMetrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    fault_latency: self.fault_latency.snapshot(),
                }
            }
        }

        impl MetricsSnapshot {
            /// (name, value) of every plain counter, for tables and Prometheus.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }

            /// (name, doc comment) of every plain counter: the help text of `/metrics`.
            pub fn counter_help() -> Vec<(&'static str, &'static str)> {
                vec![$((stringify!($name), concat!($($doc),*)),)*]
            }
        }
    };
}

counters! {
    /// Missing/minor page-fault messages read (every message, including repeats of a page).
    faults,
    /// Write-protect fault messages read.
    wp_faults,
    /// Faults whose page had to be read from the page source (this fault started the read).
    faults_to_source,
    /// Faults answered without a read of their own: zero/removed pages, pages already
    /// present, or already in flight.
    faults_avoided,
    /// Pages placed with UFFDIO_COPY (or pwrite into the memory file).
    pages_copied,
    /// Pages placed with UFFDIO_ZEROPAGE.
    pages_zeroed,
    /// Pages requested by the prefetch policy.
    pages_prefetched,
    /// Demand faults on a page whose prefetch was still in flight (see docs/pager.md).
    prefetch_hits,
    /// UFFDIO_WAKE calls for faults that raced with a placement.
    wakes,
    /// Page-source reads that failed (the page is retried on the next fault).
    read_errors,
    /// UFFD_EVENT_REMOVE messages.
    remove_events,
    /// Pages marked Removed by REMOVE events.
    pages_removed,
    /// COPY/ZEROPAGE calls that returned EAGAIN and were retried after draining events.
    copy_retries,
    /// Total nanoseconds faulting threads spent blocked (summed over every fault served).
    blocktime_ns,
    /// Reads currently in flight.
    inflight,
    /// Pages pushed unasked (by a migration source) and placed.
    pages_pushed,
    /// Reads that returned a damaged page (checksum/decode failure): never placed.
    pages_damaged,
    /// Answers from a source for pages it was not asked for (dropped).
    unrequested_pages,
    /// Faults that waited for a source (none installed for their route, or its host gone).
    faults_parked,
}

impl VmMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
