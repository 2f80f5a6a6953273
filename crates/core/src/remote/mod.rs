//! Remotes: where data blobs come from, chosen by URL. Every fetch returns
//! exactly the bytes asked for or an error naming the blob, range and cause;
//! verification against chunk digests happens above, in the cache.

mod file;
mod http;
pub mod oci;

pub use file::FileRemote;
pub use http::HttpRemote;
pub use oci::OciRemote;
pub use shoal_registry::ranges::{Piece, Sink, Streamed};
pub use shoal_registry::{HttpOptions, RemoteError};

use shoal_registry::ranges::Remaining;

use std::sync::Arc;
use std::time::Duration;

pub trait Remote: Send + Sync {
    /// A URL-like description for logs and status.
    fn describe(&self) -> String;
    /// Fetch exactly `len` bytes at `offset` of blob `name` (64 hex chars).
    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError>;
    /// Fetch `pieces` of blob `name` (sorted, apart), handing each to
    /// `sink` as soon as all of its bytes have arrived, and counting the
    /// requests made in `requests`. Adjacent pieces travel as one range;
    /// an HTTP remote asks for several ranges in one request where its
    /// server serves them so. After an error the pieces already handed
    /// over are good and the others were not fetched.
    ///
    /// This default asks range by range and hands pieces over once their
    /// range is whole: right for a local directory, where nothing waits.
    fn fetch_pieces(
        &self,
        name: &str,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
        requests: &mut u64,
    ) -> Result<(), RemoteError> {
        for (a, b) in runs(pieces) {
            let lo = pieces[a].0;
            let len = pieces[b - 1].0 + pieces[b - 1].1 - lo;
            *requests += 1;
            let bytes = self.fetch(name, lo, len)?;
            for (i, &(o, l)) in pieces.iter().enumerate().take(b).skip(a) {
                sink(i, &bytes[(o - lo) as usize..(o - lo + l) as usize]);
            }
        }
        Ok(())
    }
}

/// Runs of adjacent pieces, as index ranges `[a, b)`: one range each.
fn runs(pieces: &[Piece]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, &(o, _)) in pieces.iter().enumerate() {
        match out.last_mut() {
            Some((_, b)) if pieces[*b - 1].0 + pieces[*b - 1].1 == o => *b = i + 1,
            _ => out.push((i, i + 1)),
        }
    }
    out
}

/// Whether a remote's server answers multi-range requests: assumed until
/// it once does not, then never asked again (one wasted request at most).
#[derive(Default)]
pub(crate) struct MultiRange {
    unsupported: std::sync::atomic::AtomicBool,
}

impl MultiRange {
    /// Run `ask` unless the server is known not to serve ranges together;
    /// learn from its answer. `true`: every piece arrived; `false`: the
    /// rest are to be asked for range by range.
    fn ask(
        &self,
        url: &str,
        ask: impl FnOnce() -> Result<Streamed, RemoteError>,
    ) -> Result<bool, RemoteError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.unsupported.load(Relaxed) {
            return Ok(false);
        }
        let why = match ask() {
            Ok(Streamed::All) => return Ok(true),
            Ok(Streamed::Unsupported(why)) => why,
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
        Ok(false)
    }

    /// [`Remote::fetch_pieces`] for an HTTP remote: every range in one
    /// request (`many`) while the server serves them so, else (and for
    /// whatever that request did not deliver) one request per range
    /// (`one`).
    pub(crate) fn stream(
        &self,
        url: &str,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
        requests: &mut u64,
        many: impl FnOnce(&[Piece], &mut Sink<'_>) -> Result<Streamed, RemoteError>,
        mut one: impl FnMut(&[Piece], &mut Sink<'_>) -> Result<(), RemoteError>,
    ) -> Result<(), RemoteError> {
        let mut left = Remaining::new(pieces);
        let todo = left.todo();
        if runs(&todo).len() > 1 {
            let all = self.ask(url, || {
                *requests += 1;
                many(&todo, &mut *left.sink(sink))
            })?;
            if all {
                return Ok(());
            }
        }
        let todo = left.todo();
        let mut into = left.sink(sink);
        for (a, b) in runs(&todo) {
            *requests += 1;
            one(&todo[a..b], &mut |i, bytes| into(a + i, bytes))?;
        }
        Ok(())
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
    fn fetch_pieces(
        &self,
        name: &str,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
        requests: &mut u64,
    ) -> Result<(), RemoteError> {
        // A retry asks only for what has not arrived.
        let mut left = Remaining::new(pieces);
        let what = format!("{} pieces from byte {}", pieces.len(), pieces[0].0);
        self.retry(name, &what, || {
            let todo = left.todo();
            if todo.is_empty() {
                return Ok(());
            }
            self.inner
                .fetch_pieces(name, &todo, &mut *left.sink(sink), requests)
        })
    }
}
