//! Fetch and verify: where a blob's missing chunks come from and how they
//! cross the network. A [`Source`] is a remote serving the blob either raw
//! (by its tag) or as its compressed object (by the object's digest, read
//! through the bootstrap's frame table). Either way one ranged request
//! carries a run of adjacent chunks or frames, and nothing is handed on
//! unverified: a frame's sha256 before it is decompressed, its exact
//! decompressed length, then every chunk's own digest. Readiness and
//! single flight are the cache's business ([`crate::cache`]).

use crate::blocks::BLOCK;
use crate::error::CoreError;
use crate::remote::Remote;
use erofs::chunktable::ChunkEntry;
use erofs::frames::BlobFrames;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Somewhere a blob can be fetched from.
#[derive(Clone)]
pub struct Source {
    pub remote: Arc<dyn Remote>,
    /// The blob's compressed object on this remote, if it is stored so.
    pub frames: Option<Arc<BlobFrames>>,
}

impl Source {
    /// The blob itself, by its tag.
    pub fn raw(remote: Arc<dyn Remote>) -> Self {
        Source {
            remote,
            frames: None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.frames {
            None => self.remote.describe(),
            Some(f) => format!(
                "{} (zstd object {})",
                self.remote.describe(),
                f.object_name()
            ),
        }
    }

    /// Whether two sources fetch the same bytes the same way.
    pub fn same(&self, other: &Source) -> bool {
        self.describe() == other.describe()
    }
}

/// Why one chunk could not be had from one source.
pub(crate) struct Miss {
    pub why: String,
    /// The bytes arrived but were wrong (worth asking again), as opposed to
    /// a remote that failed (already retried by [`crate::remote::Retrying`]).
    pub wrong_bytes: bool,
}

/// What crossing the network cost: ranged requests made, bytes received.
#[derive(Default)]
pub(crate) struct Wire {
    pub requests: u64,
    pub bytes: u64,
}

impl Wire {
    fn fetch(
        &mut self,
        remote: &dyn Remote,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, crate::remote::RemoteError> {
        self.requests += 1;
        let r = remote.fetch(name, offset, len);
        if let Ok(b) = &r {
            self.bytes += b.len() as u64;
        }
        r
    }
}

/// Byte ranges of one blob fetched together: several per request where the
/// remote serves them so, each request carrying at most `max_weight` (the
/// caller's request size, in decompressed bytes; one range at least) and
/// [`MAX_RANGES`] ranges. `ranges` are (offset, len, weight), sorted and
/// apart; one result per range.
fn fetch_grouped(
    remote: &dyn Remote,
    name: &str,
    ranges: &[(u64, u64, u64)],
    max_weight: u64,
    wire: &mut Wire,
) -> Vec<Result<Vec<u8>, crate::remote::RemoteError>> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut i = 0;
    while i < ranges.len() {
        let mut weight = ranges[i].2;
        let mut j = i + 1;
        while j < ranges.len() && j - i < MAX_RANGES && weight + ranges[j].2 <= max_weight {
            weight += ranges[j].2;
            j += 1;
        }
        let group: Vec<(u64, u64)> = ranges[i..j].iter().map(|r| (r.0, r.1)).collect();
        // `None`: the remote does not serve ranges together (no request
        // counted); they go one by one below.
        let together = match group.len() {
            1 => Ok(None),
            _ => remote.fetch_ranges(name, &group),
        };
        match together {
            Ok(Some(parts)) => {
                wire.requests += 1;
                wire.bytes += parts.iter().map(|p| p.len() as u64).sum::<u64>();
                out.extend(parts.into_iter().map(Ok));
            }
            Err(e) => {
                wire.requests += 1;
                out.extend(group.iter().map(|_| Err(e.clone())));
            }
            Ok(None) => {
                for &(offset, len) in &group {
                    out.push(wire.fetch(remote, name, offset, len));
                }
            }
        }
        i = j;
    }
    out
}

/// Most ranges asked in one request.
const MAX_RANGES: usize = shoal_registry::ranges::MAX_RANGES;

/// Where verified bytes of a chunk go.
pub(crate) type Store<'a> = dyn FnMut(&ChunkEntry, &[u8]) -> Result<(), CoreError> + 'a;

/// Fetch the chunks `want` (sorted by block, none overlapping) of blob
/// `name` from `src` with as few requests as `max_run` (decompressed bytes
/// per request) allows, handing each verified chunk to `store`. Returns the
/// chunks (indexes into `want`) it could not deliver, and why.
pub(crate) fn fetch_from(
    src: &Source,
    name: &str,
    want: &[ChunkEntry],
    max_run: u64,
    store: &mut Store<'_>,
    wire: &mut Wire,
) -> Vec<(usize, Miss)> {
    match &src.frames {
        None => fetch_raw(&*src.remote, name, want, max_run, store, wire),
        Some(f) => fetch_frames(&*src.remote, name, f, want, max_run, store, wire),
    }
}

/// Count every chunk of `ks` (indexes into the wanted list) as missed.
fn fail(
    misses: &mut Vec<(usize, Miss)>,
    ks: impl IntoIterator<Item = usize>,
    why: &str,
    wrong_bytes: bool,
) {
    misses.extend(ks.into_iter().map(|k| {
        let why = why.to_string();
        (k, Miss { why, wrong_bytes })
    }));
}

fn check(e: &ChunkEntry, bytes: &[u8], what: impl FnOnce() -> String) -> Option<Miss> {
    (Sha256::digest(bytes).as_slice() != e.digest).then(|| Miss {
        why: format!("{}: sha256 mismatch", what()),
        wrong_bytes: true,
    })
}

fn deliver(store: &mut Store<'_>, e: &ChunkEntry, bytes: &[u8]) -> Option<Miss> {
    store(e, bytes).err().map(|err| Miss {
        why: err.to_string(),
        wrong_bytes: false,
    })
}

fn fetch_raw(
    remote: &dyn Remote,
    name: &str,
    want: &[ChunkEntry],
    max_run: u64,
    store: &mut Store<'_>,
    wire: &mut Wire,
) -> Vec<(usize, Miss)> {
    // Runs of adjacent chunks (indexes i..j), one range each.
    let mut runs = Vec::new();
    let mut i = 0;
    while i < want.len() {
        let start = want[i].blkaddr.get();
        let mut end = start + want[i].nblocks.get();
        let mut j = i + 1;
        while j < want.len()
            && want[j].blkaddr.get() == end
            && u64::from(end + want[j].nblocks.get() - start) * BLOCK <= max_run
        {
            end += want[j].nblocks.get();
            j += 1;
        }
        runs.push((i, j, start, end));
        i = j;
    }
    let ranges: Vec<(u64, u64, u64)> = runs
        .iter()
        .map(|&(_, _, start, end)| {
            let len = u64::from(end - start) * BLOCK;
            (u64::from(start) * BLOCK, len, len)
        })
        .collect();
    let mut misses = Vec::new();
    let fetched = fetch_grouped(remote, name, &ranges, max_run, wire);
    for (&(i, j, start, end), got) in runs.iter().zip(fetched) {
        let bytes = match got {
            Ok(b) => b,
            Err(e) => {
                let why = e.to_string();
                let (offset, len) = (u64::from(start) * BLOCK, u64::from(end - start) * BLOCK);
                tracing::warn!(blob = name, offset, len, cause = %why, "fetch failed");
                fail(&mut misses, i..j, &why, false);
                continue;
            }
        };
        for (k, e) in want.iter().enumerate().take(j).skip(i) {
            let at = (u64::from(e.blkaddr.get() - start) * BLOCK) as usize;
            let slice = &bytes[at..at + e.nblocks.get() as usize * BLOCK as usize];
            let miss = check(e, slice, || remote.describe()).or_else(|| deliver(store, e, slice));
            if let Some(m) = miss {
                if m.wrong_bytes {
                    tracing::warn!(blob = name, offset = u64::from(e.blkaddr.get()) * BLOCK, cause = %m.why, "fetched bytes fail verification");
                }
                misses.push((k, m));
            }
        }
    }
    misses
}

/// Frames of one request, each with the wanted chunks (indexes) it holds.
type FrameRun = Vec<(usize, Vec<usize>)>;

/// The frames holding `want`, grouped into runs of adjacent frames (one
/// request each) of at most `max_run` decompressed bytes (at least one
/// frame). A chunk no single frame holds (another image of the domain may
/// pin chunks this image's frame table was not checked against) is a miss.
fn frame_runs(
    f: &BlobFrames,
    want: &[ChunkEntry],
    max_run: u64,
    misses: &mut Vec<(usize, Miss)>,
) -> Vec<FrameRun> {
    let mut runs: Vec<FrameRun> = Vec::new();
    let mut raw = 0u64;
    for (k, e) in want.iter().enumerate() {
        let last_block = e.blkaddr.get() + e.nblocks.get() - 1;
        let Some(fi) = f
            .frame_of(e.blkaddr.get())
            .filter(|&fi| f.frame_of(last_block) == Some(fi))
        else {
            let why = format!(
                "object {}: no frame holds the chunk at block {} (+{})",
                f.object_name(),
                e.blkaddr.get(),
                e.nblocks.get()
            );
            misses.push((
                k,
                Miss {
                    why,
                    wrong_bytes: false,
                },
            ));
            continue;
        };
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|(last, _)| *last == fi) => {
                run.last_mut().unwrap().1.push(k)
            }
            Some(run)
                if run.last().is_some_and(|(last, _)| *last + 1 == fi)
                    && raw + f.frames[fi].raw_len() <= max_run =>
            {
                raw += f.frames[fi].raw_len();
                run.push((fi, vec![k]));
            }
            _ => {
                raw = f.frames[fi].raw_len();
                runs.push(vec![(fi, vec![k])]);
            }
        }
    }
    runs
}

fn fetch_frames(
    remote: &dyn Remote,
    name: &str,
    f: &BlobFrames,
    want: &[ChunkEntry],
    max_run: u64,
    store: &mut Store<'_>,
    wire: &mut Wire,
) -> Vec<(usize, Miss)> {
    let object = f.object_name();
    let mut misses = Vec::new();
    let runs = frame_runs(f, want, max_run, &mut misses);
    let ranges: Vec<(u64, u64, u64)> = runs
        .iter()
        .map(|run| {
            let first = &f.frames[run[0].0];
            let last = &f.frames[run[run.len() - 1].0];
            let raw = run.iter().map(|(fi, _)| f.frames[*fi].raw_len()).sum();
            let lo = first.coffset.get();
            (lo, last.coffset_end() - lo, raw)
        })
        .collect();
    let t0 = std::time::Instant::now();
    let fetched = fetch_grouped(remote, &object, &ranges, max_run, wire);
    tracing::debug!(
        blob = name,
        runs = runs.len(),
        ms = t0.elapsed().as_millis() as u64,
        "frames fetched"
    );
    for ((run, &(lo, len, _)), got) in runs.iter().zip(&ranges).zip(fetched) {
        let bytes = match got {
            Ok(b) => b,
            Err(e) => {
                let why = e.to_string();
                tracing::warn!(blob = name, object = %object, offset = lo, len, cause = %why, "fetch failed");
                for (_, ks) in run {
                    fail(&mut misses, ks.iter().copied(), &why, false);
                }
                continue;
            }
        };
        for (fi, ks) in run {
            let fr = &f.frames[*fi];
            let at = (fr.coffset.get() - lo) as usize;
            let what = || {
                format!(
                    "{}: object {object}, frame {fi} (blocks {}+{})",
                    remote.describe(),
                    fr.blkaddr.get(),
                    fr.nblocks.get()
                )
            };
            let raw = match f.decompress(fr, &bytes[at..at + fr.clen.get() as usize]) {
                Ok(raw) => raw,
                Err(why) => {
                    let why = format!("{}: {why}", what());
                    tracing::warn!(blob = name, cause = %why, "compressed frame refused");
                    fail(&mut misses, ks.iter().copied(), &why, true);
                    continue;
                }
            };
            for &k in ks {
                let e = &want[k];
                let at = (u64::from(e.blkaddr.get() - fr.blkaddr.get()) * BLOCK) as usize;
                let slice = &raw[at..at + e.nblocks.get() as usize * BLOCK as usize];
                if let Some(m) = check(e, slice, what).or_else(|| deliver(store, e, slice)) {
                    if m.wrong_bytes {
                        tracing::warn!(blob = name, cause = %m.why, "decompressed chunk fails verification");
                    }
                    misses.push((k, m));
                }
            }
        }
    }
    misses
}
