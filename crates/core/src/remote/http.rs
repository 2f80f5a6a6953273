//! `http(s)://host/prefix/`: blob NAME at `prefix/NAME`, fetched with Range
//! GETs over a keep-alive connection pool, with timeouts.

use super::{Remote, RemoteError};
use std::io::Read;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest silence while reading a reply.
    pub read_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
        }
    }
}

pub(crate) fn agent(opts: &HttpOptions) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(opts.connect_timeout)
        .timeout_read(opts.read_timeout)
        .timeout_write(opts.read_timeout)
        .max_idle_connections_per_host(16)
        .build()
}

pub struct HttpRemote {
    base: String,
    agent: ureq::Agent,
}

impl HttpRemote {
    pub fn new(url: &str, opts: HttpOptions) -> Result<Self, RemoteError> {
        url::Url::parse(url).map_err(|e| RemoteError::Permanent {
            url: url.to_string(),
            why: e.to_string(),
        })?;
        let base = if url.ends_with('/') {
            url.to_string()
        } else {
            format!("{url}/")
        };
        Ok(HttpRemote {
            base,
            agent: agent(&opts),
        })
    }
}

/// Classify a ureq error: statuses 5xx/429/408 and transport failures are
/// transient; other statuses are permanent.
pub(crate) fn classify(url: &str, what: &str, e: ureq::Error) -> RemoteError {
    match e {
        ureq::Error::Status(code, _) => {
            let why = format!("{what}: HTTP status {code}");
            if code >= 500 || code == 429 || code == 408 {
                RemoteError::Transient {
                    url: url.into(),
                    why,
                }
            } else {
                RemoteError::Permanent {
                    url: url.into(),
                    why,
                }
            }
        }
        ureq::Error::Transport(t) => RemoteError::Transient {
            url: url.into(),
            why: format!("{what}: {t}"),
        },
    }
}

/// Read a ranged reply's body: exactly `len` bytes starting at `offset`.
pub(crate) fn read_range(
    url: &str,
    resp: ureq::Response,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, RemoteError> {
    let what = format!("bytes {offset}+{len}");
    let perm = |why: String| RemoteError::Permanent {
        url: url.into(),
        why,
    };
    match resp.status() {
        206 => {
            let cr = resp.header("content-range").unwrap_or("");
            let want = format!("bytes {}-{}/", offset, offset + len - 1);
            if !cr.starts_with(&want) {
                return Err(perm(format!(
                    "{what}: Content-Range {cr:?}, expected {want}*"
                )));
            }
        }
        200 if offset == 0 => {}
        s => {
            return Err(perm(format!(
                "{what}: status {s} to a Range request (ranges unsupported?)"
            )))
        }
    }
    let mut buf = Vec::with_capacity(len as usize);
    resp.into_reader()
        .take(len)
        .read_to_end(&mut buf)
        .map_err(|e| RemoteError::Transient {
            url: url.into(),
            why: format!("{what}: body: {e}"),
        })?;
    if buf.len() as u64 != len {
        return Err(RemoteError::Transient {
            url: url.into(),
            why: format!("{what}: short body ({} bytes)", buf.len()),
        });
    }
    Ok(buf)
}

impl Remote for HttpRemote {
    fn describe(&self) -> String {
        self.base.clone()
    }

    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}{}", self.base, name);
        let resp = self
            .agent
            .get(&url)
            .set("Range", &format!("bytes={}-{}", offset, offset + len - 1))
            .call()
            .map_err(|e| classify(&url, &format!("bytes {offset}+{len}"), e))?;
        read_range(&url, resp, offset, len)
    }
}
