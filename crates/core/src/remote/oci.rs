//! `oci://host[:port]/repo`: blobs read with ranged GETs through the
//! registry client (its auth, mirrors and proxy), addressed by digest.

use super::{HttpOptions, Piece, Remote, RemoteError, Sink};
use shoal_registry::{Client, Digest, Reference, Repository};

pub struct OciRemote {
    repo: Repository,
    multi: super::MultiRange,
}

impl OciRemote {
    pub fn new(r: &Reference, opts: &HttpOptions) -> Self {
        OciRemote {
            repo: Client::shared(opts).repository(r),
            multi: Default::default(),
        }
    }
}

impl Remote for OciRemote {
    fn describe(&self) -> String {
        self.repo.reference().repository_url()
    }

    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let digest = Digest::from_hex(name).map_err(|why| RemoteError::Permanent {
            url: self.describe(),
            why,
        })?;
        self.repo.fetch_range(&digest, offset, len)
    }

    fn fetch_pieces(
        &self,
        name: &str,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
        requests: &mut u64,
    ) -> Result<(), RemoteError> {
        let digest = Digest::from_hex(name).map_err(|why| RemoteError::Permanent {
            url: self.describe(),
            why,
        })?;
        self.multi.stream(
            &self.describe(),
            pieces,
            sink,
            requests,
            |pieces, sink| self.repo.stream_ranges(&digest, pieces, sink),
            |pieces, sink| self.repo.stream_range(&digest, pieces, sink),
        )
    }
}
