//! Parameters, read from `memverify.KEY=VALUE` words (the kernel command line, passed as
//! arguments by the guest's /init). Words without the `memverify.` prefix are ignored, so the
//! whole `/proc/cmdline` can be handed over as is.

use std::fmt;

/// What the workload does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Memory filled with verifiable pages, in MiB.
    pub mib: u64,
    /// The hot set (the first `hot_mib` MiB of the buffer), rewritten continuously.
    pub hot_mib: u64,
    /// How fast the hot set is rewritten, in MiB per second (0: never).
    pub hot_rate_mibs: u64,
    /// Seconds between full verification passes.
    pub verify_secs: u64,
    /// Seconds to run after the fill before the final pass (0: run forever).
    pub duration_secs: u64,
    /// Seed mixed into every page's content.
    pub seed: u64,
    /// Free phase: MiB filled after the main fill and freed later (0: no free phase).
    pub free_mib: u64,
    /// Seconds after the main fill at which the free phase's memory is freed.
    pub free_after_secs: u64,
    /// Milliseconds between heartbeat lines (`memverify: hb N`, from a thread of their own,
    /// so a host sees every pause of the guest as a gap; 0: none).
    pub heartbeat_ms: u64,
    /// Words a hot rewrite changes per page (0: the whole page; at most
    /// `pattern::MAX_SPARSE_WORDS`).
    pub sparse_words: u64,
    /// Skewed hot set: K-1 of every K rewrites go to the hottest eighth of the hot set
    /// (1: uniform).
    pub hot_skew: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mib: 64,
            hot_mib: 8,
            hot_rate_mibs: 4,
            verify_secs: 10,
            duration_secs: 60,
            seed: 1,
            free_mib: 0,
            free_after_secs: 5,
            heartbeat_ms: 0,
            sparse_words: 0,
            hot_skew: 1,
        }
    }
}

/// A parameter that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    UnknownKey(String),
    BadValue { key: String, value: String },
    Inconsistent(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::UnknownKey(k) => write!(
                f,
                "unknown parameter memverify.{k} (known: mib, hot_mib, hot_rate_mibs, verify_secs, duration_secs, seed, free_mib, free_after_secs, heartbeat_ms, sparse_words, hot_skew)"
            ),
            ConfigError::BadValue { key, value } => write!(
                f,
                "memverify.{key}={value}: the value is not a non-negative integer"
            ),
            ConfigError::Inconsistent(why) => f.write_str(why),
        }
    }
}

impl Config {
    /// Parse `memverify.KEY=VALUE` words; other words are ignored.
    pub fn parse<'a>(words: impl IntoIterator<Item = &'a str>) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        for word in words {
            let Some(rest) = word.strip_prefix("memverify.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let number: u64 = value.parse().map_err(|_| ConfigError::BadValue {
                key: key.to_string(),
                value: value.to_string(),
            })?;
            match key {
                "mib" => cfg.mib = number,
                "hot_mib" => cfg.hot_mib = number,
                "hot_rate_mibs" => cfg.hot_rate_mibs = number,
                "verify_secs" => cfg.verify_secs = number,
                "duration_secs" => cfg.duration_secs = number,
                "seed" => cfg.seed = number,
                "free_mib" => cfg.free_mib = number,
                "free_after_secs" => cfg.free_after_secs = number,
                "heartbeat_ms" => cfg.heartbeat_ms = number,
                "sparse_words" => cfg.sparse_words = number,
                "hot_skew" => cfg.hot_skew = number,
                other => return Err(ConfigError::UnknownKey(other.to_string())),
            }
        }
        if cfg.mib == 0 {
            return Err(ConfigError::Inconsistent(
                "memverify.mib must be at least 1".into(),
            ));
        }
        if cfg.hot_mib > cfg.mib {
            return Err(ConfigError::Inconsistent(format!(
                "memverify.hot_mib={} is larger than memverify.mib={}",
                cfg.hot_mib, cfg.mib
            )));
        }
        if cfg.sparse_words > crate::pattern::MAX_SPARSE_WORDS as u64 {
            return Err(ConfigError::Inconsistent(format!(
                "memverify.sparse_words={} is more than {}",
                cfg.sparse_words,
                crate::pattern::MAX_SPARSE_WORDS
            )));
        }
        if cfg.verify_secs == 0 {
            return Err(ConfigError::Inconsistent(
                "memverify.verify_secs must be at least 1".into(),
            ));
        }
        Ok(cfg)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mib={} hot_mib={} hot_rate_mibs={} verify_secs={} duration_secs={} seed={}",
            self.mib,
            self.hot_mib,
            self.hot_rate_mibs,
            self.verify_secs,
            self.duration_secs,
            self.seed
        )?;
        if self.sparse_words > 0 {
            write!(f, " sparse_words={}", self.sparse_words)?;
        }
        if self.hot_skew > 1 {
            write!(f, " hot_skew={}", self.hot_skew)?;
        }
        if self.free_mib > 0 {
            write!(
                f,
                " free_mib={} free_after_secs={}",
                self.free_mib, self.free_after_secs
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_prefixed_words_and_ignores_others() {
        let cmdline = "console=ttyS0 quiet memverify.mib=256 memverify.hot_mib=32 rdinit=/init memverify.seed=7";
        let cfg = Config::parse(cmdline.split_whitespace()).unwrap();
        assert_eq!(cfg.mib, 256);
        assert_eq!(cfg.hot_mib, 32);
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.verify_secs, Config::default().verify_secs);
    }

    #[test]
    fn refuses_bad_input_with_named_problem() {
        let e = Config::parse(["memverify.mbi=3"]).unwrap_err();
        assert!(e.to_string().contains("memverify.mbi"), "{e}");
        let e = Config::parse(["memverify.mib=lots"]).unwrap_err();
        assert!(e.to_string().contains("memverify.mib=lots"), "{e}");
        let e = Config::parse(["memverify.mib=4", "memverify.hot_mib=8"]).unwrap_err();
        assert!(e.to_string().contains("larger"), "{e}");
        assert!(Config::parse(["memverify.verify_secs=0"]).is_err());
        assert!(Config::parse(["memverify.mib=0"]).is_err());
    }

    #[test]
    fn free_phase_parameters() {
        let cfg = Config::parse(["memverify.free_mib=64", "memverify.free_after_secs=3"]).unwrap();
        assert_eq!((cfg.free_mib, cfg.free_after_secs), (64, 3));
        assert!(
            cfg.to_string().contains("free_mib=64 free_after_secs=3"),
            "{cfg}"
        );
        let off = Config::parse(["memverify.mib=8"]).unwrap();
        assert_eq!(off.free_mib, 0);
        assert!(!off.to_string().contains("free_mib"), "{off}");
        let e = Config::parse(["memverify.free_mib=-1"]).unwrap_err();
        assert!(e.to_string().contains("memverify.free_mib=-1"), "{e}");
    }
}
