//! The chunk digest table: shoal's integrity extension (see docs/format.md).
//!
//! For every data blob an image references, the table lists each stored
//! chunk (block address, block count, sha256 of exactly those bytes), so a
//! lazy reader can verify any chunk it fetches by range, on its own. The
//! table is appended to the bootstrap after the EROFS blocks, where the
//! kernel never looks, and found through a fixed-size trailer at the end of
//! the file; the bootstrap's own digest pins it.

use crate::chunk::take_records;
pub use crate::chunk::{BlobHeader, ChunkEntry, MAX_CHUNK_BLOCKS};
use crate::error::{Error, Result};
use crate::frames::{self, BlobFrames, FRAMES_MAGIC};
use crate::start::{self, BlobStart};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const TABLE_MAGIC: [u8; 8] = *b"SHOALCT1";
pub const TRAILER_MAGIC: [u8; 8] = *b"SHOALEND";

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TableHeader {
    pub magic: [u8; 8],
    pub nblobs: U32,
    pub reserved: U32,
}
const _: () = assert!(core::mem::size_of::<TableHeader>() == 16);

/// Last 64 bytes of a shoal bootstrap.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Trailer {
    pub magic: [u8; 8],
    pub table_offset: U64,
    pub table_len: U64,
    pub table_sha256: [u8; 32],
    pub reserved: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<Trailer>() == 64);
pub const TRAILER_SIZE: u64 = 64;

/// The parsed table: per device id, entries sorted by `blkaddr`, disjoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkTable {
    pub blobs: Vec<(u16, Vec<ChunkEntry>)>,
    /// How blobs are stored compressed on remotes (empty: uncompressed).
    pub frames: Vec<BlobFrames>,
    /// Recorded starts, by device (only images built with an order).
    pub starts: Vec<BlobStart>,
}

impl ChunkTable {
    pub fn entries(&self, device_id: u16) -> Option<&[ChunkEntry]> {
        self.blobs
            .iter()
            .find(|(d, _)| *d == device_id)
            .map(|(_, e)| e.as_slice())
    }

    /// The entry covering `blkaddr` on `device_id`.
    pub fn find(&self, device_id: u16, blkaddr: u32) -> Option<&ChunkEntry> {
        let e = self.entries(device_id)?;
        let i = e.partition_point(|c| c.blkaddr.get() <= blkaddr);
        let c = e.get(i.checked_sub(1)?)?;
        (u64::from(blkaddr) < u64::from(c.blkaddr.get()) + u64::from(c.nblocks.get())).then_some(c)
    }

    /// The frames of `device_id`'s blob, if it is stored compressed.
    pub fn frames(&self, device_id: u16) -> Option<&BlobFrames> {
        self.frames.iter().find(|f| f.device_id == device_id)
    }

    pub fn total_entries(&self) -> usize {
        self.blobs.iter().map(|(_, e)| e.len()).sum()
    }

    /// Serialize: the table bytes followed by the trailer, for appending at
    /// byte `offset` of the bootstrap.
    pub fn encode(&self, offset: u64) -> Vec<u8> {
        use sha2::Digest;
        let mut out = Vec::new();
        out.extend_from_slice(
            TableHeader {
                magic: TABLE_MAGIC,
                nblobs: (self.blobs.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        for (dev, entries) in &self.blobs {
            out.extend_from_slice(
                BlobHeader {
                    device_id: (*dev).into(),
                    reserved: 0.into(),
                    nentries: (entries.len() as u32).into(),
                }
                .as_bytes(),
            );
            out.extend_from_slice(entries.as_bytes());
        }
        // Only ordered images carry a start section, and only compressed
        // ones a frame table: others stay byte for byte what earlier
        // builds wrote.
        start::encode(&mut out, &self.starts);
        if !self.frames.is_empty() {
            frames::encode(&mut out, &self.frames);
        }
        let trailer = Trailer {
            magic: TRAILER_MAGIC,
            table_offset: offset.into(),
            table_len: (out.len() as u64).into(),
            table_sha256: sha2::Sha256::digest(&out).into(),
            reserved: [0; 8],
        };
        out.extend_from_slice(trailer.as_bytes());
        out
    }

    /// Parse and validate table bytes (without the trailer). `blob_blocks`
    /// gives each device's size in blocks, to bound every entry.
    pub fn decode(bytes: &[u8], blob_blocks: &[(u16, u32)]) -> Result<Self> {
        let bad = |m: String| Error::ChunkTable(m);
        let (hdr, mut rest) =
            TableHeader::read_from_prefix(bytes).map_err(|_| bad("truncated header".into()))?;
        if hdr.magic != TABLE_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let mut blobs: Vec<(u16, Vec<ChunkEntry>)> = Vec::new();
        for i in 0..hdr.nblobs.get() {
            let (bh, r) = BlobHeader::read_from_prefix(rest)
                .map_err(|_| bad(format!("truncated blob header {i}")))?;
            let n = bh.nentries.get() as usize;
            let dev = bh.device_id.get();
            let (entries, r) = take_records::<ChunkEntry>(r, n)
                .ok_or_else(|| bad(format!("device {dev}: {n} entries overrun the table")))?;
            rest = r;
            let blocks = blob_blocks
                .iter()
                .find(|(d, _)| *d == dev)
                .map(|(_, b)| u64::from(*b))
                .ok_or_else(|| bad(format!("device {dev} is not in the device table")))?;
            if blobs.iter().any(|(d, _)| *d == dev) {
                return Err(bad(format!("device {dev} listed twice")));
            }
            let mut end = 0u64;
            for e in &entries {
                let (start, nb) = (u64::from(e.blkaddr.get()), u64::from(e.nblocks.get()));
                // No builder writes a chunk over 1 GiB; a reader fetches and
                // verifies a chunk whole, so a bigger one is a memory attack.
                if nb > MAX_CHUNK_BLOCKS {
                    return Err(bad(format!(
                        "device {dev}: entry at block {start} of {nb} blocks exceeds the largest chunk (1 GiB)"
                    )));
                }
                if nb == 0 || start < end || start + nb > blocks {
                    return Err(bad(format!(
                        "device {dev}: entry at block {start} (+{nb}) overlaps or exceeds {blocks} blocks"
                    )));
                }
                end = start + nb;
            }
            blobs.push((dev, entries));
        }
        let (starts, rest) = start::decode(rest, blob_blocks, &blobs)?;
        let frames = if rest.starts_with(&FRAMES_MAGIC) {
            frames::decode(rest, blob_blocks, &blobs)?
        } else if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        } else {
            Vec::new()
        };
        Ok(ChunkTable {
            blobs,
            frames,
            starts,
        })
    }

    /// The recorded start of `device_id`'s blob.
    pub fn start(&self, device_id: u16) -> Option<&BlobStart> {
        self.starts.iter().find(|s| s.device_id == device_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(blkaddr: u32, nblocks: u32) -> ChunkEntry {
        ChunkEntry {
            blkaddr: blkaddr.into(),
            nblocks: nblocks.into(),
            digest: [0; 32],
        }
    }

    fn start(dev: u16, ranges: &[(u32, u32)]) -> BlobStart {
        BlobStart {
            device_id: dev,
            ranges: ranges
                .iter()
                .map(|&(b, n)| crate::start::StartRange::new(b, n))
                .collect(),
        }
    }

    /// A start section round-trips; one naming an unlisted device, an
    /// empty range, a range past the blob, overlapping ranges, a device
    /// twice, or cut short is refused by name.
    #[test]
    fn start_sections() {
        let table = |starts: Vec<BlobStart>| ChunkTable {
            blobs: vec![(1, vec![entry(0, 4)]), (2, vec![entry(0, 2)])],
            frames: vec![],
            starts,
        };
        let sizes = [(1, 10), (2, 2)];
        let decode = |t: &ChunkTable| {
            let bytes = t.encode(0);
            ChunkTable::decode(&bytes[..bytes.len() - 64], &sizes)
        };
        let good = table(vec![start(1, &[(4, 2), (0, 3)]), start(2, &[(0, 2)])]);
        let back = decode(&good).unwrap();
        assert_eq!(back, good);
        assert_eq!(back.start(1).unwrap().blocks(), 5);
        assert!(decode(&table(vec![])).unwrap().start(1).is_none());
        for (starts, why) in [
            (vec![start(3, &[(0, 1)])], "device 3 has no chunk list"),
            (vec![start(1, &[(0, 0)])], "empty or exceeds"),
            (vec![start(1, &[])], "no range"),
            (vec![start(2, &[(1, 2)])], "exceeds 2 blocks"),
            (vec![start(1, &[(0, 3), (2, 1)])], "overlaps"),
            (
                vec![start(1, &[(0, 1)]), start(1, &[(2, 1)])],
                "device 1 listed twice",
            ),
        ] {
            let e = decode(&table(starts)).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
        let bytes = good.encode(0);
        let cut = &bytes[..bytes.len() - 64 - 4];
        let e = ChunkTable::decode(cut, &sizes).unwrap_err().to_string();
        assert!(e.contains("start section"), "{e}");
    }

    #[test]
    fn entries_are_bounded() {
        let decode = |entries: Vec<ChunkEntry>, blocks: u32| {
            let t = ChunkTable {
                blobs: vec![(1, entries)],
                frames: vec![],
                starts: vec![],
            };
            let bytes = t.encode(0);
            ChunkTable::decode(&bytes[..bytes.len() - 64], &[(1, blocks)])
        };
        let huge = u32::MAX;
        assert!(decode(vec![entry(0, 262_144)], huge).is_ok());
        // A 64 GiB chunk on a 64 GiB device: in bounds, but refused.
        let e = decode(vec![entry(0, 16 << 20)], huge).unwrap_err();
        assert!(e.to_string().contains("largest chunk"), "{e}");
        assert!(decode(vec![entry(10, 1)], 10).is_err());
        assert!(decode(vec![entry(0, 2), entry(1, 1)], 10).is_err());
        assert!(decode(vec![entry(0, 0)], 10).is_err());
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Per device its entries, and per device its size in blocks.
    type Devices = (Vec<(u16, Vec<ChunkEntry>)>, Vec<(u16, u32)>);

    /// Sorted, disjoint entries within `blocks`, from gaps and lengths.
    fn table() -> impl Strategy<Value = Devices> {
        proptest::collection::vec(
            proptest::collection::vec((0u32..64, 1u32..300, any::<[u8; 32]>()), 0..40),
            0..4,
        )
        .prop_map(|devs| {
            let mut blobs = Vec::new();
            let mut sizes = Vec::new();
            for (i, runs) in devs.into_iter().enumerate() {
                let dev = i as u16 + 1;
                let mut at = 0u32;
                let entries: Vec<ChunkEntry> = runs
                    .into_iter()
                    .map(|(gap, n, digest)| {
                        let e = ChunkEntry {
                            blkaddr: (at + gap).into(),
                            nblocks: n.into(),
                            digest,
                        };
                        at += gap + n;
                        e
                    })
                    .collect();
                blobs.push((dev, entries));
                sizes.push((dev, at));
            }
            (blobs, sizes)
        })
    }

    proptest! {
        /// What the builder encodes, the reader decodes unchanged, and
        /// `find` locates every entry by its block address.
        #[test]
        fn encode_decode_round_trip((blobs, sizes) in table(), offset in 0u64..1 << 40) {
            let t = ChunkTable {
                blobs,
                ..Default::default()
            };
            let bytes = t.encode(offset);
            let (table, trailer) = bytes.split_at(bytes.len() - TRAILER_SIZE as usize);
            let tr = Trailer::read_from_bytes(trailer).unwrap();
            prop_assert_eq!(tr.table_offset.get(), offset);
            prop_assert_eq!(tr.table_len.get(), table.len() as u64);
            let back = ChunkTable::decode(table, &sizes).unwrap();
            prop_assert_eq!(&back, &t);
            for (dev, entries) in &t.blobs {
                for e in entries {
                    prop_assert_eq!(back.find(*dev, e.blkaddr.get()), Some(e));
                }
            }
        }

        /// Any byte string decodes to a table or an error, never a panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = ChunkTable::decode(&bytes, &[(1, 1000), (2, 5)]);
        }
    }
}
