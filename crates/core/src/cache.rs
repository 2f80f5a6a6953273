//! The cache of one data blob in one domain: a sparse file the size of the
//! blob plus a persistent readiness bitmap (one bit per 4 KiB block).
//!
//! Crash safety: a chunk's bytes are verified against its digest and written
//! before its bit is set in memory; [`BlobCache::flush`] (run every 100 ms
//! by the daemon, and on unbind) `fdatasync`s the data *before* writing and
//! syncing the bits, so a bit set on disk always means durable, verified
//! bytes, whenever the process dies.
//! Bits only ever go from 0 to 1, so a torn bitmap write leaves a mix of old
//! and new bits, each of which is still true.

use crate::error::{CoreError, FlightError};
use crate::fetch::{self, Source};
use crate::flight::{Flight, Flights};
use crate::names::BlobId;
use crate::workdir::BlobFiles;
use erofs::chunktable::ChunkEntry;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::blocks::{block_span, BLOCK};
/// Fetch-and-verify attempts before a chunk read fails (wrong bytes from a
/// remote are retried like transient errors).
const VERIFY_ATTEMPTS: u32 = 3;

#[derive(Default, Debug, serde::Serialize, serde::Deserialize, Clone)]
pub struct BlobStats {
    /// Verified bytes stored (decompressed).
    pub fetched_bytes: u64,
    /// Ranged requests made to remotes.
    #[serde(default)]
    pub requests: u64,
    /// Bytes received from remotes (compressed, when the source is).
    #[serde(default)]
    pub wire_bytes: u64,
    pub fetches: u64,
    pub hits: u64,
    pub misses: u64,
    pub failures: u64,
    pub inflight: u64,
}

#[derive(Default)]
struct Counters {
    fetched_bytes: AtomicU64,
    requests: AtomicU64,
    wire_bytes: AtomicU64,
    fetches: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    failures: AtomicU64,
}

/// Chunks one caller leads the fetch of (see [`BlobCache::claim`]). If it
/// is dropped before [`BlobCache::complete`] (a panic, an early return),
/// its flights end with an error: no waiter is left to time out.
pub struct Claim<'a> {
    cache: &'a BlobCache,
    led: Vec<(ChunkEntry, Arc<Flight>)>,
    waits: Vec<(ChunkEntry, Arc<Flight>)>,
}

impl Claim<'_> {
    /// Whether this claim leads any fetch.
    pub fn is_empty(&self) -> bool {
        self.led.is_empty()
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        for (e, flight) in std::mem::take(&mut self.led) {
            self.cache
                .land(e.blkaddr.get(), &flight, Err(FlightError::Abandoned));
        }
    }
}

pub struct BlobCache {
    pub name: BlobId,
    pub blocks: u32,
    data_path: PathBuf,
    map_path: PathBuf,
    data: File,
    map_file: File,
    layout: crate::readiness::Layout,
    ready: Mutex<Vec<u8>>,
    /// Bitmap byte ranges set in memory but not yet durable on disk.
    dirty: Mutex<Vec<(usize, usize)>>,
    /// Serializes flushes so bits hit the disk only after their data.
    flush_lock: Mutex<()>,
    /// Chunks being fetched, by first block.
    flights: Flights,
    counters: Counters,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> CoreError {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |source| CoreError::Io { path, what, source }
}

/// Where a cache's data file descriptor comes from. A frontend whose kernel
/// watches cache files (fanotify pre-content marks) must hand out descriptors
/// opened *before* the watch, so the daemon's own I/O never raises events.
pub trait DataFiles: Send + Sync {
    /// Open `path` read-write, creating it if missing.
    fn open(&self, path: &Path) -> std::io::Result<File>;
}

/// Plain `open(2)`.
pub struct PlainFiles;

impl DataFiles for PlainFiles {
    fn open(&self, path: &Path) -> std::io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
    }
}

/// Whether bytes `[offset, offset + len)` of a cache file are ready by its
/// readiness map alone (see [`crate::readiness::map_ready`]).
pub fn map_range_ready(map: &File, offset: u64, len: u64) -> bool {
    let (first, n) = block_span(offset, len);
    crate::readiness::map_ready(map, first, n)
}

impl BlobCache {
    /// Open (or create) the cache of blob `id` in `dir`, reusing whatever
    /// an earlier run left ready.
    pub fn open(dir: &Path, id: &BlobId, blocks: u32) -> Result<Self, CoreError> {
        Self::open_with(dir, id, blocks, &PlainFiles)
    }

    /// [`BlobCache::open`] with the data file from `files`.
    pub fn open_with(
        dir: &Path,
        id: &BlobId,
        blocks: u32,
        files: &dyn DataFiles,
    ) -> Result<Self, CoreError> {
        std::fs::create_dir_all(dir).map_err(io(dir, "creating cache directory"))?;
        let BlobFiles {
            data: data_path,
            ready: map_path,
            ..
        } = BlobFiles::in_dir(dir, id);
        let data = files
            .open(&data_path)
            .map_err(io(&data_path, "opening cache file"))?;
        let size = u64::from(blocks) * BLOCK;
        if data.metadata().map_err(io(&data_path, "stat"))?.len() != size {
            data.set_len(size)
                .map_err(io(&data_path, "sizing cache file"))?;
        }
        let map_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&map_path)
            .map_err(io(&map_path, "opening readiness map"))?;
        let (bits, unsynced) = crate::readiness::load(&map_file, blocks)
            .map_err(io(&map_path, "opening readiness map"))?;
        // Bits known only from this boot's volatile section: true, but not
        // durable yet; the next flush makes them so.
        let dirty = if unsynced {
            vec![(0, bits.len())]
        } else {
            Vec::new()
        };
        Ok(BlobCache {
            name: *id,
            blocks,
            data_path,
            map_path,
            data,
            map_file,
            layout: crate::readiness::Layout::new(blocks),
            ready: Mutex::new(bits),
            dirty: Mutex::new(dirty),
            flush_lock: Mutex::new(()),
            flights: Flights::default(),
            counters: Counters::default(),
        })
    }

    /// Bound how long readers wait on another reader's fetch (the remote's
    /// deadline and retry budget, plus a margin).
    pub fn set_flight_wait(&self, max: Duration) {
        self.flights.set_wait(max);
    }

    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    pub fn map_path(&self) -> &Path {
        &self.map_path
    }

    /// The open data file, e.g. to hand its descriptor to a watcher.
    pub fn data_file(&self) -> &File {
        &self.data
    }

    /// Count a read served from the cache without [`BlobCache::ensure`].
    pub fn count_hit(&self) {
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Every block of the blob is ready: nothing can be fetched any more.
    pub fn is_complete(&self) -> bool {
        self.ready_blocks() == u64::from(self.blocks)
    }

    /// Whether every block of `[start, start + n)` is ready.
    pub fn is_ready(&self, start: u32, n: u32) -> bool {
        let bits = self.ready.lock().unwrap();
        (start..start.saturating_add(n)).all(|b| {
            bits.get(b as usize / 8)
                .is_some_and(|&x| x & (1 << (b % 8)) != 0)
        })
    }

    /// Whether every block under bytes `[offset, offset + len)` is ready.
    pub fn is_range_ready(&self, offset: u64, len: u64) -> bool {
        let (first, n) = block_span(offset, len);
        self.is_ready(first, n)
    }

    pub fn ready_blocks(&self) -> u64 {
        self.ready
            .lock()
            .unwrap()
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    pub fn stats(&self) -> BlobStats {
        let c = &self.counters;
        BlobStats {
            fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            wire_bytes: c.wire_bytes.load(Ordering::Relaxed),
            fetches: c.fetches.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            inflight: self.flights.len() as u64,
        }
    }

    /// Make the chunk `entry` ready: on a miss fetch it (once, however many
    /// callers ask concurrently), verify, write, mark. Returns whether this
    /// call waited for or did a fetch.
    pub fn ensure(&self, entry: &ChunkEntry, sources: &[Source]) -> Result<bool, CoreError> {
        if self.is_ready(entry.blkaddr.get(), entry.nblocks.get()) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let len = u64::from(entry.nblocks.get()) * BLOCK;
        self.ensure_batch(std::slice::from_ref(entry), sources, len)?;
        Ok(true)
    }

    /// End the flight for the chunk at `start`: count a failure, retire
    /// the flight and wake its waiters with the leader's result.
    fn land(&self, start: u32, flight: &Flight, result: Result<(), FlightError>) {
        if result.is_err() {
            self.counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.flights.land(start, flight, result);
    }

    /// What a waiter on the chunk `e` is told when its flight failed.
    fn flight_error(&self, e: &ChunkEntry, source: FlightError) -> CoreError {
        CoreError::Flight {
            blob: self.name.to_string(),
            offset: u64::from(e.blkaddr.get()) * BLOCK,
            len: u64::from(e.nblocks.get()) * BLOCK,
            source,
        }
    }

    fn fetch_error(&self, e: &ChunkEntry, why: String) -> CoreError {
        CoreError::Fetch {
            blob: self.name.to_string(),
            offset: u64::from(e.blkaddr.get()) * BLOCK,
            len: u64::from(e.nblocks.get()) * BLOCK,
            why,
        }
    }

    /// Make many chunks ready (sorted by block), fetching each run of
    /// adjacent missing chunks (or of the frames holding them) with one
    /// ranged request of up to `max_run` bytes and verifying every chunk on
    /// its own. Chunks another caller is fetching are waited for.
    pub fn ensure_batch(
        &self,
        entries: &[ChunkEntry],
        sources: &[Source],
        max_run: u64,
    ) -> Result<(), CoreError> {
        let claim = self.claim(entries, true);
        self.complete(claim, sources, max_run)
    }

    /// Whether every chunk of `entries` is ready or being fetched: a read
    /// of them has nothing to ask the remote for, only to wait.
    pub fn is_covered(&self, entries: &[ChunkEntry]) -> bool {
        let table = self.flights.table();
        entries.iter().all(|e| {
            self.is_ready(e.blkaddr.get(), e.nblocks.get())
                || table.joining(e.blkaddr.get()).is_some()
        })
    }

    /// Take the lead for every chunk of `entries` that is neither ready
    /// nor being fetched: concurrent readers of those chunks wait for this
    /// claim's [`BlobCache::complete`]. With `wait_others`, chunks another
    /// caller leads are waited for at completion; without, they are left
    /// to it (read-ahead). Counts hits and misses.
    pub fn claim(&self, entries: &[ChunkEntry], wait_others: bool) -> Claim<'_> {
        let mut claim = Claim {
            cache: self,
            led: Vec::new(),
            waits: Vec::new(),
        };
        let mut table = self.flights.table();
        for e in entries {
            if self.is_ready(e.blkaddr.get(), e.nblocks.get()) {
                if wait_others {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            match table.joining(e.blkaddr.get()) {
                Some(f) if wait_others => claim.waits.push((*e, f)),
                Some(_) => {}
                None => {
                    self.counters.misses.fetch_add(1, Ordering::Relaxed);
                    claim.led.push((*e, table.lead(e.blkaddr.get())));
                }
            }
        }
        claim
    }

    /// Fetch what `claim` leads, wake its waiters, then wait for the chunks
    /// others lead. The first error, if any.
    pub fn complete(
        &self,
        mut claim: Claim<'_>,
        sources: &[Source],
        max_run: u64,
    ) -> Result<(), CoreError> {
        let led = std::mem::take(&mut claim.led);
        let want: Vec<ChunkEntry> = led.iter().map(|(e, _)| *e).collect();
        // Each chunk's waiters are woken as soon as it is stored, not when
        // the whole claim is: a large request streams.
        let at: HashMap<u32, usize> = (want.iter().enumerate())
            .map(|(k, e)| (e.blkaddr.get(), k))
            .collect();
        let mut landed = vec![false; led.len()];
        let results = self.fill(&want, sources, max_run, &mut |e| {
            if let Some(&k) = at.get(&e.blkaddr.get()) {
                if !std::mem::replace(&mut landed[k], true) {
                    self.land(e.blkaddr.get(), &led[k].1, Ok(()));
                }
            }
        });
        let mut first_err = None;
        for (((e, flight), why), landed) in led.iter().zip(results).zip(landed) {
            if landed {
                continue;
            }
            let result = match why {
                None => Ok(()),
                Some(why) => Err(self.fetch_error(e, why)),
            };
            let landed = result
                .as_ref()
                .map(|_| ())
                .map_err(|e| FlightError::Failed {
                    cause: e.to_string(),
                });
            self.land(e.blkaddr.get(), flight, landed);
            if let Err(err) = result {
                first_err.get_or_insert(err);
            }
        }
        for (e, f) in std::mem::take(&mut claim.waits) {
            if let Err(why) = f.wait(self.flights.wait_limit()) {
                first_err.get_or_insert(self.flight_error(&e, why));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Fetch, verify and store `want` from the first source that delivers
    /// each chunk. Wrong bytes are asked for again, up to
    /// [`VERIFY_ATTEMPTS`] rounds over the sources; a failing remote is not
    /// (remotes retry transient errors themselves, see `Retrying`), so a
    /// read fails within one fetch budget per source. Returns per chunk
    /// `None` (ready) or why not; `ready` hears of each chunk as soon as
    /// it is stored.
    fn fill(
        &self,
        want: &[ChunkEntry],
        sources: &[Source],
        max_run: u64,
        ready: &mut dyn FnMut(&ChunkEntry),
    ) -> Vec<Option<String>> {
        let mut why: Vec<Option<String>> = want
            .iter()
            .map(|e| {
                let end = u64::from(e.blkaddr.get()) + u64::from(e.nblocks.get());
                Some(if end > u64::from(self.blocks) {
                    format!("chunk beyond the blob's {} blocks", self.blocks)
                } else {
                    String::from("no remote")
                })
            })
            .collect();
        let fetchable: Vec<usize> = (0..want.len())
            .filter(|&k| why[k].as_deref() == Some("no remote"))
            .collect();
        let mut pending = fetchable;
        for _attempt in 1..=VERIFY_ATTEMPTS {
            let mut wrong = false;
            for src in sources {
                if pending.is_empty() {
                    break;
                }
                let sub: Vec<ChunkEntry> = pending.iter().map(|&k| want[k]).collect();
                let mut wire = fetch::Wire::default();
                let misses = fetch::fetch_from(
                    src,
                    &self.name.to_string(),
                    &sub,
                    max_run,
                    &mut |e, b| {
                        self.store(e, b)?;
                        ready(e);
                        Ok(())
                    },
                    &mut wire,
                );
                let c = &self.counters;
                c.requests.fetch_add(wire.requests, Ordering::Relaxed);
                c.wire_bytes.fetch_add(wire.bytes, Ordering::Relaxed);
                let mut missed = vec![false; sub.len()];
                for (i, m) in misses {
                    missed[i] = true;
                    wrong |= m.wrong_bytes;
                    why[pending[i]] = Some(m.why);
                }
                for (i, &k) in pending.iter().enumerate() {
                    if !missed[i] {
                        why[k] = None;
                    }
                }
                pending.retain(|&k| why[k].is_some());
            }
            if !wrong || pending.is_empty() {
                break;
            }
        }
        why
    }

    /// Write verified bytes of a chunk and mark them ready.
    fn store(&self, entry: &ChunkEntry, bytes: &[u8]) -> Result<(), CoreError> {
        let (start, n) = (entry.blkaddr.get(), entry.nblocks.get());
        self.data
            .write_all_at(bytes, u64::from(start) * BLOCK)
            .map_err(io(&self.data_path, "writing cache"))?;
        self.mark(start, n);
        self.counters
            .fetched_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Set the bits in memory and in the map's volatile section (readers
    /// may use the bytes at once: they are in the page cache; the fanotify
    /// pump answers from the map) and queue them for [`flush`].
    fn mark(&self, start: u32, n: u32) {
        let (lo, hi) = (start as usize / 8, (start + n - 1) as usize / 8 + 1);
        let mut bits = self.ready.lock().unwrap();
        for b in start..start + n {
            bits[b as usize / 8] |= 1 << (b % 8);
        }
        // Under the lock, so concurrent marks of one byte land in order.
        if let Err(e) = self
            .map_file
            .write_all_at(&bits[lo..hi], self.layout.volatile() + lo as u64)
        {
            // Only the pump's shortcut is lost: it asks the daemon instead.
            tracing::debug!(blob = %self.name, error = %e, "writing volatile readiness");
        }
        drop(bits);
        self.dirty.lock().unwrap().push((lo, hi));
    }

    /// Make readiness durable: `fdatasync` the data first, then write the
    /// bitmap bytes that changed and sync them. A crash before this ends
    /// loses only readiness (the chunks are fetched again), never truth.
    pub fn flush(&self) -> Result<(), CoreError> {
        let _serial = self.flush_lock.lock().unwrap();
        let ranges = std::mem::take(&mut *self.dirty.lock().unwrap());
        if ranges.is_empty() {
            return Ok(());
        }
        self.data
            .sync_data()
            .map_err(io(&self.data_path, "syncing cache"))?;
        let snapshot: Vec<(usize, Vec<u8>)> = {
            let bits = self.ready.lock().unwrap();
            ranges
                .iter()
                .map(|&(lo, hi)| (lo, bits[lo..hi].to_vec()))
                .collect()
        };
        for (lo, bytes) in snapshot {
            self.map_file
                .write_all_at(&bytes, self.layout.durable() + lo as u64)
                .map_err(io(&self.map_path, "writing readiness map"))?;
        }
        self.map_file
            .sync_data()
            .map_err(io(&self.map_path, "syncing readiness map"))
    }

    /// Drop the cache file's clean pages, whatever put them there: the
    /// daemon's fills, or the kernel's buffered reads of the file under an
    /// erofs mount without `directio`. The cache file is a store, not a page
    /// cache: what a mount reads is cached where it is read (erofs's pages,
    /// FUSE's pages), so these are a second copy. Dirty pages stay; the
    /// daemon calls this every second, after readiness flushes.
    pub fn trim_pages(&self) {
        use rustix::fs::{fadvise, Advice};
        if let Err(e) = fadvise(&self.data, 0, None, Advice::DontNeed) {
            tracing::debug!(blob = %self.name, error = %e, "dropping cache file pages");
        }
    }

    /// Read ready bytes from the cache file.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CoreError> {
        self.data
            .read_exact_at(buf, offset)
            .map_err(io(&self.data_path, "reading cache"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(blkaddr: u32) -> ChunkEntry {
        ChunkEntry {
            blkaddr: blkaddr.into(),
            nblocks: 1.into(),
            digest: [0; 32],
        }
    }

    /// A waiter learns why the chunk it waited for did not come: the
    /// leader dropped its claim, or took too long.
    #[test]
    fn waiters_get_typed_flight_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let id = BlobId::parse(&"ab".repeat(32)).unwrap();
        let cache = BlobCache::open(tmp.path(), &id, 4).unwrap();
        let e = entry(1);

        let leader = cache.claim(&[e], true);
        let waiter = cache.claim(&[e], true);
        assert!(!leader.is_empty() && waiter.is_empty());
        drop(leader);
        let err = cache.complete(waiter, &[], BLOCK).unwrap_err();
        assert!(
            matches!(
                err,
                CoreError::Flight {
                    source: FlightError::Abandoned,
                    offset: BLOCK,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().ends_with(": the fetch was abandoned"),
            "{err}"
        );

        cache.set_flight_wait(Duration::from_millis(20));
        let leader = cache.claim(&[e], true);
        let waiter = cache.claim(&[e], true);
        let err = cache.complete(waiter, &[], BLOCK).unwrap_err();
        assert!(
            matches!(
                err,
                CoreError::Flight {
                    source: FlightError::TimedOut { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err
            .to_string()
            .contains("the fetch in flight took longer than"));

        // The leader's own failure reaches its waiters as their cause.
        let waiter = cache.claim(&[e], true);
        let led = cache.complete(leader, &[], BLOCK).unwrap_err();
        assert!(led.to_string().contains("no remote"), "{led}");
        match cache.complete(waiter, &[], BLOCK) {
            Err(CoreError::Flight {
                source: FlightError::Failed { cause },
                ..
            }) => assert_eq!(cause, led.to_string()),
            r => panic!("{r:?}"),
        }
        assert_eq!(cache.stats().failures, 2);
    }
}
