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
use crate::remote::{Piece, Remote};
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

/// Pieces of one blob (sorted, apart; (offset, len, weight)) fetched in
/// requests of at most `max_weight` (the caller's request size, in
/// decompressed bytes; one piece at least) and [`MAX_RANGES`] ranges, each
/// piece handed to `got` (by index) as soon as it has arrived, so that a
/// reader waiting on the first bytes of a large request does not wait for
/// its last. Returns the pieces that did not arrive, and why.
fn fetch_grouped(
    remote: &dyn Remote,
    name: &str,
    pieces: &[(u64, u64, u64)],
    max_weight: u64,
    wire: &mut Wire,
    got: &mut dyn FnMut(usize, &[u8]),
) -> Vec<(usize, String)> {
    let mut failed = Vec::new();
    let mut i = 0;
    while i < pieces.len() {
        let (mut weight, mut ranges, mut j) = (pieces[i].2, 1, i + 1);
        while j < pieces.len() && weight + pieces[j].2 <= max_weight {
            let apart = pieces[j - 1].0 + pieces[j - 1].1 != pieces[j].0;
            if apart && ranges == MAX_RANGES {
                break;
            }
            ranges += usize::from(apart);
            weight += pieces[j].2;
            j += 1;
        }
        let group: Vec<Piece> = pieces[i..j].iter().map(|p| (p.0, p.1)).collect();
        let mut arrived = vec![false; group.len()];
        let mut sink = |k: usize, bytes: &[u8]| {
            arrived[k] = true;
            wire.bytes += bytes.len() as u64;
            got(i + k, bytes);
        };
        let result = remote.fetch_pieces(name, &group, &mut sink, &mut wire.requests);
        let why = match result {
            Ok(()) => "the remote did not deliver it".to_string(),
            Err(e) => e.to_string(),
        };
        if arrived.iter().any(|a| !a) {
            tracing::warn!(blob = name, offset = group[0].0, pieces = group.len(), cause = %why, "fetch failed");
        }
        failed.extend(
            (0..group.len())
                .filter(|&k| !arrived[k])
                .map(|k| (i + k, why.clone())),
        );
        i = j;
    }
    failed
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
    // One piece per chunk: adjacent chunks travel as one range.
    let pieces: Vec<(u64, u64, u64)> = want
        .iter()
        .map(|e| {
            let len = u64::from(e.nblocks.get()) * BLOCK;
            (u64::from(e.blkaddr.get()) * BLOCK, len, len)
        })
        .collect();
    let mut misses = Vec::new();
    let mut got = |k: usize, bytes: &[u8]| {
        let e = &want[k];
        if let Some(m) = check(e, bytes, || remote.describe()).or_else(|| deliver(store, e, bytes))
        {
            if m.wrong_bytes {
                tracing::warn!(blob = name, offset = u64::from(e.blkaddr.get()) * BLOCK, cause = %m.why, "fetched bytes fail verification");
            }
            misses.push((k, m));
        }
    };
    let failed = fetch_grouped(remote, name, &pieces, max_run, wire, &mut got);
    for (k, why) in failed {
        fail(&mut misses, [k], &why, false);
    }
    misses
}

/// The frames holding `want` (in frame order), each with the wanted chunks
/// (indexes) it holds. A chunk no single frame holds (another image of the
/// domain may pin chunks this image's frame table was not checked
/// against) is a miss.
fn frames_of(
    f: &BlobFrames,
    want: &[ChunkEntry],
    misses: &mut Vec<(usize, Miss)>,
) -> Vec<(usize, Vec<usize>)> {
    let mut frames: Vec<(usize, Vec<usize>)> = Vec::new();
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
            fail(misses, [k], &why, false);
            continue;
        };
        match frames.last_mut() {
            Some((last, ks)) if *last == fi => ks.push(k),
            _ => frames.push((fi, vec![k])),
        }
    }
    frames
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
    let frames = frames_of(f, want, &mut misses);
    let pieces: Vec<(u64, u64, u64)> = frames
        .iter()
        .map(|(fi, _)| {
            let fr = &f.frames[*fi];
            (fr.coffset.get(), u64::from(fr.clen.get()), fr.raw_len())
        })
        .collect();
    let mut got = |p: usize, bytes: &[u8]| {
        let (fi, ks) = &frames[p];
        let fr = &f.frames[*fi];
        let what = || {
            format!(
                "{}: object {object}, frame {fi} (blocks {}+{})",
                remote.describe(),
                fr.blkaddr.get(),
                fr.nblocks.get()
            )
        };
        let raw = match f.decompress(fr, bytes) {
            Ok(raw) => raw,
            Err(why) => {
                let why = format!("{}: {why}", what());
                tracing::warn!(blob = name, cause = %why, "compressed frame refused");
                fail(&mut misses, ks.iter().copied(), &why, true);
                return;
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
    };
    let t0 = std::time::Instant::now();
    let failed = fetch_grouped(remote, &object, &pieces, max_run, wire, &mut got);
    tracing::debug!(
        blob = name,
        frames = frames.len(),
        ms = t0.elapsed().as_millis() as u64,
        "frames fetched"
    );
    for (p, why) in failed {
        fail(&mut misses, frames[p].1.iter().copied(), &why, false);
    }
    misses
}
