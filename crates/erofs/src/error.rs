//! Typed errors: every one names what was wrong and where.

use std::path::PathBuf;

/// Errors reading an image (bootstrap or blob) through [`crate::Image`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error reading {what} at byte {offset}: {source}")]
    Io {
        what: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("not an EROFS image: bad superblock magic {0:#x}")]
    BadMagic(u32),
    #[error("superblock checksum mismatch: stored {stored:#x}, computed {computed:#x}")]
    BadChecksum { stored: u32, computed: u32 },
    #[error("corrupt image: {what} (nid {nid})")]
    Corrupt { nid: u64, what: String },
    #[error("corrupt superblock: {0}")]
    CorruptSuper(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("unsupported: compressed inode (nid {nid}, layout {layout})")]
    Compressed { nid: u64, layout: u16 },
    #[error("device slot {slot}: tag {tag:?} is not 64 lowercase hex characters")]
    BadTag { slot: u16, tag: String },
    #[error("no such file or directory: {0}")]
    NotFound(String),
    #[error("not a directory: {0}")]
    NotDir(String),
    #[error("blob {blob}: chunk at block {blkaddr} ({nblocks} blocks) fails verification: {why}")]
    Verify {
        blob: String,
        blkaddr: u32,
        nblocks: u32,
        why: String,
    },
    #[error("no source for device {0} (blob {1})")]
    NoDevice(u16, String),
    #[error("chunk table: {0}")]
    ChunkTable(String),
}

impl Error {
    pub(crate) fn corrupt(nid: u64, what: impl Into<String>) -> Self {
        Error::Corrupt {
            nid,
            what: what.into(),
        }
    }
}

/// Errors building an image from sources.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{layer}: entry {entry:?}: {why}")]
    BadEntry {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("{layer}: entry {entry:?}: unsafe path: {why}")]
    UnsafePath {
        layer: String,
        entry: String,
        why: String,
    },
    #[error("{layer}: digest {actual} does not match the expected {expected}")]
    Digest {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("image limit exceeded: {0}")]
    Limit(String),
    #[error("reuse image {path}: {source}")]
    Reuse {
        path: PathBuf,
        #[source]
        source: Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Map an I/O error on `path` to [`BuildError::Io`] (for `map_err`).
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    }
}
