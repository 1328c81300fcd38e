//! Typed errors of the daemon's service APIs. No variant prints its cause inline: callers
//! render the chain ([`render_chain`] in the daemon, `{:#}` in the binary).

use std::path::PathBuf;

use crate::prefetch::UnknownPolicy;
use crate::source::SourceError;

/// `e` and every cause below it, joined by ": " (what an attach reply or a control error
/// response carries, so the peer sees as much as the log).
pub fn render_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // A transparent wrapper repeats its source's text: print it once.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Why a [`super::SourceProvider`] cannot name or open the store of a VM.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "no swap device for VM {vm:?}: {} does not exist (create it with `pagewise swapdev create`)",
        path.display()
    )]
    DeviceMissing { vm: String, path: PathBuf },
    #[error("no swap device configured for VM {vm:?}")]
    NotConfigured { vm: String },
    #[error("opening swap device {spec}")]
    Backend {
        spec: String,
        #[source]
        source: swapdev::backend::BackendError,
    },
    #[error("opening swap device {spec}")]
    Device {
        spec: String,
        #[source]
        source: swapdev::SwapError,
    },
    #[error("setting up the page source {description}")]
    Source {
        description: String,
        #[source]
        source: SourceError,
    },
    #[error("{spec:?} names no raw snapshot after the `raw:` prefix")]
    RawEmpty { spec: String },
    #[error("cannot read {}", path.display())]
    RawProbe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "raw snapshot {spec} holds {len} bytes but the VM's guest memory is {expected} bytes \
         (end of its last region): it is not this VM's snapshot"
    )]
    RawSize {
        spec: String,
        len: u64,
        expected: u64,
    },
    /// A provider that cannot honour a per-VM spec override (`prepare` with `swapdev`).
    #[error("this daemon's page sources cannot be chosen per VM (asked for {spec:?})")]
    OverrideUnsupported { spec: String },
}

/// Why a VM could not be started (the attach is refused with this, chain rendered).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("VM {vm:?} is already attached")]
    AlreadyAttached { vm: String },
    #[error("{key} already serves VM {other:?}; one VM per swap device")]
    DeviceInUse { key: String, other: String },
    #[error(
        "page size mismatch: the VM uses {vm_page_size} bytes, {source_name} has {source_page_size} bytes"
    )]
    PageSizeMismatch {
        vm_page_size: u64,
        source_name: String,
        source_page_size: u64,
    },
    #[error(
        "guest memory ends at {span} bytes (offset+size of its regions) but {source_name} holds only {source_bytes} bytes"
    )]
    SourceTooSmall {
        span: u64,
        source_name: String,
        source_bytes: u64,
    },
    #[error("the guest does not fit its page source")]
    DoesNotFit(#[source] crate::layout::LayoutError),
    #[error("starting the fault loop")]
    FaultLoop(#[source] crate::fault_loop::FaultLoopError),
    #[error("VM {vm:?} was prepared with another guest layout")]
    LayoutMismatch {
        vm: String,
        #[source]
        source: super::prepare::LayoutDifference,
    },
    #[error("applying the prepared page states and routes of VM {vm:?}")]
    Seeds {
        vm: String,
        #[source]
        source: super::prepare::SeedError,
    },
    #[error(transparent)]
    Prefetch(#[from] UnknownPolicy),
    #[error("duplicating the attach socket")]
    DupSocket(#[source] std::io::Error),
    #[error("creating the VM's stop eventfd")]
    EventFd(#[source] nix::Error),
    #[error("the pager is shutting down")]
    ShuttingDown,
    #[error("spawning the fault-loop thread")]
    Spawn(#[source] std::io::Error),
    #[error("VM {vm:?} is prepared for an incoming migration: a re-attach cannot take it (its pages are partly on the other host)")]
    ReattachPrepared { vm: String },
    #[error("VM {vm:?} waits for its own VMM to attach again (a migration destination restarted after the switchover): a new VMM cannot take it")]
    PreparedForReattach { vm: String },
    #[error("re-attach of VM {vm:?}: its pager served it from {was}, this one would from {now} (the pages stored there would read as missing)")]
    ReattachOtherStore {
        vm: String,
        was: String,
        now: String,
    },
    #[error("re-attach of VM {vm:?}: rebuilding its page states")]
    Rebuild {
        vm: String,
        #[source]
        source: super::reattach::RebuildError,
    },
}

impl StartError {
    /// Whether the same attach may pass later without anyone fixing anything here: the VM's
    /// swap device is owned by another host, which hands it back when the migration it was
    /// handed over for rolls back.
    pub fn may_pass(&self) -> bool {
        matches!(
            self,
            Self::Provider(ProviderError::Device {
                source: swapdev::SwapError::OwnedByOther { .. },
                ..
            })
        )
    }
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("binding {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon's prefetch setting")]
    Prefetch(#[source] UnknownPolicy),
    #[error("creating the daemon's stop eventfd")]
    EventFd(#[source] nix::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_render_every_cause_once() {
        let e = StartError::Provider(ProviderError::DeviceMissing {
            vm: "a".into(),
            path: "/x/a.swap".into(),
        });
        assert_eq!(
            render_chain(&e),
            "no swap device for VM \"a\": /x/a.swap does not exist (create it with `pagewise swapdev create`)"
        );
        let e = DaemonError::Bind {
            path: "/run/x".into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "in use"),
        };
        assert_eq!(render_chain(&e), "binding /run/x: in use");
        assert_eq!(
            e.to_string(),
            "binding /run/x",
            "the cause is not printed inline"
        );
    }
}
