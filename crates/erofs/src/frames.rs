//! The frame table: how a data blob is stored *compressed* on a remote,
//! without changing the blob the kernel reads (see docs/format.md).
//!
//! A blob's remote object is a run of independent zstd frames, each of
//! which decompresses to a whole run of the blob's blocks. The table (in
//! the trusted bootstrap, inside the chunk table's digest) lists, per
//! frame, its block range, where it sits in the object and the sha256 of
//! its compressed bytes, so a lazy reader can fetch any frame by range,
//! verify it before decompressing a byte, and bound what decompression may
//! produce. The object is named by its own sha256 (content addressing, as a
//! registry requires), which the table records too.

use crate::chunk::{take_records, ChunkEntry, MAX_CHUNK_BLOCKS};
use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const FRAMES_MAGIC: [u8; 8] = *b"SHOALFT1";
pub const BLOCK: u64 = 4096;
/// `algorithm` of a blob whose frames are zstd frames.
pub const ALGORITHM_ZSTD: u8 = 1;
/// The decompressed size a builder aims a frame at: small chunks are
/// batched up to this, so small files do not each cost a frame (and a
/// request); a chunk bigger than this is a frame of its own. Measured on
/// the corpus: 512 KiB left the base layer 0.7 % larger than nydus's zstd
/// blob, 1 MiB made it 2 % smaller but a recorded start fetched 13 % more
/// (a start's chunks in a shared lower layer bring their whole frames);
/// 768 KiB is 1 % smaller and fetches 7 % more.
pub const FRAME_TARGET: u64 = 768 << 10;
/// What compression may add to incompressible bytes (zstd's bound for a
/// 1 GiB frame is far below this).
const MAX_EXPANSION: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FramesHeader {
    pub magic: [u8; 8],
    pub nblobs: U32,
    pub reserved: U32,
}
const _: () = assert!(core::mem::size_of::<FramesHeader>() == 16);

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FramesBlobHeader {
    pub device_id: U16,
    pub algorithm: u8,
    pub reserved: u8,
    pub nframes: U32,
    pub object_size: U64,
    pub object_sha256: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<FramesBlobHeader>() == 48);

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameEntry {
    /// First blob block the frame decompresses to.
    pub blkaddr: U32,
    pub nblocks: U32,
    /// Where the compressed frame sits in the remote object.
    pub coffset: U64,
    pub clen: U32,
    pub reserved: U32,
    /// sha256 of the compressed frame's bytes.
    pub sha256: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<FrameEntry>() == 56);

impl FrameEntry {
    pub fn end_block(&self) -> u32 {
        self.blkaddr.get() + self.nblocks.get()
    }
    pub fn raw_len(&self) -> u64 {
        u64::from(self.nblocks.get()) * BLOCK
    }
    pub fn coffset_end(&self) -> u64 {
        self.coffset.get() + u64::from(self.clen.get())
    }
}

/// How one blob is stored compressed: its object and its frames, which
/// tile the blob's blocks in order and the object's bytes in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobFrames {
    pub device_id: u16,
    pub algorithm: u8,
    pub object_size: u64,
    pub object_sha256: [u8; 32],
    pub frames: Vec<FrameEntry>,
}

impl BlobFrames {
    /// The object's name on a remote: its lowercase hex sha256.
    pub fn object_name(&self) -> String {
        hex::encode(self.object_sha256)
    }

    /// Index of the frame holding `blkaddr`.
    pub fn frame_of(&self, blkaddr: u32) -> Option<usize> {
        let i = self
            .frames
            .partition_point(|f| f.blkaddr.get() <= blkaddr)
            .checked_sub(1)?;
        (blkaddr < self.frames[i].end_block()).then_some(i)
    }

    /// Decompress one fetched frame: its sha256 is checked before a byte is
    /// decompressed, and it must yield exactly its declared length, into a
    /// buffer of that length (a zstd bomb cannot allocate more).
    pub fn decompress(
        &self,
        frame: &FrameEntry,
        compressed: &[u8],
    ) -> std::result::Result<Vec<u8>, String> {
        if compressed.len() as u64 != u64::from(frame.clen.get()) {
            return Err(format!(
                "{} compressed bytes, the frame table says {}",
                compressed.len(),
                frame.clen.get()
            ));
        }
        if Sha256::digest(compressed).as_slice() != frame.sha256 {
            return Err("compressed frame sha256 mismatch".into());
        }
        let mut out = vec![0u8; frame.raw_len() as usize];
        let n = zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(compressed, out.as_mut_slice()))
            .map_err(|e| {
                format!(
                    "zstd: {e} (the frame must decompress to {} bytes)",
                    out.len()
                )
            })?;
        if n != out.len() {
            return Err(format!(
                "frame decompressed to {n} bytes, the frame table says {}",
                out.len()
            ));
        }
        Ok(out)
    }
}

pub(crate) fn encode(out: &mut Vec<u8>, blobs: &[BlobFrames]) {
    out.extend_from_slice(
        FramesHeader {
            magic: FRAMES_MAGIC,
            nblobs: (blobs.len() as u32).into(),
            reserved: 0.into(),
        }
        .as_bytes(),
    );
    for b in blobs {
        out.extend_from_slice(
            FramesBlobHeader {
                device_id: b.device_id.into(),
                algorithm: b.algorithm,
                reserved: 0,
                nframes: (b.frames.len() as u32).into(),
                object_size: b.object_size.into(),
                object_sha256: b.object_sha256,
            }
            .as_bytes(),
        );
        out.extend_from_slice(b.frames.as_bytes());
    }
}

/// Parse and validate a frame section. `blob_blocks` gives each device's
/// size in blocks; `chunks` the chunk table already parsed, so no chunk
/// straddles two frames (a chunk is verified whole, from one frame).
pub(crate) fn decode(
    bytes: &[u8],
    blob_blocks: &[(u16, u32)],
    chunks: &[(u16, Vec<ChunkEntry>)],
) -> Result<Vec<BlobFrames>> {
    let bad = |m: String| Error::ChunkTable(format!("frame table: {m}"));
    let (hdr, mut rest) =
        FramesHeader::read_from_prefix(bytes).map_err(|_| bad("truncated header".into()))?;
    if hdr.magic != FRAMES_MAGIC {
        return Err(bad("bad magic".into()));
    }
    let mut out: Vec<BlobFrames> = Vec::new();
    for i in 0..hdr.nblobs.get() {
        let (bh, r) = FramesBlobHeader::read_from_prefix(rest)
            .map_err(|_| bad(format!("truncated blob header {i}")))?;
        let dev = bh.device_id.get();
        let n = bh.nframes.get() as usize;
        let (frames, r) = take_records::<FrameEntry>(r, n)
            .ok_or_else(|| bad(format!("device {dev}: {n} frames overrun the table")))?;
        rest = r;
        let blocks = blob_blocks
            .iter()
            .find(|(d, _)| *d == dev)
            .map(|(_, b)| *b)
            .ok_or_else(|| bad(format!("device {dev} is not in the device table")))?;
        if out.iter().any(|b| b.device_id == dev) {
            return Err(bad(format!("device {dev} listed twice")));
        }
        if bh.algorithm != ALGORITHM_ZSTD {
            return Err(bad(format!(
                "device {dev}: unknown algorithm {}",
                bh.algorithm
            )));
        }
        let b = BlobFrames {
            device_id: dev,
            algorithm: bh.algorithm,
            object_size: bh.object_size.get(),
            object_sha256: bh.object_sha256,
            frames,
        };
        check_tiling(&b, blocks).map_err(|m| bad(format!("device {dev}: {m}")))?;
        if let Some((_, entries)) = chunks.iter().find(|(d, _)| *d == dev) {
            check_chunks(&b, entries).map_err(|m| bad(format!("device {dev}: {m}")))?;
        }
        out.push(b);
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} trailing bytes", rest.len())));
    }
    Ok(out)
}

/// Frames tile blocks `[0, blocks)` and bytes `[0, object_size)` in order,
/// each non-empty and no bigger than the largest chunk.
fn check_tiling(b: &BlobFrames, blocks: u32) -> std::result::Result<(), String> {
    let (mut next_block, mut next_byte) = (0u64, 0u64);
    for f in &b.frames {
        let (start, nb, clen) = (
            u64::from(f.blkaddr.get()),
            u64::from(f.nblocks.get()),
            u64::from(f.clen.get()),
        );
        if start != next_block || nb == 0 || nb > MAX_CHUNK_BLOCKS {
            return Err(format!(
                "frame at block {start} (+{nb}) does not continue at block {next_block}"
            ));
        }
        if f.coffset.get() != next_byte || clen == 0 || clen > nb * BLOCK + MAX_EXPANSION {
            return Err(format!(
                "frame at block {start}: bytes {}+{clen} do not continue at byte {next_byte}",
                f.coffset.get()
            ));
        }
        next_block = start + nb;
        next_byte += clen;
    }
    if next_block != u64::from(blocks) {
        return Err(format!("frames cover {next_block} of {blocks} blocks"));
    }
    if next_byte != b.object_size {
        return Err(format!(
            "frames cover {next_byte} of the object's {} bytes",
            b.object_size
        ));
    }
    Ok(())
}

fn check_chunks(b: &BlobFrames, entries: &[ChunkEntry]) -> std::result::Result<(), String> {
    for e in entries {
        let first = b.frame_of(e.blkaddr.get());
        let last = b.frame_of(e.blkaddr.get() + e.nblocks.get() - 1);
        if first.is_none() || first != last {
            return Err(format!(
                "chunk at block {} (+{}) straddles frames",
                e.blkaddr.get(),
                e.nblocks.get()
            ));
        }
    }
    Ok(())
}

/// Frame boundaries for a blob of `blocks` blocks holding `entries`
/// (sorted): whole chunks batched up to [`FRAME_TARGET`], so every chunk
/// lies in one frame. Returns `(blkaddr, nblocks)` per frame.
pub fn plan(entries: &[ChunkEntry], blocks: u32) -> Vec<(u32, u32)> {
    let target = (FRAME_TARGET / BLOCK) as u32;
    let mut out = Vec::new();
    let mut start = 0u32;
    for e in entries {
        let s = e.blkaddr.get();
        // Close the current frame before a chunk that would overflow it.
        if s > start && s - start + e.nblocks.get() > target {
            out.push((start, s - start));
            start = s;
        }
    }
    if blocks > start {
        out.push((start, blocks - start));
    }
    out
}

/// zstd settings pinned so a build is reproducible: one frame per call,
/// no checksum (the table's sha256 covers the frame), content size
/// recorded, single-threaded.
pub fn compress_frame(level: i32, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::new(level)?;
    c.include_checksum(false)?;
    c.include_contentsize(true)?;
    c.include_dictid(false)?;
    c.compress(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blkaddr: u32, nblocks: u32) -> ChunkEntry {
        ChunkEntry {
            blkaddr: blkaddr.into(),
            nblocks: nblocks.into(),
            digest: [0; 32],
        }
    }

    #[test]
    fn plan_batches_small_chunks_and_keeps_big_ones_whole() {
        // FRAME_TARGET is 192 blocks.
        let mut entries = Vec::new();
        for i in 0..400 {
            entries.push(chunk(i, 1));
        }
        entries.push(chunk(400, 256));
        entries.push(chunk(656, 2));
        let p = plan(&entries, 658);
        assert_eq!(
            p,
            vec![(0, 192), (192, 192), (384, 16), (400, 256), (656, 2)]
        );
        assert_eq!(plan(&[], 0), vec![]);
    }

    #[test]
    fn decompress_bounds_and_verifies() {
        let raw = vec![7u8; 8192];
        let c = compress_frame(3, &raw).unwrap();
        let frame = |nblocks: u32, c: &[u8]| FrameEntry {
            blkaddr: 0.into(),
            nblocks: nblocks.into(),
            coffset: 0.into(),
            clen: (c.len() as u32).into(),
            reserved: 0.into(),
            sha256: Sha256::digest(c).into(),
        };
        let b = BlobFrames {
            device_id: 1,
            algorithm: ALGORITHM_ZSTD,
            object_size: c.len() as u64,
            object_sha256: [0; 32],
            frames: vec![],
        };
        assert!(b.decompress(&frame(2, &c), &c).unwrap() == raw);
        // More than declared: refused without growing the buffer.
        let err = |r: std::result::Result<Vec<u8>, String>| r.map(|v| v.len()).unwrap_err();
        assert!(err(b.decompress(&frame(1, &c), &c)).contains("zstd"));
        // Fewer than declared.
        assert!(err(b.decompress(&frame(3, &c), &c)).contains("decompressed to 8192"));
        // A tampered frame never reaches the decompressor.
        let mut t = c.clone();
        t[c.len() / 2] ^= 1;
        assert!(err(b.decompress(&frame(2, &c), &t)).contains("sha256"));
    }
}
