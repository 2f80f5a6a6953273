//! The daemon's work directory, and the one place that knows its layout:
//!
//! ```text
//! WORK/bindings.json                      what is bound (restored on start)
//! WORK/mounts.json                        what is mounted where
//! WORK/.state-reserve                     room for those on a full disk
//! WORK/domains/DOMAIN/blobs/BLOB          a domain's cache file of a blob
//! WORK/domains/DOMAIN/blobs/BLOB.ready    its readiness map
//! WORK/private/FSID/blobs/...             the volume of an image bound
//!                                         without a domain
//! WORK/access/DOMAIN/FSID.order           an image's access order
//!                                         (DOMAIN `-` for none)
//! WORK/bootstraps/DIGEST                  bootstraps pulled by reference
//! WORK/fscache/                           the cachefiles cache directory
//! WORK/fanotify-pump.sock, .log           the fanotify pump
//! WORK/probe/                             kernel feature probes
//! ```
//!
//! Every path is made here from checked names (a [`DomainKey`], a
//! [`BlobId`]), so no caller joins strings into paths, and GC, the
//! frontends and the daemon agree on where things are. The layout is an
//! on-disk format: a restarted (or upgraded) daemon finds its caches and
//! state where the last one left them.

use crate::key::DomainKey;
use crate::names::BlobId;
use std::path::{Path, PathBuf};

const DOMAINS: &str = "domains";
const PRIVATE: &str = "private";
const BLOBS: &str = "blobs";

/// See the [module](self) documentation.
#[derive(Clone, Debug)]
pub struct WorkDir {
    root: PathBuf,
}

/// The files of one blob's cache in one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFiles {
    pub id: BlobId,
    /// The sparse cache file, the size of the blob.
    pub data: PathBuf,
    /// Its readiness map (see [`crate::readiness`]).
    pub ready: PathBuf,
}

impl BlobFiles {
    /// The files of blob `id` in the blob directory `dir`.
    pub fn in_dir(dir: &Path, id: &BlobId) -> Self {
        let name = id.to_string();
        BlobFiles {
            id: *id,
            ready: dir.join(format!("{name}.ready")),
            data: dir.join(name),
        }
    }
}

impl WorkDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        WorkDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn bindings(&self) -> PathBuf {
        self.root.join("bindings.json")
    }

    pub fn mounts(&self) -> PathBuf {
        self.root.join("mounts.json")
    }

    /// See [`crate::state`].
    pub fn state_reserve(&self) -> PathBuf {
        self.root.join(".state-reserve")
    }

    /// The directory of a domain's volume (or of an image's private one).
    pub fn volume(&self, key: &DomainKey) -> PathBuf {
        match key {
            DomainKey::Shared(d) => self.root.join(DOMAINS).join(d),
            DomainKey::Private(fsid) => self.root.join(PRIVATE).join(fsid),
        }
    }

    /// Where a volume keeps its blob caches.
    pub fn blob_dir(&self, key: &DomainKey) -> PathBuf {
        self.volume(key).join(BLOBS)
    }

    pub fn blob(&self, key: &DomainKey, id: &BlobId) -> BlobFiles {
        BlobFiles::in_dir(&self.blob_dir(key), id)
    }

    /// Where an image's access order is kept across unmounts (for a
    /// recorded prefetch or `shoal order`). Callers pass checked names.
    pub fn access_order(&self, domain: Option<&str>, fsid: &str) -> PathBuf {
        self.root
            .join("access")
            .join(domain.unwrap_or("-"))
            .join(format!("{fsid}.order"))
    }

    /// Where bootstraps pulled by reference are stored, by digest.
    pub fn bootstraps(&self) -> PathBuf {
        self.root.join("bootstraps")
    }

    /// The cache directory bound to `/dev/cachefiles`.
    pub fn fscache(&self) -> PathBuf {
        self.root.join("fscache")
    }

    pub fn pump_socket(&self) -> PathBuf {
        self.root.join("fanotify-pump.sock")
    }

    pub fn pump_log(&self) -> PathBuf {
        self.root.join("fanotify-pump.log")
    }

    /// Scratch space for kernel feature probes.
    pub fn probe(&self) -> PathBuf {
        self.root.join("probe")
    }

    /// Every blob cache in every volume, in no particular order: what GC
    /// may evict. Files whose names are not blob ids (readiness maps,
    /// temporaries) are not blobs; a blob whose map is missing is still
    /// listed (its data file takes room).
    pub fn cached_blobs(&self) -> Vec<BlobFiles> {
        let mut out = Vec::new();
        for kind in [DOMAINS, PRIVATE] {
            let Ok(volumes) = std::fs::read_dir(self.root.join(kind)) else {
                continue;
            };
            for vol in volumes.flatten() {
                let dir = vol.path().join(BLOBS);
                let Ok(files) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for f in files.flatten() {
                    let name = f.file_name();
                    if let Ok(id) = BlobId::parse(&name.to_string_lossy()) {
                        out.push(BlobFiles::in_dir(&dir, &id));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let w = WorkDir::new("/w");
        let id = BlobId::parse(&"ab".repeat(32)).unwrap();
        let shared = DomainKey::new(Some("d"), "f").unwrap();
        let private = DomainKey::new(None, "f").unwrap();
        let b = w.blob(&shared, &id);
        assert_eq!(b.data, Path::new("/w/domains/d/blobs").join(id.to_string()));
        assert_eq!(
            b.ready,
            Path::new("/w/domains/d/blobs").join(format!("{id}.ready"))
        );
        assert_eq!(w.blob_dir(&private), Path::new("/w/private/f/blobs"));
        assert_eq!(w.bindings(), Path::new("/w/bindings.json"));
        assert_eq!(w.mounts(), Path::new("/w/mounts.json"));
        assert_eq!(w.access_order(None, "f"), Path::new("/w/access/-/f.order"));
        assert_eq!(
            w.access_order(Some("d"), "f"),
            Path::new("/w/access/d/f.order")
        );
        assert_eq!(w.fscache(), Path::new("/w/fscache"));
    }

    #[test]
    fn lists_only_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let w = WorkDir::new(tmp.path());
        let id = BlobId::parse(&"0f".repeat(32)).unwrap();
        let key = DomainKey::new(None, "img").unwrap();
        let files = w.blob(&key, &id);
        std::fs::create_dir_all(w.blob_dir(&key)).unwrap();
        for p in [&files.data, &files.ready] {
            std::fs::write(p, b"").unwrap();
        }
        std::fs::write(w.blob_dir(&key).join("junk"), b"").unwrap();
        assert_eq!(w.cached_blobs(), vec![files]);
    }
}
