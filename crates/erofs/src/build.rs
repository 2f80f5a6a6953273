//! `build`: sources → tree + blobs → bootstrap, written atomically.

use crate::blob::{ChunkStore, FinalBlob, Placement, StoreStats};
use crate::compress::{compress_image, known_frames, Compression, Levels, ObjectReport};
use crate::error::BuildError;
use crate::frames::BlobFrames;
use crate::ingest::{apply_dir, apply_tar, apply_tar_stream};
use crate::reader::Image;
use crate::start::{BlobStart, StartBuilder};
use crate::tree::{Data, Tree};
use crate::writer::{write_image, WriteOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub chunk_size: u64,
    /// One blob per source layer, so images sharing base layers share blobs.
    pub layer_blobs: bool,
    /// Bootstraps (or directories of them) whose blobs' chunks are reused.
    pub reuse: Vec<PathBuf>,
    /// Recorded in the superblock's volume name (at most 16 bytes).
    pub fsid: Option<String>,
    /// `SOURCE_DATE_EPOCH`: the superblock time; otherwise derived from the tree.
    pub source_date_epoch: Option<u64>,
    /// The most file data (logical bytes, holes included) the image may
    /// hold; `None` for no limit.
    pub max_size: Option<u64>,
    /// Write inode content fingerprints for page-cache sharing.
    pub fingerprints: bool,
    /// How blobs are stored on remotes: with zstd, each blob also gets a
    /// compressed object in the blob directory and the bootstrap a frame
    /// table (see [`crate::compress`]).
    pub compress: Compression,
    /// Threads compressing frames.
    pub threads: usize,
    /// A read order for the top layer's blob: a file of absolute paths,
    /// one per line, most wanted first (see [`read_order`]).
    pub order: Option<PathBuf>,
    /// The zstd level of the frames holding the recorded start of the
    /// blob `order` lays out (see [`Levels::start`]).
    pub start_level: i32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            chunk_size: 1 << 20,
            layer_blobs: false,
            reuse: Vec::new(),
            fsid: None,
            source_date_epoch: None,
            max_size: None,
            fingerprints: true,
            compress: Compression::None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            order: None,
            start_level: crate::compress::START_LEVEL,
        }
    }
}

#[derive(Debug, serde::Serialize)]
pub struct BuildReport {
    pub bootstrap_bytes: u64,
    pub inodes: u64,
    pub blobs: Vec<BlobReport>,
    /// The blobs' compressed objects (empty without compression).
    pub objects: Vec<ObjectReport>,
    pub stats: StoreStats,
}

#[derive(Debug, serde::Serialize)]
pub struct BlobReport {
    pub tag: String,
    pub bytes: u64,
    pub chunks: usize,
    pub written: bool,
}

/// Load the chunks (and compressed objects, into `known`) of the blobs of
/// the image(s) at `path`.
fn load_reuse(
    store: &mut ChunkStore,
    known: &mut HashMap<String, BlobFrames>,
    path: &Path,
) -> Result<(), BuildError> {
    let reuse_err = |source| BuildError::Reuse {
        path: path.into(),
        source,
    };
    let io_err = |source| BuildError::Io {
        path: path.into(),
        source,
    };
    let mut add = |p: &Path, must: bool| -> Result<(), BuildError> {
        let f = std::fs::File::open(p).map_err(io_err)?;
        match Image::open(f) {
            Ok(img) => match &img.chunk_table {
                Some(t) => {
                    for (dev, entries) in &t.blobs {
                        let tag = img.device_tag(*dev).ok_or_else(|| {
                            reuse_err(crate::Error::ChunkTable(format!("device {dev} has no tag")))
                        })?;
                        let blocks = img.devices[usize::from(*dev) - 1].blocks.get();
                        store.add_dictionary(&tag, blocks, entries);
                    }
                    known.extend(known_frames(&img, t));
                    Ok(())
                }
                None if must => Err(reuse_err(crate::Error::ChunkTable(
                    "image has no chunk table (not built by shoal)".into(),
                ))),
                None => Ok(()),
            },
            Err(e) if must => Err(reuse_err(e)),
            Err(_) => Ok(()),
        }
    };
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            add(&f, false)?;
        }
        Ok(())
    } else {
        add(path, true)
    }
}

/// Opens a streamed tar layer when its turn comes.
pub type OpenLayer = Box<dyn FnOnce() -> std::io::Result<Box<dyn std::io::Read>>>;

/// One source of a build, applied in order.
pub enum Source {
    /// A directory, or a tar layer file (plain, gzip or zstd).
    Path(PathBuf),
    /// A tar layer read from a stream (a registry, say), opened only when
    /// the layers below it are applied; `name` names it in errors.
    Stream { name: String, open: OpenLayer },
}

/// Build a bootstrap at `output` from `sources` (directories or tar
/// layers, applied in order), writing new blobs into `blob_dir`.
pub fn build(
    sources: &[PathBuf],
    blob_dir: &Path,
    output: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    let sources = sources.iter().cloned().map(Source::Path).collect();
    build_sources(sources, blob_dir, output, opts)
}

/// [`build`] from paths and streams alike.
pub fn build_sources(
    sources: Vec<Source>,
    blob_dir: &Path,
    output: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport, BuildError> {
    if sources.is_empty() {
        return Err(BuildError::Invalid("no sources".into()));
    }
    let mut store = ChunkStore::new(blob_dir, opts.chunk_size)?;
    store.set_max_bytes(opts.max_size);
    let mut known = HashMap::new();
    for r in &opts.reuse {
        load_reuse(&mut store, &mut known, r)?;
    }
    let order = opts.order.as_deref().map(read_order).transpose()?;
    let mut tree = Tree::new();
    let last = sources.len() - 1;
    for (i, src) in sources.into_iter().enumerate() {
        if opts.layer_blobs {
            store.next_blob();
        }
        // Only the top layer is ordered: lower layers are the shared ones.
        if i == last {
            store.set_order(order.clone());
        }
        apply_source(&mut tree, &mut store, src)?;
    }
    let stats = store.stats.clone();
    let (blobs, placement) = store.finish(&tree, opts.layer_blobs)?;
    let wopts = WriteOptions {
        chunk_size: opts.chunk_size,
        build_time: opts.source_date_epoch.map(|t| (t, 0)),
        volume_name: opts.fsid.clone().unwrap_or_default().into_bytes(),
        fingerprints: opts.fingerprints,
        starts: order
            .as_ref()
            .map(|o| recorded_start(&tree, &blobs, &placement, o))
            .unwrap_or_default(),
    };
    let mut img = write_image(&tree, &blobs, &placement, &wopts)?;
    let mut objects = Vec::new();
    if let Compression::Zstd { level } = opts.compress {
        let levels = Levels {
            level,
            ordered: blobs
                .iter()
                .filter(|b| b.ordered)
                .map(|b| b.tag.clone())
                .collect(),
            start: opts.start_level,
        };
        (img, objects) = compress_image(&img, blob_dir, &known, &levels, opts.threads)?;
    }
    write_atomic(output, &img)?;
    Ok(BuildReport {
        bootstrap_bytes: img.len() as u64,
        inodes: tree.reachable().len() as u64,
        blobs: blobs.iter().map(blob_report).collect(),
        objects,
        stats,
    })
}

/// The recorded start: the blocks of every blob that the files of `order`
/// use, first file first (see [`crate::start`]). Paths resolve as the
/// program that opened them saw them; those not in the image are skipped.
fn recorded_start(
    tree: &Tree,
    blobs: &[FinalBlob],
    placement: &Placement,
    order: &HashMap<Vec<u8>, u32>,
) -> Vec<BlobStart> {
    let mut paths: Vec<(u32, &[u8])> = order.iter().map(|(p, &r)| (r, p.as_slice())).collect();
    paths.sort();
    let mut start = StartBuilder::default();
    for (_, path) in paths {
        let Some(id) = tree.resolve(path) else {
            continue;
        };
        let Data::File { chunks, .. } = &tree.nodes[id].data else {
            continue;
        };
        for r in chunks.iter().flatten() {
            let (dev, blk) = placement.get(*r);
            let entries = &blobs[usize::from(dev) - 1].entries;
            if let Ok(i) = entries.binary_search_by_key(&blk, |e| e.blkaddr.get()) {
                start.push(dev, &entries[i]);
            }
        }
    }
    start.finish()
}

/// Read an order file: absolute paths, one per line (a recorded access
/// order, see `shoal order`); blank lines and `#` comments are skipped.
/// Returns path → rank (first mention wins).
pub fn read_order(path: &Path) -> Result<HashMap<Vec<u8>, u32>, BuildError> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = std::fs::read(path).map_err(|source| BuildError::Io {
        path: path.into(),
        source,
    })?;
    let mut out = HashMap::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        if !line.starts_with(b"/") {
            return Err(BuildError::Invalid(format!(
                "{} line {}: {:?} is not an absolute path",
                path.display(),
                n + 1,
                std::ffi::OsStr::from_bytes(line)
            )));
        }
        let rank = out.len() as u32;
        out.entry(line.to_vec()).or_insert(rank);
    }
    Ok(out)
}

fn apply_source(tree: &mut Tree, store: &mut ChunkStore, src: Source) -> Result<(), BuildError> {
    match src {
        Source::Path(p) => {
            let md = std::fs::metadata(&p).map_err(|source| BuildError::Io {
                path: p.clone(),
                source,
            })?;
            if md.is_dir() {
                apply_dir(tree, store, &p)
            } else {
                apply_tar(tree, store, &p)
            }
        }
        Source::Stream { name, open } => {
            let r = open().map_err(|source| BuildError::Io {
                path: name.clone().into(),
                source,
            })?;
            apply_tar_stream(tree, store, &name, r, None)
        }
    }
}

fn blob_report(b: &FinalBlob) -> BlobReport {
    BlobReport {
        tag: b.tag.clone(),
        bytes: u64::from(b.blocks) * 4096,
        chunks: b.entries.len(),
        written: b.written,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let io_err = |source| BuildError::Io {
        path: path.into(),
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bootstrap-")
        .tempfile_in(dir)
        .map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}
