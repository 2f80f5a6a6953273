use shoal_registry::RemoteError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A reference that does not parse, or names nothing usable.
    #[error("{reference}: {why}")]
    Reference { reference: String, why: String },
    /// The source image is not one shoal can convert.
    #[error("{reference}: {why}")]
    Source { reference: String, why: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] erofs::BuildError),
    #[error("image {path}: {source}")]
    Image {
        path: PathBuf,
        #[source]
        source: erofs::Error,
    },
}

impl ConvertError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ConvertError::Io { what, path, source }
    }
}
