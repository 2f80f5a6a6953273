//! EROFS on-disk structures, defined once, little-endian, with the field names
//! of the kernel's `fs/erofs/erofs_fs.h`. Everything here is plain data: no I/O.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const EROFS_SUPER_MAGIC_V1: u32 = 0xE0F5_E1E2;
/// The superblock starts 1 KiB into the image (room for x86 boot sectors).
pub const EROFS_SUPER_OFFSET: u64 = 1024;
/// Inodes are addressed in 32-byte units (`nid`) from `meta_blkaddr`.
pub const EROFS_ISLOTBITS: u32 = 5;
pub const EROFS_NULL_ADDR: u32 = u32::MAX;

pub const EROFS_FEATURE_COMPAT_SB_CHKSUM: u32 = 0x0000_0001;
pub const EROFS_FEATURE_COMPAT_MTIME: u32 = 0x0000_0002;
pub const EROFS_FEATURE_COMPAT_XATTR_FILTER: u32 = 0x0000_0004;
/// Long xattr name prefixes are stored plainly in the metadata area at
/// `xattr_prefix_start * 4` (not inside a packed inode).
pub const EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX: u32 = 0x0000_0010;
/// `ishare_xattr_prefix_id` names the long prefix whose xattr holds each
/// inode's content fingerprint, for page-cache sharing (Linux 7.0+).
pub const EROFS_FEATURE_COMPAT_ISHARE_XATTRS: u32 = 0x0000_0020;

pub const EROFS_FEATURE_INCOMPAT_ZERO_PADDING: u32 = 0x0000_0001;
pub const EROFS_FEATURE_INCOMPAT_COMPR_CFGS: u32 = 0x0000_0002;
pub const EROFS_FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x0000_0004;
pub const EROFS_FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x0000_0008;
pub const EROFS_FEATURE_INCOMPAT_ZTAILPACKING: u32 = 0x0000_0010;
pub const EROFS_FEATURE_INCOMPAT_FRAGMENTS: u32 = 0x0000_0020;
pub const EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES: u32 = 0x0000_0040;
/// Incompat features this crate understands (compressed layouts are refused
/// per inode, not per image, so images mixing both still list and stat).
pub const EROFS_FEATURE_INCOMPAT_SUPPORTED: u32 = EROFS_FEATURE_INCOMPAT_ZERO_PADDING
    | EROFS_FEATURE_INCOMPAT_COMPR_CFGS
    | EROFS_FEATURE_INCOMPAT_CHUNKED_FILE
    | EROFS_FEATURE_INCOMPAT_DEVICE_TABLE
    | EROFS_FEATURE_INCOMPAT_ZTAILPACKING
    | EROFS_FEATURE_INCOMPAT_FRAGMENTS
    | EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES;

/// `struct erofs_super_block`, 128 bytes at [`EROFS_SUPER_OFFSET`].
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SuperBlock {
    pub magic: U32,
    /// crc32c of the superblock block from offset 1024, with this field zeroed.
    pub checksum: U32,
    pub feature_compat: U32,
    pub blkszbits: u8,
    pub sb_extslots: u8,
    pub root_nid: U16,
    pub inos: U64,
    pub build_time: U64,
    pub build_time_nsec: U32,
    pub blocks: U32,
    pub meta_blkaddr: U32,
    pub xattr_blkaddr: U32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: U32,
    pub u1: U16,
    pub extra_devices: U16,
    pub devt_slotoff: U16,
    pub dirblkbits: u8,
    pub xattr_prefix_count: u8,
    pub xattr_prefix_start: U32,
    pub packed_nid: U64,
    pub xattr_filter_reserved: u8,
    /// Which long prefix holds the fingerprint (with `COMPAT_ISHARE_XATTRS`).
    pub ishare_xattr_prefix_id: u8,
    pub reserved2: [u8; 22],
}
const _: () = assert!(core::mem::size_of::<SuperBlock>() == 128);

/// `i_format` bit 0: inode version.
pub const EROFS_INODE_LAYOUT_COMPACT: u16 = 0;
pub const EROFS_INODE_LAYOUT_EXTENDED: u16 = 1;
pub const EROFS_I_VERSION_MASK: u16 = 0x1;
pub const EROFS_I_DATALAYOUT_BIT: u16 = 1;
pub const EROFS_I_DATALAYOUT_MASK: u16 = 0x7;

/// Data layouts (`i_format >> 1 & 7`).
pub const EROFS_INODE_FLAT_PLAIN: u16 = 0;
pub const EROFS_INODE_COMPRESSED_FULL: u16 = 1;
pub const EROFS_INODE_FLAT_INLINE: u16 = 2;
pub const EROFS_INODE_COMPRESSED_COMPACT: u16 = 3;
pub const EROFS_INODE_CHUNK_BASED: u16 = 4;

/// `i_format` bits the format defines (`EROFS_I_ALL`): version and layout.
pub const EROFS_I_ALL_BIT: u16 = 4;
pub const EROFS_I_ALL: u16 = (1 << EROFS_I_ALL_BIT) - 1;

/// Chunk format bits in `i_u` of a chunk-based inode.
pub const EROFS_CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x001F;
pub const EROFS_CHUNK_FORMAT_INDEXES: u16 = 0x0020;

/// A block map entry (`EROFS_BLOCK_MAP_ENTRY_SIZE`): the bare `__le32`
/// block address a chunk-based inode without `EROFS_CHUNK_FORMAT_INDEXES`
/// has per chunk.
pub const EROFS_BLOCK_MAP_ENTRY_SIZE: u64 = 4;

/// How an inode's data is stored: its `i_format` layout bits, decoded once
/// so readers match on names rather than on shifted numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataLayout {
    /// `EROFS_INODE_FLAT_PLAIN`: whole blocks from `i_u`, the last padded.
    FlatPlain,
    /// `EROFS_INODE_COMPRESSED_FULL`: compressed, full lcluster indexes.
    CompressedFull,
    /// `EROFS_INODE_FLAT_INLINE`: whole blocks, then a tail inline after
    /// the inode (in the inode's block).
    FlatInline,
    /// `EROFS_INODE_COMPRESSED_COMPACT`: compressed, compacted indexes.
    CompressedCompact,
    /// `EROFS_INODE_CHUNK_BASED`: a chunk index (or block map) per chunk.
    ChunkBased,
}

impl DataLayout {
    /// The layout of an `i_format`, or `Err(bits)` for the reserved layout
    /// values 5..=7.
    pub fn from_i_format(i_format: u16) -> std::result::Result<Self, u16> {
        match (i_format >> EROFS_I_DATALAYOUT_BIT) & EROFS_I_DATALAYOUT_MASK {
            EROFS_INODE_FLAT_PLAIN => Ok(Self::FlatPlain),
            EROFS_INODE_COMPRESSED_FULL => Ok(Self::CompressedFull),
            EROFS_INODE_FLAT_INLINE => Ok(Self::FlatInline),
            EROFS_INODE_COMPRESSED_COMPACT => Ok(Self::CompressedCompact),
            EROFS_INODE_CHUNK_BASED => Ok(Self::ChunkBased),
            other => Err(other),
        }
    }

    /// The on-disk value (`EROFS_INODE_*`).
    pub fn raw(self) -> u16 {
        match self {
            Self::FlatPlain => EROFS_INODE_FLAT_PLAIN,
            Self::CompressedFull => EROFS_INODE_COMPRESSED_FULL,
            Self::FlatInline => EROFS_INODE_FLAT_INLINE,
            Self::CompressedCompact => EROFS_INODE_COMPRESSED_COMPACT,
            Self::ChunkBased => EROFS_INODE_CHUNK_BASED,
        }
    }

    /// The `i_format` of an inode with this layout (`extended`: the 64-byte
    /// inode version).
    pub fn i_format(self, extended: bool) -> u16 {
        let version = if extended {
            EROFS_INODE_LAYOUT_EXTENDED
        } else {
            EROFS_INODE_LAYOUT_COMPACT
        };
        version | (self.raw() << EROFS_I_DATALAYOUT_BIT)
    }
}

/// Compare with an `EROFS_INODE_*` value.
impl PartialEq<u16> for DataLayout {
    fn eq(&self, raw: &u16) -> bool {
        self.raw() == *raw
    }
}

/// The chunk format of a chunk-based inode (`i_u`), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkFormat {
    /// log2 of the chunk size in bytes (block size bits + `BLKBITS`).
    pub chunkbits: u32,
    /// Each chunk has a `struct erofs_inode_chunk_index` (device id and
    /// block address) rather than a bare block map entry.
    pub indexes: bool,
}

impl ChunkFormat {
    pub fn decode(i_u: u32, blkszbits: u8) -> Self {
        let format = i_u as u16;
        ChunkFormat {
            chunkbits: u32::from(format & EROFS_CHUNK_FORMAT_BLKBITS_MASK) + u32::from(blkszbits),
            indexes: format & EROFS_CHUNK_FORMAT_INDEXES != 0,
        }
    }

    /// Bytes per chunk entry: a chunk index or a block map entry.
    pub fn unit(self) -> u64 {
        if self.indexes {
            core::mem::size_of::<ChunkIndex>() as u64
        } else {
            EROFS_BLOCK_MAP_ENTRY_SIZE
        }
    }
}

/// `struct erofs_inode_compact`, 32 bytes; mtime comes from the superblock.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InodeCompact {
    pub i_format: U16,
    pub i_xattr_icount: U16,
    pub i_mode: U16,
    pub i_nlink: U16,
    pub i_size: U32,
    pub i_reserved: U32,
    /// `raw_blkaddr`, `rdev` or `chunk_info.format` depending on the type.
    pub i_u: U32,
    pub i_ino: U32,
    pub i_uid: U16,
    pub i_gid: U16,
    pub i_reserved2: U32,
}
const _: () = assert!(core::mem::size_of::<InodeCompact>() == 32);

/// `struct erofs_inode_extended`, 64 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InodeExtended {
    pub i_format: U16,
    pub i_xattr_icount: U16,
    pub i_mode: U16,
    pub i_reserved: U16,
    pub i_size: U64,
    pub i_u: U32,
    pub i_ino: U32,
    pub i_uid: U32,
    pub i_gid: U32,
    pub i_mtime: U64,
    pub i_mtime_nsec: U32,
    pub i_nlink: U32,
    pub i_reserved2: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<InodeExtended>() == 64);

/// `struct erofs_inode_chunk_index`: where one chunk of a file lives.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkIndex {
    pub advise: U16,
    /// Device slot (0 = primary device, 1.. = data blobs).
    pub device_id: U16,
    /// Block address inside that device; [`EROFS_NULL_ADDR`] is a hole.
    pub blkaddr: U32,
}
const _: () = assert!(core::mem::size_of::<ChunkIndex>() == 8);

/// `struct erofs_deviceslot`, 128 bytes each, at `devt_slotoff * 128`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DeviceSlot {
    /// For shoal: the lowercase hex sha256 of the blob (also its file name).
    pub tag: [u8; 64],
    pub blocks: U32,
    pub mapped_blkaddr: U32,
    pub reserved: [u8; 56],
}
const _: () = assert!(core::mem::size_of::<DeviceSlot>() == 128);
pub const EROFS_DEVT_SLOT_SIZE: u64 = 128;

impl Default for DeviceSlot {
    fn default() -> Self {
        <Self as FromZeros>::new_zeroed()
    }
}

/// `struct erofs_dirent`, 12 bytes; names follow the dirent array in each block.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Dirent {
    pub nid: U64,
    pub nameoff: U16,
    pub file_type: u8,
    pub reserved: u8,
}
const _: () = assert!(core::mem::size_of::<Dirent>() == 12);

pub const EROFS_FT_UNKNOWN: u8 = 0;
pub const EROFS_FT_REG_FILE: u8 = 1;
pub const EROFS_FT_DIR: u8 = 2;
pub const EROFS_FT_CHRDEV: u8 = 3;
pub const EROFS_FT_BLKDEV: u8 = 4;
pub const EROFS_FT_FIFO: u8 = 5;
pub const EROFS_FT_SOCK: u8 = 6;
pub const EROFS_FT_SYMLINK: u8 = 7;

/// `struct erofs_xattr_ibody_header`, followed by `h_shared_count` u32 ids.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrIbodyHeader {
    pub h_name_filter: U32,
    pub h_shared_count: u8,
    pub h_reserved2: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<XattrIbodyHeader>() == 12);

/// `struct erofs_xattr_entry`, followed by the name suffix and the value,
/// the whole padded to 4 bytes.
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct XattrEntry {
    pub e_name_len: u8,
    pub e_name_index: u8,
    pub e_value_size: U16,
}
const _: () = assert!(core::mem::size_of::<XattrEntry>() == 4);

/// Bit 7 of `e_name_index`: the low bits index the long prefix table.
pub const EROFS_XATTR_LONG_PREFIX: u8 = 0x80;
pub const EROFS_XATTR_LONG_PREFIX_MASK: u8 = 0x7f;

/// The fingerprint xattr mkfs.erofs writes with `--xattr-inode-digest`: a
/// long prefix of base index 0 (no namespace, so never listed to users)
/// whose value is `sha256:` and the 32-byte digest of the file's content.
pub const EROFS_FINGERPRINT_XATTR: &[u8] = b"erofs.fingerprint.v1";
pub const EROFS_FINGERPRINT_SHA256: &[u8] = b"sha256:";

pub const EROFS_XATTR_INDEX_USER: u8 = 1;
pub const EROFS_XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const EROFS_XATTR_INDEX_TRUSTED: u8 = 4;
pub const EROFS_XATTR_INDEX_LUSTRE: u8 = 5;
pub const EROFS_XATTR_INDEX_SECURITY: u8 = 6;

/// Name prefixes by index, as `fs/erofs/xattr.c` maps them.
pub const XATTR_PREFIXES: [(u8, &str); 6] = [
    (
        EROFS_XATTR_INDEX_POSIX_ACL_ACCESS,
        "system.posix_acl_access",
    ),
    (
        EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT,
        "system.posix_acl_default",
    ),
    (EROFS_XATTR_INDEX_USER, "user."),
    (EROFS_XATTR_INDEX_TRUSTED, "trusted."),
    (EROFS_XATTR_INDEX_LUSTRE, "lustre."),
    (EROFS_XATTR_INDEX_SECURITY, "security."),
];

/// The full xattr name for an on-disk (index, suffix) pair.
pub fn xattr_full_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let (_, prefix) = XATTR_PREFIXES.iter().find(|(i, _)| *i == index)?;
    let mut name = prefix.as_bytes().to_vec();
    name.extend_from_slice(suffix);
    Some(name)
}

/// Split a full xattr name into the on-disk (index, suffix) form. The ACL
/// names must match exactly; the others by prefix.
pub fn xattr_split_name(name: &[u8]) -> Option<(u8, &[u8])> {
    for (index, prefix) in XATTR_PREFIXES {
        let p = prefix.as_bytes();
        let exact = index == EROFS_XATTR_INDEX_POSIX_ACL_ACCESS
            || index == EROFS_XATTR_INDEX_POSIX_ACL_DEFAULT;
        if exact {
            if name == p {
                return Some((index, &[]));
            }
        } else if name.len() > p.len() && name.starts_with(p) {
            return Some((index, &name[p.len()..]));
        }
    }
    None
}

/// Size of the inline xattr area for an `i_xattr_icount`.
pub fn xattr_ibody_size(icount: u16) -> u64 {
    if icount == 0 {
        0
    } else {
        12 + 4 * (u64::from(icount) - 1)
    }
}

/// The kernel's superblock checksum: crc32c with seed ~0 and no final
/// inversion, over the rest of the superblock's block with `checksum` zeroed.
pub fn sb_checksum(block_from_sb: &[u8]) -> u32 {
    !crc32c::crc32c(block_from_sb)
}

/// `new_encode_dev` as the kernel stores `rdev`.
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Inverse of [`encode_rdev`]: (major, minor).
pub fn decode_rdev(rdev: u32) -> (u32, u32) {
    (
        (rdev & 0xfff00) >> 8,
        (rdev & 0xff) | ((rdev >> 12) & 0xfff00),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_names_round_trip() {
        for name in [
            &b"user.foo"[..],
            b"security.capability",
            b"trusted.overlay.opaque",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
        ] {
            let (i, s) = xattr_split_name(name).unwrap();
            assert_eq!(xattr_full_name(i, s).unwrap(), name);
        }
        assert!(xattr_split_name(b"system.posix_acl_accessX").is_none());
        assert!(xattr_split_name(b"user.").is_none());
        assert!(xattr_split_name(b"bogus.x").is_none());
    }

    #[test]
    fn rdev_round_trip() {
        for (ma, mi) in [(0, 0), (1, 3), (8, 1), (259, 70000), (4095, 0xfffff)] {
            assert_eq!(decode_rdev(encode_rdev(ma, mi)), (ma, mi));
        }
    }
}
