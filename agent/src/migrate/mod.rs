//! Live migration between hosts: the wire protocol ([`frame`], [`message`]) and the
//! peers' mutual authentication ([`auth`]), the destination's remote page source
//! ([`remote`]) and the source's answers to it ([`page_server`]); the connection itself,
//! plain TCP or TLS ([`link`], [`tls`]).

pub mod auth;
pub mod bulk;
pub mod delta;
pub mod frame;
pub mod link;
pub mod message;
pub mod order;
pub mod page_server;
pub mod precopy;
pub mod qmp;
pub mod remote;
pub mod session;
pub mod tls;
