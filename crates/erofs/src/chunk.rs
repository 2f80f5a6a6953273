//! One stored chunk as the digest table lists it, and the pieces every
//! section of that table reads with: a leaf module, so that the chunk
//! table and its frame and start sections depend on it and not on each
//! other.

use zerocopy::little_endian::{U16, U32};
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

/// The header of one blob's list in a table section (its chunk entries,
/// or its recorded-start ranges).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlobHeader {
    /// Device slot this list belongs to (1-based, as in chunk indexes).
    pub device_id: U16,
    pub reserved: U16,
    pub nentries: U32,
}
const _: () = assert!(core::mem::size_of::<BlobHeader>() == 8);

/// The most blocks one chunk may have: 1 GiB, the largest chunk size.
pub const MAX_CHUNK_BLOCKS: u64 = (1 << 30) / 4096;

/// The `n` records of `T` at the front of `bytes` (a table section's list
/// after its header) and what follows them; `None` when `bytes` holds
/// fewer, so a count read from the table never reads or allocates past it.
pub(crate) fn take_records<T>(bytes: &[u8], n: usize) -> Option<(Vec<T>, &[u8])>
where
    T: FromBytes + KnownLayout + Immutable + Unaligned + Clone + 'static,
{
    let (records, rest) = <[T]>::ref_from_prefix_with_elems(bytes, n).ok()?;
    Some((records.to_vec(), rest))
}
