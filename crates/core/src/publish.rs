//! Bind by reference: resolve `oci://host/repo:tag` (an image manifest
//! made by `shoal convert` or `shoal push`, or an earlier shoal artifact)
//! and fetch its verified bootstrap into the work directory.

use crate::error::CoreError;
use crate::remote::{HttpOptions, RemoteError};
use crate::workdir::WorkDir;
use shoal_registry::{shoal, Client, Platform, Reference};
use std::path::PathBuf;

fn bad_ref(url: &str, why: String) -> CoreError {
    CoreError::Remote(RemoteError::Permanent {
        url: url.into(),
        why,
    })
}

/// Resolve `reference`, fetch and verify its bootstrap into
/// the work directory's bootstraps, and return (bootstrap path, remote URL).
pub fn pull_bootstrap(
    reference: &str,
    work: &WorkDir,
    http: &HttpOptions,
) -> Result<(PathBuf, String), CoreError> {
    let r = Reference::parse(reference).map_err(|e| bad_ref(reference, e))?;
    let repo = Client::shared(http).repository(&r);
    let (m, _) = repo.resolve(&Platform::host())?;
    let boot = shoal::find_bootstrap(&m).ok_or_else(|| {
        bad_ref(
            reference,
            "not a shoal image: no (single) shoal bootstrap layer; convert it with `shoal convert`"
                .into(),
        )
    })?;
    let dir = work.bootstraps();
    std::fs::create_dir_all(&dir).map_err(|source| CoreError::Io {
        path: dir.clone(),
        what: "creating".into(),
        source,
    })?;
    let path = dir.join(boot.digest.hex());
    if !path.exists() {
        let bytes = shoal::bootstrap_bytes(repo.get_blob(boot, shoal::MAX_BOOTSTRAP)?)
            .map_err(|why| bad_ref(reference, why))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| CoreError::Io {
                path: path.clone(),
                what: "storing bootstrap".into(),
                source,
            })?;
    }
    Ok((path, r.repository_url()))
}
