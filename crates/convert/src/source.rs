//! Where an image to convert comes from: a registry (`oci://…`) or a local
//! OCI layout (`oci-layout:DIR[:tag]`). Every manifest, config and layer is
//! checked against the digest that names it.

use crate::error::ConvertError;
use shoal_registry::manifest::{ManifestKind, MAX_MANIFEST_BYTES};
use shoal_registry::{
    BlobReader, Client, Descriptor, Digest, ImageConfig, Index, Manifest, Platform, Reference,
    Repository,
};
use std::io::Read;
use std::path::{Path, PathBuf};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A source reference as the command line gives it.
#[derive(Clone, Debug)]
pub enum SourceRef {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
}

impl SourceRef {
    pub fn parse(s: &str) -> Result<SourceRef, ConvertError> {
        let bad = |why: String| ConvertError::Reference {
            reference: s.into(),
            why,
        };
        if let Some(rest) = s.strip_prefix("oci-layout:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(bad("oci-layout: needs a directory".into()));
            }
            return Ok(SourceRef::Layout {
                dir: dir.into(),
                tag,
            });
        }
        Reference::parse(s).map(SourceRef::Registry).map_err(|e| {
            bad(format!(
                "{e} (want oci://host/repo:tag or oci-layout:DIR[:tag])"
            ))
        })
    }
}

enum Store {
    Registry(Repository),
    Layout(PathBuf),
}

/// A resolved source image: its manifest, config and layers.
pub struct SourceImage {
    pub reference: String,
    pub manifest: Manifest,
    pub manifest_digest: Digest,
    pub config: ImageConfig,
    store: Store,
}

impl SourceImage {
    pub fn open(
        src: &SourceRef,
        client: &Client,
        platform: &Platform,
    ) -> Result<SourceImage, ConvertError> {
        match src {
            SourceRef::Registry(r) => {
                let repo = client.repository(r);
                let (manifest, manifest_digest) = repo.resolve(platform)?;
                let config = repo.get_blob(&manifest.config, MAX_MANIFEST_BYTES)?;
                SourceImage::new(
                    r.to_string(),
                    manifest,
                    manifest_digest,
                    &config,
                    Store::Registry(repo),
                )
            }
            SourceRef::Layout { dir, tag } => open_layout(dir, tag.as_deref(), platform),
        }
    }

    fn new(
        reference: String,
        manifest: Manifest,
        manifest_digest: Digest,
        config: &[u8],
        store: Store,
    ) -> Result<SourceImage, ConvertError> {
        let config: ImageConfig =
            serde_json::from_slice(config).map_err(|e| ConvertError::Source {
                reference: reference.clone(),
                why: format!("image config {}: {e}", manifest.config.digest),
            })?;
        Ok(SourceImage {
            reference,
            manifest,
            manifest_digest,
            config,
            store,
        })
    }

    pub fn layers(&self) -> &[Descriptor] {
        &self.manifest.layers
    }

    /// A layer's bytes as stored (compressed or not), checked at their end.
    pub fn open_layer(&self, d: &Descriptor) -> Result<Box<dyn Read + Send>, ConvertError> {
        match &self.store {
            Store::Registry(repo) => Ok(Box::new(repo.blob_reader(d)?)),
            Store::Layout(dir) => {
                let path = blob_path(dir, &d.digest);
                let f =
                    std::fs::File::open(&path).map_err(ConvertError::io("opening layer", &path))?;
                Ok(Box::new(BlobReader::new(
                    Box::new(f),
                    d.clone(),
                    format!("oci-layout:{}", dir.display()),
                )))
            }
        }
    }
}

fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(d.hex())
}

/// A small blob of a layout, whole and verified.
fn layout_blob(dir: &Path, d: &Descriptor) -> Result<Vec<u8>, ConvertError> {
    let path = blob_path(dir, &d.digest);
    if d.size > MAX_MANIFEST_BYTES {
        return Err(ConvertError::Source {
            reference: format!("oci-layout:{}", dir.display()),
            why: format!(
                "{} declares {} bytes, more than {MAX_MANIFEST_BYTES}",
                d.digest, d.size
            ),
        });
    }
    let f = std::fs::File::open(&path).map_err(ConvertError::io("opening", &path))?;
    let mut r = BlobReader::new(
        Box::new(f),
        d.clone(),
        format!("oci-layout:{}", dir.display()),
    );
    let mut v = Vec::new();
    r.read_to_end(&mut v)
        .map_err(ConvertError::io("reading", &path))?;
    Ok(v)
}

fn open_layout(
    dir: &Path,
    tag: Option<&str>,
    platform: &Platform,
) -> Result<SourceImage, ConvertError> {
    let reference = match tag {
        Some(t) => format!("oci-layout:{}:{t}", dir.display()),
        None => format!("oci-layout:{}", dir.display()),
    };
    let bad = |why: String| ConvertError::Source {
        reference: reference.clone(),
        why,
    };
    let index_path = dir.join("index.json");
    let text = std::fs::read(&index_path).map_err(ConvertError::io("reading", &index_path))?;
    let index: Index =
        serde_json::from_slice(&text).map_err(|e| bad(format!("index.json: {e}")))?;
    let picked: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| tag.is_none() || d.annotations.get(REF_NAME).map(String::as_str) == tag)
        .collect();
    let mut desc = match picked.as_slice() {
        [one] => (*one).clone(),
        [] => {
            return Err(bad(format!(
                "no manifest tagged {:?} in index.json",
                tag.unwrap_or("")
            )))
        }
        _ => {
            return Err(bad(
                "index.json lists several manifests: name one with :tag".into(),
            ))
        }
    };
    for _ in 0..2 {
        let body = layout_blob(dir, &desc)?;
        match ManifestKind::parse(&body, Some(&desc.media_type)).map_err(&bad)? {
            ManifestKind::Image(m) => {
                let config = layout_blob(dir, &m.config)?;
                return SourceImage::new(
                    reference.clone(),
                    *m,
                    desc.digest.clone(),
                    &config,
                    Store::Layout(dir.into()),
                );
            }
            ManifestKind::Index(i) => {
                desc = i
                    .manifests
                    .iter()
                    .find(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(p)))
                    .ok_or_else(|| bad(format!("no manifest for platform {platform}")))?
                    .clone();
            }
        }
    }
    Err(bad("indexes nested too deep".into()))
}
