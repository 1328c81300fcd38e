//! Whole migrations between two pagewise daemons, QEMU moving only device state: the source
//! driver ([`source`]), the destination endpoint ([`destination`]) and the engine the daemon
//! calls through its control socket ([`engine`]).
//!
//! # One migration, on the wire
//! Two authenticated TCP connections per migration (same session id): **urgent** (demand
//! page requests and their answers) and **bulk** (everything else). Bulk, in order:
//!
//! ```text
//! source                                   destination
//!   Setup{vm, mode, layout, argv, swapdev} ->  prepare VM, create RAM file, start QEMU
//!                                         <-  SetupOk{qemu_pid, incoming} | Refuse(why)
//!   pre-copy: Page / ZeroPages / FreedPages / StoredPages / RoundEnd ...
//!                                             pages -> RAM file, routes local/zero/stored
//!   agile: flush + release the swap device
//!   Released                              ->  acquire it, serve stored pages from it
//!   (QEMU: migrate; source paused at pre-switchover)
//!   precopy: the final dirty pages as Page
//!   postcopy/agile: StalePages runs           punch them, route them remote
//!   Switchover                            ->  install the remote source
//!                                         <-  Ready
//!   (QEMU: migrate-continue: devices move; the destination guest runs)
//!   push: Page / ZeroPages ... Done       ->  placed unless the guest already has the page
//!   urgent: PageRequest <-> Page/ZeroPages/PageInBulk, in parallel with the push
//!                                         <-  Report{json}
//!   punch + remove the source RAM file, quit the source QEMU
//! ```
//! Either side may send `Abort(why)` before the switchover; the source guest keeps running
//! and the destination removes what it made. After the switchover the source keeps every
//! page until the destination's report; a link that breaks then is recovered
//! ([`recovery`]):
//!
//! ```text
//!   (link broken: both sides postcopy-paused; faults on source pages wait)
//!   new pair, bulk: Resume{session, vm}   ->  cut the old pair, take the new one
//!                                         <-  Ack{first, count} ... (pages it holds), Ready
//!   push: the pages not acked ... Done    ->  waiting faults asked again on the new urgent
//! ```
//! A source daemon killed after the switchover does the same when it starts again, from the
//! journal it wrote right before `migrate-continue` (`source/journal.rs`,
//! `source/restarted.rs`): the guest's RAM file and swap devices still hold every page the
//! destination lacks.
//! A destination daemon killed after the switchover takes its QEMU (which waits for a pager)
//! and the source's `Resume` back when it starts again, from the journal it wrote right
//! before `Ready` (`incoming/journal.rs`, `incoming/restarted.rs`): the memory file holds
//! every page placed, the journal each absent page's route.

mod dest_qemu;
pub mod destination;
pub mod engine;
pub mod incoming;
pub mod interrupted;
pub mod journal;
mod pages;
pub mod recovery;
pub mod source;
mod status;
mod throttle;
pub mod timeline;

pub use engine::{Engine, EngineConfig};
pub use status::{MigrationStatus, Phase, RamStats, Role};
