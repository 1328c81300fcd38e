//! Attaching a VM: handshake servers (Firecracker's and pagewise's). Whatever the handshake,
//! it ends as (uffd, regions, optional memory-file fd, VM name).

pub mod protocol;
pub mod server;
