//! QEMU command lines: the checks `pagewise vm run` applies ([`cmdline`]) and the
//! destination's command line a migration makes from the source's ([`dest`]).

pub mod cmdline;
pub mod dest;
