//! The EROFS on-disk format: structures, a reader over any positioned-read
//! source, and a builder from directories and tar layers. Knows nothing of
//! caches, remotes or mounts.
#![forbid(unsafe_code)]

pub mod blob;
pub mod build;
pub mod chunk;
pub mod chunktable;
pub mod compress;
pub mod error;
pub mod frames;
pub mod ingest;
pub mod ondisk;
pub mod reader;
mod spool;
pub mod start;
pub mod tar;
pub mod tree;
pub mod writer;

pub use build::{build, build_sources, BuildOptions, BuildReport, Source};
pub use compress::Compression;
pub use error::{BuildError, Error, Result};
pub use ondisk::{ChunkFormat, DataLayout};
pub use reader::{
    BlobFiles, BlobSource, BlockMap, DirEntry, Extent, Extents, Image, ImageBytes, Inode, Mapping,
    NoBlobs, ReadAt, WalkEntry,
};
