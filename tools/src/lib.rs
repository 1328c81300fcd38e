//! pagewise lab tools: verifiable RAM images, access patterns, memhog (a process that
//! attaches memory to a pager like a VMM), a minimal in-process fault handler, and a tiny
//! KVM guest; and the benchmark drivers behind `pagewise bench`.

pub mod bench;
pub mod daemon;
pub mod image;
pub mod kvm_guest;
pub mod lab_vm;
pub mod memhog;
pub mod minipager;
pub mod pattern;
pub mod plot;
