//! Publish a shoal image: its data blobs (skipped when the repository has
//! them, mounted from a sibling repository when one does), its bootstrap,
//! its config, and the manifest last, so a failed upload never leaves a
//! manifest naming missing blobs.

use crate::error::ConvertError;
use crate::progress::Progress;
use shoal_registry::manifest::{OCI_CONFIG, OCI_MANIFEST};
use shoal_registry::{shoal, Descriptor, Digest, ImageConfig, Reference, Repository, Upload};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where a blob's bytes are, if they must be sent.
pub enum BlobOrigin {
    /// A file of this machine.
    Local(PathBuf),
    /// Another registry repository (a chunk dictionary's blob).
    Registry(Repository),
    /// Bytes made for the push (the compressed bootstrap layer).
    Memory(std::sync::Arc<[u8]>),
}

pub struct PushBlob {
    pub digest: Digest,
    pub size: u64,
    pub origin: BlobOrigin,
    /// For a blob's compressed object (the frame table in the bootstrap
    /// says how it is read): the blob's tag, for the layer's annotation.
    pub compressed_blob: Option<String>,
}

pub struct PushRequest {
    pub bootstrap: PathBuf,
    pub fsid: Option<String>,
    pub blobs: Vec<PushBlob>,
    /// The image config; its `rootfs.diff_ids` are set to the layers here.
    pub config: ImageConfig,
    /// Repositories of the target registry that may hold the blobs.
    pub mount_from: Vec<String>,
}

impl PushRequest {
    /// A bootstrap on disk and its blobs in `blob_dir` (named by tag).
    pub fn for_image(
        image: &Path,
        blob_dir: &Path,
        config: ImageConfig,
    ) -> Result<PushRequest, ConvertError> {
        let f = std::fs::File::open(image).map_err(ConvertError::io("opening", image))?;
        let img = erofs::Image::open(f).map_err(|source| ConvertError::Image {
            path: image.into(),
            source,
        })?;
        let mut blobs = Vec::new();
        for dev in 1..=img.devices.len() as u16 {
            let unusable = |why: String| ConvertError::Source {
                reference: image.display().to_string(),
                why,
            };
            let tag = img
                .device_tag(dev)
                .ok_or_else(|| unusable(format!("device {dev} has no tag")))?;
            // A compressed blob travels as its object; the raw blob stays local.
            let object = img
                .chunk_table
                .as_ref()
                .and_then(|t| t.frames(dev))
                .map(|f| f.object_name());
            let name = object.clone().unwrap_or_else(|| tag.clone());
            let digest = Digest::from_hex(&name).map_err(unusable)?;
            let path = blob_dir.join(&name);
            let size = std::fs::metadata(&path)
                .map_err(ConvertError::io("reading blob", &path))?
                .len();
            blobs.push(PushBlob {
                digest,
                size,
                origin: BlobOrigin::Local(path),
                compressed_blob: object.map(|_| tag),
            });
        }
        let name = img.sb.volume_name;
        let fsid =
            String::from_utf8_lossy(&name[..name.iter().position(|&b| b == 0).unwrap_or(16)])
                .into_owned();
        Ok(PushRequest {
            bootstrap: image.into(),
            fsid: Some(fsid).filter(|f| !f.is_empty()),
            blobs,
            config,
            mount_from: Vec::new(),
        })
    }
}

#[derive(Debug, Default, serde::Serialize)]
pub struct PushReport {
    pub reference: String,
    pub manifest_digest: String,
    pub uploaded_bytes: u64,
    pub blobs_uploaded: usize,
    pub blobs_existing: usize,
    pub blobs_mounted: usize,
}

impl PushReport {
    fn count(&mut self, u: Upload, size: u64) {
        match u {
            Upload::Uploaded => {
                self.blobs_uploaded += 1;
                self.uploaded_bytes += size;
            }
            Upload::Exists => self.blobs_existing += 1,
            Upload::Mounted => self.blobs_mounted += 1,
        }
    }
}

fn open_file(
    path: PathBuf,
    bar: indicatif::ProgressBar,
) -> impl Fn() -> std::io::Result<(Box<dyn Read>, u64)> {
    move || {
        let named =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let f = std::fs::File::open(&path).map_err(named)?;
        let len = f.metadata()?.len();
        bar.set_position(0);
        Ok((Box::new(bar.wrap_read(f)), len))
    }
}

fn upload_one(
    dst: &Repository,
    b: &PushBlob,
    mount_from: &[String],
    progress: &Progress,
) -> Result<Upload, ConvertError> {
    let bar = progress.bytes(format!("push {}", &b.digest.hex()[..12]), b.size);
    let r = match &b.origin {
        BlobOrigin::Local(p) => {
            dst.upload_blob(&b.digest, mount_from, &open_file(p.clone(), bar.clone()))
        }
        BlobOrigin::Registry(src) => {
            let desc = Descriptor::new(shoal::BLOB_MEDIA_TYPE, b.digest.clone(), b.size);
            let open = || -> std::io::Result<(Box<dyn Read>, u64)> {
                let r = src.blob_reader(&desc).map_err(std::io::Error::other)?;
                Ok((Box::new(bar.wrap_read(r)), b.size))
            };
            dst.upload_blob(&b.digest, mount_from, &open)
        }
        BlobOrigin::Memory(bytes) => {
            let open = || -> std::io::Result<(Box<dyn Read>, u64)> {
                bar.set_position(0);
                let r = std::io::Cursor::new(bytes.clone());
                Ok((Box::new(bar.wrap_read(r)), bytes.len() as u64))
            };
            dst.upload_blob(&b.digest, mount_from, &open)
        }
    };
    bar.finish_and_clear();
    Ok(r?)
}

/// The config's history describes the source layers; the shoal image has
/// other layers. Keep the entries (what built the image) as empty layers
/// and add one per shoal layer, so non-empty entries and layers agree, as
/// Docker and containerd's tools expect.
fn restack_history(config: &mut ImageConfig, blobs: usize) {
    if config.history.is_empty() {
        return;
    }
    let created = config
        .history
        .iter()
        .rev()
        .find_map(|h| h.get("created").cloned());
    for h in &mut config.history {
        h.insert("empty_layer".into(), true.into());
    }
    let entries = (0..blobs)
        .map(|_| "shoal: data blob")
        .chain(["shoal: bootstrap"]);
    for what in entries {
        let mut h = serde_json::Map::new();
        if let Some(c) = &created {
            h.insert("created".into(), c.clone());
        }
        h.insert("created_by".into(), what.into());
        config.history.push(h);
    }
}

/// Push `req` to `dst` (which names a tag).
pub fn push_image(
    dst: &Repository,
    req: PushRequest,
    progress: &Progress,
) -> Result<PushReport, ConvertError> {
    let r: &Reference = dst.reference();
    let tag = r.tag.clone().ok_or_else(|| ConvertError::Reference {
        reference: r.to_string(),
        why: "the destination needs a :tag".into(),
    })?;
    let mut report = PushReport {
        reference: r.to_string(),
        ..Default::default()
    };
    let mut layers = Vec::new();
    for b in &req.blobs {
        let u = upload_one(dst, b, &req.mount_from, progress)?;
        report.count(u, b.size);
        let mut layer = shoal::blob_layer(b.digest.clone(), b.size);
        if let Some(tag) = &b.compressed_blob {
            layer
                .annotations
                .insert(shoal::COMPRESSED_BLOB_ANNOTATION.into(), tag.clone());
        }
        layers.push(layer);
    }
    let boot_bytes =
        std::fs::read(&req.bootstrap).map_err(ConvertError::io("reading", &req.bootstrap))?;
    // The layer is the bootstrap zstd-compressed; its diff ID the
    // bootstrap's own digest.
    let boot_id = Digest::of(&boot_bytes);
    let layer: std::sync::Arc<[u8]> = shoal::compress_bootstrap(&boot_bytes)
        .map_err(ConvertError::io("compressing", &req.bootstrap))?
        .into();
    let boot = PushBlob {
        digest: Digest::of(&layer),
        size: layer.len() as u64,
        origin: BlobOrigin::Memory(layer),
        compressed_blob: None,
    };
    report.count(
        upload_one(dst, &boot, &req.mount_from, progress)?,
        boot.size,
    );
    let mut config = req.config;
    restack_history(&mut config, layers.len());
    config.rootfs.kind = "layers".into();
    config.rootfs.diff_ids = layers
        .iter()
        .map(|l| l.digest.clone())
        .chain([boot_id])
        .collect();
    let config_bytes = serde_json::to_vec(&config).expect("configs serialize");
    let config_desc = Descriptor::new(
        OCI_CONFIG,
        Digest::of(&config_bytes),
        config_bytes.len() as u64,
    );
    let open = || -> std::io::Result<(Box<dyn Read>, u64)> {
        Ok((
            Box::new(std::io::Cursor::new(config_bytes.clone())),
            config_bytes.len() as u64,
        ))
    };
    report.count(
        dst.upload_blob(&config_desc.digest, &[], &open)?,
        config_desc.size,
    );
    let manifest = shoal::image_manifest(
        config_desc,
        layers,
        shoal::bootstrap_layer(boot.digest, boot.size, req.fsid.as_deref()),
    );
    let body = serde_json::to_vec(&manifest).expect("manifests serialize");
    report.manifest_digest = dst.put_manifest(&tag, OCI_MANIFEST, &body)?.to_string();
    Ok(report)
}
