//! Remotes: where data blobs come from, chosen by URL. Every fetch returns
//! exactly the bytes asked for or an error naming the blob, range and cause;
//! verification against chunk digests happens above, in the cache.

mod file;
mod http;
pub mod oci;

pub use file::FileRemote;
pub use http::HttpRemote;
pub use oci::OciRemote;
pub use shoal_registry::{HttpOptions, RemoteError};

use std::sync::Arc;
use std::time::Duration;

pub trait Remote: Send + Sync {
    /// A URL-like description for logs and status.
    fn describe(&self) -> String;
    /// Fetch exactly `len` bytes at `offset` of blob `name` (64 hex chars).
    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError>;
}

/// Open a remote by URL: `file:///dir`, `http(s)://host/prefix/`,
/// `oci://host[:port]/repo`.
pub fn open(url: &str, opts: &HttpOptions) -> Result<Arc<dyn Remote>, RemoteError> {
    let bad = |why: &str| RemoteError::Permanent {
        url: url.to_string(),
        why: why.to_string(),
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad("file:// URLs need an absolute path"));
        }
        return Ok(Arc::new(FileRemote::new(path.into())));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Arc::new(HttpRemote::new(url, opts.clone())?));
    }
    if url.starts_with("oci://") {
        let r = shoal_registry::Reference::parse(url).map_err(|e| bad(&e))?;
        return Ok(Arc::new(OciRemote::new(&r, opts)));
    }
    Err(bad(
        "unknown remote scheme (want file://, http(s):// or oci://)",
    ))
}

/// Retry transient failures with exponential backoff, a bounded number of
/// times and within one time budget: a read fails within `budget` (plus the
/// one attempt under way) however the remote fails.
pub struct Retrying {
    pub inner: Arc<dyn Remote>,
    pub attempts: u32,
    pub base_delay: Duration,
    pub budget: Duration,
}

impl Remote for Retrying {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let mut delay = self.base_delay;
        let mut attempt = 1;
        let start = std::time::Instant::now();
        loop {
            match self.inner.fetch(name, offset, len) {
                Err(e)
                    if e.is_transient()
                        && attempt < self.attempts
                        && start.elapsed() + delay < self.budget =>
                {
                    tracing::warn!(blob = name, offset, len, attempt, error = %e, "fetch failed, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}
