/// A failed exchange with a remote, named by URL. The split decides what a
/// caller retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// Worth retrying: connection refused or reset, timeout, 5xx, short body.
    #[error("{url}: {why}")]
    Transient { url: String, why: String },
    /// Not worth retrying: 404, auth refused, malformed URL or reply.
    #[error("{url}: {why}")]
    Permanent { url: String, why: String },
}

impl RemoteError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RemoteError::Transient { .. })
    }

    pub(crate) fn permanent(url: impl Into<String>, why: impl Into<String>) -> Self {
        RemoteError::Permanent {
            url: url.into(),
            why: why.into(),
        }
    }

    pub(crate) fn transient(url: impl Into<String>, why: impl Into<String>) -> Self {
        RemoteError::Transient {
            url: url.into(),
            why: why.into(),
        }
    }

    /// The same error with `what` said first.
    pub fn context(self, what: &str) -> Self {
        match self {
            RemoteError::Transient { url, why } => RemoteError::Transient {
                url,
                why: format!("{what}: {why}"),
            },
            RemoteError::Permanent { url, why } => RemoteError::Permanent {
                url,
                why: format!("{what}: {why}"),
            },
        }
    }

    /// Whether the registry answered 404 (the blob or manifest is missing).
    pub fn is_not_found(&self) -> bool {
        self.has_status(404)
    }

    /// Whether the reply had this HTTP status (as `classify` words it).
    pub fn has_status(&self, code: u16) -> bool {
        let (RemoteError::Transient { why, .. } | RemoteError::Permanent { why, .. }) = self;
        why.ends_with(&format!("HTTP status {code}"))
    }
}
