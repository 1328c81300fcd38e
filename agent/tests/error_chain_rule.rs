//! The error-chain rule (ARCHITECTURE.md, "Errors"): a thiserror variant that marks a cause
//! (`#[source]`, `#[from]`, or a field named `source`) does not also print it in its message;
//! the binary prints the whole chain once.
//!
//! `every_error_variant_keeps_its_cause_out_of_its_message` scans the workspace's Rust sources
//! for `#[error(...)]` attributes and the variant or struct each one describes.
//! `an_io_error_reads_once` runs the real binary on a file it cannot read and counts the OS
//! error's text in stderr.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One `#[error(...)]` attribute whose message names the cause it also marks as a source.
#[derive(Debug)]
struct Violation {
    file: PathBuf,
    line: usize,
    item: String,
    field: String,
}

/// Index of the `)` (or `]`, `}`) closing the bracket opened just before `start`, skipping
/// string and char literals.
fn closing(s: &[u8], start: usize) -> Option<usize> {
    let mut depth = 1usize;
    let mut i = start;
    while i < s.len() {
        match s[i] {
            b'"' => {
                i += 1;
                while i < s.len() && s[i] != b'"' {
                    if s[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'\'' if i + 2 < s.len() && (s[i + 2] == b'\'' || s[i + 1] == b'\\') => {
                // a char literal ('x' or '\n'); lifetimes have no closing quote nearby
                i += if s[i + 1] == b'\\' { 3 } else { 2 };
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The text of the first string literal in `s` (escapes left as written).
fn first_literal(s: &str) -> Option<&str> {
    let start = s.find('"')? + 1;
    let b = s.as_bytes();
    let mut i = start;
    while i < b.len() && b[i] != b'"' {
        if b[i] == b'\\' {
            i += 1;
        }
        i += 1;
    }
    Some(&s[start..i.min(b.len())])
}

/// The names a format string interpolates: `{x}`, `{x:?}`, `{0:#x}` give `x`, `x`, `0`.
fn interpolated(fmt: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = fmt;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        if let Some(stripped) = rest.strip_prefix('{') {
            rest = stripped; // `{{` is a literal brace
            continue;
        }
        let end = rest.find('}').unwrap_or(rest.len());
        let name = rest[..end].split(':').next().unwrap_or("").trim();
        names.push(name.to_string());
        rest = &rest[end.min(rest.len())..];
    }
    names
}

/// Splits `s` at the commas that are not nested in brackets, generics or literals.
fn top_level_fields(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let (mut out, mut depth, mut from, mut i) = (Vec::new(), 0i32, 0, 0);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' | b'<' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'>' if i > 0 && b[i - 1] != b'-' && b[i - 1] != b'=' => depth -= 1,
            b',' if depth == 0 => {
                out.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if from < s.len() && !s[from..].trim().is_empty() {
        out.push(&s[from..]);
    }
    out
}

/// Strips leading outer attributes and doc/line comments from `s`, returning those
/// attributes' text and the rest.
fn split_attrs(mut s: &str) -> (String, &str) {
    let mut attrs = String::new();
    loop {
        s = s.trim_start();
        if s.starts_with("//") {
            s = s.find('\n').map_or("", |n| &s[n + 1..]);
        } else if let Some(rest) = s.strip_prefix("#[") {
            let Some(end) = closing(rest.as_bytes(), 0) else {
                return (attrs, "");
            };
            attrs.push_str(&rest[..end]);
            attrs.push(' ');
            s = &rest[end + 1..];
        } else {
            return (attrs, s);
        }
    }
}

/// The names of the fields thiserror treats as the source of the item at the start of
/// `item` (a variant `Name(..)` / `Name { .. }`, or `pub struct Name ..`), and the item's name.
fn source_fields(item: &str) -> (String, Vec<String>) {
    let (_, mut s) = split_attrs(item);
    for kw in ["pub(crate) ", "pub(super) ", "pub ", "struct "] {
        s = s.trim_start().strip_prefix(kw).unwrap_or(s);
    }
    let s = s.trim_start();
    let name_end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    let name = s[..name_end].to_string();
    let rest = s[name_end..].trim_start();
    let rest = rest
        .strip_prefix('<')
        .and_then(|r| closing(r.as_bytes(), 0).map(|e| r[e + 1..].trim_start()))
        .unwrap_or(rest);
    let (tuple, body) = match rest.as_bytes().first() {
        Some(b'(') => (true, &rest[1..]),
        Some(b'{') => (false, &rest[1..]),
        _ => return (name, Vec::new()),
    };
    let Some(end) = closing(body.as_bytes(), 0) else {
        return (name, Vec::new());
    };
    let mut sources = Vec::new();
    for (i, field) in top_level_fields(&body[..end]).into_iter().enumerate() {
        let (attrs, decl) = split_attrs(field);
        let marked = attrs
            .split_whitespace()
            .any(|a| a == "source" || a == "from");
        let decl = decl
            .trim_start()
            .strip_prefix("pub ")
            .unwrap_or(decl)
            .trim();
        let field_name = if tuple {
            i.to_string()
        } else {
            decl.split(':').next().unwrap_or("").trim().to_string()
        };
        if marked || (!tuple && field_name == "source") {
            sources.push(field_name);
        }
    }
    (name, sources)
}

/// Every violation of the rule in one file's text.
fn violations_in(file: &Path, text: &str) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("#[error(") {
        let start = from + at + "#[error(".len();
        from = start;
        let Some(end) = closing(text.as_bytes(), start) else {
            break;
        };
        let args = &text[start..end];
        if args.trim() == "transparent" {
            continue;
        }
        let Some(fmt) = first_literal(args) else {
            continue;
        };
        // the rest of the attribute (`)]`), then the item it describes
        let item = text[end..].trim_start_matches([')', ']']);
        let (name, sources) = source_fields(item);
        let extra_args = &args[args.find(fmt).map_or(0, |p| p + fmt.len() + 1)..];
        for field in sources {
            let inline = interpolated(fmt).contains(&field);
            let as_arg = !field.chars().all(|c| c.is_ascii_digit())
                && extra_args
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    .any(|tok| tok == field || tok == format!(".{field}"));
            if inline || as_arg {
                out.push(Violation {
                    file: file.to_path_buf(),
                    line: text[..start].lines().count(),
                    item: name.clone(),
                    field,
                });
            }
        }
    }
    out
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_scanner_sees_inline_sources() {
    let p = Path::new("x.rs");
    let bad = [
        "#[error(\"{op} at offset {offset} failed: {source}\")]\n Io { op: &'static str, offset: u64, source: std::io::Error },",
        "#[error(\"{0}\")]\n    Io(#[from] std::io::Error),",
        "#[error(\"backend I/O failed: {0:?}\")]\n Backend(#[from] BackendError),",
        "#[error(\"open {path}: {err}\")]\n Open { path: String, #[source] err: std::io::Error },",
        "#[error(\"reading {}: {}\", path.display(), source)]\n Read { path: PathBuf, source: std::io::Error },",
        "#[error(\"bad: {1}\")]\n Two(u32, #[source] std::io::Error),",
        "#[derive(Debug, thiserror::Error)]\n#[error(\"wrapped: {0}\")]\npub struct Wrapped(#[from] std::io::Error);",
    ];
    for snippet in bad {
        assert_eq!(violations_in(p, snippet).len(), 1, "missed: {snippet}");
    }
    let good = [
        "#[error(\"{op} at offset {offset} failed\")]\n Io { op: &'static str, offset: u64, source: std::io::Error },",
        "#[error(transparent)]\n    Io(#[from] std::io::Error),",
        "#[error(\"page size {0} is not a power of two\")]\n PageSize(u64),",
        "#[error(\"peer closed after {0} bytes\")]\n Closed(usize, #[source] std::io::Error),",
        "#[error(\"{{0}} literally\")]\n Lit(#[from] std::io::Error),",
        "#[error(\"open {path}\")]\n /// doc\n Open {\n /// the path\n path: String,\n #[source]\n err: std::io::Error },",
    ];
    for snippet in good {
        assert!(
            violations_in(p, snippet).is_empty(),
            "false alarm: {snippet}"
        );
    }
}

#[test]
fn every_error_variant_keeps_its_cause_out_of_its_message() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["swapdev", "pager", "agent", "tools", "tests"] {
        rust_sources(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} sources", files.len());
    let this_file = Path::new(file!()).file_name().unwrap();
    let mut attrs = 0;
    let mut found = Vec::new();
    for f in &files {
        if f.file_name() == Some(this_file) {
            continue; // the scanner's own test snippets
        }
        let text = std::fs::read_to_string(f).unwrap();
        attrs += text.matches("#[error(").count();
        found.extend(violations_in(f.strip_prefix(root).unwrap(), &text));
    }
    assert!(attrs > 100, "found only {attrs} #[error] attributes");
    let list: Vec<String> = found
        .iter()
        .map(|v| {
            format!(
                "{}:{} {} prints its source `{}`",
                v.file.display(),
                v.line,
                v.item,
                v.field
            )
        })
        .collect();
    assert!(
        list.is_empty(),
        "{} error messages print the cause they also mark as #[source]/#[from] \
         (the binary prints the chain; see ARCHITECTURE.md, \"Errors\"):\n{}",
        list.len(),
        list.join("\n")
    );
}

/// `pagewise ARGS`: (success, stderr).
fn pagewise(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pagewise"))
        .args(args)
        .output()
        .expect("running pagewise");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_once(stderr: &str, os_error: &str) {
    assert_eq!(
        stderr.matches(os_error).count(),
        1,
        "the OS error {os_error:?} must read exactly once: {stderr}"
    );
}

/// nbdkit serving 16 MiB whose every read fails with EIO (the error filter); killed on drop.
struct FailingNbd(std::process::Child);

impl Drop for FailingNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_io_error_reads_once() {
    let dir = tempfile::tempdir().unwrap();
    // A missing device file: ENOENT from the file backend's open.
    let missing = dir.path().join("no-such.swap");
    let (ok, stderr) = pagewise(&["swapdev", "inspect", missing.to_str().unwrap()]);
    assert!(!ok, "{stderr}");
    assert_once(&stderr, "No such file or directory");
    assert!(
        stderr.contains("no-such.swap"),
        "names the device: {stderr}"
    );

    // An image that cannot be created: ENOENT through SwapError::Image.
    let dev = dir.path().join("vm1.swap");
    let (ok, stderr) = pagewise(&["swapdev", "create", dev.to_str().unwrap(), "--size", "1M"]);
    assert!(ok, "{stderr}");
    let image = dir.path().join("no/such/dir/ram.img");
    let (ok, stderr) = pagewise(&[
        "swapdev",
        "export",
        dev.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    assert!(!ok, "{stderr}");
    assert_once(&stderr, "No such file or directory");

    // A device whose reads fail with EIO: a real server's error reply, through the NBD
    // client, BackendError::Io and SwapError.
    let sock = dir.path().join("nbd.sock");
    let server = Command::new("nbdkit")
        .args(["--foreground", "--unix", sock.to_str().unwrap()])
        .args(["--filter=error", "memory", "16M"])
        .args(["error-pread=EIO", "error-pread-rate=100%"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdkit (installed by tools/lab/install-prereqs.sh)");
    let _server = FailingNbd(server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let spec = format!("nbd+unix:///?socket={}", sock.display());
    for sub in ["inspect", "fsck"] {
        let (ok, stderr) = pagewise(&["swapdev", sub, &spec]);
        assert!(!ok, "{stderr}");
        assert_once(&stderr, "Input/output error");
        assert!(
            stderr.contains("read at offset 0"),
            "says what failed: {stderr}"
        );
    }
}
