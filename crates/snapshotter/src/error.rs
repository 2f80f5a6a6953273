/// Why a snapshot operation failed, in the terms containerd maps to its
/// errdefs (through gRPC status codes).
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("snapshot {0} not found")]
    NotFound(String),
    #[error("snapshot {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<SnapError> for tonic::Status {
    fn from(e: SnapError) -> tonic::Status {
        let msg = e.to_string();
        match e {
            SnapError::NotFound(_) => tonic::Status::not_found(msg),
            SnapError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            SnapError::Unavailable(_) => tonic::Status::unavailable(msg),
            SnapError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

impl SnapError {
    pub(crate) fn io(what: &str, e: std::io::Error) -> SnapError {
        SnapError::Internal(format!("{what}: {e}"))
    }
}
