//! The tunables of one VM's fault loop.

/// Tunables of one VM's fault loop.
#[derive(Debug, Clone, Copy)]
pub struct FaultLoopConfig {
    /// Most page reads in flight (demand + prefetch).
    pub max_inflight: usize,
    /// Most pages the prefetch policy may add per demand fault.
    pub prefetch_per_fault: usize,
    /// Attempts for one page read before giving up on it.
    pub read_attempts: u64,
    /// What a damaged page a guest thread waits on does to the VM.
    pub on_damaged: crate::damage::DamagePolicy,
}

impl Default for FaultLoopConfig {
    fn default() -> Self {
        Self {
            max_inflight: 64,
            prefetch_per_fault: 16,
            read_attempts: 3,
            on_damaged: crate::damage::DamagePolicy::default(),
        }
    }
}
