//! Image conversion and publishing: read an OCI image (a registry or a
//! local OCI layout), stream each layer into the EROFS builder (one blob
//! per layer), and publish the result as an image manifest containerd
//! pulls ([`shoal_registry::shoal`]). Knows nothing of caches or mounts.
#![forbid(unsafe_code)]

mod convert;
mod error;
mod progress;
mod push;
mod source;

pub use convert::{convert, ConvertOptions, ConvertReport};
pub use error::ConvertError;
pub use progress::Progress;
pub use push::{push_image, BlobOrigin, PushBlob, PushReport, PushRequest};
pub use source::{SourceImage, SourceRef};
