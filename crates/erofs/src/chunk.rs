//! One stored chunk as the digest table lists it: a leaf module, so that
//! the chunk table and its frame table section (which both hold chunks)
//! depend on it and not on each other.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A chunk of a data blob: its first block, its length in blocks, and the
/// sha256 of exactly those bytes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ChunkEntry {
    pub blkaddr: U32,
    pub nblocks: U32,
    pub digest: [u8; 32],
}
const _: () = assert!(core::mem::size_of::<ChunkEntry>() == 40);

/// The most blocks one chunk may have: 1 GiB, the largest chunk size.
pub const MAX_CHUNK_BLOCKS: u64 = (1 << 30) / 4096;
