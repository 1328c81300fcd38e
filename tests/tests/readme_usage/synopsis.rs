//! The usage lines of the README and docs/*.md, and the concrete command lines each one
//! stands for.
//!
//! A usage line is a line of a shell code block (untagged, `sh`, `bash`, `shell`, `console`)
//! whose first word is `pagewise`, with its continuations (a trailing `\`, or indented lines
//! after it) and without its `# comment`. Several commands on one line joined by ` | pagewise`
//! are separate usage lines. Its synopsis grammar: `[...]` is optional, `(a | b)` is a
//! choice, `lz4|raw` a choice of values, `]...` a repeatable group, and an UPPERCASE word a
//! placeholder.

use std::path::Path;

/// One usage line: where it is, its paragraph (lines of a code block up to a blank line,
/// which run in order on one scratch directory), and its text.
#[derive(Debug, Clone)]
pub struct UsageLine {
    pub file: String,
    pub line: usize,
    pub paragraph: usize,
    pub text: String,
}

impl std::fmt::Display for UsageLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.text)
    }
}

fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('#', None) if i == 0 || line[..i].ends_with(char::is_whitespace) => {
                return line[..i].trim_end()
            }
            _ => {}
        }
    }
    line.trim_end()
}

/// Every usage line of `root/README.md` and `root/docs/*.md`.
pub fn usage_lines(root: &Path) -> Vec<UsageLine> {
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    let mut paragraph = 0;
    for path in files {
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut shell: Option<bool> = None; // inside a block: is it a shell block?
        let mut current: Option<UsageLine> = None;
        let mut continued = false;
        for (i, raw) in text.lines().enumerate() {
            if let Some(info) = raw.trim_start().strip_prefix("```") {
                out.extend(current.take());
                paragraph += 1;
                shell = match shell {
                    Some(_) => None,
                    None => Some(matches!(
                        info.split_whitespace().next().unwrap_or(""),
                        "" | "sh" | "bash" | "shell" | "console"
                    )),
                };
                continue;
            }
            if shell != Some(true) {
                continue;
            }
            let line = strip_comment(raw);
            let indented = raw.starts_with(char::is_whitespace) && !line.trim().is_empty();
            if let Some(cur) = current.as_mut().filter(|_| continued || indented) {
                cur.text.push(' ');
                cur.text
                    .push_str(line.trim().trim_end_matches('\\').trim_end());
                continued = line.ends_with('\\');
                continue;
            }
            out.extend(current.take());
            if raw.trim().is_empty() {
                paragraph += 1;
            }
            continued = line.ends_with('\\');
            if line.starts_with("pagewise ") {
                current = Some(UsageLine {
                    file: name.clone(),
                    line: i + 1,
                    paragraph,
                    text: line.trim_end_matches('\\').trim_end().to_string(),
                });
            }
        }
        out.extend(current.take());
    }
    // `a | pagewise b`: two commands.
    out.into_iter()
        .flat_map(|u| {
            u.text
                .split(" | pagewise ")
                .enumerate()
                .map(|(i, t)| UsageLine {
                    text: if i == 0 {
                        t.to_string()
                    } else {
                        format!("pagewise {t}")
                    },
                    ..u.clone()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Node {
    /// A word, or a choice of values (`lz4|raw`).
    Word(Vec<String>),
    /// `[a | b]`: nothing, or one of the alternatives.
    Optional(Vec<Vec<Node>>),
    /// `(a | b)`: one of the alternatives.
    Choice(Vec<Vec<Node>>),
}

fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            out.push(std::mem::take(word));
        }
    };
    for c in text.chars() {
        match (c, quote) {
            ('\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            (_, Some(_)) => word.push(c),
            ('[' | ']' | '(' | ')', None) => {
                flush(&mut word, &mut out);
                out.push(c.to_string());
            }
            (c, None) if c.is_whitespace() => flush(&mut word, &mut out),
            _ => word.push(c),
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Alternatives up to the closing `close` (or the end), separated by a lone `|`.
fn parse_alternatives(toks: &[String], at: &mut usize, close: Option<&str>) -> Vec<Vec<Node>> {
    let mut alts = vec![Vec::new()];
    while *at < toks.len() {
        let t = toks[*at].as_str();
        *at += 1;
        match t {
            "|" => alts.push(Vec::new()),
            "[" => {
                let inner = parse_alternatives(toks, at, Some("]"));
                if toks.get(*at).is_some_and(|t| t == "...") {
                    *at += 1; // repeatable: once is enough
                }
                alts.last_mut().unwrap().push(Node::Optional(inner));
            }
            "(" => {
                let inner = parse_alternatives(toks, at, Some(")"));
                alts.last_mut().unwrap().push(Node::Choice(inner));
            }
            t if Some(t) == close => return alts,
            t => alts
                .last_mut()
                .unwrap()
                .push(Node::Word(t.split('|').map(str::to_string).collect())),
        }
    }
    alts
}

/// Every variant of `seq`, the default first: every optional part left out, the first of
/// every choice; then each optional part in turn put in, and each other choice taken, one
/// at a time.
fn seq_variants(seq: &[Node]) -> Vec<Vec<String>> {
    let per_node: Vec<Vec<Vec<String>>> = seq.iter().map(node_variants).collect();
    let default: Vec<String> = per_node.iter().flat_map(|v| v[0].clone()).collect();
    let mut out = vec![default];
    for (i, variants) in per_node.iter().enumerate() {
        for v in &variants[1..] {
            let mut line = Vec::new();
            for (j, other) in per_node.iter().enumerate() {
                line.extend(if i == j { v.clone() } else { other[0].clone() });
            }
            out.push(line);
        }
    }
    out
}

fn node_variants(node: &Node) -> Vec<Vec<String>> {
    match node {
        Node::Word(alts) => alts.iter().map(|a| vec![a.clone()]).collect(),
        Node::Optional(alts) => std::iter::once(Vec::new())
            .chain(alts.iter().flat_map(|a| seq_variants(a)))
            .collect(),
        Node::Choice(alts) => alts.iter().flat_map(|a| seq_variants(a)).collect(),
    }
}

/// The concrete command lines (argv, `pagewise` first) a usage line stands for, the default
/// one first.
pub fn variants(text: &str) -> Vec<Vec<String>> {
    let toks = tokens(text);
    let mut at = 0;
    let alts = parse_alternatives(&toks, &mut at, None);
    alts.iter().flat_map(|a| seq_variants(a)).collect()
}

/// The placeholders (UPPERCASE words) of one argument: `NAME=SOCKET:SPEC` has three.
pub fn placeholders(arg: &str) -> Vec<&str> {
    arg.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            w.starts_with(|c: char| c.is_ascii_uppercase())
                && w.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect()
}

#[test]
fn synopses_expand_one_option_at_a_time() {
    let v = variants("pagewise swapdev create vm1.swap --size 512M [--codec lz4|raw] [--json]");
    let lines: Vec<String> = v.iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        lines,
        [
            "pagewise swapdev create vm1.swap --size 512M",
            "pagewise swapdev create vm1.swap --size 512M --codec lz4",
            "pagewise swapdev create vm1.swap --size 512M --codec raw",
            "pagewise swapdev create vm1.swap --size 512M --json",
        ]
    );
    let v = variants("pagewise evict --vm vm1 (--target-rss 64M | --auto) [--backend 'a b']...");
    let lines: Vec<String> = v.iter().map(|a| a.join(" ")).collect();
    assert_eq!(
        lines,
        [
            "pagewise evict --vm vm1 --target-rss 64M",
            "pagewise evict --vm vm1 --auto",
            "pagewise evict --vm vm1 --target-rss 64M --backend a b",
        ]
    );
    assert_eq!(
        placeholders("NAME=SOCKET:DIR/vm1.swap"),
        ["NAME", "SOCKET", "DIR"]
    );
    assert!(placeholders("512M").is_empty());
}

#[test]
fn lines_are_joined_split_and_stripped_of_comments() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("docs")).unwrap();
    std::fs::write(
        dir.path().join("README.md"),
        "```sh\n# a comment\npagewise a --x 1 \\\n    --y 2   # why\npagewise b | pagewise c\n\n\
         pagewise d\n    [--e]\n```\n```text\npagewise output, not a command\n```\n",
    )
    .unwrap();
    let lines = usage_lines(dir.path());
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "pagewise a --x 1 --y 2",
            "pagewise b",
            "pagewise c",
            "pagewise d [--e]"
        ]
    );
    assert_eq!(lines[0].paragraph, lines[2].paragraph);
    assert_ne!(lines[0].paragraph, lines[3].paragraph);
}
