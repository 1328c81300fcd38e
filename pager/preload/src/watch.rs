//! Pager watch: after a successful attach, one small thread blocks reading the attach
//! connection. The pager never writes to it again; end-of-file or an error means the pager
//! went away (crashed, was stopped, or tore this VM down). Nobody can serve the guest's
//! missing pages any more — the next one would block its vCPU forever, and a blocked vCPU
//! makes QEMU ignore SIGTERM — so the process ends at once with a message naming the cause.
//! `PAGEWISE_ON_PAGER_EXIT=hang` keeps the old behaviour (block, never zero-fill).
//!
//! This is the library's only thread. It is created with every signal blocked, so it never
//! takes a signal the VMM meant for its own threads.

use std::io::Read;
use std::os::unix::net::UnixStream;

use crate::sys;

/// What to do when the pager's connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPagerExit {
    /// Print the cause and `_exit(1)` (default).
    Exit,
    /// Do nothing: faults block until the process is killed.
    Hang,
}

impl OnPagerExit {
    pub fn parse(text: Option<&str>) -> Result<Self, String> {
        match text {
            None | Some("exit") => Ok(Self::Exit),
            Some("hang") => Ok(Self::Hang),
            Some(other) => Err(format!(
                "PAGEWISE_ON_PAGER_EXIT={other:?}: expected exit or hang"
            )),
        }
    }
}

/// Start watching `stream` (the attach connection); `what` names the VM in the message.
pub fn start(mut stream: UnixStream, what: String) -> Result<(), String> {
    stream
        .set_read_timeout(None)
        .map_err(|e| format!("pager watch: clearing the socket timeout: {e}"))?;
    let saved = sys::block_all_signals();
    let spawned = std::thread::Builder::new()
        .name("pagewise-watch".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut buf = [0u8; 256];
            let cause = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break "closed the connection".to_string(),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break format!("connection failed: {e}"),
                }
            };
            crate::die(&format!(
                "the pager serving {what} {cause}: nobody can serve the guest's missing \
                 pages any more"
            ));
        });
    sys::restore_signals(&saved);
    spawned
        .map(drop)
        .map_err(|e| format!("starting the pager watch thread: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_policy() {
        assert_eq!(OnPagerExit::parse(None), Ok(OnPagerExit::Exit));
        assert_eq!(OnPagerExit::parse(Some("hang")), Ok(OnPagerExit::Hang));
        assert!(OnPagerExit::parse(Some("ignore"))
            .unwrap_err()
            .contains("PAGEWISE_ON_PAGER_EXIT"));
    }
}
