//! The misbehaviours, one function each.

use std::time::{Duration, Instant};

use agent::migrate::auth::{Opened, Psk};
use agent::migrate::frame::{Command, MAGIC, VERSION};
use agent::migrate::message::{Channel, Message, Setup};

use super::{
    header, hello, raw_header, session, valid_setup, Conn, Endpoint, HostileError, Outcome,
    ALIEN_VERSION,
};

type Scenario = fn(&Endpoint) -> Result<Outcome, HostileError>;

/// Every scenario by name (what `hostile-peer` runs).
pub const SCENARIOS: &[(&str, Scenario)] = &[
    ("wrong-key", wrong_key),
    ("no-common-version", no_common_version),
    ("bad-magic", bad_magic),
    ("future-frame-version", future_frame_version),
    ("oversized-header", oversized_header),
    ("truncated-header", truncated_header),
    ("truncated-frame", truncated_frame),
    ("stall", stall),
    ("page-before-setup", page_before_setup),
    ("oversized-setup", oversized_setup),
    ("bad-vm-name", bad_vm_name),
    ("guest-size-overflow", guest_size_overflow),
    ("guest-too-large", guest_too_large),
    ("no-mem-path", no_mem_path),
    ("no-qmp", no_qmp),
    ("missing-qemu", missing_qemu),
    ("lone-channel", lone_channel),
    ("two-urgent", two_urgent),
    ("resume-unknown", resume_unknown),
];

/// A complete, valid handshake on a fresh connection (proof that the endpoint still serves).
pub fn handshake(ep: &Endpoint) -> Result<Opened, HostileError> {
    let mut c = Conn::connect(ep)?;
    Ok(c.open(&ep.key, Channel::Urgent, session())?)
}

/// The agent's handshake under a key the endpoint does not hold.
pub fn wrong_key(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    let wrong = Psk::new(b"not-the-endpoints-key-0123456789".to_vec());
    let _ = c.open(&wrong, Channel::Bulk, session());
    Ok(c.finish(t))
}

/// A hello that speaks only version 99 (in a frame of this build's version).
pub fn no_common_version(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    let h = hello(Channel::Bulk, session(), ALIEN_VERSION, ALIEN_VERSION);
    c.send(&Message::Hello(h));
    Ok(c.finish(t))
}

/// A stray HTTP client: the first 16 bytes are no pagewise header.
pub fn bad_magic(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    c.send_raw(b"GET / HTTP/1.1\r\n");
    Ok(c.finish(t))
}

/// A hello in a frame of version 99 (the header itself is from the future).
pub fn future_frame_version(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    c.send_raw(&raw_header(
        MAGIC,
        ALIEN_VERSION,
        Command::Hello as u16,
        0,
        Command::Hello.max_len() as u32,
    ));
    Ok(c.finish(t))
}

/// A hello header announcing 4 GiB - 1 of payload, and only the header: the endpoint must
/// refuse it from the header alone (nothing read, nothing allocated).
pub fn oversized_header(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    c.send_raw(&header(Command::Hello, u32::MAX));
    Ok(c.finish(t))
}

/// Seven bytes of a header, then end of stream.
pub fn truncated_header(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    let whole = Message::Hello(hello(Channel::Bulk, session(), VERSION, VERSION)).encode();
    c.send_raw(&whole[..7]);
    c.shut_write();
    Ok(c.finish(t))
}

/// A hello header and 20 of its 56 payload bytes, then end of stream.
pub fn truncated_frame(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut c = Conn::connect(ep)?;
    let t = Instant::now();
    let whole = Message::Hello(hello(Channel::Bulk, session(), VERSION, VERSION)).encode();
    c.send_raw(&whole[..16 + 20]);
    c.shut_write();
    Ok(c.finish(t))
}

/// Connect and say nothing: the endpoint must time the handshake out (give this scenario
/// a patience longer than the endpoint's handshake timeout).
pub fn stall(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let c = Conn::connect(ep)?;
    Ok(c.finish(Instant::now()))
}

/// Both channels of a session authenticated; the bulk one opened (the endpoint's side of
/// a session starts when its second channel arrives).
fn session_pair(ep: &Endpoint) -> Result<(Conn, Conn), HostileError> {
    let id = session();
    let mut urgent = Conn::connect(ep)?;
    urgent.open(&ep.key, Channel::Urgent, id)?;
    let mut bulk = Conn::connect(ep)?;
    bulk.open(&ep.key, Channel::Bulk, id)?;
    Ok((urgent, bulk))
}

/// A valid session whose first bulk frame is a page, not the setup.
pub fn page_before_setup(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let (urgent, mut bulk) = session_pair(ep)?;
    let t = Instant::now();
    bulk.send(&Message::Page {
        page: 0,
        data: vec![0xa5; 4096],
    });
    let out = bulk.finish(t);
    drop(urgent);
    Ok(out)
}

/// A valid session whose first bulk frame asks to resume a post-copy nobody paused.
pub fn resume_unknown(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let (urgent, mut bulk) = session_pair(ep)?;
    let t = Instant::now();
    bulk.send(&Message::Resume {
        session: session(),
        vm: "vm1".into(),
    });
    let out = bulk.finish(t);
    drop(urgent);
    Ok(out)
}

/// A valid session whose setup header announces one byte more than a setup's cap.
pub fn oversized_setup(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let (urgent, mut bulk) = session_pair(ep)?;
    let t = Instant::now();
    bulk.send_raw(&header(Command::Setup, Command::Setup.max_len() as u32 + 1));
    let out = bulk.finish(t);
    drop(urgent);
    Ok(out)
}

/// A valid session that sends `setup` on its bulk channel: the endpoint's answer to it.
pub fn setup(ep: &Endpoint, setup: &Setup) -> Result<Outcome, HostileError> {
    let (urgent, mut bulk) = session_pair(ep)?;
    let t = Instant::now();
    bulk.send(&Message::Setup(setup.clone()));
    let out = bulk.finish(t);
    drop(urgent);
    Ok(out)
}

/// A VM name that climbs out of the endpoint's directory.
pub fn bad_vm_name(ep: &Endpoint) -> Result<Outcome, HostileError> {
    setup(ep, &valid_setup("../etc", "/nonexistent/qemu"))
}

/// A guest of u64::MAX pages (its size in bytes overflows).
pub fn guest_size_overflow(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut s = valid_setup("hostile-overflow", "/nonexistent/qemu");
    s.pages = u64::MAX;
    setup(ep, &s)
}

/// A guest one page larger than the endpoint's limit (1 TiB).
pub fn guest_too_large(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut s = valid_setup("hostile-large", "/nonexistent/qemu");
    s.page_size = 2 << 20;
    s.pages = (1u64 << 40) / (2 << 20) + 1;
    setup(ep, &s)
}

/// A QEMU command line whose RAM is not a memory-backend-file with a mem-path.
pub fn no_mem_path(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut s = valid_setup("hostile-nomem", "/nonexistent/qemu");
    s.qemu_argv
        .retain(|a| !a.starts_with("memory-backend-file"));
    s.qemu_argv.retain(|a| a != "-object");
    setup(ep, &s)
}

/// A QEMU command line without -qmp (the destination cannot drive its QEMU).
pub fn no_qmp(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut s = valid_setup("hostile-noqmp", "/nonexistent/qemu");
    s.qemu_argv
        .retain(|a| a != "-qmp" && !a.starts_with("unix:"));
    setup(ep, &s)
}

/// A valid setup whose QEMU program does not exist here: the destination cannot start the
/// VM and must fail before any switchover.
pub fn missing_qemu(ep: &Endpoint) -> Result<Outcome, HostileError> {
    setup(ep, &valid_setup("hostile-noqemu", "/nonexistent/qemu"))
}

/// Only the bulk channel of a session connects, and sends a valid setup: the endpoint must
/// not start anything for half a session (expect [`super::End::Silent`]).
pub fn lone_channel(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let mut bulk = Conn::connect(ep)?;
    bulk.open(&ep.key, Channel::Bulk, session())?;
    let t = Instant::now();
    bulk.send(&Message::Setup(valid_setup(
        "hostile-lone",
        "/nonexistent/qemu",
    )));
    Ok(bulk.finish(t))
}

/// The first half of a lone session, left open for the caller (the endpoint's pairing
/// window is 30 s; see what it does with the half after that).
pub fn lone_half(ep: &Endpoint) -> Result<Conn, HostileError> {
    let mut bulk = Conn::connect(ep)?;
    bulk.open(&ep.key, Channel::Bulk, session())?;
    Ok(bulk)
}

/// Two urgent connections for one session: the outcome of the second.
pub fn two_urgent(ep: &Endpoint) -> Result<Outcome, HostileError> {
    let id = session();
    let mut first = Conn::connect(ep)?;
    first.open(&ep.key, Channel::Urgent, id)?;
    // The endpoint files the first half once it has checked the proof, after `open` has
    // returned here: give it the time, so that the second is the one refused (otherwise the
    // two race, and on a busy machine the first may be filed second).
    std::thread::sleep(Duration::from_millis(500));
    let mut second = Conn::connect(ep)?;
    let t = Instant::now();
    let _ = second.open(&ep.key, Channel::Urgent, id);
    let out = second.finish(t);
    // The first is still a valid half: it pairs with a bulk connection of its session.
    drop(first);
    Ok(out)
}

/// How long a [`stall`] must wait: longer than the endpoint's handshake timeout (10 s).
pub const STALL_PATIENCE: Duration = Duration::from_secs(15);
