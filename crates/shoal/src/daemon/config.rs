//! Daemon settings: the TOML file and what it turns into for remotes.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Daemon settings: a TOML file, overridden by flags.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// Run GC every this many seconds (0 or absent: never).
    pub gc_interval_secs: Option<u64>,
    /// The cache size GC shrinks to.
    pub gc_max_bytes: Option<u64>,
    /// Fetch attempts for transient remote errors.
    pub retries: Option<u32>,
    pub connect_timeout_secs: Option<u64>,
    pub read_timeout_secs: Option<u64>,
    /// The most one remote request may take (body included), and the
    /// budget of a read's retries: reads fail within about this when a
    /// remote is down, hangs or trickles (default 30).
    pub fetch_deadline_secs: Option<u64>,
    /// Threads answering fanotify events.
    pub fanotify_threads: Option<usize>,
    /// `http://host:port`: an HTTP(S) proxy (CONNECT) for every remote.
    pub proxy: Option<String>,
    /// Hosts reached without the proxy (`host`, `host:port`, `.suffix`).
    #[serde(default)]
    pub no_proxy: Vec<String>,
    /// Registries reached over plain http although not loopback.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registry mirrors, tried in order before the origin (`[[mirror]]`).
    #[serde(default)]
    pub mirror: Vec<shoal_registry::Mirror>,
    /// Mount file-backed with `directio` where the kernel has it (default
    /// false). Either way a byte is cached once once the daemon has trimmed
    /// the cache files (every second); direct I/O also avoids the brief
    /// second copy, but costs the backing file's readahead and makes every
    /// lazy read wait for the fill's writeback: measured 1.6x slower lazy
    /// and 2.4x slower cold whole-tree reads (scripts/bench-pagecache.sh).
    pub directio: Option<bool>,
    /// Mounts of one domain share the page cache of equal files
    /// (`inode_share`, Linux 7.0+; default true). Images of a domain then
    /// trust each other's fingerprints: turn it off for a domain that mixes
    /// images from parties that do not trust each other.
    pub page_cache_share: Option<bool>,
}

/// Where settings are read from when no flag names a file.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/shoal.toml";

impl Config {
    /// The settings file: the flag's, else `$SHOAL_CONFIG`, else
    /// [`DEFAULT_CONFIG`] if it exists.
    pub fn path(flag: Option<PathBuf>) -> Option<PathBuf> {
        flag.or_else(|| std::env::var_os("SHOAL_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()))
    }

    /// Timeouts, proxy, mirrors and insecure registries for every remote.
    pub fn http_options(&self) -> Result<shoal_core::remote::HttpOptions> {
        let mut http = shoal_core::remote::HttpOptions::default();
        if let Some(s) = self.connect_timeout_secs {
            http.connect_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.read_timeout_secs {
            http.read_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.fetch_deadline_secs {
            http.deadline = Duration::from_secs(s.max(1));
        }
        http.proxy = self.proxy.clone();
        http.no_proxy = self.no_proxy.clone();
        http.insecure = self.insecure_registries.clone();
        http.mirrors = self.mirror.clone();
        http.validate().map_err(anyhow::Error::msg)?;
        Ok(http)
    }

    pub fn load(path: Option<&Path>) -> Result<Config> {
        match path {
            None => Ok(Config::default()),
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))
            }
        }
    }
}
