//! `http(s)://host/prefix/`: blob NAME at `prefix/NAME`, fetched with Range
//! GETs over a keep-alive connection pool, with timeouts; several ranges
//! in one GET when the server serves them so.

use super::{HttpOptions, Remote, RemoteError};
use shoal_registry::ranges::{range_header, read_ranges};
use shoal_registry::{agent, classify, read_range, url_host};

pub struct HttpRemote {
    base: String,
    agent: ureq::Agent,
    multi: super::MultiRange,
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
            multi: Default::default(),
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

    fn fetch_ranges(
        &self,
        name: &str,
        ranges: &[(u64, u64)],
    ) -> Result<Option<Vec<Vec<u8>>>, RemoteError> {
        let url = format!("{}{}", self.base, name);
        self.multi.ask(&self.base, || {
            let resp = self
                .agent
                .get(&url)
                .set("Range", &range_header(ranges))
                .call()
                .map_err(|e| classify(&url, &format!("{} ranges", ranges.len()), e))?;
            read_ranges(&url, resp, ranges)
        })
    }
}
