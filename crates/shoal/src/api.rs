//! The daemon's control API on the wire: one typed request and reply per
//! endpoint, shared by the daemon (which serves them) and the client
//! commands and the snapshotter (which send them). JSON over HTTP/1.1 on
//! the daemon's Unix socket.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How an image is mounted. `Auto` resolves to the first of fanotify,
/// fscache, FUSE that this kernel supports (see `shoal doctor`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    #[default]
    Auto,
    /// File-backed erofs over the domain's cache files, filled on fanotify
    /// pre-content events (Linux 6.14+).
    Fanotify,
    /// erofs over cachefiles on-demand (`fsid=`/`domain_id=`, Linux 6.1–7.1).
    Fscache,
    /// The daemon serves the image over FUSE (any kernel).
    Fuse,
}

impl Frontend {
    pub fn name(self) -> &'static str {
        match self {
            Frontend::Auto => "auto",
            Frontend::Fanotify => "fanotify",
            Frontend::Fscache => "fscache",
            Frontend::Fuse => "fuse",
        }
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `POST /v1/bind`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct BindRequest {
    pub domain: Option<String>,
    pub fsid: String,
    /// A bootstrap path on the daemon's host, or absent with `reference`.
    pub bootstrap: Option<PathBuf>,
    pub remote: Option<String>,
    /// `oci://host/repo:tag` as pushed by `shoal push`.
    pub reference: Option<String>,
}

/// What `bind` and `mount` answer: the image as bound.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ImageReply {
    pub domain: Option<String>,
    pub fsid: String,
    pub bootstrap: PathBuf,
    /// The domain's cache files of its blobs, in device-slot order.
    pub blobs: Vec<PathBuf>,
}

/// `POST /v1/mount`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct MountRequest {
    #[serde(flatten)]
    pub bind: BindRequest,
    pub mountpoint: PathBuf,
    #[serde(default)]
    pub frontend: Frontend,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct MountReply {
    #[serde(flatten)]
    pub image: ImageReply,
    /// The frontend used (`auto` resolved).
    pub frontend: Frontend,
}

/// `POST /v1/umount`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct UmountRequest {
    pub mountpoint: PathBuf,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct UmountReply {
    pub unmounted: PathBuf,
    pub fsid: String,
}

/// `POST /v1/unbind`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ImageRequest {
    pub domain: Option<String>,
    pub fsid: String,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct UnbindReply {
    pub unbound: String,
}

/// `GET /v1/read` (query string).
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ReadRequest {
    pub domain: Option<String>,
    pub fsid: String,
    pub path: String,
}

/// `POST /v1/prefetch`.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct PrefetchRequest {
    pub domain: Option<String>,
    pub fsid: String,
    /// Use the access order recorded when this image was last unbound.
    #[serde(default)]
    pub recorded: bool,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct PrefetchReply {
    pub prefetching: String,
    pub recorded_chunks: usize,
}

/// `POST /v1/gc`; the reply is [`shoal_core::domain::GcReport`].
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct GcRequest {
    pub max_bytes: u64,
}

/// One daemon-hosted mount, as `GET /v1/doctor` lists it.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct MountStatus {
    pub mountpoint: PathBuf,
    pub domain: Option<String>,
    pub fsid: String,
    pub frontend: Frontend,
    /// The kernel reads the cache files with direct I/O.
    pub directio: bool,
    /// "active", or "off: " and why.
    pub page_cache_share: String,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
pub struct FanotifyStatus {
    pub pump_connected: bool,
    /// The connected pump's protocol version (it outlives daemon upgrades).
    #[serde(default)]
    pub pump_protocol: Option<u32>,
    /// Cache files marked for pre-content events (incomplete blobs).
    pub marked: Vec<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
pub struct FscacheStatus {
    pub opens: u64,
    pub closes: u64,
    pub reads: u64,
    pub failed_reads: u64,
    /// Cookies open now (blob names and fsids).
    pub objects: Vec<String>,
}

/// `GET /v1/doctor`: kernel features, the frontend `auto` picks, mounts.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct DoctorReply {
    pub features: Features,
    /// Absent when no daemon answered (a local probe).
    #[serde(default)]
    pub mounts: Option<Vec<MountStatus>>,
    #[serde(default)]
    pub fanotify: FanotifyStatus,
    pub fscache: Option<FscacheStatus>,
}

/// Every error reply: the HTTP status says what kind, this says what.
#[derive(Deserialize, Serialize, Debug, Clone)]
pub struct ErrorReply {
    pub error: String,
}

/// The kernel features shoal looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kernel {
    Erofs,
    FileBacked,
    Fanotify,
    Cachefiles,
    Fuse,
    Directio,
    InodeShare,
}

impl Kernel {
    /// What `shoal doctor` calls it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Erofs => "erofs",
            Kernel::FileBacked => "erofs file-backed mounts",
            Kernel::Fanotify => "fanotify pre-content",
            Kernel::Cachefiles => "cachefiles on-demand",
            Kernel::Fuse => "fuse",
            Kernel::Directio => "erofs directio",
            Kernel::InodeShare => "erofs inode_share",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Feature {
    pub kind: Kernel,
    pub name: String,
    pub available: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Features {
    pub kernel: String,
    pub features: Vec<Feature>,
    /// The frontend `auto` resolves to, and why.
    pub auto: Option<Frontend>,
    pub reasons: Vec<String>,
}

impl Features {
    /// `Ok` if this kernel has `kind`, else why not.
    pub fn has(&self, kind: Kernel) -> Result<(), String> {
        match self.features.iter().find(|f| f.kind == kind) {
            Some(f) if f.available => Ok(()),
            Some(f) => Err(f.detail.clone()),
            None => Err(format!("{}: not probed", kind.name())),
        }
    }
}
