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
    /// Fetch several `(offset, len)` ranges of blob `name` (sorted, apart)
    /// in one request, one buffer per range. `None`: this remote does not
    /// serve ranges together (a local directory gains nothing from it; an
    /// HTTP server may not), so the caller asks range by range.
    fn fetch_ranges(
        &self,
        _name: &str,
        _ranges: &[(u64, u64)],
    ) -> Result<Option<Vec<Vec<u8>>>, RemoteError> {
        Ok(None)
    }
}

/// Whether a remote's server answers multi-range requests: assumed until
/// it once does not, then never asked again (one wasted request at most).
#[derive(Default)]
pub(crate) struct MultiRange {
    unsupported: std::sync::atomic::AtomicBool,
}

impl MultiRange {
    /// Run `ask` unless the server is known not to serve ranges together;
    /// learn from its answer.
    pub(crate) fn ask(
        &self,
        url: &str,
        ask: impl FnOnce() -> Result<shoal_registry::ranges::Ranges, RemoteError>,
    ) -> Result<Option<Vec<Vec<u8>>>, RemoteError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.unsupported.load(Relaxed) {
            return Ok(None);
        }
        let why = match ask() {
            Ok(shoal_registry::ranges::Ranges::Parts(p)) => return Ok(Some(p)),
            Ok(shoal_registry::ranges::Ranges::Unsupported(why)) => why,
            // A transient failure, a missing blob or a refused login is
            // the remote's, whatever was asked.
            Err(e)
                if e.is_transient()
                    || e.is_not_found()
                    || e.has_status(401)
                    || e.has_status(403) =>
            {
                return Err(e)
            }
            // A refusal (400, 416, 501, a malformed reply) may be of the
            // multi-range request alone: single ranges will tell.
            Err(e) => e.to_string(),
        };
        tracing::info!(remote = url, why, "no multi-range requests to this remote");
        self.unsupported.store(true, Relaxed);
        Ok(None)
    }
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

impl Retrying {
    /// `f` until it succeeds, fails for good, or attempts or budget run out.
    fn retry<T>(
        &self,
        name: &str,
        what: &str,
        mut f: impl FnMut() -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let mut delay = self.base_delay;
        let mut attempt = 1;
        let start = std::time::Instant::now();
        loop {
            match f() {
                Err(e)
                    if e.is_transient()
                        && attempt < self.attempts
                        && start.elapsed() + delay < self.budget =>
                {
                    tracing::warn!(blob = name, what, attempt, error = %e, "fetch failed, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

impl Remote for Retrying {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let what = format!("bytes {offset}+{len}");
        self.retry(name, &what, || self.inner.fetch(name, offset, len))
    }
    fn fetch_ranges(
        &self,
        name: &str,
        ranges: &[(u64, u64)],
    ) -> Result<Option<Vec<Vec<u8>>>, RemoteError> {
        let what = format!("{} ranges from byte {}", ranges.len(), ranges[0].0);
        self.retry(name, &what, || self.inner.fetch_ranges(name, ranges))
    }
}
