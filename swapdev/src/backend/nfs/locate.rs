//! Which export holds a path: `nfs://SERVER/EXPORT/PATH` names one absolute path on the
//! server; the export is the longest exported directory that is a prefix of it.

/// Split `full` into (export, path inside the export starting with '/') using the exports a
/// server lists: the longest export that is a prefix of `full` at a '/' boundary and leaves
/// a non-empty file path.
pub fn split_export(full: &str, exports: &[String]) -> Option<(String, String)> {
    exports
        .iter()
        .map(|e| e.trim_end_matches('/'))
        .filter_map(|e| {
            let rest = full.strip_prefix(e)?;
            (rest.starts_with('/') && rest.len() > 1).then(|| (e.to_string(), rest.to_string()))
        })
        .max_by_key(|(e, _)| e.len())
        .map(|(e, rest)| (if e.is_empty() { "/".into() } else { e }, rest))
}

/// Without an export list: the export is the file's parent directory.
pub fn split_parent(full: &str) -> (String, String) {
    match full.rfind('/') {
        Some(0) | None => ("/".into(), full.to_string()),
        Some(i) => (full[..i].to_string(), full[i..].to_string()),
    }
}
