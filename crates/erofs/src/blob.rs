//! Content-addressed data blobs and the chunk dictionary of a build.
//!
//! Each chunk of file data is stored once per build (keyed by the sha256 of
//! its block-padded bytes), appended block-aligned to the current blob.
//! Chunks already present in blobs of earlier images (`--reuse-blobs`) are
//! referenced in place, never written again. All-zero chunks become holes.

use crate::chunktable::ChunkEntry;
use crate::error::{io_err, BuildError};
use crate::spool::Spool;
use crate::tree::{ChunkRef, Data, Tree};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const BLOCK_SIZE: u64 = 4096;

enum Body {
    /// A blob of an earlier image: only referenced.
    Reused,
    /// A blob this build writes (chunks are appended in arrival order, the
    /// blob's tag hashed as they are); `None` until its first chunk arrives.
    New { file: Option<Spool> },
}

struct Draft {
    body: Body,
    /// Hex sha256 for reused blobs; computed at `finish` for new ones.
    tag: Option<String>,
    blocks: u32,
    entries: Vec<ChunkEntry>,
    /// For new blobs, where each entry came from (parallel to `entries`).
    origins: Vec<Origin>,
    /// Holds chunks of a layer given a read order (`set_order`), which
    /// lead its layout.
    ordered: bool,
}

/// The file (of the layer that introduced it) a chunk was first stored
/// for: blobs are laid out by it, in the order a reader is likely to ask
/// for them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Origin {
    /// Position in the `--order` file, `u32::MAX` for files it does not list.
    rank: u32,
    /// Path components: sorting them sorts files as a depth-first walk of
    /// directories listed in the kernel's order (bytewise) meets them.
    path: std::sync::Arc<[Vec<u8>]>,
    /// Chunk index within the file.
    index: u32,
}

/// A blob as the finished image references it.
#[derive(Clone, Debug)]
pub struct FinalBlob {
    pub tag: String,
    pub blocks: u32,
    /// Whether this build wrote it (false: reused from an earlier image).
    pub written: bool,
    /// Laid out by a read order given for its layer: its recorded start is
    /// its own, at its beginning (see [`crate::compress::Levels`]).
    pub ordered: bool,
    pub entries: Vec<ChunkEntry>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StoreStats {
    /// File bytes seen (logical sizes of all chunks, holes included).
    pub bytes_in: u64,
    /// Bytes written to new blobs (block-padded).
    pub bytes_written: u64,
    pub chunks: u64,
    pub chunks_deduped: u64,
    pub chunks_reused: u64,
    pub holes: u64,
}

pub struct ChunkStore {
    chunk_size: u64,
    blob_dir: PathBuf,
    blobs: Vec<Draft>,
    current: Option<u32>,
    dict: HashMap<[u8; 32], (u32, u32)>,
    scratch: Vec<u8>,
    max_bytes: Option<u64>,
    /// The file whose chunks arrive now, and how many it has had.
    file: Origin,
    /// Read order given for the layer being applied: path → rank.
    order: Option<HashMap<Vec<u8>, u32>>,
    pub stats: StoreStats,
}

/// Maps build-local chunk references to (device id, block address).
pub struct Placement {
    map: HashMap<(u32, u32), (u16, u32)>,
}

impl Placement {
    pub fn get(&self, r: ChunkRef) -> (u16, u32) {
        self.map[&(r.blob, r.blkaddr)]
    }
}

impl ChunkStore {
    pub fn new(blob_dir: &Path, chunk_size: u64) -> Result<Self, BuildError> {
        if !chunk_size.is_power_of_two() || !(BLOCK_SIZE..=1 << 30).contains(&chunk_size) {
            return Err(BuildError::Invalid(format!(
                "chunk size {chunk_size} must be a power of two from 4096 to 1 GiB"
            )));
        }
        std::fs::create_dir_all(blob_dir).map_err(io_err(blob_dir))?;
        Ok(ChunkStore {
            chunk_size,
            blob_dir: blob_dir.to_path_buf(),
            blobs: Vec::new(),
            current: None,
            dict: HashMap::new(),
            scratch: Vec::new(),
            max_bytes: None,
            file: Origin {
                rank: u32::MAX,
                path: Vec::new().into(),
                index: 0,
            },
            order: None,
            stats: StoreStats::default(),
        })
    }

    /// Refuse to take in more than `max` bytes of file data (holes
    /// included): a small compressed layer can expand without bound.
    pub fn set_max_bytes(&mut self, max: Option<u64>) {
        self.max_bytes = max;
    }

    fn count_in(&mut self, len: u64) -> Result<(), BuildError> {
        let total = self.stats.bytes_in + len;
        if let Some(max) = self.max_bytes.filter(|&m| total > m) {
            return Err(BuildError::Limit(format!(
                "file data exceeds the maximum image size of {max} bytes (--max-size)"
            )));
        }
        self.stats.bytes_in = total;
        Ok(())
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Lay out the chunks of the layers that follow with the files `order`
    /// lists (paths like `/usr/bin/python3`, ranked by position) first;
    /// `None`: directory order only. A blob's layout is then a function of
    /// its layer's own content and of the order given for it, so a shared
    /// base layer stays the same blob in every image built on it.
    pub fn set_order(&mut self, order: Option<HashMap<Vec<u8>, u32>>) {
        self.order = order;
    }

    /// The chunks that follow belong to the file at `comps` (of the layer
    /// being applied).
    pub fn begin_file(&mut self, comps: &[&[u8]]) {
        let rank = self.order.as_ref().map_or(u32::MAX, |o| {
            let mut p = Vec::new();
            for c in comps {
                p.push(b'/');
                p.extend_from_slice(c);
            }
            o.get(&p).copied().unwrap_or(u32::MAX)
        });
        self.file = Origin {
            rank,
            path: comps.iter().map(|c| c.to_vec()).collect(),
            index: 0,
        };
    }

    /// Count a chunk the source already knows is a hole (sparse files).
    pub fn note_hole(&mut self, len: u64) -> Result<(), BuildError> {
        self.file.index += 1;
        self.count_in(len)?;
        self.stats.chunks += 1;
        self.stats.holes += 1;
        Ok(())
    }

    /// Make the chunks of an existing blob available for reuse.
    pub fn add_dictionary(&mut self, tag: &str, blocks: u32, entries: &[ChunkEntry]) {
        if self.blobs.iter().any(|b| b.tag.as_deref() == Some(tag)) {
            return;
        }
        let idx = self.blobs.len() as u32;
        for e in entries {
            self.dict.entry(e.digest).or_insert((idx, e.blkaddr.get()));
        }
        self.blobs.push(Draft {
            body: Body::Reused,
            tag: Some(tag.to_string()),
            blocks,
            entries: entries.to_vec(),
            origins: Vec::new(),
            ordered: false,
        });
    }

    /// Start a new blob for the chunks that follow (one blob per layer).
    pub fn next_blob(&mut self) {
        self.current = None;
    }

    /// Store one chunk (at most `chunk_size` bytes; only a file's last chunk
    /// may be shorter). Returns `None` for an all-zero chunk: a hole.
    pub fn add_chunk(&mut self, data: &[u8]) -> Result<Option<ChunkRef>, BuildError> {
        self.store_chunk(data, None)
    }

    /// [`ChunkStore::add_chunk`] for a chunk that `absorbed` has hashed
    /// exactly (a one-chunk file, whose content digest the caller computes
    /// anyway): the chunk's digest continues that state over the padding
    /// instead of hashing the data a second time.
    pub fn add_absorbed_chunk(
        &mut self,
        data: &[u8],
        absorbed: Sha256,
    ) -> Result<Option<ChunkRef>, BuildError> {
        self.store_chunk(data, Some(absorbed))
    }

    fn store_chunk(
        &mut self,
        data: &[u8],
        absorbed: Option<Sha256>,
    ) -> Result<Option<ChunkRef>, BuildError> {
        debug_assert!(data.len() as u64 <= self.chunk_size && !data.is_empty());
        let origin = self.file.clone();
        self.file.index += 1;
        self.count_in(data.len() as u64)?;
        self.stats.chunks += 1;
        if data.iter().all(|&b| b == 0) {
            self.stats.holes += 1;
            return Ok(None);
        }
        let padded_len = (data.len() as u64).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let padded: &[u8] = if padded_len as usize == data.len() {
            data
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(data);
            self.scratch.resize(padded_len as usize, 0);
            &self.scratch
        };
        let digest: [u8; 32] = match absorbed {
            Some(mut h) => {
                static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
                h.update(&ZEROS[..padded.len() - data.len()]);
                h.finalize().into()
            }
            None => Sha256::digest(padded).into(),
        };
        if let Some(&(blob, blkaddr)) = self.dict.get(&digest) {
            let draft = &mut self.blobs[blob as usize];
            if matches!(draft.body, Body::Reused) {
                self.stats.chunks_reused += 1;
            } else {
                self.stats.chunks_deduped += 1;
            }
            // A chunk two files of the layer being applied share is laid
            // out for the one a walk meets first, whichever the source
            // listed first: the blob stays a function of its layer's
            // content, not of a tar's entry order. A lower layer's blob is
            // left as that layer laid it out: images built on it share it.
            if self.current == Some(blob) {
                let i = draft
                    .entries
                    .binary_search_by_key(&blkaddr, |e| e.blkaddr.get())
                    .expect("a new blob's chunks are in block order");
                if origin < draft.origins[i] {
                    draft.origins[i] = origin;
                }
            }
            return Ok(Some(ChunkRef { blob, blkaddr }));
        }
        let blob = match self.current {
            Some(b) => b,
            None => {
                self.blobs.push(Draft {
                    body: Body::New { file: None },
                    tag: None,
                    blocks: 0,
                    entries: Vec::new(),
                    origins: Vec::new(),
                    ordered: false,
                });
                let b = self.blobs.len() as u32 - 1;
                self.current = Some(b);
                b
            }
        };
        let draft = &mut self.blobs[blob as usize];
        draft.ordered |= self.order.is_some();
        let nblocks = (padded_len / BLOCK_SIZE) as u32;
        let blkaddr = draft.blocks;
        draft.blocks = blkaddr
            .checked_add(nblocks)
            .filter(|&b| b < u32::MAX)
            .ok_or_else(|| BuildError::Limit("a data blob exceeds 2^32 blocks".into()))?;
        let Body::New { file } = &mut draft.body else {
            unreachable!("current blob is always new")
        };
        if file.is_none() {
            *file = Some(Spool::create(&self.blob_dir)?);
        }
        file.as_mut().unwrap().write(padded)?;
        self.stats.bytes_written += padded_len;
        draft.entries.push(ChunkEntry {
            blkaddr: blkaddr.into(),
            nblocks: nblocks.into(),
            digest,
        });
        draft.origins.push(origin);
        self.dict.insert(digest, (blob, blkaddr));
        Ok(Some(ChunkRef { blob, blkaddr }))
    }

    /// Close every blob: drop chunks nothing references (unless `keep_dead`,
    /// which keeps per-layer blobs identical across images), name each new
    /// blob by its sha256 in the blob directory, and assign device ids in
    /// blob order to the blobs the tree references.
    pub fn finish(
        mut self,
        tree: &Tree,
        keep_dead: bool,
    ) -> Result<(Vec<FinalBlob>, Placement), BuildError> {
        let used = used_chunks(tree, self.blobs.len());
        let mut out = Vec::new();
        let mut map = HashMap::new();
        for (idx, draft) in std::mem::take(&mut self.blobs).into_iter().enumerate() {
            let used = &used[idx];
            let written_file = matches!(draft.body, Body::New { file: Some(_) });
            if used.is_empty() && !(keep_dead && written_file) {
                if let Body::New { file: Some(spool) } = draft.body {
                    drop(spool); // nothing survived: the temp file goes away
                }
                continue;
            }
            let device_id = u16::try_from(out.len() + 1)
                .ok()
                .filter(|&d| d < u16::MAX)
                .ok_or_else(|| BuildError::Limit("too many data blobs".into()))?;
            // (old block address, final entry) of every chunk kept.
            let (blob, moved) = match draft.body {
                Body::Reused => finish_reused(draft, used),
                Body::New { .. } => self.finish_new(draft, used, keep_dead)?,
            };
            for (old, e) in moved {
                map.insert((idx as u32, old), (device_id, e));
            }
            out.push(blob);
        }
        Ok((out, Placement { map }))
    }

    /// A new blob: its kept chunks in read order (rewritten to a new file
    /// unless they already are, as they are when every chunk is kept in
    /// order), then published under its sha256. Returns the blob and each
    /// chunk's (old, new) block address.
    fn finish_new(
        &self,
        draft: Draft,
        used: &HashSet<u32>,
        keep_dead: bool,
    ) -> Result<(FinalBlob, Vec<(u32, u32)>), BuildError> {
        let Body::New { file } = draft.body else {
            unreachable!("finish_new is for new blobs")
        };
        let (draft_len, ordered) = (draft.entries.len(), draft.ordered);
        let first_blocks: Vec<u32> = draft.entries.iter().map(|e| e.blkaddr.get()).collect();
        let (tmp, f, hash) = file.expect("new blobs with chunks have a file").finish()?;
        // The chunks to keep, in read order.
        let mut keep: Vec<(Origin, ChunkEntry)> = draft
            .origins
            .into_iter()
            .zip(draft.entries)
            .filter(|(_, e)| keep_dead || used.contains(&e.blkaddr.get()))
            .collect();
        let n = keep.len();
        keep.sort_by(|a, b| a.0.cmp(&b.0));
        let keep: Vec<ChunkEntry> = keep.into_iter().map(|(_, e)| e).collect();
        let in_place = n == draft_len
            && keep
                .iter()
                .enumerate()
                .all(|(i, e)| e.blkaddr.get() == first_blocks[i]);
        let (tmp, entries, blocks, tag) = if in_place {
            let pairs = keep.into_iter().map(|e| (e.blkaddr.get(), e));
            let tag = hex::encode(hash.finalize());
            (tmp, pairs.collect(), draft.blocks, tag)
        } else {
            self.rewrite(f, tmp, keep)?
        };
        let moved = entries
            .iter()
            .map(|(old, e)| (*old, e.blkaddr.get()))
            .collect();
        let entries: Vec<ChunkEntry> = entries.into_iter().map(|(_, e)| e).collect();
        publish(tmp, &self.blob_dir.join(&tag))?;
        let blob = FinalBlob {
            tag,
            blocks,
            written: true,
            ordered,
            entries,
        };
        Ok((blob, moved))
    }

    /// Copy the chunks `keep` to a new blob file, in that order, hashing
    /// it as it is written. Returns the file, (old blkaddr, new entry)
    /// pairs, its blocks and its tag.
    #[allow(clippy::type_complexity)]
    fn rewrite(
        &self,
        mut f: File,
        old: tempfile::NamedTempFile,
        keep: Vec<ChunkEntry>,
    ) -> Result<(tempfile::NamedTempFile, Vec<(u32, ChunkEntry)>, u32, String), BuildError> {
        let tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .tempfile_in(&self.blob_dir)
            .map_err(io_err(&self.blob_dir))?;
        let mut w = BufWriter::with_capacity(1 << 20, tmp.reopen().map_err(io_err(tmp.path()))?);
        let mut out = Vec::new();
        let mut next = 0u32;
        let mut buf = Vec::new();
        let mut hash = Sha256::new();
        for e in keep {
            let b = e.blkaddr.get();
            buf.resize(e.nblocks.get() as usize * BLOCK_SIZE as usize, 0);
            f.seek(SeekFrom::Start(u64::from(b) * BLOCK_SIZE))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(io_err(old.path()))?;
            w.write_all(&buf).map_err(io_err(tmp.path()))?;
            hash.update(&buf);
            out.push((
                b,
                ChunkEntry {
                    blkaddr: next.into(),
                    ..e
                },
            ));
            next += e.nblocks.get();
        }
        w.flush().map_err(io_err(tmp.path()))?;
        // Entries stay sorted by block address, as the chunk table requires.
        out.sort_by_key(|(_, e)| e.blkaddr.get());
        Ok((tmp, out, next, hex::encode(hash.finalize())))
    }
}

/// Give a finished content-addressed file (a blob, a compressed object)
/// its name, unless a file of that name, hence those bytes, is there
/// already. Such files are public content (served to any reader); the
/// temp file starts 0600.
pub(crate) fn publish(tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), BuildError> {
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(io_err(tmp.path()))?;
    if !path.exists() {
        tmp.persist(path).map_err(|e| BuildError::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
    }
    Ok(())
}

/// The chunks (block addresses, per blob) of the files reachable from the
/// root: only those count, the others were hidden or replaced by later
/// layers.
fn used_chunks(tree: &Tree, nblobs: usize) -> Vec<HashSet<u32>> {
    let mut used: Vec<HashSet<u32>> = vec![HashSet::new(); nblobs];
    for id in tree.reachable() {
        if let Data::File { chunks, .. } = &tree.nodes[id].data {
            for c in chunks.iter().flatten() {
                used[c.blob as usize].insert(c.blkaddr);
            }
        }
    }
    used
}

/// A blob of an earlier image: referenced as it is, with the digests of
/// the chunks this image uses. Returns the blob and each chunk's (old,
/// new) block address, which are the same.
fn finish_reused(draft: Draft, used: &HashSet<u32>) -> (FinalBlob, Vec<(u32, u32)>) {
    let entries: Vec<ChunkEntry> = draft
        .entries
        .into_iter()
        .filter(|e| used.contains(&e.blkaddr.get()))
        .collect();
    let moved = entries
        .iter()
        .map(|e| (e.blkaddr.get(), e.blkaddr.get()))
        .collect();
    let blob = FinalBlob {
        tag: draft.tag.unwrap(),
        blocks: draft.blocks,
        written: false,
        ordered: false,
        entries,
    };
    (blob, moved)
}
