//! The benchmark drivers behind `pagewise bench ...`: each prints a table against a
//! baseline from the same run. The CLI (`agent/src/cli/bench.rs`) only parses and dispatches.

pub mod evict;
pub mod guest;
pub mod migrate;
pub mod pager;
pub mod restore;
pub mod swapdev;
