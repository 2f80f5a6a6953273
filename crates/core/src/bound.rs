//! An image bound into a domain: reads through the domain's blob caches,
//! the access order it records, and prefetch.

use crate::blocks::BLOCK;
use crate::error::CoreError;
use crate::key::{BindSpec, DomainKey};
use crate::shared::SharedBlob;
use erofs::chunktable::ChunkEntry;
use erofs::{Image, ImageBytes};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// An image bound into a domain.
pub struct BoundImage {
    pub spec: BindSpec,
    pub key: DomainKey,
    pub image: Image<ImageBytes>,
    /// Per device slot (index 0 = device 1).
    pub blobs: Vec<Arc<SharedBlob>>,
    pub(crate) access: Mutex<AccessLog>,
    /// Whether its mounts may share page cache with the domain's other
    /// images (`inode_share`): `Err(why not)`. See [`crate::fingerprint`].
    pub page_cache_share: Result<(), String>,
    /// The fingerprints it added to its domain's, released on unbind.
    pub(crate) fingerprints: HashMap<Vec<u8>, crate::fingerprint::ContentProof>,
    /// Set when it leaves its domain: a prefetch still running for it (a
    /// recorded start, `shoal prefetch`) stops at its next request instead
    /// of downloading the rest of an image nobody mounts.
    pub(crate) unbound: std::sync::atomic::AtomicBool,
}

/// A chunk as (device id, block address).
pub type ChunkKey = (u16, u32);

/// Chunks in first-touch order, for recorded prefetch.
#[derive(Default)]
pub(crate) struct AccessLog {
    seen: HashSet<ChunkKey>,
    order: Vec<ChunkKey>,
}

impl BoundImage {
    pub fn blob(&self, device_id: u16) -> Option<&Arc<SharedBlob>> {
        self.blobs.get(usize::from(device_id).checked_sub(1)?)
    }

    /// Read bytes of a regular file through the domain cache: holes are
    /// zeros, blob chunks are made ready (fetched and verified once) and read
    /// from the cache file. Returns the bytes read (short only at EOF).
    pub fn read_at(
        &self,
        ino: &erofs::Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, CoreError> {
        Ok(self.read_inner(ino, offset, buf, true)?.unwrap_or(0))
    }

    /// [`BoundImage::read_at`] only if every byte is already in the cache:
    /// `Ok(None)` instead of fetching. Lets a frontend answer hits inline
    /// and hand only misses to worker threads.
    pub fn read_cached(
        &self,
        ino: &erofs::Inode,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<usize>, CoreError> {
        self.read_inner(ino, offset, buf, false)
    }

    fn read_inner(
        &self,
        ino: &erofs::Inode,
        offset: u64,
        buf: &mut [u8],
        fetch: bool,
    ) -> Result<Option<usize>, CoreError> {
        use erofs::ReadAt;
        let img_err = |source| CoreError::Image {
            path: self.spec.bootstrap.clone(),
            source,
        };
        let end = ino.size.min(offset.saturating_add(buf.len() as u64));
        for m in self.image.extents_in(ino, offset..end) {
            let m = m.map_err(img_err)?;
            let (start, pos) = (m.la, m.la.max(offset));
            let n = (m.end().min(end) - pos) as usize;
            let out = &mut buf[(pos - offset) as usize..][..n];
            match m.extent {
                erofs::Extent::Hole => out.fill(0),
                erofs::Extent::Image { offset: at } => self
                    .image
                    .source()
                    .read_exact_at(out, at + (pos - start))
                    .map_err(|source| CoreError::Io {
                        path: self.spec.bootstrap.clone(),
                        what: "reading bootstrap".into(),
                        source,
                    })?,
                erofs::Extent::Chunk { device_id, blkaddr } => {
                    let blob = self.blob(device_id).ok_or_else(|| CoreError::Unusable {
                        path: self.spec.bootstrap.clone(),
                        why: format!("no device {device_id}"),
                    })?;
                    let physical = u64::from(blkaddr) * BLOCK + (pos - start);
                    if fetch {
                        let entries = blob.ensure_range_ahead(physical, n as u64)?;
                        self.record(device_id, &entries);
                    } else {
                        if !blob.cache.is_range_ready(physical, n as u64) {
                            return Ok(None);
                        }
                        blob.cache.count_hit();
                        self.record_chunk((device_id, blkaddr));
                    }
                    blob.cache.read_at(out, physical)?;
                }
            }
        }
        Ok(Some((end.saturating_sub(offset)) as usize))
    }

    fn record(&self, device_id: u16, entries: &[ChunkEntry]) {
        for e in entries {
            self.record_chunk((device_id, e.blkaddr.get()));
        }
    }

    fn record_chunk(&self, k: ChunkKey) {
        let mut a = self.access.lock().unwrap();
        if a.seen.insert(k) {
            a.order.push(k);
        }
    }

    /// Chunks in the order this image first touched them. Reads through
    /// this image (FUSE, `shoal read`) are recorded here; reads the kernel
    /// makes of the cache files (fanotify, fscache) are recorded per blob,
    /// and then the image's order is its blobs' first touches, merged.
    pub fn access_order(&self) -> Vec<(u16, u32)> {
        let own = self.access.lock().unwrap().order.clone();
        if !own.is_empty() {
            return own;
        }
        let mut all: Vec<(u64, (u16, u32))> = Vec::new();
        for (i, b) in self.blobs.iter().enumerate() {
            let t = b.touched.lock().unwrap();
            all.extend(t.order.iter().map(|&(seq, blk)| (seq, (i as u16 + 1, blk))));
        }
        all.sort_unstable();
        all.into_iter().map(|(_, k)| k).collect()
    }

    /// Fetch every chunk of every blob, in `order` first (an earlier run's
    /// access order), then the rest by address.
    pub fn prefetch(&self, order: &[(u16, u32)], threads: usize) -> Result<u64, CoreError> {
        // Work items: runs of adjacent chunks of one blob, recorded order first.
        let mut seen = HashSet::new();
        let mut items: Vec<(u16, Vec<ChunkEntry>)> = Vec::new();
        let mut push = |dev: u16, e: ChunkEntry, items: &mut Vec<(u16, Vec<ChunkEntry>)>| {
            if !seen.insert((dev, e.blkaddr.get())) {
                return;
            }
            match items.last_mut() {
                Some((d, run))
                    if *d == dev
                        && run.len() < 256
                        && run.last().is_some_and(|l| {
                            l.blkaddr.get() + l.nblocks.get() == e.blkaddr.get()
                        }) =>
                {
                    run.push(e)
                }
                _ => items.push((dev, vec![e])),
            }
        };
        for &(dev, blk) in order {
            if let Some(e) = self
                .blob(dev)
                .and_then(|b| b.chunks.read().unwrap().get(&blk).copied())
            {
                push(dev, e, &mut items);
            }
        }
        for (i, b) in self.blobs.iter().enumerate() {
            for e in b.all_chunks() {
                push(i as u16 + 1, e, &mut items);
            }
        }
        self.fetch_runs(&items, threads, PREFETCH_RUN)
    }

    /// Whether the image records a start (`shoal build --order`).
    pub fn has_start(&self) -> bool {
        self.image
            .chunk_table
            .as_ref()
            .is_some_and(|t| !t.starts.is_empty())
    }

    /// Fetch the recorded start (`shoal build --order`: the blocks of each
    /// blob a recorded run read) on `threads` threads, in requests of at
    /// most [`START_RUN`] bytes taken from the blobs in turn, so that every
    /// blob's first bytes are ready soon and the rest arrive in parallel
    /// while the workload starts. Returns the bytes it covered.
    pub fn prefetch_start(&self, threads: usize) -> Result<u64, CoreError> {
        let Some(table) = self.image.chunk_table.as_ref() else {
            return Ok(0);
        };
        let mut per_blob: Vec<std::collections::VecDeque<(u16, Vec<ChunkEntry>)>> = table
            .starts
            .iter()
            .filter_map(|s| Some((s, self.blob(s.device_id)?)))
            .map(|(s, b)| start_runs(s, &b.chunks.read().unwrap()).into())
            .collect();
        let mut items = Vec::new();
        while per_blob.iter().any(|q| !q.is_empty()) {
            items.extend(per_blob.iter_mut().filter_map(|q| q.pop_front()));
        }
        self.fetch_runs(&items, threads, START_RUN)
    }

    /// Whether it is still bound (see [`BoundImage::prefetch`]).
    pub fn is_bound(&self) -> bool {
        !self.unbound.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Make every run of `items` ready on `threads` threads, each run with
    /// requests of at most `max_run` bytes. The first error, else the
    /// bytes covered; [`CoreError::NotBound`] once the image is unbound.
    fn fetch_runs(
        &self,
        items: &[(u16, Vec<ChunkEntry>)],
        threads: usize,
        max_run: u64,
    ) -> Result<u64, CoreError> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let first_err = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((dev, run)) = items.get(i) else {
                        break;
                    };
                    if first_err.lock().unwrap().is_some() {
                        break;
                    }
                    if !self.is_bound() {
                        first_err
                            .lock()
                            .unwrap()
                            .get_or_insert(CoreError::NotBound {
                                domain: self.key.to_string(),
                                fsid: self.spec.fsid.clone(),
                            });
                        break;
                    }
                    let b = self.blob(*dev).expect("device of a queued chunk");
                    if let Err(e) = b.cache.ensure_batch(run, &b.sources(), max_run) {
                        first_err.lock().unwrap().get_or_insert(e);
                    }
                });
            }
        });
        if let Some(e) = first_err.into_inner().unwrap() {
            return Err(e);
        }
        Ok(items
            .iter()
            .flat_map(|(_, r)| r)
            .map(|e| u64::from(e.nblocks.get()) * BLOCK)
            .sum())
    }
}

/// Largest single ranged request prefetch makes.
const PREFETCH_RUN: u64 = 8 << 20;
/// Largest request of a recorded start. Chunks are ready as their bytes
/// arrive, whatever the request's size, so a start goes in as few
/// requests as possible: one per blob unless it is larger than this or
/// scattered over more than 64 ranges.
const START_RUN: u64 = 32 << 20;

/// A blob's start as requests of up to [`START_RUN`] bytes in block order,
/// a gap of up to [`START_GAP`] bytes between two of its chunks fetched
/// along (larger gaps are skipped: a multi-range request carries the
/// pieces on either side).
fn start_runs(
    s: &erofs::start::BlobStart,
    chunks: &std::collections::BTreeMap<u32, ChunkEntry>,
) -> Vec<(u16, Vec<ChunkEntry>)> {
    let mut want: Vec<u32> = Vec::new();
    for r in &s.ranges {
        let within = chunks.range(r.blkaddr.get()..);
        want.extend(
            within
                .take_while(|(&b, _)| u64::from(b) < r.end())
                .map(|(&b, _)| b),
        );
    }
    want.sort_unstable();
    want.dedup();
    let (mut runs, mut run, mut run_bytes) = (Vec::new(), Vec::<ChunkEntry>::new(), 0u64);
    let mut take = |e: ChunkEntry, runs: &mut Vec<(u16, Vec<ChunkEntry>)>| {
        let bytes = u64::from(e.nblocks.get()) * BLOCK;
        if run_bytes + bytes > START_RUN && !run.is_empty() {
            runs.push((s.device_id, std::mem::take(&mut run)));
            run_bytes = 0;
        }
        run.push(e);
        run_bytes += bytes;
    };
    let mut last_end: Option<u32> = None;
    for b in want {
        if let Some(end) = last_end.filter(|&end| end < b) {
            if u64::from(b - end) * BLOCK <= START_GAP {
                for (_, e) in chunks.range(end..b) {
                    take(*e, &mut runs);
                }
            }
        }
        let e = chunks[&b];
        last_end = Some(b + e.nblocks.get());
        take(e, &mut runs);
    }
    if !run.is_empty() {
        runs.push((s.device_id, run));
    }
    runs
}

/// Largest gap between two chunks of a start fetched with them.
const START_GAP: u64 = 256 << 10;
