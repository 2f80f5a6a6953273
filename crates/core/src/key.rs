//! Who an image is and where it is bound: the domain key and the bind
//! spec. A leaf module (only names and errors below it) so that the domain
//! registry and bound images can both name them without importing each
//! other.

use crate::error::CoreError;
use crate::names::check_id;
use std::path::PathBuf;

/// Which volume an image lives in.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum DomainKey {
    Shared(String),
    /// No domain: a volume of the image's own, keyed by its fsid.
    Private(String),
}

impl DomainKey {
    pub fn new(domain: Option<&str>, fsid: &str) -> Result<Self, CoreError> {
        check_id("fsid", fsid)?;
        match domain {
            Some(d) => {
                check_id("domain id", d)?;
                Ok(DomainKey::Shared(d.to_string()))
            }
            None => Ok(DomainKey::Private(fsid.to_string())),
        }
    }

    /// The cachefiles volume key the kernel uses.
    pub fn volume_key(&self) -> String {
        match self {
            DomainKey::Shared(d) | DomainKey::Private(d) => format!("erofs,{d}"),
        }
    }

    pub fn domain_id(&self) -> Option<&str> {
        match self {
            DomainKey::Shared(d) => Some(d),
            DomainKey::Private(_) => None,
        }
    }
}

impl std::fmt::Display for DomainKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainKey::Shared(d) => write!(f, "domain {d}"),
            DomainKey::Private(fsid) => write!(f, "the private volume of {fsid}"),
        }
    }
}

/// What an image is bound from; persisted so a restarted daemon rebinds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BindSpec {
    pub domain: Option<String>,
    pub fsid: String,
    pub bootstrap: PathBuf,
    pub remote: String,
    /// The `oci://` reference the bootstrap was pulled from, if any.
    #[serde(default)]
    pub reference: Option<String>,
}
