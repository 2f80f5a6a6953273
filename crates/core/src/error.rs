use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{what} {path}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {what} {value:?}: {why}")]
    InvalidName {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("fsid {fsid} is already bound in {domain}")]
    Exists { domain: String, fsid: String },
    #[error("fsid {fsid} is not bound in {domain}")]
    NotBound { domain: String, fsid: String },
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: erofs::Error,
    },
    #[error("image {path}: {why}")]
    Unusable { path: PathBuf, why: String },
    #[error("blob {blob} bytes {offset}+{len}: {why}")]
    Fetch {
        blob: String,
        offset: u64,
        len: u64,
        why: String,
    },
    /// A chunk another reader was fetching did not arrive.
    #[error("blob {blob} bytes {offset}+{len}: {source}")]
    Flight {
        blob: String,
        offset: u64,
        len: u64,
        #[source]
        source: FlightError,
    },
    #[error(transparent)]
    Remote(#[from] crate::remote::RemoteError),
    #[error("state file {path}: {why}")]
    State { path: PathBuf, why: String },
}

impl CoreError {
    /// The errno a frontend answers the kernel with.
    pub fn errno(&self) -> i32 {
        match self {
            CoreError::Exists { .. } => 17,      // EEXIST
            CoreError::NotBound { .. } => 2,     // ENOENT
            CoreError::InvalidName { .. } => 22, // EINVAL
            _ => 5,                              // EIO
        }
    }
}

/// Why a reader that waited on another's fetch of a chunk (single flight,
/// see [`crate::cache`]) did not get it: typed, so a waiter can tell a
/// failed fetch from one that was dropped or is stuck.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FlightError {
    /// The leader's fetch failed; `cause` is its error.
    #[error("{cause}")]
    Failed { cause: String },
    /// The leader gave up its claim before completing it (a panic, an
    /// early return).
    #[error("the fetch was abandoned")]
    Abandoned,
    /// The leader did not finish within the bound a fetch may take.
    #[error("the fetch in flight took longer than {} s", .after.as_secs())]
    TimedOut { after: Duration },
}
