//! A data blob as a domain holds it: one verified cache shared by every
//! image of the domain that references the blob.

use crate::cache::BlobCache;
use crate::cache::BLOCK;
use crate::error::CoreError;
use crate::fetch::Source;
use erofs::chunktable::ChunkEntry;
use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

/// A data blob as a domain holds it: one cache, the digests every bound
/// image pins for it, and the sources it can come from (compressed first:
/// fewer bytes on the wire).
pub struct SharedBlob {
    pub cache: BlobCache,
    pub(crate) chunks: RwLock<BTreeMap<u32, ChunkEntry>>,
    pub(crate) sources: RwLock<Vec<Source>>,
    pub(crate) refs: Mutex<usize>,
    /// Where the last fill ended, to spot sequential readers.
    pub(crate) last_fill_end: std::sync::atomic::AtomicU64,
    /// How far past a compressed miss the next fill reads (adaptive).
    pub(crate) window: std::sync::atomic::AtomicU64,
}

/// How far past a sequential miss [`SharedBlob::ensure_range_ahead`] fills.
const READ_AHEAD: u64 = 2 << 20;
/// Frames fetched past a random miss's own (decompressed bytes).
const WINDOW_MIN: u64 = 512 << 10;
/// The most a sequential reader's window grows to.
const WINDOW_MAX: u64 = 8 << 20;
/// How close to the last fill a miss must start to count as sequential.
const READ_AHEAD_SLACK: u64 = 512 << 10;

impl SharedBlob {
    /// The remote this blob is fetched from first: what fairness between
    /// slow and healthy remotes is keyed by.
    pub fn remote_key(&self) -> String {
        self.sources
            .read()
            .unwrap()
            .first()
            .map(|s| s.remote.describe())
            .unwrap_or_default()
    }

    pub(crate) fn sources(&self) -> Vec<Source> {
        self.sources.read().unwrap().clone()
    }

    /// Add where a bound image says the blob can be fetched from.
    pub(crate) fn add_source(&self, src: Source) {
        let mut v = self.sources.write().unwrap();
        if !v.iter().any(|x| x.same(&src)) {
            // Compressed sources first, otherwise in bind order.
            let at = if src.frames.is_some() {
                v.iter().take_while(|x| x.frames.is_some()).count()
            } else {
                v.len()
            };
            v.insert(at, src);
        }
    }
    pub fn refs(&self) -> usize {
        *self.refs.lock().unwrap()
    }

    /// The pinned chunks covering bytes `[offset, offset + len)`.
    pub fn chunks_for(&self, offset: u64, len: u64) -> Result<Vec<ChunkEntry>, CoreError> {
        let chunks = self.chunks.read().unwrap();
        let (first, last) = (
            (offset / BLOCK) as u32,
            ((offset + len.max(1)).div_ceil(BLOCK) - 1) as u32,
        );
        let mut out: Vec<ChunkEntry> = Vec::new();
        let start = chunks
            .range(..=first)
            .next_back()
            .map_or(first, |(k, _)| *k);
        let mut covered = first;
        for (_, e) in chunks.range(start..=last) {
            let (s, n) = (e.blkaddr.get(), e.nblocks.get());
            if s + n <= first {
                continue;
            }
            if s > covered {
                break;
            }
            covered = s + n;
            out.push(*e);
        }
        if covered <= last {
            return Err(CoreError::Fetch {
                blob: self.cache.name.clone(),
                offset,
                len,
                why: format!("block {covered} is not pinned by any bound image's chunk digests"),
            });
        }
        Ok(out)
    }

    /// Make `[offset, offset + len)` ready in the cache (fetch + verify).
    pub fn ensure_range(&self, offset: u64, len: u64) -> Result<Vec<ChunkEntry>, CoreError> {
        let entries = self.chunks_for(offset, len)?;
        let sources = self.sources();
        for e in &entries {
            self.cache.ensure(e, &sources)?;
        }
        Ok(entries)
    }

    /// [`SharedBlob::ensure_range`] for a kernel that reads the blob file
    /// itself, fetching what will be needed next in the same request.
    /// Blobs are laid out in build order (a tree walk reads them in order),
    /// so "next" is what follows in the blob:
    /// - from a compressed source: the frames holding the range, whole (a
    ///   frame batches small files), plus the frames after them up to a
    ///   window that starts at [`WINDOW_MIN`] and doubles while misses
    ///   continue each other (a sequential reader), up to [`WINDOW_MAX`];
    /// - from a raw source: when this miss continues the previous one, up
    ///   to [`READ_AHEAD`] bytes of the missing chunks that follow.
    ///
    /// Read-ahead is best effort: if it fails, only the range itself is
    /// fetched, once. Returns the chunks covering the range, as
    /// [`SharedBlob::ensure_range`] does.
    pub fn ensure_range_ahead(&self, offset: u64, len: u64) -> Result<Vec<ChunkEntry>, CoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let need = self.chunks_for(offset, len)?;
        let sources = self.sources();
        let last = self.last_fill_end.load(Relaxed);
        let sequential = offset + READ_AHEAD_SLACK >= last && offset <= last + READ_AHEAD_SLACK;
        let window = if sequential {
            (self.window.load(Relaxed) * 2).clamp(WINDOW_MIN, WINDOW_MAX)
        } else {
            WINDOW_MIN
        };
        self.window.store(window, Relaxed);
        let (entries, max_run) = match sources.first().and_then(|s| s.frames.clone()) {
            Some(f) => self.plan_frames(&f, &need, window),
            None if sequential => (self.plan_raw(&need, offset + len), READ_AHEAD + len),
            None => (need.clone(), len.max(1)),
        };
        let fill_end = entries.last().map_or(offset + len, |e| {
            u64::from(e.blkaddr.get() + e.nblocks.get()) * BLOCK
        });
        let batched = self.cache.ensure_batch(&entries, &sources, max_run);
        // A failed read-ahead falls back to the range asked for, once, in
        // one request (not chunk by chunk, each with its own retries): a
        // read fails within two fetch budgets however the remote fails.
        match batched {
            Err(e) if entries.len() == need.len() => return Err(e),
            Err(_) => self.cache.ensure_batch(&need, &sources, len.max(1))?,
            Ok(()) => {}
        }
        self.last_fill_end.store(fill_end, Relaxed);
        Ok(need)
    }

    /// `need` and the missing pinned chunks right after it, up to
    /// [`READ_AHEAD`] bytes past `end`.
    fn plan_raw(&self, need: &[ChunkEntry], end: u64) -> Vec<ChunkEntry> {
        let mut entries = need.to_vec();
        let mut next = need.last().map_or(0, |e| e.blkaddr.get() + e.nblocks.get());
        let limit = (end + READ_AHEAD).div_ceil(BLOCK);
        let chunks = self.chunks.read().unwrap();
        for e in chunks.range(next..).map(|(_, e)| *e) {
            let end = e.blkaddr.get() + e.nblocks.get();
            if e.blkaddr.get() != next
                || u64::from(end) > limit
                || self.cache.is_ready(e.blkaddr.get(), e.nblocks.get())
            {
                break;
            }
            entries.push(e);
            next = end;
        }
        entries
    }

    /// The pinned chunks of the frames holding `need` and of up to
    /// `window` bytes of the frames after them (stopping at a frame already
    /// ready), and the request size that fetches them in one go.
    fn plan_frames(
        &self,
        f: &erofs::frames::BlobFrames,
        need: &[ChunkEntry],
        window: u64,
    ) -> (Vec<ChunkEntry>, u64) {
        let (Some(first), Some(last)) = (
            need.first().and_then(|e| f.frame_of(e.blkaddr.get())),
            need.last()
                .and_then(|e| f.frame_of(e.blkaddr.get() + e.nblocks.get() - 1)),
        ) else {
            return (need.to_vec(), 1);
        };
        let chunks = self.chunks.read().unwrap();
        let missing = |fi: usize| {
            let fr = &f.frames[fi];
            chunks
                .range(fr.blkaddr.get()..fr.end_block())
                .map(|(_, e)| *e)
                .filter(|e| !self.cache.is_ready(e.blkaddr.get(), e.nblocks.get()))
                .collect::<Vec<_>>()
        };
        let mut entries: Vec<ChunkEntry> = need.to_vec();
        let mut raw = 0u64;
        for fi in first..=last {
            entries.extend(missing(fi));
            raw += f.frames[fi].raw_len();
        }
        let mut ahead = 0u64;
        for fi in last + 1..f.frames.len() {
            ahead += f.frames[fi].raw_len();
            let more = missing(fi);
            if ahead > window || more.is_empty() {
                break;
            }
            entries.extend(more);
            raw += f.frames[fi].raw_len();
        }
        entries.sort_by_key(|e| e.blkaddr.get());
        entries.dedup_by_key(|e| e.blkaddr.get());
        (entries, raw)
    }

    pub fn all_chunks(&self) -> Vec<ChunkEntry> {
        self.chunks.read().unwrap().values().copied().collect()
    }
}
