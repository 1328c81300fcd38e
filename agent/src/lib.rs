//! `agent` — the pagewise CLI and, later, host-to-host migration.
pub mod migrate;
