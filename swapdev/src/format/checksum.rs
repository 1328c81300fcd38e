//! Per-page payload checksums.

use serde::Serialize;

/// Which checksum protects each stored page payload (chosen at create time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumKind {
    Crc32c,
    /// xxh3-64, truncated to its low 32 bits.
    Xxh3,
}

impl ChecksumKind {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            ChecksumKind::Crc32c => 1,
            ChecksumKind::Xxh3 => 2,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ChecksumKind::Crc32c),
            2 => Some(ChecksumKind::Xxh3),
            _ => None,
        }
    }

    /// Checksum of a stored payload.
    pub fn compute(self, data: &[u8]) -> u32 {
        match self {
            ChecksumKind::Crc32c => crc32c::crc32c(data),
            ChecksumKind::Xxh3 => xxhash_rust::xxh3::xxh3_64(data) as u32,
        }
    }
}

impl std::str::FromStr for ChecksumKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "crc32c" => Ok(ChecksumKind::Crc32c),
            "xxh3" => Ok(ChecksumKind::Xxh3),
            other => Err(format!(
                "unknown checksum {other:?} (expected crc32c or xxh3)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_differ_and_detect_flips() {
        let mut data = vec![7u8; 4096];
        for kind in [ChecksumKind::Crc32c, ChecksumKind::Xxh3] {
            let a = kind.compute(&data);
            data[100] ^= 1;
            assert_ne!(a, kind.compute(&data));
            data[100] ^= 1;
            assert_eq!(ChecksumKind::from_u8(kind.to_u8()), Some(kind));
        }
        assert_eq!(ChecksumKind::from_u8(9), None);
        assert!("md5".parse::<ChecksumKind>().is_err());
    }
}
