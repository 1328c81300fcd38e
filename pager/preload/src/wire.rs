//! The pagewise attach handshake, client side, written by hand (no serde inside QEMU).
//! Format (see `pager::attach::protocol`): `b"PWHS"`, `u32` LE version 1, `u32` LE body
//! length, JSON `AttachRequest`; fds `[uffd, memory file]` as SCM_RIGHTS on the same sendmsg.
//! Reply: `b"PWHR"`, version, length, JSON `AttachReply {ok, error, swapdev, reattach, retry}`; later
//! frames of the same kind on the same connection change `reattach`, or (`ok: false`) say
//! why the pager tore the VM down.

use std::io::Read;

pub const REQUEST_MAGIC: &[u8; 4] = b"PWHS";
pub const REPLY_MAGIC: &[u8; 4] = b"PWHR";
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest reply body accepted.
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// One mapped region of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub host_addr: u64,
    pub size: u64,
    /// Byte offset of the region in the memory file.
    pub file_offset: u64,
    pub page_size: u64,
}

/// What the library tells the pager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub vm: &'a str,
    pub region: Region,
    pub uffd_features: u64,
    pub modes: &'a [String],
    /// Attaching again after the pager went away (the same uffd and memory file).
    pub reattach: bool,
    /// On a re-attach: the swap device the gone pager named.
    pub served_by: Option<&'a str>,
}

/// A JSON string literal with the escapes JSON requires.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON body of an `AttachRequest` with `memory_file: true` (`reattach` only when set).
pub fn request_body(req: &Request<'_>) -> String {
    let r = req.region;
    let modes: Vec<String> = req.modes.iter().map(|m| json_string(m)).collect();
    format!(
        "{{\"vm\":{},\"regions\":[{{\"base_host_virt_addr\":{},\"size\":{},\"offset\":{},\
         \"page_size\":{},\"page_size_kib\":{}}}],\"memory_file\":true,\"uffd_features\":{},\
         \"modes\":[{}]{}}}",
        json_string(req.vm),
        r.host_addr,
        r.size,
        r.file_offset,
        r.page_size,
        r.page_size,
        req.uffd_features,
        modes.join(","),
        match (req.reattach, req.served_by) {
            (false, _) => String::new(),
            (true, None) => ",\"reattach\":true".to_string(),
            (true, Some(dev)) => format!(",\"reattach\":true,\"served_by\":{}", json_string(dev)),
        }
    )
}

/// Magic, version, length, body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(REQUEST_MAGIC);
    msg.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// The pager's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `reattach`: whether the VMM may attach again if the connection ends without a word.
    Accepted {
        swapdev: Option<String>,
        reattach: bool,
    },
    Refused {
        error: String,
        /// The pager said the refusal may pass (`"retry": true`): try again while waiting.
        retry: bool,
    },
}

/// Read and decode one reply frame.
pub fn read_reply(stream: &mut impl Read) -> Result<Verdict, String> {
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("no reply from the pager: {e}"))?;
    if &head[..4] != REPLY_MAGIC {
        return Err(format!(
            "the peer answered {:02x?}, not a pagewise reply (is the socket a pagewise pager?)",
            &head[..4]
        ));
    }
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "the pager speaks handshake version {version}, this library {PROTOCOL_VERSION}"
        ));
    }
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if len > MAX_REPLY_BYTES {
        return Err(format!(
            "the pager's reply claims {len} bytes, more than {MAX_REPLY_BYTES}"
        ));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("truncated reply from the pager: {e}"))?;
    let text = String::from_utf8(body).map_err(|_| "the pager's reply is not UTF-8".to_string())?;
    parse_reply(&text)
}

/// The next reply frame on a connection, or `None` when it ended cleanly before one began
/// (the pager's later frames: a new `reattach`, or why it tore the VM down).
pub fn read_next(stream: &mut impl Read) -> Result<Option<Verdict>, String> {
    let mut first = [0u8; 1];
    loop {
        match stream.read(&mut first) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
    read_reply(&mut (&first[..]).chain(stream)).map(Some)
}

/// Decode the reply JSON: `ok` (bool), `error` and `swapdev` (string or null).
pub fn parse_reply(text: &str) -> Result<Verdict, String> {
    let ok = match value_after_key(text, "ok") {
        Some(v) if v.starts_with("true") => true,
        Some(v) if v.starts_with("false") => false,
        _ => return Err(format!("the pager's reply has no boolean \"ok\": {text}")),
    };
    if ok {
        Ok(Verdict::Accepted {
            swapdev: value_after_key(text, "swapdev").and_then(string_literal),
            reattach: value_after_key(text, "reattach").is_some_and(|v| v.starts_with("true")),
        })
    } else {
        let error = value_after_key(text, "error")
            .and_then(string_literal)
            .unwrap_or_else(|| format!("(no reason given: {text})"));
        let retry = value_after_key(text, "retry").is_some_and(|v| v.starts_with("true"));
        Ok(Verdict::Refused { error, retry })
    }
}

/// The text right after `"key":` (whitespace skipped), for a top-level key of a flat object.
fn value_after_key<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let mut from = 0;
    while let Some(pos) = text[from..].find(&quoted) {
        let after = text[from + pos + quoted.len()..].trim_start();
        if let Some(rest) = after.strip_prefix(':') {
            return Some(rest.trim_start());
        }
        from += pos + quoted.len();
    }
    None
}

/// Decode a JSON string literal at the start of `text` (`null` and anything else: `None`).
fn string_literal(text: &str) -> Option<String> {
    let mut chars = text.strip_prefix('"')?.chars();
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let unit = hex4(&mut chars)?;
                    let code = if (0xd800..0xdc00).contains(&unit) {
                        // A surrogate pair: the low half must follow as `\uDC00`-`\uDFFF`.
                        let rest = chars.as_str();
                        match rest.strip_prefix("\\u").map(|r| r.chars()) {
                            Some(mut after) => match hex4(&mut after) {
                                Some(low) if (0xdc00..0xe000).contains(&low) => {
                                    chars = after;
                                    0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00)
                                }
                                _ => unit,
                            },
                            None => unit,
                        }
                    } else {
                        unit
                    };
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
}

/// Four hex digits of a `\u` escape.
fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    let hex: String = chars.by_ref().take(4).collect();
    if hex.len() != 4 {
        return None;
    }
    u32::from_str_radix(&hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_escapes_as_serde_prints_them() {
        for text in [
            "form\u{c}feed\u{8}back",
            "tab\tnl\nq\"bs\\",
            "\u{1}\u{1f}",
            "é😀",
            "",
        ] {
            let json = serde_json::to_string(text).unwrap();
            assert_eq!(string_literal(&json).as_deref(), Some(text), "{json}");
        }
        // Escaped surrogate pairs (serde prints the character itself, others may not).
        assert_eq!(string_literal(r#""\ud83d\ude00""#).as_deref(), Some("😀"));
        assert_eq!(string_literal(r#""\ud83dx""#).as_deref(), Some("\u{fffd}x"));
        assert_eq!(string_literal(r#""\u12""#), None);
    }

    #[test]
    fn request_is_the_json_the_pager_expects() {
        let modes = vec!["missing".to_string(), "wp".to_string()];
        let body = request_body(&Request {
            vm: "vm \"1\"",
            region: Region {
                host_addr: 0x7f00_0000_0000,
                size: 1 << 30,
                file_offset: 0,
                page_size: 4096,
            },
            uffd_features: 0x3028,
            modes: &modes,
            reattach: false,
            served_by: None,
        });
        assert_eq!(
            body,
            "{\"vm\":\"vm \\\"1\\\"\",\"regions\":[{\"base_host_virt_addr\":139637976727552,\
             \"size\":1073741824,\"offset\":0,\"page_size\":4096,\"page_size_kib\":4096}],\
             \"memory_file\":true,\"uffd_features\":12328,\"modes\":[\"missing\",\"wp\"]}"
        );
        let again = request_body(&Request {
            vm: "v",
            region: Region {
                host_addr: 0x1000,
                size: 4096,
                file_offset: 0,
                page_size: 4096,
            },
            uffd_features: 1,
            modes: &modes[..1],
            reattach: true,
            served_by: Some("swapdev /d/v.swap"),
        });
        assert_eq!(
            again,
            "{\"vm\":\"v\",\"regions\":[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,\
             \"page_size\":4096,\"page_size_kib\":4096}],\"memory_file\":true,\"uffd_features\":1,\
             \"modes\":[\"missing\"],\"reattach\":true,\"served_by\":\"swapdev /d/v.swap\"}"
        );
        let framed = frame(body.as_bytes());
        assert_eq!(&framed[..4], b"PWHS");
        assert_eq!(
            u32::from_le_bytes(framed[8..12].try_into().unwrap()) as usize,
            body.len()
        );
    }

    #[test]
    fn replies_decode() {
        assert_eq!(
            parse_reply("{\"ok\":true,\"error\":null,\"swapdev\":\"/var/pw/vm1.swap\"}"),
            Ok(Verdict::Accepted {
                swapdev: Some("/var/pw/vm1.swap".into()),
                reattach: false,
            })
        );
        assert_eq!(
            parse_reply("{\"ok\":true,\"error\":null,\"swapdev\":null,\"reattach\":true}"),
            Ok(Verdict::Accepted {
                swapdev: None,
                reattach: true,
            })
        );
        assert_eq!(
            parse_reply("{ \"ok\" : false, \"error\": \"region \\\"0\\\" beyond capacity\\n\" }"),
            Ok(Verdict::Refused {
                error: "region \"0\" beyond capacity\n".into(),
                retry: false,
            })
        );
        assert_eq!(
            parse_reply("{\"ok\":false,\"error\":\"owned by host dst\",\"retry\":true}"),
            Ok(Verdict::Refused {
                error: "owned by host dst".into(),
                retry: true,
            })
        );
        assert!(parse_reply("{\"okay\":true}").is_err());
        let mut framed = b"PWHR".to_vec();
        framed.extend_from_slice(&1u32.to_le_bytes());
        let body = b"{\"ok\":true}";
        framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
        framed.extend_from_slice(body);
        assert_eq!(
            read_reply(&mut &framed[..]),
            Ok(Verdict::Accepted {
                swapdev: None,
                reattach: false
            })
        );
        assert!(read_reply(&mut &b"HTTP/1.1 200 OK\r\n"[..]).is_err());
        // Later frames on the connection, then its end.
        let mut two = framed.clone();
        let bye = b"{\"ok\":false,\"error\":\"detached\"}";
        two.extend_from_slice(b"PWHR");
        two.extend_from_slice(&1u32.to_le_bytes());
        two.extend_from_slice(&(bye.len() as u32).to_le_bytes());
        two.extend_from_slice(bye);
        let mut rest = &two[..];
        assert!(matches!(
            read_next(&mut rest),
            Ok(Some(Verdict::Accepted { .. }))
        ));
        assert_eq!(
            read_next(&mut rest),
            Ok(Some(Verdict::Refused {
                error: "detached".into(),
                retry: false,
            }))
        );
        assert_eq!(read_next(&mut rest), Ok(None));
        assert!(read_next(&mut &framed[..5]).is_err());
        assert!(read_reply(&mut &framed[..14]).is_err());
    }
}

/// The hand-written format against the pager's own serde types, for arbitrary inputs.
#[cfg(test)]
mod against_pager {
    use super::*;
    use pager::attach::protocol::{AttachReply, AttachRequest, GuestRegionUffdMapping};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_parses_as_attach_request(
            vm in any::<String>(),
            host_page in 0u64..(1 << 35),
            pages in 1u64..(1 << 20),
            offset_page in 0u64..(1 << 20),
            features in any::<u64>(),
            modes in proptest::sample::subsequence(vec!["missing", "wp", "minor"], 1..=3),
            reattach in any::<bool>(),
            served_by in proptest::option::of(any::<String>()),
        ) {
            let modes: Vec<String> = modes.into_iter().map(String::from).collect();
            let region = Region {
                host_addr: host_page * 4096,
                size: pages * 4096,
                file_offset: offset_page * 4096,
                page_size: 4096,
            };
            let body = request_body(&Request { vm: &vm, region, uffd_features: features, modes: &modes, reattach, served_by: served_by.as_deref() });
            let parsed: AttachRequest = serde_json::from_str(&body).expect("valid JSON");
            prop_assert_eq!(parsed, AttachRequest {
                vm: vm.clone(),
                regions: vec![GuestRegionUffdMapping {
                    base_host_virt_addr: region.host_addr,
                    size: region.size as usize,
                    offset: region.file_offset,
                    page_size: 4096,
                    page_size_kib: 4096,
                }],
                memory_file: true,
                uffd_features: features,
                modes,
                reattach,
                served_by: served_by.filter(|_| reattach),
            });
        }

        #[test]
        fn pager_replies_decode(ok in any::<bool>(), error in proptest::option::of(any::<String>()),
                                swapdev in proptest::option::of(any::<String>()),
                                reattach in any::<bool>(), retry in any::<bool>()) {
            let reply = AttachReply { ok, error: error.clone(), swapdev: swapdev.clone(), reattach, retry };
            let text = serde_json::to_string(&reply).unwrap();
            let verdict = parse_reply(&text).unwrap();
            if ok {
                prop_assert_eq!(verdict, Verdict::Accepted { swapdev, reattach });
            } else {
                match (verdict, error) {
                    (Verdict::Refused { error: got, retry: r }, Some(e)) => {
                        prop_assert_eq!(got, e);
                        prop_assert_eq!(r, retry);
                    }
                    (Verdict::Refused { retry: r, .. }, None) => prop_assert_eq!(r, retry),
                    (v, _) => prop_assert!(false, "unexpected {:?}", v),
                }
            }
        }
    }
}
