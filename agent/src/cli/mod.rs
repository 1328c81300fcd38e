//! One module per subcommand group of the `pagewise` binary.

pub mod bench;
pub mod evict;
pub mod migrate;
pub mod serve;
pub mod stats;
pub mod swapdev;
pub mod vm;
