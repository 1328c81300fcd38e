//! What happens to a VM when a page it waits on is damaged (its checksum or its decoding
//! failed at the source): the page is never placed, so the guest is never fed garbage; the
//! faulting thread keeps waiting; and by default the whole VM is paused (SIGSTOP to the VMM
//! process) so that its other vCPUs do not run on, spinning on a lock the waiting one holds
//! or tripping the guest's watchdogs, while the operator looks. `SIGCONT` resumes the VMM;
//! the thread that faulted on the damaged page still waits.
//!
//! Why a signal and not QMP `stop`: QEMU pauses only once every vCPU has acknowledged, and
//! a TCG vCPU blocked in the fault never does, so `stop` would hang QEMU's main loop (and
//! its QMP monitor) for good; SIGSTOP pauses QEMU and Firecracker alike and cannot hang.

use std::sync::Mutex;
use std::time::SystemTime;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// `serve --on-damaged-page`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DamagePolicy {
    /// Pause the VMM (SIGSTOP); the faulting thread waits.
    #[default]
    Pause,
    /// Only the faulting thread waits; the rest of the VM runs.
    Hold,
    /// End the VM's fault loop (the VM is torn down), naming the page.
    TearDown,
}

impl DamagePolicy {
    /// The policy named `name` (pause, hold, tear-down).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "pause" => Some(Self::Pause),
            "hold" => Some(Self::Hold),
            "tear-down" => Some(Self::TearDown),
            _ => None,
        }
    }
}

/// The first damaged page a thread of the VM waited on, and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedPage {
    pub page: u64,
    /// The read error, its causes joined.
    pub error: String,
    /// Seconds since the epoch when it was found.
    pub at_secs: u64,
    /// The VMM process paused (SIGSTOP), when it was.
    pub paused_pid: Option<i32>,
    /// Why the VMM was not paused, when it was not.
    pub not_paused: Option<String>,
    /// Faults held on damaged pages since (every fault on one, this one included).
    pub faults_held: u64,
}

/// A VM's damaged-page record (see [`DamagedPage`]).
#[derive(Debug, Default)]
pub struct DamageRecord(Mutex<Option<DamagedPage>>);

impl DamageRecord {
    /// The record so far.
    pub fn get(&self) -> Option<DamagedPage> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `faults` faults are held on damaged page `page`. The first damaged page is recorded
    /// and, under [`DamagePolicy::Pause`], pauses the VMM `vmm_pid`; later ones are counted.
    pub fn faults_held(
        &self,
        page: u64,
        error: String,
        faults: u64,
        policy: DamagePolicy,
        vmm_pid: i32,
    ) {
        let mut record = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = record.as_mut() {
            r.faults_held = r.faults_held.saturating_add(faults);
            return;
        }
        let (paused_pid, not_paused) = match policy {
            DamagePolicy::Pause => match pause_vmm(vmm_pid) {
                Ok(()) => (Some(vmm_pid), None),
                Err(why) => (None, Some(why)),
            },
            _ => (None, Some("serve --on-damaged-page hold".to_string())),
        };
        let at_secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        *record = Some(DamagedPage {
            page,
            error,
            at_secs,
            paused_pid,
            not_paused,
            faults_held: faults,
        });
    }
}

/// SIGSTOP to the VMM `pid`; why not, when it cannot be paused.
fn pause_vmm(pid: i32) -> Result<(), String> {
    if pid <= 0 {
        return Err("the VMM's pid is not known".into());
    }
    if u32::try_from(pid).ok() == Some(std::process::id()) {
        return Err("the VMM is the pager's own process".into());
    }
    kill(Pid::from_raw(pid), Signal::SIGSTOP).map_err(|e| format!("SIGSTOP to pid {pid}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_damaged_page_is_kept_and_later_faults_counted() {
        let r = DamageRecord::default();
        assert_eq!(r.get(), None);
        r.faults_held(7, "bad".into(), 1, DamagePolicy::Hold, 1234);
        r.faults_held(9, "worse".into(), 2, DamagePolicy::Pause, 1234);
        let got = r.get().unwrap();
        assert_eq!(
            (got.page, got.error.as_str(), got.faults_held),
            (7, "bad", 3)
        );
        assert_eq!(got.paused_pid, None);
    }

    #[test]
    fn the_pager_never_pauses_itself_nor_an_unknown_pid() {
        for pid in [0, -1, std::process::id() as i32] {
            let r = DamageRecord::default();
            r.faults_held(1, "bad".into(), 1, DamagePolicy::Pause, pid);
            let got = r.get().unwrap();
            assert_eq!(got.paused_pid, None, "pid {pid}");
            assert!(got.not_paused.is_some(), "pid {pid}");
        }
    }

    #[test]
    fn a_child_process_is_paused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let r = DamageRecord::default();
        r.faults_held(1, "bad".into(), 1, DamagePolicy::Pause, pid);
        assert_eq!(r.get().unwrap().paused_pid, Some(pid));
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat.rsplit(") ").next().unwrap().chars().next().unwrap()
        };
        let start = std::time::Instant::now();
        while state() != 'T' && start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(state(), 'T');
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(DamagePolicy::by_name("pause"), Some(DamagePolicy::Pause));
        assert_eq!(DamagePolicy::by_name("hold"), Some(DamagePolicy::Hold));
        assert_eq!(
            DamagePolicy::by_name("tear-down"),
            Some(DamagePolicy::TearDown)
        );
        assert_eq!(DamagePolicy::by_name("ignore"), None);
    }
}
