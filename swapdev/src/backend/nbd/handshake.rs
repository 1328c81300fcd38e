//! Fixed-newstyle NBD negotiation: `NBD_OPT_GO` (with a block size request), falling back to
//! `NBD_OPT_EXPORT_NAME` when the server answers `NBD_REP_ERR_UNSUP`.

use std::io::{self, Read, Write};

use super::proto::*;
use crate::backend::BackendError;

/// Largest read/write payload sent in one command when the server states no maximum
/// (the NBD spec's recommended ceiling; qemu-nbd's limit too).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints (1 / 4096 / 32 MiB unless the server sent NBD_INFO_BLOCK_SIZE).
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

impl ExportInfo {
    fn new(name: &str, size: u64, flags: u16) -> Self {
        Self {
            name: name.to_string(),
            size,
            flags: if flags & TFLAG_HAS_FLAGS != 0 {
                flags
            } else {
                0
            },
            min_block: 1,
            preferred_block: 4096,
            max_block: DEFAULT_MAX_PAYLOAD,
        }
    }

    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }

    pub fn can_trim(&self) -> bool {
        self.flags & TFLAG_SEND_TRIM != 0
    }
}

/// Reads and writes with errors that say which server and which step failed.
struct Wire<'a, S> {
    stream: &'a mut S,
    server: &'a str,
}

impl<S: Read + Write> Wire<'_, S> {
    fn fail(&self, step: &str, e: io::Error) -> BackendError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => BackendError::Protocol(format!(
                "NBD server at {} closed the connection while {step}",
                self.server
            )),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => BackendError::Protocol(format!(
                "NBD server at {} timed out while {step}",
                self.server
            )),
            _ => BackendError::Setup(format!(
                "i/o error with NBD server at {} while {step}: {e}",
                self.server
            )),
        }
    }

    fn bytes<const N: usize>(&mut self, step: &str) -> Result<[u8; N], BackendError> {
        let mut b = [0u8; N];
        self.stream
            .read_exact(&mut b)
            .map_err(|e| self.fail(step, e))?;
        Ok(b)
    }

    fn u16(&mut self, step: &str) -> Result<u16, BackendError> {
        Ok(u16::from_be_bytes(self.bytes(step)?))
    }

    fn u32(&mut self, step: &str) -> Result<u32, BackendError> {
        Ok(u32::from_be_bytes(self.bytes(step)?))
    }

    fn u64(&mut self, step: &str) -> Result<u64, BackendError> {
        Ok(u64::from_be_bytes(self.bytes(step)?))
    }

    /// `len` bytes (at most [`MAX_OPTION_REPLY`]), allocated as they arrive: a server that
    /// announces a long reply and sends less costs no more than it sent.
    fn vec(&mut self, len: usize, step: &str) -> Result<Vec<u8>, BackendError> {
        let mut v = Vec::new();
        let got = (&mut *self.stream)
            .take(len as u64)
            .read_to_end(&mut v)
            .map_err(|e| self.fail(step, e))?;
        if got < len {
            return Err(self.fail(step, io::ErrorKind::UnexpectedEof.into()));
        }
        Ok(v)
    }

    fn send(&mut self, data: &[u8], step: &str) -> Result<(), BackendError> {
        self.stream.write_all(data).map_err(|e| self.fail(step, e))
    }

    fn protocol(&self, what: String) -> BackendError {
        BackendError::Protocol(format!("NBD server at {}: {what}", self.server))
    }
}

/// Negotiate `export` on a freshly connected `stream`. `server` names the peer in errors.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &str,
    server: &str,
) -> Result<ExportInfo, BackendError> {
    if export.len() > MAX_NAME_LEN || export.contains('\0') {
        return Err(BackendError::Setup(format!(
            "invalid NBD export name {export:?}: at most {MAX_NAME_LEN} bytes and no NUL"
        )));
    }
    let mut w = Wire { stream, server };
    let magic = w.u64("reading the greeting")?;
    if magic != NBD_MAGIC {
        return Err(w.protocol(format!(
            "not an NBD server: greeting magic {magic:#018x}, expected NBDMAGIC"
        )));
    }
    let style = w.u64("reading the greeting")?;
    if style == OLDSTYLE_MAGIC {
        return Err(w.protocol(
            "server speaks oldstyle negotiation, which this client does not support".into(),
        ));
    }
    if style != IHAVEOPT {
        return Err(w.protocol(format!(
            "bad newstyle magic {style:#018x} in greeting, expected IHAVEOPT"
        )));
    }
    let hs_flags = w.u16("reading handshake flags")?;
    if hs_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(w.protocol("server does not support fixed newstyle negotiation".into()));
    }
    let no_zeroes = hs_flags & FLAG_NO_ZEROES != 0;
    let client_flags = CLIENT_FIXED_NEWSTYLE | if no_zeroes { CLIENT_NO_ZEROES } else { 0 };
    w.send(&client_flags.to_be_bytes(), "sending client flags")?;

    match go(&mut w, export)? {
        Some(info) => Ok(info),
        None => {
            tracing::debug!(
                server,
                "NBD_OPT_GO unsupported, falling back to EXPORT_NAME"
            );
            export_name(&mut w, export, no_zeroes)
        }
    }
}

/// NBD_OPT_GO. `Ok(None)` if the server does not support it.
fn go<S: Read + Write>(w: &mut Wire<S>, export: &str) -> Result<Option<ExportInfo>, BackendError> {
    let data = encode_go_data(export, &[INFO_BLOCK_SIZE]);
    w.send(&encode_option(OPT_GO, &data), "sending NBD_OPT_GO")?;
    let mut info: Option<ExportInfo> = None;
    let mut block_size: Option<(u32, u32, u32)> = None;
    loop {
        let step = "reading the NBD_OPT_GO reply";
        let magic = w.u64(step)?;
        if magic != OPT_REPLY_MAGIC {
            return Err(w.protocol(format!(
                "option reply has bad magic {magic:#018x}, expected {OPT_REPLY_MAGIC:#x}"
            )));
        }
        let option = w.u32(step)?;
        if option != OPT_GO {
            return Err(w.protocol(format!(
                "option reply is for option {option}, but NBD_OPT_GO ({OPT_GO}) was sent"
            )));
        }
        let rep = w.u32(step)?;
        let len = w.u32(step)?;
        if len > MAX_OPTION_REPLY {
            return Err(w.protocol(format!(
                "option reply of {len} bytes exceeds the {MAX_OPTION_REPLY}-byte limit"
            )));
        }
        let payload = w.vec(len as usize, step)?;
        match rep {
            REP_ACK => {
                let Some(mut info) = info else {
                    return Err(w.protocol(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT (size and flags)".into(),
                    ));
                };
                if let Some((min, pref, max)) = block_size {
                    info.min_block = min;
                    info.preferred_block = pref;
                    info.max_block = max;
                }
                return Ok(Some(info));
            }
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(w.protocol(format!(
                        "NBD_REP_INFO of {} bytes has no information type",
                        payload.len()
                    )));
                }
                let kind = u16::from_be_bytes([payload[0], payload[1]]);
                let body = &payload[2..];
                match kind {
                    INFO_EXPORT => {
                        if body.len() != 10 {
                            return Err(w.protocol(format!(
                                "NBD_INFO_EXPORT has {} bytes, expected 12",
                                payload.len()
                            )));
                        }
                        let size = u64::from_be_bytes(body[0..8].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([body[8], body[9]]);
                        info = Some(ExportInfo::new(export, size, flags));
                    }
                    INFO_BLOCK_SIZE => {
                        block_size = Some(parse_block_size(w, body)?);
                    }
                    _ => {} // Informational types we did not ask for are ignored.
                }
            }
            REP_ERR_UNSUP => return Ok(None),
            rep if is_error_reply(rep) => {
                let text = String::from_utf8_lossy(&payload);
                let detail = if text.is_empty() {
                    String::new()
                } else {
                    format!(" (server says: {text})")
                };
                let msg = match rep {
                    REP_ERR_UNKNOWN => format!("export '{export}' not found on server{detail}"),
                    REP_ERR_TLS_REQD => {
                        format!("server requires TLS, which this client does not speak{detail}")
                    }
                    _ => format!(
                        "server refused export '{export}': {}{detail}",
                        error_reply_name(rep)
                    ),
                };
                return Err(w.protocol(msg));
            }
            other => {
                return Err(w.protocol(format!(
                    "unexpected option reply type {other} to NBD_OPT_GO"
                )))
            }
        }
    }
}

fn parse_block_size<S: Read + Write>(
    w: &Wire<S>,
    body: &[u8],
) -> Result<(u32, u32, u32), BackendError> {
    if body.len() != 12 {
        return Err(w.protocol(format!(
            "NBD_INFO_BLOCK_SIZE has {} bytes, expected 14",
            body.len() + 2
        )));
    }
    let word = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
    let (min, pref, max) = (word(0), word(4), word(8));
    let sane = min.is_power_of_two()
        && min <= 64 * 1024
        && pref.is_power_of_two()
        && pref >= min
        && max >= min
        && (max == u32::MAX || max.is_multiple_of(min));
    if !sane {
        return Err(w.protocol(format!(
            "inconsistent block sizes: minimum {min}, preferred {pref}, maximum {max}"
        )));
    }
    Ok((min, pref, max.min(DEFAULT_MAX_PAYLOAD).max(min)))
}

/// NBD_OPT_EXPORT_NAME: the server answers with size and flags, or drops the connection.
fn export_name<S: Read + Write>(
    w: &mut Wire<S>,
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, BackendError> {
    let data = encode_option(OPT_EXPORT_NAME, export.as_bytes());
    w.send(&data, "sending NBD_OPT_EXPORT_NAME")?;
    let step = "reading the NBD_OPT_EXPORT_NAME reply";
    let mut size = [0u8; 8];
    match w.stream.read_exact(&mut size) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(w.protocol(format!(
                "export '{export}' not found on server (connection closed after \
                 NBD_OPT_EXPORT_NAME)"
            )))
        }
        Err(e) => return Err(w.fail(step, e)),
    }
    let size = u64::from_be_bytes(size);
    let flags = w.u16(step)?;
    if !no_zeroes {
        w.vec(EXPORT_NAME_ZEROES, step)?;
    }
    Ok(ExportInfo::new(export, size, flags))
}
