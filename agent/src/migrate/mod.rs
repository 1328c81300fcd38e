//! Live migration between hosts: the wire protocol ([`frame`], [`message`]) and the
//! peers' mutual authentication ([`auth`]).

pub mod auth;
pub mod frame;
pub mod message;
