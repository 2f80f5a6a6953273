//! `http(s)://host/prefix/`: blob NAME at `prefix/NAME`, fetched with Range
//! GETs over a keep-alive connection pool, with timeouts.

use super::{HttpOptions, Remote, RemoteError};
use shoal_registry::{agent, classify, read_range, url_host};

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
            agent: agent(&opts, &url_host(url)),
        })
    }
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
