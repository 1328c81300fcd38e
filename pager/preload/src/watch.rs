//! Pager watch: after a successful attach, one small thread blocks reading the attach
//! connection. The pager writes to it only to change whether a re-attach could serve this
//! VM (a reply frame with a new `reattach`) or, last, to say why it tore the VM down (`ok:
//! false`: the process ends with that reason). An end without a word means the pager went
//! away (killed, crashed, restarted): with [`OnPagerExit::Wait`] (the default) and the
//! pager's last word allowing it, the thread then tries to attach again every 200 ms, the
//! same uffd and memory file with `reattach: true`, for `PAGEWISE_PAGER_WAIT_SECS`; guest
//! threads that fault meanwhile just wait (the uffd stays registered: nothing reads zeros).
//! Otherwise, or when the pager does not come back in time, or refuses, the process ends
//! with a message naming the cause: the next missing page would block its vCPU forever,
//! and a blocked vCPU makes QEMU ignore SIGTERM. `PAGEWISE_ON_PAGER_EXIT=hang` blocks
//! instead (never zero-fill).
//!
//! This is the library's only thread. It is created with every signal blocked, so it never
//! takes a signal the VMM meant for its own threads.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::attach::{handshake, HandshakeFailure, Link};
use crate::config::Config;
use crate::sys;
use crate::wire::{self, Verdict};

/// Between two re-attach attempts.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// What to do when the pager's connection ends without the pager saying why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPagerExit {
    /// Wait for a restarted pager and attach again, when the pager said a re-attach can
    /// serve this VM; print the cause and `_exit(1)` if it does not come back in time or said
    /// it cannot (default).
    Wait,
    /// Print the cause and `_exit(1)`.
    Exit,
    /// Do nothing: faults block until the process is killed.
    Hang,
}

impl OnPagerExit {
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        match text {
            None | Some("wait") => Ok(Self::Wait),
            Some("exit") => Ok(Self::Exit),
            Some("hang") => Ok(Self::Hang),
            Some(other) => Err(format!(
                "PAGEWISE_ON_PAGER_EXIT={other:?}: expected wait, exit or hang"
            )),
        }
    }
}

/// What the pager last said about the VM it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The swap device serving it: a restarted pager must serve it from the same one (else
    /// the pages stored there would read as missing).
    pub swapdev: Option<String>,
    /// Whether a re-attach could serve it.
    pub reattach: bool,
}

/// Start watching `stream` (the attach connection); `served` is what the pager's reply
/// said; `what` names the VM in messages.
pub fn start(
    stream: UnixStream,
    cfg: Config,
    link: Link,
    served: Served,
    what: String,
) -> Result<(), String> {
    stream
        .set_read_timeout(None)
        .map_err(|e| format!("pager watch: clearing the socket timeout: {e}"))?;
    let saved = sys::block_all_signals();
    let spawned = std::thread::Builder::new()
        .name("pagewise-watch".into())
        .stack_size(128 << 10)
        .spawn(move || watch(stream, &cfg, &link, served, &what));
    sys::restore_signals(&saved);
    spawned
        .map(drop)
        .map_err(|e| format!("starting the pager watch thread: {e}"))
}

fn watch(mut stream: UnixStream, cfg: &Config, link: &Link, mut served: Served, what: &str) -> ! {
    loop {
        let cause = loop {
            match wire::read_next(&mut stream) {
                Ok(Some(Verdict::Accepted { swapdev, reattach })) => {
                    served = Served { swapdev, reattach }
                }
                Ok(Some(Verdict::Refused { error, .. })) => {
                    crate::die(&format!("the pager serving {what} tore it down: {error}"))
                }
                Ok(None) => break "closed the connection".to_string(),
                Err(e) => break e,
            }
        };
        let gone = format!(
            "the pager serving {what} {cause}: nobody can serve the guest's missing pages any more"
        );
        if cfg.on_pager_exit != OnPagerExit::Wait {
            crate::die(&gone);
        }
        if !served.reattach {
            crate::die(&format!(
                "{gone} (it had said a re-attach could not serve this VM: some of its pages \
                 were on another host)"
            ));
        }
        stream = wait_for_pager(cfg, link, what, &gone, &mut served);
    }
}

/// Attach again until the pager takes the VM back, or end the process.
fn wait_for_pager(
    cfg: &Config,
    link: &Link,
    what: &str,
    gone: &str,
    served: &mut Served,
) -> UnixStream {
    let limit = cfg.pager_wait;
    sys::write_stderr(&format!(
        "pagewise-preload: the pager serving {what} went away; waiting up to {} s for it to \
         come back at {} (guest threads that fault meanwhile wait)\n",
        limit.as_secs(),
        cfg.socket.display()
    ));
    let began = Instant::now();
    let mut told_not_yet = false;
    loop {
        match handshake(cfg, link, Some(served.swapdev.as_deref())) {
            Ok((stream, swapdev, allowed)) => {
                if swapdev != served.swapdev {
                    crate::die(&format!(
                        "{gone}; the pager that came back serves it from {}, not {}: its pages \
                         stored there would be lost",
                        swapdev.as_deref().unwrap_or("(no swap device)"),
                        served.swapdev.as_deref().unwrap_or("(no swap device)")
                    ));
                }
                sys::write_stderr(&format!(
                    "pagewise-preload: {what} attached again to the pager at {} after {} ms\n",
                    cfg.socket.display(),
                    began.elapsed().as_millis()
                ));
                *served = Served {
                    swapdev,
                    reattach: allowed,
                };
                if let Err(e) = stream.set_read_timeout(None) {
                    crate::die(&format!("pager watch: clearing the socket timeout: {e}"));
                }
                return stream;
            }
            Err(HandshakeFailure::Refused(e)) => {
                crate::die(&format!("{gone}; attaching again was refused: {e}"))
            }
            Err(HandshakeFailure::NotYet(why)) => {
                if !told_not_yet {
                    sys::write_stderr(&format!(
                        "pagewise-preload: {what}: the pager is back but cannot take it yet \
                         ({why}); trying again\n"
                    ));
                    told_not_yet = true;
                }
                if began.elapsed() >= limit {
                    crate::die(&format!(
                        "{gone}, and it could not take the VM back within {} s ({}; last \
                         try: {why})",
                        limit.as_secs(),
                        crate::config::ENV_PAGER_WAIT
                    ));
                }
            }
            Err(HandshakeFailure::Unreachable(last)) => {
                if began.elapsed() >= limit {
                    crate::die(&format!(
                        "{gone}, and it did not come back within {} s ({}; last try: {last})",
                        limit.as_secs(),
                        crate::config::ENV_PAGER_WAIT
                    ));
                }
            }
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_policy() {
        assert_eq!(OnPagerExit::parse(None), Ok(OnPagerExit::Wait));
        assert_eq!(OnPagerExit::parse(Some("exit")), Ok(OnPagerExit::Exit));
        assert_eq!(OnPagerExit::parse(Some("hang")), Ok(OnPagerExit::Hang));
        assert!(OnPagerExit::parse(Some("ignore"))
            .unwrap_err()
            .contains("PAGEWISE_ON_PAGER_EXIT"));
    }
}
