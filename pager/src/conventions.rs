//! Conventions the CLI and the lab benchmarks share: human byte sizes (`512M`, `1.5G`) and
//! the default control (stats) socket next to a serve socket.

use std::path::{Path, PathBuf};

/// Why a human size does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size (e.g. 4096, 512M, 1.5G)")]
    NotASize(String),
    #[error("unknown size unit {unit:?} in {input:?} (use K, M, G or T)")]
    UnknownUnit { unit: String, input: String },
    #[error("size {0:?} is out of range")]
    OutOfRange(String),
}

/// Parse "4096", "512M", "1.5G", "2GiB" into bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| SizeError::NotASize(s.into()))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.into(),
                input: s.into(),
            })
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(SizeError::OutOfRange(s.into()));
    }
    Ok(bytes as u64)
}

/// The default control socket of a serve socket: `PATH.stats`.
pub fn default_stats_socket(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".stats");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 64 k "), Ok(64 << 10));
        let e = parse_size("lots").unwrap_err().to_string();
        assert!(e.contains("not a size"), "{e}");
        let e = parse_size("3X").unwrap_err().to_string();
        assert!(e.contains("unknown size unit"), "{e}");
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::OutOfRange(_))
        ));
    }

    #[test]
    fn stats_socket_sits_next_to_the_serve_socket() {
        assert_eq!(
            default_stats_socket(Path::new("/run/pw.sock")),
            PathBuf::from("/run/pw.sock.stats")
        );
    }
}
