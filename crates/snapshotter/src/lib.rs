//! `shoal snapshotter`: a containerd proxy snapshotter. Layers of a shoal
//! image (recognised by the `containerd.io/snapshot/shoal.layer` label
//! containerd passes from the layer's annotation) are committed as remote
//! placeholders at pull time, and only the bootstrap is fetched; a
//! container's snapshot over such an image is an overlay whose lower layer
//! is the image's shoal mount, one per image and domain, shared by its
//! containers. Every other layer is an ordinary overlayfs snapshot, so one
//! snapshotter serves every image. Mounts go through a [`Mounter`] (the
//! shoal daemon, in the binary); this crate knows nothing of frontends.
#![forbid(unsafe_code)]

mod engine;
mod error;
mod proto;
mod service;
mod store;

pub use error::SnapError;
pub use service::{serve, DomainPolicy, Snapshotter, SnapshotterOptions};

use std::path::{Path, PathBuf};

/// A shoal image to mount where the snapshotter says.
#[derive(Clone, Debug)]
pub struct MountSpec {
    pub bootstrap: PathBuf,
    /// `oci://host/repo` the blobs come from.
    pub remote: String,
    pub domain: Option<String>,
    pub fsid: String,
    pub mountpoint: PathBuf,
}

/// Who mounts shoal images: the shoal daemon, so one daemon serves
/// containers and `shoal mount` alike.
pub trait Mounter: Send + Sync + 'static {
    /// Whether mounts can be made now (the daemon answers).
    fn check(&self) -> Result<(), String>;
    fn mount(&self, spec: &MountSpec) -> Result<(), String>;
    fn unmount(&self, mountpoint: &Path) -> Result<(), String>;
}
