//! Reader over any positioned-read source. Every offset and length read from
//! the image is bounds-checked before use, so a hostile image yields an
//! [`Error`] naming the nid and field, never a panic or a huge allocation.

use crate::chunktable::{ChunkTable, Trailer, TRAILER_MAGIC, TRAILER_SIZE};
use crate::error::{Error, Result};
use crate::ondisk::*;
use crate::tree::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use zerocopy::FromBytes;

/// A positioned-read source: a file, a byte slice, later a cache.
pub trait ReadAt: Send + Sync {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn size(&self) -> std::io::Result<u64>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for &[u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
        {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// A bootstrap's bytes as a long-lived reader holds them: in memory when
/// the file is at most [`ImageBytes::IN_MEMORY_MAX`], so that every inode,
/// directory and xattr read is a copy instead of a system call (binding an
/// image walks its whole tree; FUSE serves lookups and readdirs from it),
/// else read through the file as it is asked for.
pub enum ImageBytes {
    Memory(Vec<u8>),
    File(File),
}

impl ImageBytes {
    /// Bootstraps up to this size are read into memory (a large image's
    /// bootstrap, hundreds of thousands of files, stays on disk).
    pub const IN_MEMORY_MAX: u64 = 64 << 20;

    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Read;
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        if len > Self::IN_MEMORY_MAX {
            return Ok(ImageBytes::File(f));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        f.read_to_end(&mut bytes)?;
        Ok(ImageBytes::Memory(bytes))
    }
}

impl ReadAt for ImageBytes {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match self {
            ImageBytes::Memory(b) => b.read_exact_at(buf, offset),
            ImageBytes::File(f) => ReadAt::read_exact_at(f, buf, offset),
        }
    }
    fn size(&self) -> std::io::Result<u64> {
        match self {
            ImageBytes::Memory(b) => b.size(),
            ImageBytes::File(f) => ReadAt::size(f),
        }
    }
}

/// Where the data blobs (device slots 1..) of an image are read from.
pub trait BlobSource {
    fn read_blob(&self, device_id: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// No blobs: reading chunk data from a device fails.
pub struct NoBlobs;
impl BlobSource for NoBlobs {
    fn read_blob(&self, device_id: u16, _: &mut [u8], _: u64) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no blob source for device {device_id}"),
        ))
    }
}

/// Blobs as files, one per device slot in order.
pub struct BlobFiles(pub Vec<File>);
impl BlobSource for BlobFiles {
    fn read_blob(&self, device_id: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let f = self.0.get(usize::from(device_id) - 1).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no file for device {device_id}"),
            )
        })?;
        FileExt::read_exact_at(f, buf, offset)
    }
}

/// Receives a file's data in order: `Some(bytes)`, or `None` for a hole of
/// the given length.
pub type DataSink<'a> = dyn FnMut(Option<&[u8]>, u64) -> std::io::Result<()> + 'a;

#[derive(Clone, Debug)]
pub struct Inode {
    pub nid: u64,
    pub extended: bool,
    /// How the data is stored, decoded from `i_format`.
    pub datalayout: DataLayout,
    pub mode: u32,
    pub nlink: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch, signed: the on-disk fields are `__le64`
    /// but the kernel reads them as `time64_t`, so before 1970 is negative.
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattr_icount: u16,
    pub i_u: u32,
    /// Byte offset of the inode in the image.
    pub offset: u64,
    pub inode_isize: u64,
    pub xattr_isize: u64,
}

impl Inode {
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.file_type() == S_IFREG
    }
    /// (major, minor) for device nodes.
    pub fn rdev(&self) -> (u32, u32) {
        match self.file_type() {
            S_IFCHR | S_IFBLK => decode_rdev(self.i_u),
            _ => (0, 0),
        }
    }
    fn data_offset(&self) -> u64 {
        self.offset + self.inode_isize + self.xattr_isize
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

/// One mapped extent of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Zeros.
    Hole,
    /// Bytes in the image itself (flat layouts, inline tails).
    Image { offset: u64 },
    /// A chunk in a data blob: device slot, block address.
    Chunk { device_id: u16, blkaddr: u32 },
}

/// Where a run of a file's bytes is: what [`Image::map`] returns, the
/// kernel's `struct erofs_map_blocks` once `erofs_map_dev` has resolved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Logical start in the file (`m_la`).
    pub la: u64,
    /// Logical length (`m_llen`), cut at the file's end (the kernel rounds
    /// it up to a block).
    pub llen: u64,
    /// Where the bytes are (`m_deviceid`, `m_pa`, or unmapped).
    pub extent: Extent,
}

impl Mapping {
    /// The logical end: the next mapping starts here.
    pub fn end(&self) -> u64 {
        self.la + self.llen
    }

    /// The logical range mapped.
    pub fn logical(&self) -> Range<u64> {
        self.la..self.end()
    }
}

/// What [`Image::map_blocks`] (`erofs_map_blocks`) finds before the device
/// is resolved: a logical range and, unless it is a hole, a physical byte
/// address on a device slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMap {
    /// Logical start in the file (`m_la`).
    pub la: u64,
    /// Logical length (`m_llen`), cut at the file's end.
    pub llen: u64,
    /// Physical byte address (`m_pa`); `None` for a hole (the kernel's
    /// map without `EROFS_MAP_MAPPED`).
    pub pa: Option<u64>,
    /// Device slot (`m_deviceid`), masked: 0 is the image itself, or with
    /// unified addressing whichever device `mapped_blkaddr` says.
    pub deviceid: u16,
    /// The chunk number for a chunk-based file; `None` for flat data,
    /// which is always in the image (never remapped to a device).
    pub chunk: Option<u64>,
}

impl BlockMap {
    fn flat(la: u64, llen: u64, pa: u64) -> Self {
        BlockMap {
            la,
            llen,
            pa: Some(pa),
            deviceid: 0,
            chunk: None,
        }
    }
}

/// The mappings of a file in logical order ([`Image::extents`]): one
/// [`Image::map`] per extent rather than hand-written position loops.
pub struct Extents<'a, R> {
    img: &'a Image<R>,
    ino: &'a Inode,
    pos: u64,
    end: u64,
}

impl<R: ReadAt> Iterator for Extents<'_, R> {
    type Item = Result<Mapping>;

    fn next(&mut self) -> Option<Result<Mapping>> {
        if self.pos >= self.end {
            return None;
        }
        let m = self.img.map(self.ino, self.pos);
        // After an error (or a mapping that would not advance) the walk
        // ends: the next position is unknown.
        self.pos = match &m {
            Ok(m) if m.end() > self.pos => m.end(),
            _ => self.end,
        };
        Some(m)
    }
}

/// An inode reached by [`Image::walk`].
#[derive(Clone, Debug)]
pub struct WalkEntry {
    /// The path it was reached by, from the walk's start and after its
    /// prefix (`""` for the root).
    pub path: Vec<u8>,
    pub inode: Inode,
    /// Whether this is the first time the walk reached this inode: later
    /// reaches are further hard links, or for a directory a cycle or a
    /// hard-linked directory (not entered again).
    pub first: bool,
}

pub struct Image<R> {
    src: R,
    pub sb: SuperBlock,
    pub devices: Vec<DeviceSlot>,
    pub chunk_table: Option<ChunkTable>,
    pub image_size: u64,
    blksz: u64,
    /// The long xattr name prefixes (`XATTR_PREFIXES`), by id.
    pub xattr_prefixes: Vec<LongPrefix>,
}

/// `struct erofs_xattr_long_prefix`: a short prefix (by base index, 0 for
/// none) followed by an infix, shared by every entry that refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LongPrefix {
    pub base_index: u8,
    pub infix: Vec<u8>,
}

/// One xattr as stored, its name resolved to (base index, rest): the rest
/// is the long prefix's infix (if any) followed by the entry's name.
struct RawXattr {
    base_index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
}

fn io(what: &'static str, offset: u64) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io {
        what,
        offset,
        source,
    }
}

/// Validate a device tag: empty (untagged, as mkfs.erofs writes) or 64
/// lowercase hex characters (a shoal blob digest).
pub fn tag_name(slot: u16, tag: &[u8; 64]) -> Result<Option<String>> {
    if tag.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if tag
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return Ok(Some(String::from_utf8_lossy(tag).into_owned()));
    }
    let end = tag.iter().position(|&b| b == 0).unwrap_or(64);
    Err(Error::BadTag {
        slot,
        tag: String::from_utf8_lossy(&tag[..end]).into_owned(),
    })
}

impl<R: ReadAt> Image<R> {
    pub fn open(src: R) -> Result<Self> {
        let image_size = src.size().map_err(io("image size", 0))?;
        let mut sbuf = [0u8; 128];
        src.read_exact_at(&mut sbuf, EROFS_SUPER_OFFSET)
            .map_err(io("superblock", EROFS_SUPER_OFFSET))?;
        let sb = SuperBlock::read_from_bytes(&sbuf).unwrap();
        if sb.magic.get() != EROFS_SUPER_MAGIC_V1 {
            return Err(Error::BadMagic(sb.magic.get()));
        }
        if !(9..=16).contains(&sb.blkszbits) {
            return Err(Error::CorruptSuper(format!(
                "block size bits {}",
                sb.blkszbits
            )));
        }
        let blksz = 1u64 << sb.blkszbits;
        if sb.feature_compat.get() & EROFS_FEATURE_COMPAT_SB_CHKSUM != 0 {
            let len = blksz.saturating_sub(EROFS_SUPER_OFFSET).max(128);
            let mut blk = vec![0u8; len as usize];
            src.read_exact_at(&mut blk, EROFS_SUPER_OFFSET)
                .map_err(io("superblock block", EROFS_SUPER_OFFSET))?;
            blk[4..8].fill(0);
            let computed = sb_checksum(&blk);
            if computed != sb.checksum.get() {
                return Err(Error::BadChecksum {
                    stored: sb.checksum.get(),
                    computed,
                });
            }
        }
        let unknown = sb.feature_incompat.get() & !EROFS_FEATURE_INCOMPAT_SUPPORTED;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompat features {unknown:#x}"
            )));
        }
        let fs_bytes = u64::from(sb.blocks.get()) * blksz;
        if fs_bytes > image_size {
            return Err(Error::CorruptSuper(format!(
                "{} blocks ({fs_bytes} bytes) but the image has {image_size} bytes: truncated",
                sb.blocks.get()
            )));
        }
        let ndev = u64::from(sb.extra_devices.get());
        let devt = u64::from(sb.devt_slotoff.get()) * EROFS_DEVT_SLOT_SIZE;
        if ndev > 0 && devt + ndev * EROFS_DEVT_SLOT_SIZE > image_size {
            return Err(Error::CorruptSuper(format!(
                "{ndev} device slots overrun the image"
            )));
        }
        let mut devices = Vec::with_capacity(ndev as usize);
        for i in 0..ndev {
            let off = devt + i * EROFS_DEVT_SLOT_SIZE;
            let mut b = [0u8; 128];
            src.read_exact_at(&mut b, off)
                .map_err(io("device slot", off))?;
            let slot = DeviceSlot::read_from_bytes(&b).unwrap();
            tag_name(i as u16 + 1, &slot.tag)?;
            devices.push(slot);
        }
        let mut img = Image {
            src,
            sb,
            devices,
            chunk_table: None,
            image_size,
            blksz,
            xattr_prefixes: Vec::new(),
        };
        img.xattr_prefixes = img.load_xattr_prefixes()?;
        img.chunk_table = img.load_chunk_table()?;
        Ok(img)
    }

    pub fn block_size(&self) -> u64 {
        self.blksz
    }

    pub fn source(&self) -> &R {
        &self.src
    }

    /// The blob file name of a device slot (1-based), if tagged.
    pub fn device_tag(&self, device_id: u16) -> Option<String> {
        let slot = self.devices.get(usize::from(device_id).checked_sub(1)?)?;
        tag_name(device_id, &slot.tag).ok().flatten()
    }

    /// Read the long prefix table as `erofs_xattr_prefixes_init` does, for
    /// the plain layout (the one mkfs.erofs 1.8+ and shoal write).
    fn load_xattr_prefixes(&self) -> Result<Vec<LongPrefix>> {
        let sb = &self.sb;
        let count = sb.xattr_prefix_count;
        if sb.feature_incompat.get() & EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES == 0 || count == 0 {
            return Ok(Vec::new());
        }
        let plain = sb.feature_compat.get() & EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX != 0;
        if !plain && sb.packed_nid.get() != 0 {
            return Err(Error::Unsupported(
                "long xattr prefixes inside the packed inode".into(),
            ));
        }
        let mut pos = u64::from(sb.xattr_prefix_start.get()) * 4;
        let mut out = Vec::with_capacity(usize::from(count));
        for id in 0..count {
            pos = pos.div_ceil(4) * 4;
            let bad = |why: &str| Error::CorruptSuper(format!("long xattr prefix {id}: {why}"));
            if pos + 2 > self.image_size {
                return Err(bad("beyond the image end"));
            }
            let len = u64::from(u16::from_le_bytes(
                self.read("xattr prefix", pos, 2)?.try_into().unwrap(),
            ));
            // The kernel's bounds: a base index, then at most a name.
            if !(1..=256).contains(&len) || pos + 2 + len > self.image_size {
                return Err(bad(&format!("length {len}")));
            }
            let raw = self.read("xattr prefix", pos + 2, len)?;
            out.push(LongPrefix {
                base_index: raw[0],
                infix: raw[1..].to_vec(),
            });
            pos += 2 + len;
        }
        if sb.feature_compat.get() & EROFS_FEATURE_COMPAT_ISHARE_XATTRS != 0
            && usize::from(sb.ishare_xattr_prefix_id) >= out.len()
        {
            return Err(Error::CorruptSuper(format!(
                "ishare xattr prefix id {} of {} prefixes",
                sb.ishare_xattr_prefix_id,
                out.len()
            )));
        }
        Ok(out)
    }

    fn load_chunk_table(&self) -> Result<Option<ChunkTable>> {
        let fs_end = u64::from(self.sb.blocks.get()) * self.blksz;
        if self.image_size <= fs_end {
            return Ok(None);
        }
        if self.image_size < fs_end + TRAILER_SIZE {
            return Err(Error::ChunkTable(format!(
                "{} bytes after the filesystem: too short for a chunk table (truncated?)",
                self.image_size - fs_end
            )));
        }
        let off = self.image_size - TRAILER_SIZE;
        let mut b = [0u8; TRAILER_SIZE as usize];
        self.src
            .read_exact_at(&mut b, off)
            .map_err(io("trailer", off))?;
        let t = Trailer::read_from_bytes(&b).unwrap();
        if t.magic != TRAILER_MAGIC {
            if self.image_size > fs_end {
                // Bytes after the filesystem but no trailer: a shoal table cut
                // short (or damaged). Refuse rather than silently not verify.
                return Err(Error::ChunkTable(format!(
                    "{} bytes after the filesystem without a chunk table trailer (truncated?)",
                    self.image_size - fs_end
                )));
            }
            return Ok(None);
        }
        let (start, len) = (t.table_offset.get(), t.table_len.get());
        if start < fs_end || start.checked_add(len) != Some(off) {
            return Err(Error::ChunkTable(format!(
                "table at {start} (+{len}) is misplaced"
            )));
        }
        let mut table = vec![0u8; len as usize];
        self.src
            .read_exact_at(&mut table, start)
            .map_err(io("chunk table", start))?;
        if Sha256::digest(&table).as_slice() != t.table_sha256 {
            return Err(Error::ChunkTable("digest mismatch".into()));
        }
        let blocks: Vec<(u16, u32)> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u16 + 1, d.blocks.get()))
            .collect();
        ChunkTable::decode(&table, &blocks).map(Some)
    }

    pub fn root_nid(&self) -> u64 {
        u64::from(self.sb.root_nid.get())
    }

    fn read(&self, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.image_size)
        {
            return Err(Error::Io {
                what,
                offset,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{len} bytes beyond the image end ({})", self.image_size),
                ),
            });
        }
        let mut b = vec![0u8; len as usize];
        self.src
            .read_exact_at(&mut b, offset)
            .map_err(io(what, offset))?;
        Ok(b)
    }

    pub fn inode(&self, nid: u64) -> Result<Inode> {
        let offset = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(u64::from(self.sb.meta_blkaddr.get()) * self.blksz))
            .ok_or_else(|| Error::corrupt(nid, "nid out of range"))?;
        if offset.checked_add(32).is_none_or(|e| e > self.image_size) {
            return Err(Error::corrupt(nid, "inode beyond the image end"));
        }
        let b = self.read("inode", offset, 32)?;
        let c = InodeCompact::read_from_bytes(&b).unwrap();
        let format = c.i_format.get();
        let extended = format & EROFS_I_VERSION_MASK == EROFS_INODE_LAYOUT_EXTENDED;
        if format & !EROFS_I_ALL != 0 {
            return Err(Error::corrupt(nid, format!("unknown i_format {format:#x}")));
        }
        if extended && offset + 64 > self.image_size {
            return Err(Error::corrupt(nid, "extended inode beyond the image end"));
        }
        let datalayout = DataLayout::from_i_format(format)
            .map_err(|n| Error::corrupt(nid, format!("unknown data layout {n}")))?;
        let mut ino = if extended {
            let b = self.read("inode", offset, 64)?;
            let e = InodeExtended::read_from_bytes(&b).unwrap();
            Inode {
                nid,
                extended,
                datalayout,
                mode: u32::from(e.i_mode.get()),
                nlink: e.i_nlink.get(),
                size: e.i_size.get(),
                uid: e.i_uid.get(),
                gid: e.i_gid.get(),
                mtime: e.i_mtime.get() as i64,
                mtime_nsec: e.i_mtime_nsec.get(),
                xattr_icount: e.i_xattr_icount.get(),
                i_u: e.i_u.get(),
                offset,
                inode_isize: 64,
                xattr_isize: 0,
            }
        } else {
            Inode {
                nid,
                extended,
                datalayout,
                mode: u32::from(c.i_mode.get()),
                nlink: u32::from(c.i_nlink.get()),
                size: u64::from(c.i_size.get()),
                uid: u32::from(c.i_uid.get()),
                gid: u32::from(c.i_gid.get()),
                mtime: self.sb.build_time.get() as i64,
                mtime_nsec: self.sb.build_time_nsec.get(),
                xattr_icount: c.i_xattr_icount.get(),
                i_u: c.i_u.get(),
                offset,
                inode_isize: 32,
                xattr_isize: 0,
            }
        };
        ino.xattr_isize = xattr_ibody_size(ino.xattr_icount);
        match ino.file_type() {
            S_IFREG | S_IFDIR | S_IFLNK | S_IFCHR | S_IFBLK | S_IFIFO | S_IFSOCK => {}
            t => return Err(Error::corrupt(nid, format!("unknown file type {t:#o}"))),
        }
        if ino.data_offset() > self.image_size {
            return Err(Error::corrupt(nid, "inode body beyond the image end"));
        }
        Ok(ino)
    }

    /// All xattrs of an inode as (full name, value), shared ones included,
    /// as the kernel lists them: names without a namespace (such as the
    /// fingerprint) are not listed.
    pub fn xattrs(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        for x in self.raw_xattrs(ino)? {
            if x.base_index == 0 {
                continue;
            }
            let name = xattr_full_name(x.base_index, &x.name).ok_or_else(|| {
                Error::corrupt(
                    ino.nid,
                    format!("unknown xattr name index {}", x.base_index),
                )
            })?;
            out.push((name, x.value));
        }
        Ok(out)
    }

    /// The inode's content fingerprint for page-cache sharing: the value of
    /// the xattr the superblock's `ishare_xattr_prefix_id` names, as
    /// `erofs_xattr_fill_inode_fingerprint` reads it.
    pub fn fingerprint(&self, ino: &Inode) -> Result<Option<Vec<u8>>> {
        if self.sb.feature_compat.get() & EROFS_FEATURE_COMPAT_ISHARE_XATTRS == 0 {
            return Ok(None);
        }
        let Some(p) = self
            .xattr_prefixes
            .get(usize::from(self.sb.ishare_xattr_prefix_id))
        else {
            return Ok(None);
        };
        Ok(self
            .raw_xattrs(ino)?
            .into_iter()
            .find(|x| x.base_index == p.base_index && x.name == p.infix)
            .map(|x| x.value))
    }

    fn raw_xattrs(&self, ino: &Inode) -> Result<Vec<RawXattr>> {
        if ino.xattr_isize == 0 {
            return Ok(Vec::new());
        }
        if ino.xattr_isize < 12 {
            return Err(Error::corrupt(ino.nid, "xattr body too small"));
        }
        let body = self.read("xattr body", ino.offset + ino.inode_isize, ino.xattr_isize)?;
        let shared = usize::from(body[4]);
        let ids_end = 12 + 4 * shared;
        if ids_end > body.len() {
            return Err(Error::corrupt(
                ino.nid,
                "shared xattr count overruns the xattr body",
            ));
        }
        let mut out = Vec::new();
        let xattr_base = u64::from(self.sb.xattr_blkaddr.get()) * self.blksz;
        for k in 0..shared {
            let id = u32::from_le_bytes(body[12 + 4 * k..16 + 4 * k].try_into().unwrap());
            let at = xattr_base + u64::from(id) * 4;
            let beyond = || {
                Error::corrupt(
                    ino.nid,
                    format!("shared xattr id {id} beyond the image end"),
                )
            };
            if at + 4 > self.image_size {
                return Err(beyond());
            }
            let head = self.read("shared xattr", at, 4)?;
            let e = XattrEntry::read_from_bytes(&head).unwrap();
            let len = 4 + u64::from(e.e_name_len) + u64::from(e.e_value_size.get());
            if at + len > self.image_size {
                return Err(beyond());
            }
            let raw = self.read("shared xattr", at, len)?;
            out.push(self.parse_entry(ino.nid, &raw)?.0);
        }
        let mut rest = &body[ids_end..];
        while rest.len() >= 4 {
            let (x, used) = self.parse_entry(ino.nid, rest)?;
            out.push(x);
            rest = &rest[used.min(rest.len())..];
        }
        Ok(out)
    }

    /// One xattr entry and the bytes it took (padded to 4).
    fn parse_entry(&self, nid: u64, raw: &[u8]) -> Result<(RawXattr, usize)> {
        let e = XattrEntry::read_from_prefix(raw)
            .map_err(|_| Error::corrupt(nid, "truncated xattr entry"))?
            .0;
        let nl = usize::from(e.e_name_len);
        let vl = usize::from(e.e_value_size.get());
        if 4 + nl + vl > raw.len() {
            return Err(Error::corrupt(nid, "xattr entry overruns its area"));
        }
        let suffix = &raw[4..4 + nl];
        let (base_index, name) = if e.e_name_index & EROFS_XATTR_LONG_PREFIX != 0 {
            let id = e.e_name_index & EROFS_XATTR_LONG_PREFIX_MASK;
            let p = self.xattr_prefixes.get(usize::from(id)).ok_or_else(|| {
                Error::corrupt(
                    nid,
                    format!("xattr names long prefix {id}, which is not defined"),
                )
            })?;
            (p.base_index, [p.infix.as_slice(), suffix].concat())
        } else {
            (e.e_name_index, suffix.to_vec())
        };
        let value = raw[4 + nl..4 + nl + vl].to_vec();
        Ok((
            RawXattr {
                base_index,
                name,
                value,
            },
            (4 + nl + vl).div_ceil(4) * 4,
        ))
    }

    /// Read a flat (uncompressed, non-chunked) inode's data whole, i.e.
    /// directories, symlinks and erofs-utils' plain files: all of it must
    /// be in the image itself.
    fn read_flat(&self, ino: &Inode) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ino.size.min(1 << 20) as usize);
        for m in self.extents(ino) {
            let m = m?;
            let Extent::Image { offset } = m.extent else {
                return Err(Error::corrupt(
                    ino.nid,
                    "flat data is not mapped in the image",
                ));
            };
            out.extend(self.read("inode data", offset, m.llen)?);
        }
        Ok(out)
    }

    /// Map the byte at `pos` of a file, as the kernel does: the block map
    /// ([`Image::map_blocks`]), then the device ([`Image::map_dev`]).
    pub fn map(&self, ino: &Inode, pos: u64) -> Result<Mapping> {
        let m = self.map_blocks(ino, pos)?;
        Ok(Mapping {
            la: m.la,
            llen: m.llen,
            extent: self.map_dev(ino.nid, &m)?,
        })
    }

    /// Every extent of a file's data, in order: the mappings that together
    /// cover `0..size`. Ends after the first error.
    pub fn extents<'a>(&'a self, ino: &'a Inode) -> Extents<'a, R> {
        self.extents_in(ino, 0..ino.size)
    }

    /// The extents that cover `range` of a file (cut at its size), whole:
    /// the first may start before `range.start`, the last end after
    /// `range.end`.
    pub fn extents_in<'a>(&'a self, ino: &'a Inode, range: Range<u64>) -> Extents<'a, R> {
        Extents {
            img: self,
            ino,
            pos: range.start,
            end: range.end.min(ino.size),
        }
    }

    /// `erofs_map_blocks`: find which logical range of the file `pos`
    /// falls in and where its bytes are, as a device slot and a physical
    /// address on it (not yet resolved to a blob: see [`Image::map_dev`]).
    pub fn map_blocks(&self, ino: &Inode, pos: u64) -> Result<BlockMap> {
        if pos >= ino.size {
            return Err(Error::corrupt(ino.nid, "read past the end of the file"));
        }
        match ino.datalayout {
            DataLayout::FlatPlain | DataLayout::FlatInline => self.map_flat(ino, pos),
            DataLayout::ChunkBased => self.map_chunk(ino, pos),
            layout => Err(Error::Compressed {
                nid: ino.nid,
                layout: layout.raw(),
            }),
        }
    }

    /// Flat layouts: whole blocks from `i_u` (the last one padded, so the
    /// range ends at the file's end), then for `FlatInline` a tail right
    /// after the inode, in the inode's own block.
    fn map_flat(&self, ino: &Inode, pos: u64) -> Result<BlockMap> {
        let (nid, bs) = (ino.nid, self.blksz);
        let inline = ino.datalayout == DataLayout::FlatInline;
        let last = ino.size.div_ceil(bs) - u64::from(inline);
        let block_end = last
            .checked_mul(bs)
            .ok_or_else(|| Error::corrupt(nid, format!("file size {}", ino.size)))?;
        if pos < block_end {
            let start = u64::from(ino.i_u) * bs;
            if start
                .checked_add(block_end)
                .is_none_or(|e| e > self.image_size)
            {
                return Err(Error::corrupt(nid, "data blocks beyond the image end"));
            }
            return Ok(BlockMap::flat(0, block_end.min(ino.size), start));
        }
        let at = ino.data_offset();
        let tail = ino.size - block_end;
        // The tail shares the inode's block (as fs/erofs requires); `at %
        // bs` alone would accept a tail that starts exactly at the next
        // block.
        let inode_block_end = (ino.offset / bs + 1) * bs;
        if tail > 0 && at + tail > inode_block_end {
            return Err(Error::corrupt(nid, "inline data crosses a block boundary"));
        }
        Ok(BlockMap::flat(block_end, tail, at))
    }

    /// Chunk-based layout: one chunk index (or bare block map entry) per
    /// chunk, aligned after the inode's xattrs. The device id is masked as
    /// the kernel masks it (`device_id_mask`).
    fn map_chunk(&self, ino: &Inode, pos: u64) -> Result<BlockMap> {
        let nid = ino.nid;
        let format = ChunkFormat::decode(ino.i_u, self.sb.blkszbits);
        let chunkbits = format.chunkbits;
        if chunkbits > 40 {
            return Err(Error::corrupt(nid, format!("chunk size 2^{chunkbits}")));
        }
        let unit = format.unit();
        let chunknr = pos >> chunkbits;
        let nchunks = ino.size.div_ceil(1 << chunkbits);
        let base = ino.data_offset().div_ceil(unit) * unit;
        if base + nchunks * unit > self.image_size {
            return Err(Error::corrupt(nid, "chunk indexes beyond the image end"));
        }
        let b = self.read("chunk index", base + chunknr * unit, unit)?;
        let la = chunknr << chunkbits;
        let llen = (la + (1 << chunkbits)).min(ino.size) - la;
        let (deviceid, blkaddr) = if format.indexes {
            let ci = ChunkIndex::read_from_bytes(&b).unwrap();
            (ci.device_id.get(), ci.blkaddr.get())
        } else {
            (0, u32::from_le_bytes(b.try_into().unwrap()))
        };
        let pa = (blkaddr != EROFS_NULL_ADDR).then(|| u64::from(blkaddr) * self.blksz);
        let mask = (usize::from(self.sb.extra_devices.get()) + 1).next_power_of_two() - 1;
        Ok(BlockMap {
            la,
            llen,
            pa,
            deviceid: deviceid & mask as u16,
            chunk: Some(chunknr),
        })
    }

    /// `erofs_map_dev`: resolve where a block map points. Flat data is the
    /// image's own; a chunk names a device slot (checked to exist and to
    /// hold the chunk), or with device 0 an address that unified
    /// addressing (`mapped_blkaddr`) may place on a device.
    pub fn map_dev(&self, nid: u64, m: &BlockMap) -> Result<Extent> {
        let Some(pa) = m.pa else {
            return Ok(Extent::Hole);
        };
        let Some(chunknr) = m.chunk else {
            return Ok(Extent::Image { offset: pa });
        };
        let (bs, device_id) = (self.blksz, m.deviceid);
        let blkaddr = pa / bs;
        if usize::from(device_id) > self.devices.len() {
            return Err(Error::corrupt(
                nid,
                format!("chunk {chunknr}: device {device_id} does not exist"),
            ));
        }
        let nblocks = m.llen.div_ceil(bs);
        if device_id == 0 {
            if let Some(extent) = self.map_unified(blkaddr) {
                return Ok(extent);
            }
            if pa + nblocks * bs > self.image_size.div_ceil(bs) * bs {
                return Err(Error::corrupt(
                    nid,
                    format!("chunk {chunknr} beyond the image end"),
                ));
            }
            return Ok(Extent::Image { offset: pa });
        }
        let dev_blocks = u64::from(self.devices[usize::from(device_id) - 1].blocks.get());
        // erofs-utils 1.5 leaves `blocks` 0 for --blobdev: size unknown.
        if dev_blocks != 0 && blkaddr + nblocks > dev_blocks {
            return Err(Error::corrupt(
                nid,
                format!("chunk {chunknr}: blocks {blkaddr}+{nblocks} beyond device {device_id} ({dev_blocks} blocks)"),
            ));
        }
        Ok(Extent::Chunk {
            device_id,
            blkaddr: blkaddr as u32,
        })
    }

    /// Flat multi-device addressing: the device whose `mapped_blkaddr`
    /// range holds `blkaddr`, and the block within it.
    fn map_unified(&self, blkaddr: u64) -> Option<Extent> {
        self.devices.iter().zip(1u16..).find_map(|(d, device_id)| {
            let m = u64::from(d.mapped_blkaddr.get());
            (m != 0 && (m..m + u64::from(d.blocks.get())).contains(&blkaddr)).then(|| {
                Extent::Chunk {
                    device_id,
                    blkaddr: (blkaddr - m) as u32,
                }
            })
        })
    }

    pub fn read_link(&self, ino: &Inode) -> Result<Vec<u8>> {
        if ino.file_type() != S_IFLNK {
            return Err(Error::corrupt(ino.nid, "not a symlink"));
        }
        if ino.size == 0 || ino.size > 4096 {
            return Err(Error::corrupt(
                ino.nid,
                format!("symlink size {}", ino.size),
            ));
        }
        self.read_flat(ino)
    }

    /// Walk the tree under `start` (its path `prefix`) once, pre-order: a
    /// directory before its entries, entries in on-disk (sorted) order.
    /// Every name is reported, but a directory is entered only the first
    /// time, so cycles and hard-linked directories in a hostile image
    /// cannot make the walk loop; [`WalkEntry::first`] tells the caller,
    /// which decides whether a directory reached twice is an error.
    pub fn walk(
        &self,
        start: Inode,
        prefix: &[u8],
        mut f: impl FnMut(&WalkEntry) -> Result<()>,
    ) -> Result<()> {
        let mut seen = HashSet::new();
        let mut stack = vec![(prefix.to_vec(), start)];
        while let Some((path, inode)) = stack.pop() {
            let first = seen.insert(inode.nid);
            let entry = WalkEntry { path, inode, first };
            f(&entry)?;
            if first && entry.inode.is_dir() {
                let children = self.children(&entry)?;
                stack.extend(children.into_iter().rev());
            }
        }
        Ok(())
    }

    /// A directory's entries (without `.` and `..`) as (path, inode).
    fn children(&self, dir: &WalkEntry) -> Result<Vec<(Vec<u8>, Inode)>> {
        let mut out = Vec::new();
        for e in self.read_dir(&dir.inode)? {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let mut path = dir.path.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&e.name);
            out.push((path, self.inode(e.nid)?));
        }
        Ok(out)
    }

    /// A directory's entries in on-disk order. Names must be strictly
    /// increasing in byte order across the whole directory (`.` and `..`
    /// included), as the kernel's binary search in `erofs_namei` assumes:
    /// a duplicate or misplaced name is corruption, and a duplicate would
    /// let one path name two inodes (a symlink and a directory, say).
    pub fn read_dir(&self, ino: &Inode) -> Result<Vec<DirEntry>> {
        let nid = ino.nid;
        if !ino.is_dir() {
            return Err(Error::NotDir(format!("nid {nid}")));
        }
        if ino.size > self.image_size {
            return Err(Error::corrupt(
                nid,
                format!("directory size {} exceeds the image", ino.size),
            ));
        }
        let data = self.read_flat(ino)?;
        let bs = self.blksz as usize;
        let mut out: Vec<DirEntry> = Vec::new();
        for (bi, blk) in data.chunks(bs).enumerate() {
            if blk.len() < 12 {
                return Err(Error::corrupt(nid, format!("dir block {bi} too short")));
            }
            let first = usize::from(u16::from_le_bytes([blk[8], blk[9]]));
            if first < 12 || first >= blk.len() || first % 12 != 0 {
                return Err(Error::corrupt(
                    nid,
                    format!("dir block {bi}: bad nameoff {first}"),
                ));
            }
            let n = first / 12;
            for k in 0..n {
                let de = Dirent::read_from_bytes(&blk[12 * k..12 * k + 12]).unwrap();
                let start = usize::from(de.nameoff.get());
                let end = if k + 1 < n {
                    usize::from(u16::from_le_bytes([blk[12 * k + 20], blk[12 * k + 21]]))
                } else {
                    let tail = &blk[start.min(blk.len())..];
                    start + tail.iter().position(|&b| b == 0).unwrap_or(tail.len())
                };
                if start < first || end <= start || end > blk.len() {
                    return Err(Error::corrupt(
                        nid,
                        format!("dir block {bi} entry {k}: bad name bounds {start}..{end}"),
                    ));
                }
                let name = &blk[start..end];
                if name.contains(&b'/') || name.contains(&0) {
                    return Err(Error::corrupt(
                        nid,
                        format!(
                            "dir block {bi} entry {k}: invalid name {:?}",
                            String::from_utf8_lossy(name)
                        ),
                    ));
                }
                if let Some(prev) = out.last() {
                    check_order(nid, &prev.name, name)?;
                }
                out.push(DirEntry {
                    name: name.to_vec(),
                    nid: de.nid.get(),
                    file_type: de.file_type,
                });
            }
        }
        Ok(out)
    }

    /// Resolve a path (no symlinks followed) to its inode.
    pub fn lookup(&self, path: &str) -> Result<Inode> {
        let mut cur = self.inode(self.root_nid())?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if !cur.is_dir() {
                return Err(Error::NotDir(path.to_string()));
            }
            let e = self
                .read_dir(&cur)?
                .into_iter()
                .find(|e| e.name == comp.as_bytes())
                .ok_or_else(|| Error::NotFound(path.to_string()))?;
            cur = self.inode(e.nid)?;
        }
        Ok(cur)
    }

    /// Stream a regular file's bytes to `sink` in extent order, verifying
    /// every blob chunk against the chunk table when the image has one.
    /// Holes are passed as `None` with their length.
    pub fn read_file(
        &self,
        ino: &Inode,
        blobs: &dyn BlobSource,
        sink: &mut DataSink<'_>,
    ) -> Result<()> {
        if ino.file_type() != S_IFREG {
            return Err(Error::corrupt(ino.nid, "not a regular file"));
        }
        for m in self.extents(ino) {
            let m = m?;
            match m.extent {
                Extent::Hole => sink(None, m.llen).map_err(io("output", m.la))?,
                // Flat data streams in pieces: one extent may be the whole file.
                Extent::Image { offset } => {
                    let mut pos = m.la;
                    while pos < m.end() {
                        let len = (m.end() - pos).min(1 << 20);
                        let bytes = self.read("file data", offset + (pos - m.la), len)?;
                        sink(Some(&bytes), len).map_err(io("output", pos))?;
                        pos += len;
                    }
                }
                Extent::Chunk { device_id, blkaddr } => {
                    let chunk = self.read_chunk(device_id, blkaddr, m.llen, blobs)?;
                    sink(Some(&chunk[..m.llen as usize]), m.llen).map_err(io("output", m.la))?;
                }
            }
        }
        Ok(())
    }

    /// Read (and verify, if the image pins digests) the chunk at `blkaddr`
    /// of a device; returns at least `len` bytes.
    pub fn read_chunk(
        &self,
        device_id: u16,
        blkaddr: u32,
        len: u64,
        blobs: &dyn BlobSource,
    ) -> Result<Vec<u8>> {
        let bs = self.blksz;
        let blob_name = || {
            self.device_tag(device_id)
                .unwrap_or_else(|| format!("device {device_id}"))
        };
        let (read_blocks, digest) = match &self.chunk_table {
            Some(t) => {
                let e = t
                    .find(device_id, blkaddr)
                    .filter(|e| e.blkaddr.get() == blkaddr)
                    .ok_or_else(|| Error::Verify {
                        blob: blob_name(),
                        blkaddr,
                        nblocks: 0,
                        why: "no chunk table entry starts here".into(),
                    })?;
                if u64::from(e.nblocks.get()) * bs < len {
                    return Err(Error::Verify {
                        blob: blob_name(),
                        blkaddr,
                        nblocks: e.nblocks.get(),
                        why: format!("chunk table entry shorter than the {len} bytes mapped"),
                    });
                }
                (u64::from(e.nblocks.get()), Some(e.digest))
            }
            None => (len.div_ceil(bs), None),
        };
        // Grow the buffer only as reads succeed (1 MiB, then doubling): a
        // hostile block count costs at most what the blob really holds.
        const FIRST: u64 = 1 << 20;
        let total = read_blocks * bs;
        let mut buf = Vec::with_capacity(total.min(FIRST) as usize);
        while (buf.len() as u64) < total {
            let at = buf.len();
            let offset = u64::from(blkaddr) * bs + at as u64;
            let piece = FIRST.max(at as u64).min(total - at as u64);
            buf.resize(at + piece as usize, 0);
            blobs
                .read_blob(device_id, &mut buf[at..], offset)
                .map_err(|e| Error::Io {
                    what: "data blob",
                    offset,
                    source: std::io::Error::new(e.kind(), format!("blob {}: {e}", blob_name())),
                })?;
        }
        if let Some(d) = digest {
            if Sha256::digest(&buf).as_slice() != d {
                return Err(Error::Verify {
                    blob: blob_name(),
                    blkaddr,
                    nblocks: read_blocks as u32,
                    why: "sha256 mismatch".into(),
                });
            }
        }
        Ok(buf)
    }
}

/// Refuse a directory entry whose name does not sort strictly after the
/// previous one (byte order, a shorter prefix first: `erofs_dirnamecmp`).
fn check_order(nid: u64, prev: &[u8], name: &[u8]) -> Result<()> {
    let show = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    match prev.cmp(name) {
        std::cmp::Ordering::Less => Ok(()),
        std::cmp::Ordering::Equal => Err(Error::corrupt(
            nid,
            format!("duplicate directory entry {:?}", show(name)),
        )),
        std::cmp::Ordering::Greater => Err(Error::corrupt(
            nid,
            format!(
                "directory entry {:?} out of order (after {:?})",
                show(name),
                show(prev)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small bootstraps are read into memory, large ones read through
    /// their file; both give the same bytes and refuse reads past the end.
    #[test]
    fn image_bytes_in_memory_or_from_the_file() {
        let dir = std::env::temp_dir().join(format!("shoal-image-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (small, large) = (dir.join("small"), dir.join("large"));
        std::fs::write(&small, b"0123456789").unwrap();
        let f = File::create(&large).unwrap();
        f.set_len(ImageBytes::IN_MEMORY_MAX + 4096).unwrap(); // sparse
        FileExt::write_all_at(&f, b"abc", ImageBytes::IN_MEMORY_MAX).unwrap();
        let s = ImageBytes::open(&small).unwrap();
        let l = ImageBytes::open(&large).unwrap();
        assert!(matches!(s, ImageBytes::Memory(_)));
        assert!(matches!(l, ImageBytes::File(_)));
        let mut buf = [0u8; 3];
        s.read_exact_at(&mut buf, 7).unwrap();
        assert_eq!(&buf, b"789");
        l.read_exact_at(&mut buf, ImageBytes::IN_MEMORY_MAX)
            .unwrap();
        assert_eq!(&buf, b"abc");
        assert_eq!(s.size().unwrap(), 10);
        assert_eq!(l.size().unwrap(), ImageBytes::IN_MEMORY_MAX + 4096);
        assert!(s.read_exact_at(&mut buf, 8).is_err());
        assert!(l.read_exact_at(&mut buf, l.size().unwrap() - 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
