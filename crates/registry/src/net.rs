//! HTTP plumbing every remote shares: timeouts, an optional HTTP(S) proxy,
//! registry mirrors, and the classification of failures into transient and
//! permanent ones.

use crate::error::RemoteError;
use crate::ranges::{Piece, Sink};
use std::io::Read;
use std::time::Duration;

/// What a mirror may be asked, as containerd's `hosts.toml` capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorCapability {
    /// Blob reads (by digest: a mirror cannot lie about them undetected).
    Pull,
    /// Manifest reads by tag (trusting the mirror to resolve tags).
    Resolve,
}

/// A registry mirror: a pull-through cache (docker-registry in proxy mode)
/// or a P2P agent serving the same distribution API. Mirrors are tried in
/// the order configured, then the origin; a mirror that fails falls through.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The registry host it mirrors (`host[:port]`), or `*` for every one.
    pub registry: String,
    /// `http(s)://host[:port][/prefix]`; requests go to `<url>/v2/<repo>/…`.
    pub url: String,
    #[serde(default = "default_capabilities")]
    pub capabilities: Vec<MirrorCapability>,
}

fn default_capabilities() -> Vec<MirrorCapability> {
    vec![MirrorCapability::Pull]
}

impl Mirror {
    pub fn serves(&self, host: &str, cap: MirrorCapability) -> bool {
        (self.registry == "*" || self.registry == host) && self.capabilities.contains(&cap)
    }

    /// The base URL of repository `repo` on this mirror.
    pub fn repo_base(&self, repo: &str) -> String {
        let url = self.url.trim_end_matches('/');
        if url.ends_with("/v2") {
            format!("{url}/{repo}")
        } else {
            format!("{url}/v2/{repo}")
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    pub connect_timeout: Duration,
    /// Longest silence while reading a reply.
    pub read_timeout: Duration,
    /// The most one request may take, reply body included: a remote that
    /// trickles a byte now and then defeats `read_timeout`, not this.
    pub deadline: Duration,
    /// `http://host:port` of an HTTP(S) proxy (CONNECT) for every remote.
    pub proxy: Option<String>,
    /// Hosts (`host` or `host:port`, or `.suffix`) reached without the proxy.
    pub no_proxy: Vec<String>,
    pub mirrors: Vec<Mirror>,
    /// Registry hosts reached over plain http although not loopback.
    pub insecure: Vec<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
            proxy: None,
            no_proxy: Vec::new(),
            mirrors: Vec::new(),
            insecure: Vec::new(),
        }
    }
}

impl HttpOptions {
    /// Check the proxy and mirror URLs once, where settings are read.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.proxy {
            ureq::Proxy::new(p).map_err(|e| format!("proxy {p:?}: {e}"))?;
        }
        for m in &self.mirrors {
            let u = url::Url::parse(&m.url).map_err(|e| format!("mirror {:?}: {e}", m.url))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(format!("mirror {:?}: want an http(s):// URL", m.url));
            }
        }
        Ok(())
    }

    fn bypasses_proxy(&self, host: &str) -> bool {
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        self.no_proxy.iter().any(|n| {
            n == "*" || n == host || n == name || (n.starts_with('.') && name.ends_with(n.as_str()))
        })
    }
}

/// `host` or `host:port` of a URL, as pools, proxies and credentials key
/// hosts (empty if it has none).
pub fn url_host(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            let h = u.host_str()?.to_string();
            Some(match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h,
            })
        })
        .unwrap_or_default()
}

/// A connection pool with these options; `host` decides whether it goes
/// through the proxy.
pub fn agent(opts: &HttpOptions, host: &str) -> ureq::Agent {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(opts.connect_timeout)
        .timeout_read(opts.read_timeout)
        .timeout_write(opts.read_timeout)
        .timeout(opts.deadline)
        .max_idle_connections_per_host(16)
        .user_agent(concat!("shoal/", env!("CARGO_PKG_VERSION")));
    if let Some(p) = opts.proxy.as_deref().filter(|_| !opts.bypasses_proxy(host)) {
        match ureq::Proxy::new(p) {
            Ok(p) => b = b.proxy(p),
            // validate() refuses such settings before an agent is built.
            Err(e) => tracing::error!(proxy = p, error = %e, "ignoring an invalid proxy"),
        }
    }
    b.build()
}

/// Load the TLS roots in the background now. ureq builds its TLS
/// configuration (the system's root certificates, read and parsed) when
/// the first agent of a process is built, even for plain-HTTP registries;
/// a long-running service calls this at startup so that its first pull or
/// fetch, on the path a container start waits on, does not pay for it.
pub fn warm_tls() {
    let _ = std::thread::Builder::new()
        .name("tls-roots".into())
        .spawn(|| drop(ureq::AgentBuilder::new()));
}

/// Classify a ureq error: statuses 5xx/429/408 and transport failures are
/// transient; other statuses are permanent.
pub fn classify(url: &str, what: &str, e: ureq::Error) -> RemoteError {
    match e {
        ureq::Error::Status(code, _) => {
            let why = format!("{what}: HTTP status {code}");
            if code >= 500 || code == 429 || code == 408 {
                RemoteError::transient(url, why)
            } else {
                RemoteError::permanent(url, why)
            }
        }
        ureq::Error::Transport(t) => RemoteError::transient(url, format!("{what}: {t}")),
    }
}

/// Buffers for ranged reads start at most this big and grow as bytes
/// arrive, so a range a hostile image declares huge costs nothing up front.
const INITIAL_BUFFER: u64 = 4 << 20;

/// Read a ranged reply's body: exactly `len` bytes starting at `offset`.
pub fn read_range(
    url: &str,
    resp: ureq::Response,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, RemoteError> {
    let what = format!("bytes {offset}+{len}");
    let mut body = range_body(url, &what, resp, offset, len)?;
    let mut buf = Vec::with_capacity(len.min(INITIAL_BUFFER) as usize);
    body.by_ref()
        .take(len)
        .read_to_end(&mut buf)
        .map_err(|e| RemoteError::transient(url, format!("{what}: body: {e}")))?;
    if buf.len() as u64 != len {
        return Err(RemoteError::transient(
            url,
            format!("{what}: short body ({} bytes)", buf.len()),
        ));
    }
    Ok(buf)
}

/// Read a ranged reply for the adjacent `pieces` (one range), handing each
/// piece to `sink` as soon as it has arrived.
pub fn stream_range(
    url: &str,
    resp: ureq::Response,
    pieces: &[Piece],
    sink: &mut Sink<'_>,
) -> Result<(), RemoteError> {
    let (offset, last) = (pieces[0].0, pieces[pieces.len() - 1]);
    let len = last.0 + last.1 - offset;
    let what = format!("bytes {offset}+{len}");
    let mut body = range_body(url, &what, resp, offset, len)?.take(len);
    crate::ranges::stream_body(
        url,
        &what,
        &mut body,
        (offset, offset + len - 1),
        pieces,
        sink,
    )
}

/// The body of a reply to a request for `len` bytes at `offset`, from its
/// first byte at `offset`. A whole-blob reply (200, as a pull-through
/// mirror gives while it has not yet stored the blob) is read past its
/// first `offset` bytes.
fn range_body(
    url: &str,
    what: &str,
    resp: ureq::Response,
    offset: u64,
    len: u64,
) -> Result<Box<dyn Read + Send + Sync>, RemoteError> {
    match resp.status() {
        206 => {
            let cr = resp.header("content-range").unwrap_or("");
            let want = format!("bytes {}-{}/", offset, offset + len - 1);
            if !cr.starts_with(&want) {
                return Err(RemoteError::permanent(
                    url,
                    format!("{what}: Content-Range {cr:?}, expected {want}*"),
                ));
            }
            Ok(resp.into_reader())
        }
        200 => {
            let mut r = resp.into_reader();
            let skipped = std::io::copy(&mut (&mut r).take(offset), &mut std::io::sink())
                .map_err(|e| RemoteError::transient(url, format!("{what}: body: {e}")))?;
            if skipped != offset {
                return Err(RemoteError::permanent(
                    url,
                    format!("{what}: whole-blob reply of only {skipped} bytes"),
                ));
            }
            Ok(r)
        }
        s => Err(RemoteError::permanent(
            url,
            format!("{what}: status {s} to a Range request"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_and_no_proxy() {
        let m = Mirror {
            registry: "reg:5000".into(),
            url: "http://m:5001/".into(),
            capabilities: default_capabilities(),
        };
        assert!(m.serves("reg:5000", MirrorCapability::Pull));
        assert!(!m.serves("reg:5000", MirrorCapability::Resolve));
        assert!(!m.serves("other", MirrorCapability::Pull));
        assert_eq!(m.repo_base("a/b"), "http://m:5001/v2/a/b");
        let m = Mirror {
            url: "https://m/v2".into(),
            ..m
        };
        assert_eq!(m.repo_base("a"), "https://m/v2/a");
        let o = HttpOptions {
            no_proxy: vec!["localhost".into(), ".internal".into()],
            ..Default::default()
        };
        assert!(o.bypasses_proxy("localhost:5000"));
        assert!(o.bypasses_proxy("reg.internal"));
        assert!(!o.bypasses_proxy("example.com"));
        let bad = HttpOptions {
            mirrors: vec![Mirror {
                url: "ftp://x".into(),
                ..m
            }],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }
}
