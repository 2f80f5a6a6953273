//! The domain core: domains and their refcounted blobs, verified
//! crash-safe blob caches, and remotes (file, HTTP, OCI registry). Knows
//! nothing of FUSE, fanotify or cachefiles; every frontend adapts to this.
#![forbid(unsafe_code)]

pub mod blocks;
mod bound;
pub mod cache;
pub mod domain;
pub mod error;
pub mod fetch;
pub mod fingerprint;
mod flight;
mod key;
pub mod names;
pub mod pool;
pub mod publish;
pub mod readiness;
pub mod remote;
mod shared;
pub mod state;
pub mod workdir;

pub use domain::{BindSpec, BoundImage, DomainKey, Registry, RegistryOptions};
pub use error::CoreError;
pub use names::BlobId;
pub use workdir::WorkDir;
