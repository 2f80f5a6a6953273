//! Compressing an image's blobs for remotes: each blob becomes an object of
//! independent zstd frames ([`crate::frames`]) and the bootstrap gains the
//! frame table. The blobs themselves, and everything the kernel reads, stay
//! as they are: one pass over a finished image, shared by `build`,
//! `convert` and `push`.

use crate::chunktable::{ChunkTable, Trailer, TRAILER_SIZE};
use crate::error::{io_err, BuildError};
use crate::frames::{self, BlobFrames, FrameEntry, ALGORITHM_ZSTD, BLOCK};
use crate::reader::Image;
use crate::start::BlobStart;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use zerocopy::FromBytes;

/// How blobs are stored on remotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

impl Compression {
    /// What `zstd` without a level means: zstd's own default level.
    pub const ZSTD: Compression = Compression::Zstd { level: 3 };
}

impl std::str::FromStr for Compression {
    type Err = String;
    /// `none`, `zstd` or `zstd:LEVEL` (1–19).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "none" => Ok(Compression::None),
            None if s == "zstd" => Ok(Compression::ZSTD),
            Some(("zstd", l)) => match l.parse::<i32>() {
                Ok(level) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
                _ => Err(format!("zstd level {l:?}: want 1 to 19")),
            },
            _ => Err(format!("compression {s:?}: want none, zstd or zstd:LEVEL")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

/// How hard [`compress_image`] compresses each frame.
#[derive(Clone, Debug)]
pub struct Levels {
    /// Every frame's zstd level, but those below.
    pub level: i32,
    /// Blobs (tags) laid out for the image's recorded start (`--order`):
    /// their frames holding start blocks are compressed at `start`. Only
    /// these: a shared lower layer's object must be the same bytes in
    /// every image built on it, whatever each image's start.
    pub ordered: HashSet<String>,
    /// The level of recorded-start frames. Those bytes cross the wire
    /// before a lazy start can finish, at every cold start of the image,
    /// so they are worth the compressor's time at build: on the py
    /// corpus image level 18 stores them 16 % smaller than level 3 for
    /// about 0.3 s of CPU per MB, and zstd decompresses every level at
    /// the same speed. Never below `level`.
    pub start: i32,
}

/// The default [`Levels::start`]: level 19 stores no less than 18 here
/// and takes 40 % longer.
pub const START_LEVEL: i32 = 18;

impl Levels {
    /// Every frame at `level`.
    pub fn uniform(level: i32) -> Levels {
        Levels {
            level,
            ordered: HashSet::new(),
            start: level,
        }
    }

    /// Each frame's level, for the blob `tag` with the recorded start
    /// `start` (its block ranges, if the image has one for it).
    fn of_frames(&self, tag: &str, start: Option<&BlobStart>, plan: &[(u32, u32)]) -> Vec<i32> {
        let hot = |&(blkaddr, nblocks): &(u32, u32)| {
            let (b, e) = (u64::from(blkaddr), u64::from(blkaddr) + u64::from(nblocks));
            start.is_some_and(|s| {
                s.ranges
                    .iter()
                    .any(|r| u64::from(r.blkaddr.get()) < e && b < r.end())
            })
        };
        let start_level = self.start.max(self.level);
        let ordered = self.ordered.contains(tag);
        plan.iter()
            .map(|f| {
                if ordered && hot(f) {
                    start_level
                } else {
                    self.level
                }
            })
            .collect()
    }
}

/// One blob's remote object, as [`compress_image`] left it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ObjectReport {
    /// The blob (device slot tag).
    pub tag: String,
    /// The object's name on remotes (its sha256, hex).
    pub object: String,
    pub raw_bytes: u64,
    pub object_bytes: u64,
    pub frames: usize,
    /// Whether this pass wrote it (false: known from a reused image).
    pub written: bool,
}

/// Give every blob of the bootstrap `image` a compressed object in
/// `blob_dir` and return the bootstrap with the frame table. A blob whose
/// frames are in `known` (by tag, from an image it was reused from) keeps
/// them, so its object stays the one already published; a blob that is
/// not in `blob_dir` and not known stays uncompressed. Deterministic: the
/// frames are a function of the blob's bytes, its chunks, its recorded
/// start and the levels.
pub fn compress_image(
    image: &[u8],
    blob_dir: &Path,
    known: &HashMap<String, BlobFrames>,
    levels: &Levels,
    threads: usize,
) -> Result<(Vec<u8>, Vec<ObjectReport>), BuildError> {
    let bad = |why: String| BuildError::Invalid(format!("compressing blobs: {why}"));
    let img = Image::open(image).map_err(|e| bad(e.to_string()))?;
    let mut table = img
        .chunk_table
        .clone()
        .ok_or_else(|| bad("the image has no chunk table (not built by shoal)".into()))?;
    table.frames.clear();
    let mut reports = Vec::new();
    for dev in 1..=img.devices.len() as u16 {
        let tag = img
            .device_tag(dev)
            .ok_or_else(|| bad(format!("device {dev} has no tag")))?;
        let blocks = img.devices[usize::from(dev) - 1].blocks.get();
        let entries = table.entries(dev).unwrap_or(&[]).to_vec();
        let path = blob_dir.join(&tag);
        let (mut frames, written) = match known.get(&tag) {
            Some(f) => (f.clone(), false),
            None if path.is_file() => {
                let plan = frames::plan(&entries, blocks);
                let start = table.starts.iter().find(|s| s.device_id == dev);
                let levels = levels.of_frames(&tag, start, &plan);
                let frames = compress_blob(&path, blob_dir, &plan, &levels, threads)?;
                (frames, true)
            }
            None => continue,
        };
        frames.device_id = dev;
        reports.push(ObjectReport {
            tag,
            object: frames.object_name(),
            raw_bytes: u64::from(blocks) * BLOCK,
            object_bytes: frames.object_size,
            frames: frames.frames.len(),
            written,
        });
        table.frames.push(frames);
    }
    let trailer = Trailer::read_from_bytes(&image[image.len() - TRAILER_SIZE as usize..])
        .map_err(|_| bad("no trailer".into()))?;
    let offset = trailer.table_offset.get();
    let mut out = image[..offset as usize].to_vec();
    out.extend_from_slice(&table.encode(offset));
    // What was written must read back: the reader's checks are the format.
    Image::open(out.as_slice())
        .map_err(|e| bad(format!("the frame table does not read back: {e}")))?;
    Ok((out, reports))
}

/// Compress one blob file into an object of the frames `plan` (block
/// ranges, see [`frames::plan`]) in `dir`, named by its sha256, each frame
/// at its level in `levels`. Frames are compressed `threads` at a time in
/// batches, written in order: memory stays at a few frames per thread
/// whatever the blob's size.
pub fn compress_blob(
    blob: &Path,
    dir: &Path,
    plan: &[(u32, u32)],
    levels: &[i32],
    threads: usize,
) -> Result<BlobFrames, BuildError> {
    assert_eq!(plan.len(), levels.len(), "a level per frame");
    let src = File::open(blob).map_err(io_err(blob))?;
    let tmp = tempfile::Builder::new()
        .prefix(".object-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp.reopen().map_err(io_err(tmp.path()))?);
    let mut hash = Sha256::new();
    let mut out = Vec::with_capacity(plan.len());
    let mut coffset = 0u64;
    let batch = threads.max(1) * 4;
    for (group, levels) in plan.chunks(batch).zip(levels.chunks(batch)) {
        let compressed = compress_group(&src, blob, group, levels, threads)?;
        for (&(blkaddr, nblocks), c) in group.iter().zip(compressed) {
            w.write_all(&c).map_err(io_err(tmp.path()))?;
            hash.update(&c);
            out.push(FrameEntry {
                blkaddr: blkaddr.into(),
                nblocks: nblocks.into(),
                coffset: coffset.into(),
                clen: u32::try_from(c.len())
                    .map_err(|_| BuildError::Limit("a compressed frame exceeds 4 GiB".into()))?
                    .into(),
                reserved: 0.into(),
                sha256: Sha256::digest(&c).into(),
            });
            coffset += c.len() as u64;
        }
    }
    w.flush().map_err(io_err(tmp.path()))?;
    drop(w);
    let object_sha256: [u8; 32] = hash.finalize().into();
    crate::blob::publish(tmp, &dir.join(hex::encode(object_sha256)))?;
    Ok(BlobFrames {
        device_id: 0,
        algorithm: ALGORITHM_ZSTD,
        object_size: coffset,
        object_sha256,
        frames: out,
    })
}

/// Compress the frames of `group`, each at its level in `levels`, on up to
/// `threads` threads; results in the group's order.
fn compress_group(
    src: &File,
    path: &Path,
    group: &[(u32, u32)],
    levels: &[i32],
    threads: usize,
) -> Result<Vec<Vec<u8>>, BuildError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    type Slot = std::sync::Mutex<Option<Result<Vec<u8>, BuildError>>>;
    let results: Vec<Slot> = group.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, group.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(blkaddr, nblocks)) = group.get(i) else {
                    break;
                };
                let mut raw = vec![0u8; nblocks as usize * BLOCK as usize];
                let r = src
                    .read_exact_at(&mut raw, u64::from(blkaddr) * BLOCK)
                    .and_then(|_| frames::compress_frame(levels[i], &raw))
                    .map_err(io_err(path));
                *results[i].lock().unwrap() = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap().expect("every frame was compressed"))
        .collect()
}

/// The frames of every blob of the images in `table`, by tag, so that a
/// build reusing their blobs reuses their objects too.
pub fn known_frames(
    img: &Image<impl crate::reader::ReadAt>,
    table: &ChunkTable,
) -> HashMap<String, BlobFrames> {
    table
        .frames
        .iter()
        .filter_map(|f| Some((img.device_tag(f.device_id)?, f.clone())))
        .collect()
}
