//! Every usage line of README.md and docs/*.md is run against a scratch directory, or is on
//! [`SKIPPED`] with the reason (a guest, QEMU or servers this machine does not start here).
//! A line that is neither fails the test, and so does a skip entry that matches no line.
//!
//! How a line runs (readme_usage/synopsis.rs has the grammar): each synopsis becomes its
//! default command (no optional part) and one command per optional part or alternative.
//! The lines of one paragraph (a code block up to a blank line) run in order on one scratch
//! directory; a non-default command runs on a fresh one after the paragraph's earlier lines.
//! Absolute paths (`/run/...`, `/var/lib/...`, `/dev/shm/...`) are moved under the scratch
//! directory, placeholders take the values of [`PLACEHOLDERS`], the fixed metrics port a
//! free one, and `pagewise serve` runs in the background until the paragraph ends (it must
//! come up: its socket appears, and `/metrics` answers when asked for).

#[path = "readme_usage/synopsis.rs"]
mod synopsis;

mod qemu_lab;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use synopsis::UsageLine;

/// (file, command prefix, only variants with this argument (or every one), why not run).
const SKIPPED: &[(&str, &str, Option<&str>, &str)] = &[
    (
        "README.md",
        "pagewise vm run",
        None,
        "boots a QEMU guest (tests/tests/qemu_vm_run.rs)",
    ),
    (
        "docs/qemu.md",
        "pagewise vm run",
        None,
        "boots a QEMU guest (tests/tests/qemu_vm_run.rs)",
    ),
    (
        "README.md",
        "pagewise evict",
        None,
        "needs a running guest attached to the pager (tests/tests/evict_daemon.rs)",
    ),
    (
        "README.md",
        "pagewise stats",
        Some("--vm"),
        "needs a VM attached to the pager (agent/tests, pager/tests/control_e2e.rs)",
    ),
    (
        "README.md",
        "pagewise bench guest",
        None,
        "boots two QEMU guests for ~80 s (tests/tests/bench_guest.rs)",
    ),
    (
        "docs/benchguest.md",
        "pagewise bench guest",
        None,
        "boots two QEMU guests for ~80 s (tests/tests/bench_guest.rs)",
    ),
    (
        "README.md",
        "pagewise serve",
        Some("--migrate-listen"),
        "listens on another host's address of the two-host lab (tests/tests/migrate_qemu.rs)",
    ),
    (
        "README.md",
        "pagewise migrate",
        None,
        "moves a running guest between two hosts (tests/tests/migrate_qemu.rs, migrate_failures.rs)",
    ),
    (
        "docs/migration.md",
        "pagewise serve",
        Some("--migrate-listen"),
        "listens on another host's address of the two-host lab (tests/tests/migrate_qemu.rs)",
    ),
    (
        "docs/migration.md",
        "pagewise vm run",
        None,
        "boots a QEMU guest (tests/tests/migrate_qemu.rs)",
    ),
    (
        "docs/migration.md",
        "pagewise migrate",
        None,
        "moves a running guest between two hosts (tests/tests/migrate_qemu.rs, migrate_failures.rs)",
    ),
    (
        "README.md",
        "pagewise bench migrate",
        None,
        "boots ten QEMU guests in the two-host lab for ~10 min (tools/src/bench/migrate.rs)",
    ),
    (
        "docs/backends.md",
        "pagewise bench swapdev --backend nfs://",
        None,
        "needs an NFS server and two NBD servers (tests/tests/nfs_bench.rs)",
    ),
    (
        "README.md",
        "pagewise vm save",
        None,
        "saves a running QEMU guest (tests/tests/qemu_restore.rs)",
    ),
    (
        "README.md",
        "pagewise vm restore",
        None,
        "restores a QEMU guest (tests/tests/qemu_restore.rs)",
    ),
    (
        "README.md",
        "pagewise bench restore",
        None,
        "boots and restores three QEMU guests for ~3 min (tools/src/bench/restore.rs)",
    ),
    (
        "docs/restore.md",
        "pagewise vm save",
        None,
        "saves a running QEMU guest (tests/tests/qemu_restore.rs)",
    ),
    (
        "docs/restore.md",
        "pagewise vm restore",
        None,
        "restores a QEMU guest (tests/tests/qemu_restore.rs)",
    ),
    (
        "docs/restore.md",
        "pagewise bench restore",
        None,
        "boots and restores three QEMU guests for ~3 min (tools/src/bench/restore.rs)",
    ),
];

/// Arguments added to a command (prefix) so that it runs in seconds: the benchmarks.
const SHRUNK: &[(&str, &[&str])] = &[
    (
        "pagewise bench swapdev",
        &["--pages", "2048", "--secs", "1", "--dir", "{scratch}"],
    ),
    (
        "pagewise bench pager",
        &[
            "--size",
            "16M",
            "--latency-pages",
            "256",
            "--policies",
            "none,bubble",
            "--dir",
            "{scratch}",
        ],
    ),
    (
        "pagewise bench evict",
        &[
            "--mib",
            "4",
            "--secs",
            "0.5",
            "--hot-pages",
            "64",
            "--dir",
            "{scratch}",
        ],
    ),
];

/// What each placeholder of the docs stands for here (files are made by [`Scratch::new`]).
const PLACEHOLDERS: &[(&str, &str)] = &[
    ("DEV", "dev.swap"),
    ("DEVICE", "device.swap"),
    ("IMAGE", "image.raw"),
    ("FILE", "img.raw"),
    ("OUT", "out.img"),
    ("N", "4096"),
    ("U", "2f1c9a57-1d1e-4a2b-9c3d-0e5f6a7b8c9d"),
    ("H", "{host}"),
    ("ID", "{host}"),
    ("SOCK", "pw.sock"),
    ("STATS", "pw-stats.sock"),
    ("SPEC", "spec.swap"),
    ("DIR", "."),
    ("NAME", "vm1"),
    ("SOCKET", "vm1.sock"),
    ("PORT", "{port}"),
    ("P", "bubble"),
    ("GROUP", "root"),
    ("UID", "0"),
];

fn skip_of(u: &UsageLine, argv: &[String]) -> Option<&'static str> {
    SKIPPED
        .iter()
        .find(|(file, prefix, arg, _)| {
            u.file == *file
                && u.text.starts_with(prefix)
                && arg.is_none_or(|a| argv.iter().any(|x| x == a))
        })
        .map(|s| s.3)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One scratch directory with the files the examples name, and the daemons started there.
struct Scratch {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn sparse(path: &Path, bytes: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    // a few data pages, so that import/export carry something
    use std::os::unix::fs::FileExt;
    for p in [0u64, 7, 100] {
        f.write_all_at(&[p as u8 + 1; 4096], p * 4096).unwrap();
    }
}

impl Scratch {
    fn new() -> Scratch {
        // On a disk: the benchmarks want O_DIRECT.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let root = dir.path();
        for d in ["run/pagewise", "var/lib/pagewise"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        sparse(&root.join("dev/shm/vm1-ram"), 512 << 20); // README: a 512M guest's RAM
        sparse(&root.join("image.raw"), 512 << 20); // docs/swapdev.md: DEV is 512M
        sparse(&root.join("img.raw"), 65536 * 4096); // memhog gen-image --pages 65536
        let scratch = Scratch {
            dir,
            daemons: Vec::new(),
        };
        for dev in ["var/lib/pagewise/fc1.swap", "spec.swap"] {
            scratch.pagewise_ok(&["swapdev", "create", dev, "--size", "16M"]);
        }
        scratch
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn pagewise_ok(&self, args: &[&str]) {
        let out = Command::new(qemu_lab::pagewise_bin())
            .args(args)
            .current_dir(self.root())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// `arg` with placeholders replaced and absolute paths moved under the scratch dir.
    fn concrete(&self, arg: &str, port: u16) -> Result<String, String> {
        let mut out = arg.to_string();
        for p in synopsis::placeholders(arg) {
            let value = PLACEHOLDERS
                .iter()
                .find(|(name, _)| *name == p)
                .ok_or_else(|| format!("placeholder {p} has no value in PLACEHOLDERS"))?
                .1;
            out = replace_word(&out, p, value);
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        out = out
            .replace("{host}", host.trim())
            .replace("{port}", &port.to_string())
            .replace(":9464", &format!(":{port}"))
            .replace("{scratch}", &self.root().display().to_string());
        for prefix in ["/run/", "/var/lib/", "/dev/shm/"] {
            for lead in ["", "=", ":"] {
                let from = format!("{lead}{prefix}");
                if out.starts_with(&from) || (!lead.is_empty() && out.contains(&from)) {
                    let to = format!("{lead}{}{prefix}", self.root().display());
                    out = out.replace(&from, &to);
                }
            }
        }
        Ok(out)
    }

    /// Run one command; `serve` stays in the background once it is up.
    fn run(&mut self, argv: &[String]) -> Result<(), String> {
        let port = free_port();
        let mut args = Vec::new();
        for a in &argv[1..] {
            if a == "..." {
                return Err("elided arguments (`...`): put the line on SKIPPED".into());
            }
            args.push(self.concrete(a, port)?);
        }
        let line = argv.join(" ");
        for (prefix, extra) in SHRUNK {
            if line.starts_with(prefix) {
                for e in *extra {
                    args.push(self.concrete(e, port)?);
                }
            }
        }
        let mut cmd = Command::new(qemu_lab::pagewise_bin());
        cmd.args(&args).current_dir(self.root());
        if args[0] == "serve" {
            return self.serve(cmd, &args, port);
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`pagewise {}` exited with {}: {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn serve(&mut self, mut cmd: Command, args: &[String], port: u16) -> Result<(), String> {
        let socket = args
            .iter()
            .position(|a| a == "--socket")
            .map(|i| self.root().join(&args[i + 1]))
            .ok_or("serve without --socket")?;
        let log = self
            .root()
            .join(format!("serve-{}.log", self.daemons.len()));
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| e.to_string())?;
        self.daemons.push(child);
        let child = self.daemons.last_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let failed = |why: &str| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("`pagewise {}` {why}: {log}", args.join(" "))
        };
        while !socket.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(failed(&format!("exited with {status}")));
            }
            if Instant::now() > deadline {
                return Err(failed("did not create its socket in 20 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if args.iter().any(|a| a == "--metrics-addr") {
            // The endpoint is bound after the socket (a loaded machine showed the gap): a
            // refused connection is tried again until the deadline.
            let body = loop {
                match get_metrics(port) {
                    Err(e)
                        if e.kind() == std::io::ErrorKind::ConnectionRefused
                            && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    other => break other,
                }
            }
            .map_err(|e| failed(&format!("/metrics: {e}")))?;
            if !(body.contains("application/openmetrics-text") && body.ends_with("# EOF\n")) {
                return Err(failed(&format!("/metrics answered {body:?}")));
            }
        }
        Ok(())
    }
}

fn get_metrics(port: u16) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// `s` with each whole word `word` (not part of a longer word) replaced by `value`.
fn replace_word(s: &str, word: &str, value: &str) -> String {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        out.push_str(&rest[..i]);
        if before.is_some_and(is_word) || after.is_some_and(is_word) {
            out.push_str(word);
        } else {
            out.push_str(value);
        }
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

#[test]
fn every_usage_line_of_readme_and_docs_runs_or_is_skipped_with_a_reason() {
    let lines = synopsis::usage_lines(&qemu_lab::repo());
    assert!(
        lines.iter().filter(|l| l.file == "README.md").count() >= 10,
        "README usage lines not found: {lines:#?}"
    );
    let mut failures = Vec::new();
    let (mut ran, mut skipped) = (0, Vec::new());
    let mut paragraphs: Vec<Vec<&UsageLine>> = Vec::new();
    for l in &lines {
        match paragraphs.last_mut() {
            Some(p) if p[0].paragraph == l.paragraph => p.push(l),
            _ => paragraphs.push(vec![l]),
        }
    }
    for paragraph in &paragraphs {
        let mut main = Scratch::new();
        let mut before: Vec<Vec<String>> = Vec::new(); // the paragraph's defaults run so far
        for u in paragraph {
            let variants = synopsis::variants(&u.text);
            for (i, argv) in variants.iter().enumerate() {
                if let Some(why) = skip_of(u, argv) {
                    let entry = format!("{u}\n    {why}");
                    if !skipped.contains(&entry) {
                        skipped.push(entry);
                    }
                    continue;
                }
                let result = if i == 0 {
                    main.run(argv)
                } else {
                    let mut fresh = Scratch::new();
                    before
                        .iter()
                        .try_for_each(|b| fresh.run(b))
                        .and_then(|()| fresh.run(argv))
                };
                ran += 1;
                if let Err(e) = result {
                    failures.push(format!("{u}\n    as `{}`: {e}", argv.join(" ")));
                }
            }
            if skip_of(u, &variants[0]).is_none() {
                before.push(variants[0].clone());
            }
        }
    }
    for (file, prefix, _, why) in SKIPPED {
        if !lines
            .iter()
            .any(|l| l.file == *file && l.text.starts_with(prefix))
        {
            failures.push(format!(
                "stale SKIPPED entry ({file}, {prefix}: {why}): no such line"
            ));
        }
    }
    eprintln!(
        "ran {ran} commands from {} usage lines; skipped:",
        lines.len()
    );
    for s in &skipped {
        eprintln!("  {s}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(ran >= 30, "only {ran} commands ran");
}
