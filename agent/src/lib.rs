//! `agent` — the pagewise CLI and host-to-host migration: the migration wire, its peers
//! and policies ([`migrate`]), and QEMU command lines ([`qemu`]).
pub mod migrate;
pub mod qemu;
