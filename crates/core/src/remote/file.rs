//! `file:///dir`: a blob directory as `shoal build` writes it.

use super::{Remote, RemoteError};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

pub struct FileRemote {
    dir: PathBuf,
}

impl FileRemote {
    pub fn new(dir: PathBuf) -> Self {
        FileRemote { dir }
    }
}

impl Remote for FileRemote {
    fn describe(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let path = self.dir.join(name);
        let url = format!("file://{}", path.display());
        let err = |e: std::io::Error| {
            let why = format!("bytes {offset}+{len}: {e}");
            if e.kind() == std::io::ErrorKind::NotFound {
                RemoteError::Permanent {
                    url: url.clone(),
                    why,
                }
            } else {
                RemoteError::Transient {
                    url: url.clone(),
                    why,
                }
            }
        };
        let f = std::fs::File::open(&path).map_err(err)?;
        // The range comes from an image, which may lie: allocate for it only
        // once the blob is known to hold it.
        let size = f.metadata().map_err(err)?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(RemoteError::Permanent {
                url,
                why: format!("bytes {offset}+{len}: beyond the blob's {size} bytes"),
            });
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).map_err(err)?;
        Ok(buf)
    }
}
