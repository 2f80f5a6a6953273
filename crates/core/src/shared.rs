//! A data blob as a domain holds it: one verified cache shared by every
//! image of the domain that references the blob.

use crate::cache::BlobCache;
use crate::cache::BLOCK;
use crate::error::CoreError;
use crate::remote::Remote;
use erofs::chunktable::ChunkEntry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A data blob as a domain holds it: one cache, the digests every bound
/// image pins for it, and the remotes it can come from.
pub struct SharedBlob {
    pub cache: BlobCache,
    pub(crate) chunks: RwLock<BTreeMap<u32, ChunkEntry>>,
    pub(crate) remotes: RwLock<Vec<Arc<dyn Remote>>>,
    pub(crate) refs: Mutex<usize>,
    /// Where the last fill ended, to spot sequential readers.
    pub(crate) last_fill_end: std::sync::atomic::AtomicU64,
}

/// How far past a sequential miss [`SharedBlob::ensure_range_ahead`] fills.
const READ_AHEAD: u64 = 2 << 20;
/// How close to the last fill a miss must start to count as sequential.
const READ_AHEAD_SLACK: u64 = 512 << 10;

impl SharedBlob {
    /// The remote this blob is fetched from first: what fairness between
    /// slow and healthy remotes is keyed by.
    pub fn remote_key(&self) -> String {
        self.remotes
            .read()
            .unwrap()
            .first()
            .map(|r| r.describe())
            .unwrap_or_default()
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
        let remotes = self.remotes.read().unwrap().clone();
        for e in &entries {
            self.cache.ensure(e, &remotes)?;
        }
        Ok(entries)
    }

    /// [`SharedBlob::ensure_range`] for a kernel that reads the blob file
    /// itself: when this miss continues the previous one (a sequential
    /// reader; blobs are laid out in build order, so a tree walk is one
    /// too), up to `READ_AHEAD` bytes of the missing pinned chunks that
    /// follow are fetched in the same ranged requests. Read-ahead is best
    /// effort: if it fails, only the range itself is fetched, once. Returns the
    /// chunks covering the range, as [`SharedBlob::ensure_range`] does.
    pub fn ensure_range_ahead(&self, offset: u64, len: u64) -> Result<Vec<ChunkEntry>, CoreError> {
        let need = self.chunks_for(offset, len)?;
        let remotes = self.remotes.read().unwrap().clone();
        let last = self
            .last_fill_end
            .load(std::sync::atomic::Ordering::Relaxed);
        let sequential = offset + READ_AHEAD_SLACK >= last && offset <= last + READ_AHEAD_SLACK;
        let mut entries = need.clone();
        if sequential {
            let mut next = need.last().map_or(0, |e| e.blkaddr.get() + e.nblocks.get());
            let limit = (offset + len + READ_AHEAD).div_ceil(BLOCK);
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
        }
        let fill_end = entries.last().map_or(offset + len, |e| {
            u64::from(e.blkaddr.get() + e.nblocks.get()) * BLOCK
        });
        let batched = self
            .cache
            .ensure_batch(&entries, &remotes, READ_AHEAD + len);
        // A failed read-ahead falls back to the range asked for, once, in
        // one request (not chunk by chunk, each with its own retries): a
        // read fails within two fetch budgets however the remote fails.
        match batched {
            Err(e) if entries.len() == need.len() => return Err(e),
            Err(_) => self.cache.ensure_batch(&need, &remotes, len.max(1))?,
            Ok(()) => {}
        }
        self.last_fill_end
            .store(fill_end, std::sync::atomic::Ordering::Relaxed);
        Ok(need)
    }

    pub fn all_chunks(&self) -> Vec<ChunkEntry> {
        self.chunks.read().unwrap().values().copied().collect()
    }
}
