//! The recorded start (see docs/format.md, "Recorded start"): for an image
//! built with an access order (`--order`), the block ranges of every blob
//! that the recorded run read, in the order it first read them. A daemon
//! fetches them as soon as the image is bound, in parallel, before the
//! workload asks: the top layer's are one run at its blob's start (the
//! builder laid them out there), a shared lower layer's are wherever that
//! layer keeps them, since its layout must not depend on the image.
//!
//! A hint only: every byte fetched is still checked against its chunk's
//! digest. The section sits inside the chunk table, so the trailer's
//! digest covers it.

use crate::chunk::{take_records, BlobHeader, ChunkEntry};
use crate::error::{Error, Result};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The section's magic; `1` is its version.
pub const START_MAGIC: [u8; 8] = *b"SHOALST1";

/// One run of blocks of a blob the recorded run read.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct StartRange {
    pub blkaddr: U32,
    pub nblocks: U32,
}
const _: () = assert!(core::mem::size_of::<StartRange>() == 8);

impl StartRange {
    pub fn new(blkaddr: u32, nblocks: u32) -> Self {
        StartRange {
            blkaddr: blkaddr.into(),
            nblocks: nblocks.into(),
        }
    }

    /// One past the last block.
    pub fn end(&self) -> u64 {
        u64::from(self.blkaddr.get()) + u64::from(self.nblocks.get())
    }
}

/// A blob's recorded start: its ranges, first read first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobStart {
    pub device_id: u16,
    pub ranges: Vec<StartRange>,
}

impl BlobStart {
    /// Blocks the start covers.
    pub fn blocks(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.nblocks.get())).sum()
    }
}

/// Collects a start chunk by chunk, first read first, merging a chunk that
/// continues the previous range and skipping chunks already listed.
#[derive(Default)]
pub struct StartBuilder {
    starts: Vec<BlobStart>,
    seen: std::collections::HashSet<(u16, u32)>,
}

impl StartBuilder {
    pub fn push(&mut self, device_id: u16, e: &ChunkEntry) {
        if !self.seen.insert((device_id, e.blkaddr.get())) {
            return;
        }
        let i = match self.starts.iter().position(|s| s.device_id == device_id) {
            Some(i) => i,
            None => {
                self.starts.push(BlobStart {
                    device_id,
                    ranges: Vec::new(),
                });
                self.starts.len() - 1
            }
        };
        let ranges = &mut self.starts[i].ranges;
        match ranges.last_mut() {
            Some(r) if r.end() == u64::from(e.blkaddr.get()) => {
                r.nblocks = (r.nblocks.get() + e.nblocks.get()).into()
            }
            _ => ranges.push(StartRange::new(e.blkaddr.get(), e.nblocks.get())),
        }
    }

    /// The starts, by device id.
    pub fn finish(mut self) -> Vec<BlobStart> {
        self.starts.sort_by_key(|s| s.device_id);
        self.starts
    }
}

/// Append the section (nothing for no starts: images without an order stay
/// byte for byte what earlier builds wrote).
pub fn encode(out: &mut Vec<u8>, starts: &[BlobStart]) {
    if starts.is_empty() {
        return;
    }
    out.extend_from_slice(&START_MAGIC);
    out.extend_from_slice(&(starts.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for s in starts {
        let h = BlobHeader {
            device_id: s.device_id.into(),
            reserved: 0.into(),
            nentries: (s.ranges.len() as u32).into(),
        };
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(s.ranges.as_bytes());
    }
}

/// The section, if `rest` begins with one, and what follows it. Each blob
/// has a chunk list and appears once; its ranges are non-empty, inside the
/// blob and do not overlap.
pub fn decode<'a>(
    rest: &'a [u8],
    blob_blocks: &[(u16, u32)],
    blobs: &[(u16, Vec<ChunkEntry>)],
) -> Result<(Vec<BlobStart>, &'a [u8])> {
    let bad = |m: String| Error::ChunkTable(format!("start section: {m}"));
    let Some(body) = rest.strip_prefix(&START_MAGIC) else {
        return Ok((Vec::new(), rest));
    };
    let (counts, mut rest) =
        U64::read_from_prefix(body).map_err(|_| bad("truncated header".into()))?;
    let (n, reserved) = (counts.get() as u32, (counts.get() >> 32) as u32);
    if reserved != 0 {
        return Err(bad("reserved bytes are not zero".into()));
    }
    let mut starts: Vec<BlobStart> = Vec::new();
    for i in 0..n {
        let (h, r) = BlobHeader::read_from_prefix(rest)
            .map_err(|_| bad(format!("truncated blob header {i}")))?;
        let (dev, k) = (h.device_id.get(), h.nentries.get() as usize);
        let (ranges, r) = take_records::<StartRange>(r, k)
            .ok_or_else(|| bad(format!("device {dev}: {k} ranges overrun the table")))?;
        rest = r;
        let blocks = blob_blocks.iter().find(|(d, _)| *d == dev).map(|(_, b)| *b);
        match blocks {
            _ if !blobs.iter().any(|(d, _)| *d == dev) => {
                return Err(bad(format!("device {dev} has no chunk list")))
            }
            _ if h.reserved.get() != 0 => return Err(bad(format!("device {dev}: reserved bytes"))),
            _ if starts.iter().any(|s| s.device_id == dev) => {
                return Err(bad(format!("device {dev} listed twice")))
            }
            _ if ranges.is_empty() => return Err(bad(format!("device {dev}: no range"))),
            _ => check_ranges(&ranges, u64::from(blocks.unwrap_or(0)))
                .map_err(|m| bad(format!("device {dev}: {m}")))?,
        }
        starts.push(BlobStart {
            device_id: dev,
            ranges,
        });
    }
    Ok((starts, rest))
}

/// Ranges of 1 or more blocks, inside `blocks`, none overlapping another.
fn check_ranges(ranges: &[StartRange], blocks: u64) -> std::result::Result<(), String> {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.blkaddr.get());
    let mut end = 0u64;
    for r in &sorted {
        let (start, nb) = (u64::from(r.blkaddr.get()), u64::from(r.nblocks.get()));
        if nb == 0 || r.end() > blocks {
            return Err(format!(
                "range at block {start} (+{nb}) is empty or exceeds {blocks} blocks"
            ));
        }
        if start < end {
            return Err(format!("range at block {start} overlaps another"));
        }
        end = r.end();
    }
    Ok(())
}
