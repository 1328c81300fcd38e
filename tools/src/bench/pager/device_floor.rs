//! The swap device file's own read performance on its disk, measured with O_DIRECT `pread`
//! (one request at a time): the floor under any pager that serves faults from that file.
//! A demand fault on disk costs at least one 4 KiB device read more than the null handler,
//! and a scan can go no faster than the disk streams the file.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use crate::pattern::Rng64;
use anyhow::Context;
use serde::Serialize;
use swapdev::AlignedBuf;

const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;

#[derive(Debug, Serialize)]
pub struct DeviceFloor {
    /// Whether the file could be opened with O_DIRECT (false: page-cache reads were timed).
    pub direct: bool,
    pub read_4k_p50_us: f64,
    pub read_4k_p99_us: f64,
    /// The random 4 KiB reads' rate, one at a time.
    pub read_4k_mib_per_s: f64,
    /// Sequential 1 MiB reads over (up to) the first `seq_bytes` of the file.
    pub seq_mib_per_s: f64,
    pub seq_bytes: u64,
}

fn open(path: &Path) -> anyhow::Result<(File, bool)> {
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            Ok((f, false))
        }
        Err(e) => Err(e).with_context(|| format!("opening {} with O_DIRECT", path.display())),
    }
}

fn quantile(sorted_us: &[f64], q: f64) -> f64 {
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us.get(i).copied().unwrap_or(0.0)
}

/// `samples` random 4 KiB reads, then sequential 1 MiB reads of up to `seq_limit` bytes.
pub fn measure(path: &Path, samples: usize, seq_limit: u64) -> anyhow::Result<DeviceFloor> {
    let (file, direct) = open(path)?;
    let size = file.metadata()?.len();
    let blocks = size / SMALL as u64;
    anyhow::ensure!(blocks > 0, "{} is empty", path.display());
    let mut rng = Rng64::new(0xf100);
    let mut small = AlignedBuf::new(SMALL);
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let off = rng.below(blocks) * SMALL as u64;
        let t = Instant::now();
        file.read_exact_at(small.as_mut_slice(), off)
            .with_context(|| format!("reading {} at {off}", path.display()))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let random_secs: f64 = lat.iter().sum::<f64>() / 1e6;
    lat.sort_by(f64::total_cmp);
    let seq_bytes = (size.min(seq_limit) / LARGE as u64) * LARGE as u64;
    let mut large = AlignedBuf::new(LARGE);
    let t = Instant::now();
    let mut off = 0;
    while off < seq_bytes {
        file.read_exact_at(large.as_mut_slice(), off)
            .with_context(|| format!("reading {} at {off}", path.display()))?;
        off += LARGE as u64;
    }
    let secs = t.elapsed().as_secs_f64().max(1e-9);
    Ok(DeviceFloor {
        direct,
        read_4k_p50_us: quantile(&lat, 0.5),
        read_4k_p99_us: quantile(&lat, 0.99),
        read_4k_mib_per_s: (samples * SMALL) as f64 / (1 << 20) as f64 / random_secs.max(1e-9),
        seq_mib_per_s: seq_bytes as f64 / (1 << 20) as f64 / secs,
        seq_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_real_file() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        let f = measure(&path, 64, 2 << 20).unwrap();
        assert!(f.read_4k_p50_us > 0.0 && f.read_4k_p99_us >= f.read_4k_p50_us);
        assert!(f.read_4k_mib_per_s > 0.0);
        assert_eq!(f.seq_bytes, 2 << 20);
        assert!(f.seq_mib_per_s > 0.0);
        assert!(measure(&dir.path().join("missing"), 1, 1).is_err());
    }
}
