//! Publish an image to an OCI registry (`shoal push`) and pull its
//! bootstrap back by reference (bind by `oci://host/repo:tag`).
//!
//! The artifact: an OCI image manifest with artifactType
//! `application/vnd.shoal.image.v1`, an empty config, the bootstrap as its
//! first layer and each data blob (digest = its device tag) after it.

use crate::error::CoreError;
use crate::remote::oci::{
    Descriptor, Manifest, OciRef, OciRemote, ARTIFACT_TYPE, BLOB_MEDIA_TYPE, BOOTSTRAP_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
};
use crate::remote::{HttpOptions, RemoteError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, serde::Serialize)]
pub struct PushReport {
    pub reference: String,
    pub manifest_digest: String,
    pub uploaded_bytes: u64,
    pub skipped_blobs: usize,
}

fn bad_ref(url: &str, why: String) -> CoreError {
    CoreError::Remote(RemoteError::Permanent {
        url: url.into(),
        why,
    })
}

pub fn push(
    image: &Path,
    blob_dir: &Path,
    reference: &str,
    http: &HttpOptions,
) -> Result<PushReport, CoreError> {
    let r = OciRef::parse(reference).map_err(|e| bad_ref(reference, e))?;
    let tag = r
        .reference
        .clone()
        .ok_or_else(|| bad_ref(reference, "push needs a :tag".into()))?;
    let remote = OciRemote::new(r, http.clone())?;
    let io = |path: &Path, what: &str| {
        let path = path.to_path_buf();
        let what = what.to_string();
        move |source| CoreError::Io { path, what, source }
    };
    let boot = std::fs::read(image).map_err(io(image, "reading bootstrap"))?;
    let img = erofs::Image::open(boot.clone()).map_err(|source| CoreError::Image {
        path: image.into(),
        source,
    })?;
    let mut layers = Vec::new();
    let mut uploaded = 0u64;
    let mut skipped = 0usize;
    let boot_digest = format!("sha256:{}", hex::encode(Sha256::digest(&boot)));
    if remote.put_blob(&boot_digest, &boot)? {
        uploaded += boot.len() as u64;
    } else {
        skipped += 1;
    }
    layers.push(Descriptor {
        media_type: BOOTSTRAP_MEDIA_TYPE.into(),
        digest: boot_digest,
        size: boot.len() as u64,
        data: None,
    });
    for dev in 1..=img.devices.len() as u16 {
        let tag_name = img.device_tag(dev).ok_or_else(|| CoreError::Unusable {
            path: image.into(),
            why: format!("device {dev} has no tag"),
        })?;
        let path = blob_dir.join(&tag_name);
        let bytes = std::fs::read(&path).map_err(io(&path, "reading blob"))?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if digest != format!("sha256:{tag_name}") {
            return Err(CoreError::Unusable {
                path,
                why: format!("blob content is {digest}, not its name"),
            });
        }
        if remote.put_blob(&digest, &bytes)? {
            uploaded += bytes.len() as u64;
        } else {
            skipped += 1;
        }
        layers.push(Descriptor {
            media_type: BLOB_MEDIA_TYPE.into(),
            digest,
            size: bytes.len() as u64,
            data: None,
        });
    }
    let (config, data) = OciRemote::empty_config();
    remote.put_blob(&config.digest, data)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_MEDIA_TYPE.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config,
        layers,
    };
    let manifest_digest = remote.put_manifest(&tag, &manifest)?;
    Ok(PushReport {
        reference: reference.to_string(),
        manifest_digest,
        uploaded_bytes: uploaded,
        skipped_blobs: skipped,
    })
}

/// Resolve `reference`, fetch and verify its bootstrap into
/// `work_dir/bootstraps/`, and return (bootstrap path, remote URL).
pub fn pull_bootstrap(
    reference: &str,
    work_dir: &Path,
    http: &HttpOptions,
) -> Result<(PathBuf, String), CoreError> {
    let r = OciRef::parse(reference).map_err(|e| bad_ref(reference, e))?;
    let remote = OciRemote::new(r.clone(), http.clone())?;
    let (m, _) = remote.manifest()?;
    let boot = m
        .layers
        .iter()
        .find(|l| l.media_type == BOOTSTRAP_MEDIA_TYPE)
        .ok_or_else(|| bad_ref(reference, "manifest has no shoal bootstrap layer".into()))?;
    let hexd = boot
        .digest
        .strip_prefix("sha256:")
        .filter(|h| crate::names::check_blob(h).is_ok())
        .ok_or_else(|| bad_ref(reference, format!("bad bootstrap digest {}", boot.digest)))?;
    let dir = work_dir.join("bootstraps");
    std::fs::create_dir_all(&dir).map_err(|source| CoreError::Io {
        path: dir.clone(),
        what: "creating".into(),
        source,
    })?;
    let path = dir.join(hexd);
    if !path.exists() {
        let bytes = remote.get_blob(&boot.digest, 1 << 30)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| CoreError::Io {
                path: path.clone(),
                what: "storing bootstrap".into(),
                source,
            })?;
    }
    Ok((path, format!("oci://{}/{}", r.host, r.repo)))
}
