//! The snapshotter's metadata: every snapshot (containerd's key, kind,
//! parent, labels, times) and every shoal image it mounts, in one JSON file
//! written atomically on each change, so a restart loses nothing. This
//! module alone knows the layout under the root directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// What a committed remote layer of a shoal image stands for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "layer", rename_all = "lowercase")]
pub enum Remote {
    /// A data blob: its bytes are read through the image's mount.
    Blob,
    /// The bootstrap (by sha256 hex): the whole image, mounted as one
    /// lower layer. containerd names remote snapshots by chain ID in every
    /// namespace, so one bootstrap snapshot may serve several namespaces:
    /// the domain is chosen per container snapshot, not here.
    Bootstrap { bootstrap: String },
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub id: u64,
    pub kind: Kind,
    /// Empty for none, as containerd says it.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: (i64, u32),
    pub updated: (i64, u32),
    #[serde(default)]
    pub remote: Option<Remote>,
    /// For active and view snapshots: the domain (of the requesting
    /// namespace) its shoal image lower layer is mounted in.
    #[serde(default)]
    pub domain: Option<String>,
}

/// A bootstrap fetched at pull time.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Bootstrap {
    /// `oci://host/repo` its blobs come from.
    pub remote: String,
    pub path: PathBuf,
}

/// A shoal image in one domain, mounted while snapshots use it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Image {
    /// The bootstrap's sha256 hex.
    pub bootstrap: String,
    /// Empty for none.
    pub domain: String,
    pub fsid: String,
    /// Where it is mounted, while it is.
    pub mountpoint: Option<PathBuf>,
    /// Active and view snapshots whose lower layers include the mount.
    pub users: BTreeSet<String>,
}

#[derive(Default, Debug, serde::Serialize, serde::Deserialize)]
pub struct State {
    pub next_id: u64,
    pub snapshots: BTreeMap<String, Snapshot>,
    /// By sha256 hex.
    #[serde(default)]
    pub bootstraps: BTreeMap<String, Bootstrap>,
    /// By `<domain>/<bootstrap sha256 hex>` (`-` for no domain).
    pub images: BTreeMap<String, Image>,
}

pub fn now() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

pub struct Store {
    root: PathBuf,
    pub state: State,
}

impl Store {
    pub fn open(root: &Path) -> std::io::Result<Store> {
        for d in ["snapshots", "bootstraps", "mounts"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        let path = root.join("metadata.json");
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(e),
        };
        Ok(Store {
            root: root.into(),
            state,
        })
    }

    /// Write the state: a temp file, fsync, rename.
    pub fn save(&self) -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.root)?;
        tmp.write_all(&serde_json::to_vec_pretty(&self.state).expect("state serializes"))?;
        tmp.as_file().sync_all()?;
        tmp.persist(self.root.join("metadata.json"))
            .map_err(|e| e.error)?;
        Ok(())
    }

    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// The upper directory of a snapshot (its files).
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    pub fn bootstraps_dir(&self) -> PathBuf {
        self.root.join("bootstraps")
    }

    pub fn bootstrap_path(&self, hex: &str) -> PathBuf {
        self.bootstraps_dir().join(hex)
    }

    pub fn mountpoint(&self, image_key: &str) -> PathBuf {
        self.root.join("mounts").join(image_key.replace('/', "_"))
    }

    pub fn snapshots_root(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    pub fn next_id(&mut self) -> u64 {
        self.state.next_id += 1;
        self.state.next_id
    }
}
