//! QEMU command lines: the checks `pagewise vm run` applies ([`cmdline`]) and the
//! destination's command line a migration makes from the source's ([`dest`]); a saved guest
//! for lazy restore: its state file and RAM image ([`saved`]).

pub mod cmdline;
pub mod dest;
pub mod ram_image;
pub mod saved;
