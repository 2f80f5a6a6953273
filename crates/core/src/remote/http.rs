//! `http(s)://host/prefix/`: blob NAME at `prefix/NAME`, fetched with Range
//! GETs over a keep-alive connection pool, with timeouts; several ranges
//! in one GET when the server serves them so.

use super::{HttpOptions, Piece, Remote, RemoteError, Sink};
use shoal_registry::ranges::{range_header, ranges_of, stream_ranges};
use shoal_registry::{agent, classify, read_range, stream_range, url_host};

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

    fn fetch_pieces(
        &self,
        name: &str,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
        requests: &mut u64,
    ) -> Result<(), RemoteError> {
        let url = format!("{}{}", self.base, name);
        let get = |pieces: &[Piece]| {
            let ranges = ranges_of(pieces);
            let what = format!("{} ranges from byte {}", ranges.len(), ranges[0].0);
            self.agent
                .get(&url)
                .set("Range", &range_header(&ranges))
                .call()
                .map_err(|e| classify(&url, &what, e))
        };
        self.multi.stream(
            &self.base,
            pieces,
            sink,
            requests,
            |pieces, sink| stream_ranges(&url, get(pieces)?, pieces, sink),
            |pieces, sink| stream_range(&url, get(pieces)?, pieces, sink),
        )
    }
}
