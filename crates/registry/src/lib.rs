//! The OCI distribution API as shoal uses it: references, authentication
//! (anonymous, bearer tokens, basic credentials from `--creds` or the
//! Docker config), registry mirrors and HTTP(S) proxies in the spirit of
//! containerd's `hosts.toml`, manifest and index resolution, verified blob
//! streams, ranged blob reads and uploads that skip what the registry has.
//! It also owns the one layout of a shoal image in a registry
//! ([`shoal`]). It knows nothing of EROFS, caches or mounts.
#![forbid(unsafe_code)]

mod auth;
mod client;
mod error;
pub mod manifest;
mod net;
pub mod ranges;
mod reference;
pub mod shoal;

pub use auth::Credentials;
pub use client::{BlobReader, Client, OpenBlob, Repository, Upload};
pub use error::RemoteError;
pub use manifest::{Descriptor, ImageConfig, Index, Manifest, Platform};
pub use net::{
    agent, classify, read_range, stream_range, url_host, warm_tls, HttpOptions, Mirror,
    MirrorCapability,
};
pub use reference::{Digest, Reference};
