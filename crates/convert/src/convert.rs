//! `shoal convert SRC DST`: an OCI image becomes a shoal image. Layers are
//! streamed from their source into the builder one after the other (never
//! unpacked to disk), one data blob per layer, so images on the same base
//! share its blob; chunk dictionaries let a new image reference chunks of
//! earlier ones in place.

use crate::error::ConvertError;
use crate::progress::Progress;
use crate::push::{push_image, BlobOrigin, PushBlob, PushRequest};
use crate::source::{SourceImage, SourceRef};
use erofs::{BuildOptions, Image, Source};
use shoal_registry::manifest::tar_layer_compression;
use shoal_registry::{shoal, Client, Digest, Platform, Reference, Repository};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub platform: Platform,
    pub chunk_size: u64,
    /// `oci://` references or bootstrap paths of earlier shoal images.
    pub chunk_dicts: Vec<String>,
    pub fsid: Option<String>,
    /// Keep the bootstrap (`DIR/image.boot`) and blobs (`DIR/blobs/`) here.
    pub output: Option<PathBuf>,
    pub max_size: Option<u64>,
    /// Write inode fingerprints (page-cache sharing on Linux 7.0+).
    pub fingerprints: bool,
    /// How the blobs are stored in the registry.
    pub compress: erofs::Compression,
    /// A read order for the top layer's blob (see `BuildOptions::order`).
    pub order: Option<PathBuf>,
    /// The zstd level of the recorded start's frames (`BuildOptions::start_level`).
    pub start_level: i32,
    pub progress: bool,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ConvertReport {
    pub source: String,
    pub source_manifest: String,
    pub reference: String,
    pub manifest_digest: String,
    pub layers: usize,
    /// Layer bytes as the source stores them (compressed).
    pub source_bytes: u64,
    pub blobs: usize,
    pub blob_bytes: u64,
    /// What the blobs take in the registry (compressed objects or blobs).
    pub remote_bytes: u64,
    pub bootstrap_bytes: u64,
    pub chunks: u64,
    pub chunks_reused: u64,
    pub chunks_deduped: u64,
    pub uploaded_bytes: u64,
    pub blobs_uploaded: usize,
    pub blobs_existing: usize,
    pub blobs_mounted: usize,
    pub seconds: f64,
}

/// A chunk dictionary: a bootstrap on disk, and where its blobs are.
struct Dict {
    bootstrap: PathBuf,
    /// The registry repository holding its blobs, if it came from one.
    repo: Option<Repository>,
    /// Directories that may hold its blobs, if it is local.
    dirs: Vec<PathBuf>,
}

fn load_dict(
    spec: &str,
    client: &Client,
    work: &Path,
    platform: &Platform,
) -> Result<Dict, ConvertError> {
    if !spec.starts_with("oci://") {
        let p = PathBuf::from(spec);
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        return Ok(Dict {
            bootstrap: p,
            repo: None,
            dirs: vec![parent.join("blobs"), parent],
        });
    }
    let r = Reference::parse(spec).map_err(|why| ConvertError::Reference {
        reference: spec.into(),
        why,
    })?;
    let repo = client.repository(&r);
    let (m, _) = repo.resolve(platform)?;
    let boot = shoal::find_bootstrap(&m).ok_or_else(|| ConvertError::Source {
        reference: spec.into(),
        why: "not a shoal image (no bootstrap layer), so not a chunk dictionary".into(),
    })?;
    let bytes =
        shoal::bootstrap_bytes(repo.get_blob(boot, shoal::MAX_BOOTSTRAP)?).map_err(|why| {
            ConvertError::Source {
                reference: spec.into(),
                why,
            }
        })?;
    let path = work.join(format!("dict-{}.boot", boot.digest.hex()));
    std::fs::write(&path, bytes).map_err(ConvertError::io("writing", &path))?;
    Ok(Dict {
        bootstrap: path,
        repo: Some(repo),
        dirs: Vec::new(),
    })
}

/// Refuse what cannot be converted before anything is built or pushed.
fn check_source(img: &SourceImage) -> Result<(), ConvertError> {
    let bad = |why: String| ConvertError::Source {
        reference: img.reference.clone(),
        why,
    };
    for (i, l) in img.layers().iter().enumerate() {
        if shoal::is_shoal_layer(l) {
            return Err(bad("already a shoal image".into()));
        }
        if tar_layer_compression(&l.media_type).is_none() {
            return Err(bad(format!(
                "layer {i} ({}) has media type {:?}, which shoal cannot read (want an OCI or Docker tar layer: plain, gzip or zstd)",
                l.digest, l.media_type
            )));
        }
    }
    let (ids, layers) = (img.config.rootfs.diff_ids.len(), img.layers().len());
    if ids != layers {
        return Err(bad(format!(
            "its config lists {ids} diff_ids for {layers} layers"
        )));
    }
    if layers == 0 {
        return Err(bad("the image has no layers".into()));
    }
    Ok(())
}

/// The stream of the layer being applied, shared with the converter so
/// that after a failed build it can read the rest and tell corruption
/// (a digest mismatch) from a bad layer.
type Current = Arc<Mutex<Option<(String, Box<dyn Read + Send>)>>>;

/// The builder's sources: each layer streamed when its turn comes.
fn layer_sources(img: &Arc<SourceImage>, progress: &Progress, current: &Current) -> Vec<Source> {
    let n = img.layers().len();
    (0..n)
        .map(|i| {
            let d = img.layers()[i].clone();
            let name = format!("layer {}/{n} ({}) of {}", i + 1, d.digest, img.reference);
            let bar = progress.bytes(format!("pull {}", &d.digest.hex()[..12]), d.size);
            let (img, current, what) = (img.clone(), current.clone(), name.clone());
            let open: erofs::build::OpenLayer = Box::new(move || {
                let r = img.open_layer(&d).map_err(std::io::Error::other)?;
                let r: Box<dyn Read + Send> = Box::new(Finishing {
                    inner: bar.wrap_read(r),
                    bar,
                });
                *current.lock().unwrap() = Some((what, r));
                Ok(Box::new(SharedRead(current)) as Box<dyn Read>)
            });
            Source::Stream { name, open }
        })
        .collect()
}

struct SharedRead(Current);

impl Read for SharedRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap().as_mut() {
            Some((_, r)) => r.read(buf),
            None => Ok(0),
        }
    }
}

/// After a failed build: if the layer being read does not match its
/// digest, that is the error to report (its bytes were corrupt), not what
/// the builder made of them.
fn blame_corruption(current: &Current, e: erofs::BuildError) -> ConvertError {
    let Some((name, mut r)) = current.lock().unwrap().take() else {
        return e.into();
    };
    match std::io::copy(&mut r, &mut std::io::sink()) {
        Err(io) if io.kind() == std::io::ErrorKind::InvalidData => ConvertError::Source {
            reference: name,
            why: io.to_string(),
        },
        _ => e.into(),
    }
}

/// Clears its progress bar once the stream has ended.
struct Finishing<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Finishing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.bar.finish_and_clear();
        }
        Ok(n)
    }
}

/// Where each blob of the built image is: this build's blob directory or
/// a chunk dictionary's home.
fn blob_origins(
    report: &erofs::BuildReport,
    blob_dir: &Path,
    dicts: &[Dict],
) -> Result<Vec<PushBlob>, ConvertError> {
    let mut homes: HashMap<String, &Dict> = HashMap::new();
    for d in dicts {
        let f =
            std::fs::File::open(&d.bootstrap).map_err(ConvertError::io("opening", &d.bootstrap))?;
        let img = Image::open(f).map_err(|source| ConvertError::Image {
            path: d.bootstrap.clone(),
            source,
        })?;
        for dev in 1..=img.devices.len() as u16 {
            if let Some(tag) = img.device_tag(dev) {
                homes.entry(tag).or_insert(d);
            }
        }
    }
    let mut out = Vec::new();
    for b in &report.blobs {
        // A compressed blob travels as its object (named by its own digest).
        let object = report.objects.iter().find(|o| o.tag == b.tag);
        let (name, size, written) = match object {
            Some(o) => (&o.object, o.object_bytes, o.written),
            None => (&b.tag, b.bytes, b.written),
        };
        let digest = Digest::from_hex(name).map_err(|why| ConvertError::Source {
            reference: name.clone(),
            why,
        })?;
        let origin = if written {
            BlobOrigin::Local(blob_dir.join(name))
        } else {
            let d = homes[&b.tag];
            match (
                &d.repo,
                d.dirs.iter().map(|p| p.join(name)).find(|p| p.exists()),
            ) {
                (Some(repo), _) => BlobOrigin::Registry(repo.clone()),
                (None, Some(p)) => BlobOrigin::Local(p),
                // Not local: the destination must have it (checked at push).
                (None, None) => BlobOrigin::Local(d.dirs[0].join(name)),
            }
        };
        out.push(PushBlob {
            digest,
            size,
            origin,
            compressed_blob: object.map(|_| b.tag.clone()),
        });
    }
    Ok(out)
}

/// `output`, or a temporary directory (removed when the guard drops).
fn work_dir(output: Option<&Path>) -> Result<(PathBuf, Option<tempfile::TempDir>), ConvertError> {
    let (work, tmp) = match output {
        Some(d) => (d.to_path_buf(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("shoal-convert-")
                .tempdir()
                .map_err(ConvertError::io(
                    "creating a work directory in",
                    std::env::temp_dir(),
                ))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    std::fs::create_dir_all(&work).map_err(ConvertError::io("creating", &work))?;
    Ok((work, tmp))
}

pub fn convert(
    client: &Client,
    src: &SourceRef,
    dst: &Reference,
    opts: &ConvertOptions,
) -> Result<ConvertReport, ConvertError> {
    let t0 = Instant::now();
    if dst.tag.is_none() || dst.digest.is_some() {
        return Err(ConvertError::Reference {
            reference: dst.to_string(),
            why: "the destination must name a tag (and no digest)".into(),
        });
    }
    let progress = Progress::new(opts.progress);
    let img = Arc::new(SourceImage::open(src, client, &opts.platform)?);
    check_source(&img)?;
    let (work, _tmp) = work_dir(opts.output.as_deref())?;
    let dicts = opts
        .chunk_dicts
        .iter()
        .map(|s| load_dict(s, client, &work, &opts.platform))
        .collect::<Result<Vec<_>, _>>()?;
    let (blob_dir, bootstrap) = (work.join("blobs"), work.join("image.boot"));
    let bopts = BuildOptions {
        chunk_size: opts.chunk_size,
        layer_blobs: true,
        reuse: dicts.iter().map(|d| d.bootstrap.clone()).collect(),
        fsid: opts.fsid.clone(),
        source_date_epoch: std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse().ok()),
        max_size: opts.max_size,
        fingerprints: opts.fingerprints,
        compress: opts.compress,
        order: opts.order.clone(),
        start_level: opts.start_level,
        ..BuildOptions::default()
    };
    let current = Current::default();
    let sources = layer_sources(&img, &progress, &current);
    let built = erofs::build_sources(sources, &blob_dir, &bootstrap, &bopts)
        .map_err(|e| blame_corruption(&current, e))?;
    let blobs = blob_origins(&built, &blob_dir, &dicts)?;
    let remote_bytes: u64 = blobs.iter().map(|b| b.size).sum();
    let mount_from: Vec<String> = dicts
        .iter()
        .filter_map(|d| d.repo.as_ref())
        .filter(|r| r.reference().host == dst.host)
        .map(|r| r.reference().repo.clone())
        .collect();
    let req = PushRequest {
        bootstrap: bootstrap.clone(),
        fsid: opts.fsid.clone(),
        blobs,
        config: img.config.clone(),
        mount_from,
    };
    let pushed = push_image(&client.repository(dst), req, &progress)?;
    Ok(ConvertReport {
        source: img.reference.clone(),
        source_manifest: img.manifest_digest.to_string(),
        reference: pushed.reference,
        manifest_digest: pushed.manifest_digest,
        layers: img.layers().len(),
        source_bytes: img.layers().iter().map(|l| l.size).sum(),
        blobs: built.blobs.len(),
        blob_bytes: built.blobs.iter().map(|b| b.bytes).sum(),
        remote_bytes,
        bootstrap_bytes: built.bootstrap_bytes,
        chunks: built.stats.chunks,
        chunks_reused: built.stats.chunks_reused,
        chunks_deduped: built.stats.chunks_deduped,
        uploaded_bytes: pushed.uploaded_bytes,
        blobs_uploaded: pushed.blobs_uploaded,
        blobs_existing: pushed.blobs_existing,
        blobs_mounted: pushed.blobs_mounted,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
