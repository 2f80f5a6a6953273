//! A data blob as a domain holds it: one verified cache shared by every
//! image of the domain that references the blob.

use crate::blocks::BLOCK;
use crate::cache::BlobCache;
use crate::error::CoreError;
use crate::fetch::Source;
use erofs::chunktable::ChunkEntry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A data blob as a domain holds it: one cache, the digests every bound
/// image pins for it, and the sources it can come from (compressed first:
/// fewer bytes on the wire).
pub struct SharedBlob {
    pub cache: BlobCache,
    pub(crate) chunks: RwLock<BTreeMap<u32, ChunkEntry>>,
    pub(crate) sources: RwLock<Vec<Source>>,
    /// Where the last fill ended, to spot sequential readers.
    pub(crate) last_fill_end: std::sync::atomic::AtomicU64,
    /// How far the next read-ahead reads (adaptive).
    pub(crate) window: std::sync::atomic::AtomicU64,
    /// Where the read-aheads started so far end.
    pub(crate) ahead_end: std::sync::atomic::AtomicU64,
    /// Read-aheads running.
    pub(crate) ahead_running: std::sync::atomic::AtomicUsize,
    /// Chunks read through the blob's cache file (kernel frontends), first
    /// touch first, numbered across blobs so an image's order can be made
    /// from its blobs' (see `BoundImage::access_order`).
    pub(crate) touched: Mutex<Touched>,
}

/// First touches of a blob's chunks: (global sequence, block address).
#[derive(Default)]
pub(crate) struct Touched {
    seen: std::collections::HashSet<u32>,
    pub(crate) order: Vec<(u64, u32)>,
}

/// Orders first touches across blobs.
static TOUCH_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Read-aheads of one blob running at once (one fetching while another
/// decompresses and verifies, on two cores).
const AHEAD_MAX: usize = 2;
/// Frames fetched past a random miss's own (decompressed bytes).
const WINDOW_MIN: u64 = 512 << 10;
/// The most a sequential reader's window grows to.
const WINDOW_MAX: u64 = 8 << 20;
/// How close to the last fill a miss must start to count as sequential.
const READ_AHEAD_SLACK: u64 = 512 << 10;

impl SharedBlob {
    /// A blob with nothing pinned and nowhere to fetch from yet: binds
    /// add both (and the domain counts its references).
    pub(crate) fn new(cache: BlobCache) -> Self {
        SharedBlob {
            cache,
            chunks: RwLock::new(BTreeMap::new()),
            sources: RwLock::new(Vec::new()),
            last_fill_end: Default::default(),
            window: Default::default(),
            ahead_end: Default::default(),
            ahead_running: Default::default(),
            touched: Default::default(),
        }
    }

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
                blob: self.cache.name.to_string(),
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
    /// itself, fetching what will be needed next in the same or a parallel
    /// request. Blobs are laid out in read order (a tree walk, or a
    /// recorded start, reads them front to back), so "next" is what follows
    /// in the blob:
    /// - the read waits for its own range only: from a compressed source,
    ///   the frames holding it, whole (a frame batches small files), plus up
    ///   to [`WINDOW_MIN`] of the frames after them, in one request; from an
    ///   uncompressed one, its chunks and up to [`WINDOW_MIN`] of the chunks
    ///   after them;
    /// - a read that continues the previous ones (a sequential reader) also
    ///   starts a read-ahead of the next window in the background, claimed
    ///   before this read goes on (so later reads of it wait for it rather
    ///   than fetch it again), at most [`AHEAD_MAX`] at a time: the remote,
    ///   decompression and verification of the next window overlap the
    ///   reader's use of this one. The window doubles while the reader keeps
    ///   going, from [`WINDOW_MIN`] up to [`WINDOW_MAX`].
    ///
    /// A read whose chunks are all ready or already being fetched (by a
    /// recorded start, a read-ahead, another reader) plans nothing of its
    /// own and waits for them; inside a read-ahead it still starts the
    /// next one. Read-ahead is best effort: if a read's wait on it fails,
    /// the range itself is fetched, once. Returns the chunks covering the range, as
    /// [`SharedBlob::ensure_range`] does.
    pub fn ensure_range_ahead(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<ChunkEntry>, CoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let need = self.chunks_for(offset, len)?;
        self.touch(&need);
        let sources = self.sources();
        let frames = sources.first().and_then(|s| s.frames.clone());
        if self.cache.is_covered(&need) {
            // Ready, or on its way in a stream that already plans what
            // comes next (a recorded start, a read-ahead): wait for it. A
            // sequential reader inside a read-ahead keeps it going.
            let end = need.last().map_or(offset + len, |e| {
                u64::from(e.blkaddr.get() + e.nblocks.get()) * BLOCK
            });
            if self.ahead_end.load(Relaxed) > self.last_fill_end.load(Relaxed)
                && self.follow(offset, len, end, frames.as_deref(), &sources)
            {
                self.last_fill_end.store(end, Relaxed);
            }
            self.cache.ensure_batch(&need, &sources, len.max(1))?;
            return Ok(need);
        }
        let (now, max_run) = match &frames {
            Some(f) => self.plan_frames(f, &need, WINDOW_MIN),
            None => self.plan_raw(&need, WINDOW_MIN),
        };
        let now_end = now.last().map_or(offset + len, |e| {
            u64::from(e.blkaddr.get() + e.nblocks.get()) * BLOCK
        });
        if !self.follow(offset, len, now_end, frames.as_deref(), &sources) {
            self.window.store(WINDOW_MIN, Relaxed);
            self.ahead_end.store(now_end, Relaxed);
        }
        self.last_fill_end.store(now_end, Relaxed);
        match self.cache.ensure_batch(&now, &sources, max_run) {
            Err(e) if now.len() == need.len() => Err(e),
            Err(_) => self
                .cache
                .ensure_batch(&need, &sources, len.max(1))
                .map(|_| need),
            Ok(()) => Ok(need),
        }
    }

    /// If a read of `[offset, offset + len)` (fetched up to `end`)
    /// continues the previous ones, double the read-ahead window and start
    /// the next read-ahead unless one already reaches past the window.
    /// Returns whether the read was sequential.
    fn follow(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        end: u64,
        frames: Option<&erofs::frames::BlobFrames>,
        sources: &[Source],
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (last, ahead) = (
            self.last_fill_end.load(Relaxed),
            self.ahead_end.load(Relaxed),
        );
        let sequential =
            offset + READ_AHEAD_SLACK >= last && offset <= last.max(ahead) + READ_AHEAD_SLACK;
        if sequential {
            let window = (self.window.load(Relaxed) * 2).clamp(WINDOW_MIN, WINDOW_MAX);
            self.window.store(window, Relaxed);
            let start = ahead.max(end);
            if start < offset + len + window {
                self.read_ahead(start, window, frames, sources);
            }
        }
        sequential
    }

    /// Start fetching `window` bytes of the blob from byte `start` in the
    /// background (one request per run of missing chunks or frames), unless
    /// [`AHEAD_MAX`] read-aheads are running. Returns once the chunks are
    /// claimed.
    fn read_ahead(
        self: &Arc<Self>,
        start: u64,
        window: u64,
        frames: Option<&erofs::frames::BlobFrames>,
        sources: &[Source],
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.ahead_running.fetch_add(1, Relaxed) >= AHEAD_MAX {
            self.ahead_running.fetch_sub(1, Relaxed);
            return;
        }
        let entries = self.plan_ahead((start / BLOCK) as u32, window, frames);
        let end = entries.last().map_or(start, |e| {
            u64::from(e.blkaddr.get() + e.nblocks.get()) * BLOCK
        });
        self.ahead_end.fetch_max(end.max(start + window), Relaxed);
        let (blob, sources) = (self.clone(), sources.to_vec());
        let (claimed, wait) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || {
                let claim = blob.cache.claim(&entries, false);
                let _ = claimed.send(());
                if !claim.is_empty() {
                    // Failures are logged by the fetch; a reader waiting on
                    // these chunks then fetches its own range.
                    let _ = blob.cache.complete(claim, &sources, window + WINDOW_MIN);
                }
                blob.ahead_running.fetch_sub(1, Relaxed);
            });
        match spawned {
            Ok(_) => {
                let _ = wait.recv();
            }
            Err(e) => {
                tracing::debug!(error = %e, "no read-ahead thread");
                self.ahead_running.fetch_sub(1, Relaxed);
            }
        }
    }

    /// The missing pinned chunks of `window` bytes from block `start`: of
    /// the frames from the one holding `start`, when compressed.
    fn plan_ahead(
        &self,
        start: u32,
        window: u64,
        frames: Option<&erofs::frames::BlobFrames>,
    ) -> Vec<ChunkEntry> {
        let chunks = self.chunks.read().unwrap();
        let (from, to) = match frames.and_then(|f| Some((f, f.frame_of(start)?))) {
            Some((f, first)) => {
                let mut raw = 0u64;
                let last = f.frames[first..]
                    .iter()
                    .take_while(|fr| {
                        raw += fr.raw_len();
                        raw <= window.max(fr.raw_len())
                    })
                    .last()
                    .map_or(start, |fr| fr.end_block());
                (f.frames[first].blkaddr.get(), last)
            }
            None => (start, start.saturating_add((window / BLOCK) as u32)),
        };
        chunks
            .range(from..to)
            .map(|(_, e)| *e)
            .filter(|e| {
                e.blkaddr.get() + e.nblocks.get() <= to
                    && !self.cache.is_ready(e.blkaddr.get(), e.nblocks.get())
            })
            .collect()
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

    /// From an uncompressed source: `need`, then the missing chunks right
    /// after it, up to `window` bytes of them (stopping at one already
    /// ready), and the request size that fetches them in one go. Without
    /// frames to batch them, small files would otherwise cost a round trip
    /// each, though the blob holds them in the order they are read.
    fn plan_raw(&self, need: &[ChunkEntry], window: u64) -> (Vec<ChunkEntry>, u64) {
        let Some(last) = need.last() else {
            return (Vec::new(), 1);
        };
        let bytes = |e: &ChunkEntry| u64::from(e.nblocks.get()) * BLOCK;
        let mut entries = need.to_vec();
        let mut run: u64 = need.iter().map(bytes).sum();
        let mut ahead = 0u64;
        let chunks = self.chunks.read().unwrap();
        for (_, e) in chunks.range(last.blkaddr.get() + last.nblocks.get()..) {
            ahead += bytes(e);
            if ahead > window || self.cache.is_ready(e.blkaddr.get(), e.nblocks.get()) {
                break;
            }
            entries.push(*e);
            run += bytes(e);
        }
        (entries, run.max(1))
    }

    /// Record the first touch of `entries` (what a reader asked for, not
    /// what was read ahead).
    fn touch(&self, entries: &[ChunkEntry]) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut t = self.touched.lock().unwrap();
        for e in entries {
            if t.seen.insert(e.blkaddr.get()) {
                t.order
                    .push((TOUCH_SEQ.fetch_add(1, Relaxed), e.blkaddr.get()));
            }
        }
    }

    pub fn all_chunks(&self) -> Vec<ChunkEntry> {
        self.chunks.read().unwrap().values().copied().collect()
    }
}
