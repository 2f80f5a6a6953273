//! Lay out a [`Tree`] as an EROFS bootstrap: superblock, device table,
//! inodes with inline xattrs and tails, shared xattrs, directory blocks,
//! then shoal's chunk digest table. All addresses are from byte 0
//! (`meta_blkaddr = xattr_blkaddr = 0`), so a nid is simply offset / 32.

use crate::blob::{FinalBlob, Placement, BLOCK_SIZE};
use crate::chunktable::ChunkTable;
use crate::error::BuildError;
use crate::ondisk::*;
use crate::start::BlobStart;
use crate::tree::*;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use zerocopy::IntoBytes;

const BLK: usize = BLOCK_SIZE as usize;
const DEVT_OFFSET: usize = 1152;

pub struct WriteOptions {
    pub chunk_size: u64,
    /// Superblock time; inodes with exactly this mtime can be compact.
    /// `None`: the most common mtime in the tree.
    pub build_time: Option<(u64, u32)>,
    /// Stored in the superblock's `volume_name` (at most 16 bytes).
    pub volume_name: Vec<u8>,
    /// Write each regular file's content fingerprint (the xattr and
    /// superblock fields mkfs.erofs `--xattr-inode-digest` writes), so that
    /// mounts with `inode_share,domain_id=` share page cache (Linux 7.0+).
    pub fingerprints: bool,
    /// The recorded start (`--order`): blocks of each blob read first.
    pub starts: Vec<BlobStart>,
}

type Xattrs = BTreeMap<Vec<u8>, Vec<u8>>;

/// How xattr names are stored: the kernel's short prefixes, and the long
/// prefixes this image declares (today only the fingerprint's).
struct XattrNames {
    /// Full names of the long prefixes (base index 0: no namespace).
    long: Vec<&'static [u8]>,
}

impl XattrNames {
    fn split<'a>(&self, name: &'a [u8]) -> Option<(u8, &'a [u8])> {
        for (i, p) in self.long.iter().enumerate() {
            if name.starts_with(p) {
                return Some((EROFS_XATTR_LONG_PREFIX | i as u8, &name[p.len()..]));
            }
        }
        xattr_split_name(name)
    }

    /// The long prefix table as the kernel reads it with
    /// `PLAIN_XATTR_PFX`: per prefix a le16 length, the base index and the
    /// infix, each record 4-byte aligned.
    fn table(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.long {
            out.extend_from_slice(&(1 + p.len() as u16).to_le_bytes());
            out.push(0);
            out.extend_from_slice(p);
            out.resize(align(out.len(), 4), 0);
        }
        out
    }
}

/// A node's xattrs as written: any fingerprint its source claimed is
/// dropped (only one computed here from the content may be written), and
/// the computed one added when fingerprints are on.
fn node_xattrs<'a>(node: &'a Node, fingerprints: bool) -> Cow<'a, Xattrs> {
    let fp = match &node.data {
        Data::File {
            fingerprint: Some(d),
            ..
        } if fingerprints => Some(d),
        _ => None,
    };
    if fp.is_none() && !node.meta.xattrs.contains_key(EROFS_FINGERPRINT_XATTR) {
        return Cow::Borrowed(&node.meta.xattrs);
    }
    let mut x = node.meta.xattrs.clone();
    x.remove(EROFS_FINGERPRINT_XATTR);
    if let Some(d) = fp {
        x.insert(
            EROFS_FINGERPRINT_XATTR.to_vec(),
            [EROFS_FINGERPRINT_SHA256, d.as_slice()].concat(),
        );
    }
    Cow::Owned(x)
}

struct Layout {
    nid: u64,
    extended: bool,
    xattr_icount: u16,
    xattr_body: Vec<u8>,
    datalayout: DataLayout,
    /// Directory content or symlink target (for regular files: empty).
    content: Vec<u8>,
    /// Where `content` holds a dirent nid to fill in, and for which node.
    dir_patches: Vec<(usize, NodeId)>,
    /// Bytes of `content` kept inline after the inode.
    tail_inline: usize,
    raw_blkaddr: u32,
    nlink: u32,
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

fn file_type(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFREG => EROFS_FT_REG_FILE,
        S_IFDIR => EROFS_FT_DIR,
        S_IFCHR => EROFS_FT_CHRDEV,
        S_IFBLK => EROFS_FT_BLKDEV,
        S_IFIFO => EROFS_FT_FIFO,
        S_IFSOCK => EROFS_FT_SOCK,
        S_IFLNK => EROFS_FT_SYMLINK,
        _ => EROFS_FT_UNKNOWN,
    }
}

/// Directory blocks: (sorted entries incl. "." and "..", block boundaries).
/// Returns the content with every dirent's nid left as an index into
/// `entries`; nids are patched in once inodes are placed.
fn dir_blocks(entries: &[(&[u8], NodeId, u8)]) -> (Vec<u8>, Vec<(usize, NodeId)>) {
    let mut out = Vec::new();
    let mut patches = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        // How many entries fit in this block?
        let mut used = 0;
        let mut n = 0;
        while i + n < entries.len() {
            let need = 12 + entries[i + n].0.len();
            if used + need > BLK {
                break;
            }
            used += need;
            n += 1;
        }
        let base = out.len();
        let mut nameoff = 12 * n;
        for (k, (name, id, ft)) in entries[i..i + n].iter().enumerate() {
            let de = Dirent {
                nid: 0.into(),
                nameoff: (nameoff as u16).into(),
                file_type: *ft,
                reserved: 0,
            };
            patches.push((base + 12 * k, *id));
            out.extend_from_slice(de.as_bytes());
            nameoff += name.len();
        }
        for (name, _, _) in &entries[i..i + n] {
            out.extend_from_slice(name);
        }
        i += n;
        if i < entries.len() {
            out.resize(base + BLK, 0);
        }
    }
    (out, patches)
}

/// Build the inline xattr body (header, shared ids, entries).
fn xattr_body(
    xattrs: &Xattrs,
    names: &XattrNames,
    shared: &HashMap<(&[u8], &[u8]), u32>,
) -> Result<(u16, Vec<u8>), BuildError> {
    if xattrs.is_empty() {
        return Ok((0, Vec::new()));
    }
    let mut ids = Vec::new();
    let mut inline = Vec::new();
    for (name, value) in xattrs {
        match shared.get(&(name.as_slice(), value.as_slice())) {
            Some(&id) if ids.len() < 255 => ids.push(id),
            _ => {
                let (index, suffix) = names.split(name).ok_or_else(|| {
                    BuildError::Invalid(format!(
                        "xattr {:?} has a prefix EROFS cannot store",
                        String::from_utf8_lossy(name)
                    ))
                })?;
                encode_xattr_entry(&mut inline, index, suffix, value)?;
            }
        }
    }
    let mut body = XattrIbodyHeader {
        h_name_filter: 0.into(),
        h_shared_count: ids.len() as u8,
        h_reserved2: [0; 7],
    }
    .as_bytes()
    .to_vec();
    for id in ids {
        body.extend_from_slice(&id.to_le_bytes());
    }
    body.extend_from_slice(&inline);
    let icount = (body.len() - 12) / 4 + 1;
    let icount = u16::try_from(icount)
        .map_err(|_| BuildError::Limit("xattrs of one inode exceed 256 KiB".into()))?;
    Ok((icount, body))
}

fn encode_xattr_entry(
    out: &mut Vec<u8>,
    index: u8,
    suffix: &[u8],
    value: &[u8],
) -> Result<(), BuildError> {
    let name_len = u8::try_from(suffix.len())
        .map_err(|_| BuildError::Limit("xattr name longer than 255 bytes".into()))?;
    let value_size = u16::try_from(value.len())
        .map_err(|_| BuildError::Limit("xattr value larger than 64 KiB".into()))?;
    let start = out.len();
    out.extend_from_slice(
        XattrEntry {
            e_name_len: name_len,
            e_name_index: index,
            e_value_size: value_size.into(),
        }
        .as_bytes(),
    );
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    out.resize(start + align(out.len() - start, 4), 0);
    Ok(())
}

/// Write the bootstrap for `tree`. Returns the image bytes (EROFS blocks,
/// then the chunk table and its trailer).
///
/// Two passes over the inodes: the first measures and places them (nids,
/// then the metadata areas and data blocks after them), the second
/// serialises them. Sizes never change between the passes: xattr bodies
/// are measured with shared ids relative to the shared area, which have
/// the same encoding as the final ids.
pub fn write_image(
    tree: &Tree,
    blobs: &[FinalBlob],
    placement: &Placement,
    opts: &WriteOptions,
) -> Result<Vec<u8>, BuildError> {
    let order = tree.reachable();
    let (nlink, parent) = link_counts(tree, &order)?;
    let build_time = opts
        .build_time
        .unwrap_or_else(|| common_mtime(tree, &order));
    let plan = Plan {
        nodes: &tree.nodes,
        order,
        nlink,
        parent,
        build_time,
    };
    let xattrs: Vec<Cow<Xattrs>> = plan
        .order
        .iter()
        .map(|&id| node_xattrs(&plan.nodes[id], opts.fingerprints))
        .collect();
    let fingerprinted = xattrs
        .iter()
        .any(|x| x.contains_key(EROFS_FINGERPRINT_XATTR));
    let names = XattrNames {
        long: if fingerprinted {
            vec![EROFS_FINGERPRINT_XATTR]
        } else {
            Vec::new()
        },
    };
    let shared = SharedXattrs::new(&xattrs, &names)?;

    // Pass 1: measure and place.
    let inodes_start = align(DEVT_OFFSET + 128 * blobs.len(), 32);
    let (mut layouts, cursor) = place_inodes(&plan, &xattrs, &names, &shared, inodes_start)?;
    if layouts[0].nid > u64::from(u16::MAX) {
        return Err(BuildError::Limit("root inode beyond nid 65535".into()));
    }
    let areas = place_after_inodes(&mut layouts, &xattrs, &names, &shared, cursor)?;

    // Pass 2: serialise.
    let mut img = vec![0u8; areas.data_blocks as usize * BLK];
    write_inodes(&mut img, &plan, &mut layouts, placement, opts.chunk_size);
    img[areas.shared_start..areas.prefix_start].copy_from_slice(&shared.area);
    img[areas.prefix_start..areas.meta_end].copy_from_slice(&names.table());
    write_device_table(&mut img, blobs);
    let sb = SuperBlock {
        root_nid: (layouts[0].nid as u16).into(),
        inos: (plan.order.len() as u64).into(),
        build_time: build_time.0.into(),
        build_time_nsec: build_time.1.into(),
        blocks: areas.data_blocks.into(),
        extra_devices: (blobs.len() as u16).into(),
        xattr_prefix_start: ((areas.prefix_start / 4) as u32).into(),
        ..Default::default()
    };
    write_superblock(&mut img, sb, &names, &opts.volume_name)?;

    // Chunk digest table.
    let table = ChunkTable {
        blobs: blobs
            .iter()
            .enumerate()
            .map(|(k, b)| ((k + 1) as u16, b.entries.clone()))
            .collect(),
        frames: Vec::new(),
        starts: opts.starts.clone(),
    };
    let offset = img.len() as u64;
    img.extend_from_slice(&table.encode(offset));
    Ok(img)
}

/// The tree in write order (`i_ino` is the index + 1), with what every
/// phase needs to know about each inode by that index.
struct Plan<'a> {
    nodes: &'a [Node],
    order: Vec<NodeId>,
    nlink: Vec<u32>,
    /// Each directory's parent (for `..`).
    parent: Vec<NodeId>,
    /// The superblock time: inodes with exactly this mtime can be compact.
    build_time: (u64, u32),
}

/// Link counts (one per directory entry; directories 2 + subdirectories)
/// and each directory's parent, by write order.
fn link_counts(tree: &Tree, order: &[NodeId]) -> Result<(Vec<u32>, Vec<NodeId>), BuildError> {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let nodes = &tree.nodes;
    let mut nlink = vec![0u32; order.len()];
    let mut parent = vec![tree.root; order.len()];
    for &id in order {
        if let Data::Dir(children) = &nodes[id].data {
            nlink[pos[&id]] += 2;
            for &c in children.values() {
                if matches!(nodes[c].data, Data::Dir(_)) {
                    nlink[pos[&id]] += 1;
                    parent[pos[&c]] = id;
                } else {
                    nlink[pos[&c]] += 1;
                }
            }
        }
    }
    if let Some(n) = nlink.iter().find(|&&n| n == u32::MAX) {
        return Err(BuildError::Limit(format!("link count {n}")));
    }
    Ok((nlink, parent))
}

/// The most common (non-negative) mtime, so that most inodes can be
/// compact; ties go to the earliest.
fn common_mtime(tree: &Tree, order: &[NodeId]) -> (u64, u32) {
    let mut counts: HashMap<(i64, u32), usize> = HashMap::new();
    for &id in order {
        let m = &tree.nodes[id].meta;
        *counts.entry((m.mtime, m.mtime_nsec)).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|((t, _), _)| *t >= 0)
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|((t, n), _)| (t as u64, n))
        .unwrap_or((0, 0))
}

/// Xattrs stored once in the shared area: any (name, value) pair on two
/// or more inodes.
struct SharedXattrs<'a> {
    area: Vec<u8>,
    /// Each pair and its byte offset in `area`.
    list: Vec<(&'a [u8], &'a [u8], usize)>,
}

impl<'a> SharedXattrs<'a> {
    fn new(xattrs: &'a [Cow<'a, Xattrs>], names: &XattrNames) -> Result<Self, BuildError> {
        let mut count: BTreeMap<(&[u8], &[u8]), usize> = BTreeMap::new();
        for x in xattrs {
            for (k, v) in x.iter() {
                *count.entry((k.as_slice(), v.as_slice())).or_default() += 1;
            }
        }
        let mut shared = SharedXattrs {
            area: Vec::new(),
            list: Vec::new(),
        };
        for ((k, v), n) in count {
            if n < 2 {
                continue;
            }
            if let Some((index, suffix)) = names.split(k) {
                shared.list.push((k, v, shared.area.len()));
                encode_xattr_entry(&mut shared.area, index, suffix, v)?;
            }
        }
        Ok(shared)
    }

    /// The ids (4-byte units from the image start) of the pairs when the
    /// area starts at byte `start`.
    fn ids(&self, start: usize) -> HashMap<(&'a [u8], &'a [u8]), u32> {
        self.list
            .iter()
            .map(|(k, v, off)| ((*k, *v), ((start + off) / 4) as u32))
            .collect()
    }
}

/// Pass 1: each inode's layout and nid, packed in 32-byte slots from
/// `cursor`. An inode whose inline tail would cross a block boundary
/// starts the next block instead (the kernel wants the tail in the
/// inode's block). Returns the layouts and the end of the inodes.
fn place_inodes(
    plan: &Plan,
    xattrs: &[Cow<Xattrs>],
    names: &XattrNames,
    shared: &SharedXattrs,
    mut cursor: usize,
) -> Result<(Vec<Layout>, usize), BuildError> {
    // Ids relative to the shared area: the same sizes as the final ids.
    let shared_rel = shared.ids(0);
    let mut layouts: Vec<Layout> = Vec::with_capacity(plan.order.len());
    for (i, &id) in plan.order.iter().enumerate() {
        let node = &plan.nodes[id];
        let (icount, xbody) = xattr_body(&xattrs[i], names, &shared_rel)?;
        let (content, dir_patches) = inode_content(plan, i);
        let size = match &node.data {
            Data::File { size, .. } => *size,
            _ => content.len() as u64,
        };
        let m = &node.meta;
        let build_time = plan.build_time;
        let extended = m.uid > 0xffff
            || m.gid > 0xffff
            || plan.nlink[i] > 0xffff
            || size > u64::from(u32::MAX)
            || (m.mtime, m.mtime_nsec) != (build_time.0 as i64, build_time.1);
        let isize = if extended { 64 } else { 32 };
        let head = isize + xattr_ibody_size(icount) as usize;
        let (datalayout, tail, extra) = data_layout(&node.data, content.len(), head);
        if tail > 0 && cursor % BLK + head + tail > BLK {
            cursor = align(cursor, BLK);
        }
        layouts.push(Layout {
            nid: (cursor / 32) as u64,
            extended,
            xattr_icount: icount,
            xattr_body: xbody,
            datalayout,
            content,
            dir_patches,
            tail_inline: tail,
            raw_blkaddr: EROFS_NULL_ADDR,
            nlink: plan.nlink[i],
        });
        cursor = align(cursor + head + extra, 32);
    }
    Ok((layouts, cursor))
}

/// A directory's blocks (entries sorted, `.` and `..` included, nids to
/// patch once inodes are placed) or a symlink's target; nothing for other
/// inodes.
fn inode_content(plan: &Plan, i: usize) -> (Vec<u8>, Vec<(usize, NodeId)>) {
    let id = plan.order[i];
    match &plan.nodes[id].data {
        Data::Dir(children) => {
            let mut entries: Vec<(&[u8], NodeId, u8)> = Vec::with_capacity(children.len() + 2);
            entries.push((b".", id, EROFS_FT_DIR));
            entries.push((b"..", plan.parent[i], EROFS_FT_DIR));
            for (name, &c) in children {
                entries.push((name, c, file_type(plan.nodes[c].meta.mode)));
            }
            entries.sort_by(|a, b| a.0.cmp(b.0));
            dir_blocks(&entries)
        }
        Data::Symlink(t) => (t.clone(), Vec::new()),
        _ => (Vec::new(), Vec::new()),
    }
}

/// How an inode's data is stored, given its `content` length and the
/// bytes of its inode and xattrs (`head`): (layout, bytes of content
/// inline, bytes after the head besides the tail). Directories and
/// symlinks keep their last partial block inline when it fits in the
/// block; non-empty files are chunk-based with 8-byte aligned indexes.
fn data_layout(data: &Data, content_len: usize, head: usize) -> (DataLayout, usize, usize) {
    match data {
        Data::Dir(_) | Data::Symlink(_) => {
            let tail = content_len % BLK;
            if tail > 0 && head + tail <= BLK {
                (DataLayout::FlatInline, tail, tail)
            } else {
                (DataLayout::FlatPlain, 0, 0)
            }
        }
        Data::File { size, chunks, .. } if *size > 0 => (
            DataLayout::ChunkBased,
            0,
            align(head, 8) - head + size_of::<ChunkIndex>() * chunks.len(),
        ),
        _ => (DataLayout::FlatPlain, 0, 0),
    }
}

/// Where the areas after the inodes start, in bytes, and the image's
/// size in blocks.
struct Areas {
    shared_start: usize,
    prefix_start: usize,
    meta_end: usize,
    data_blocks: u32,
}

/// Pass 1, end: the shared xattr area (4-byte aligned after the inodes),
/// the long prefix table, then the data blocks of directories and
/// symlinks. Xattr bodies that name shared xattrs are rebuilt with the
/// final ids (the same size as measured).
fn place_after_inodes(
    layouts: &mut [Layout],
    xattrs: &[Cow<Xattrs>],
    names: &XattrNames,
    shared: &SharedXattrs,
    cursor: usize,
) -> Result<Areas, BuildError> {
    let shared_start = align(cursor, 4);
    let ids = shared.ids(shared_start);
    let prefix_start = shared_start + shared.area.len();
    let meta_end = prefix_start + names.table().len();
    let mut data_blk = align(meta_end, BLK) / BLK;
    let too_big = || BuildError::Limit("bootstrap exceeds 2^32 blocks".into());
    for (i, l) in layouts.iter_mut().enumerate() {
        if !ids.is_empty() && !xattrs[i].is_empty() {
            let (icount, body) = xattr_body(&xattrs[i], names, &ids)?;
            debug_assert_eq!(icount, l.xattr_icount);
            l.xattr_icount = icount;
            l.xattr_body = body;
        }
        let full = l.content.len() - l.tail_inline;
        if full > 0 {
            l.raw_blkaddr = u32::try_from(data_blk).map_err(|_| too_big())?;
            data_blk += full.div_ceil(BLK);
        }
    }
    Ok(Areas {
        shared_start,
        prefix_start,
        meta_end,
        data_blocks: u32::try_from(data_blk).map_err(|_| too_big())?,
    })
}

/// Pass 2: every inode with its xattrs, inline tail or chunk indexes, and
/// its data blocks, directory entries patched with the placed nids.
fn write_inodes(
    img: &mut [u8],
    plan: &Plan,
    layouts: &mut [Layout],
    placement: &Placement,
    chunk_size: u64,
) {
    let nid_of: HashMap<NodeId, u64> = plan
        .order
        .iter()
        .zip(layouts.iter())
        .map(|(&id, l)| (id, l.nid))
        .collect();
    for (i, l) in layouts.iter_mut().enumerate() {
        for &(off, target) in &l.dir_patches {
            l.content[off..off + 8].copy_from_slice(&nid_of[&target].to_le_bytes());
        }
        let node = &plan.nodes[plan.order[i]];
        let mut p = (l.nid * 32) as usize;
        let inode = inode_bytes(l, node, i as u32 + 1, chunk_size);
        img[p..p + inode.len()].copy_from_slice(&inode);
        p += inode.len();
        img[p..p + l.xattr_body.len()].copy_from_slice(&l.xattr_body);
        p += xattr_ibody_size(l.xattr_icount) as usize;
        let full = l.content.len() - l.tail_inline;
        if l.tail_inline > 0 {
            img[p..p + l.tail_inline].copy_from_slice(&l.content[full..]);
        }
        if full > 0 {
            let at = l.raw_blkaddr as usize * BLK;
            img[at..at + full].copy_from_slice(&l.content[..full]);
        }
        if let Data::File { size, chunks, .. } = &node.data {
            if *size > 0 {
                write_chunk_indexes(&mut img[align(p, 8)..], chunks, placement);
            }
        }
    }
}

/// The compact or extended inode of `l` (`i_ino` numbered from 1).
fn inode_bytes(l: &Layout, node: &Node, i_ino: u32, chunk_size: u64) -> Vec<u8> {
    let m = &node.meta;
    let (size, i_u) = match &node.data {
        Data::File { size, .. } if *size > 0 => {
            let bits = (chunk_size.trailing_zeros() - 12) as u16;
            (*size, u32::from(bits | EROFS_CHUNK_FORMAT_INDEXES))
        }
        Data::File { .. } => (0, EROFS_NULL_ADDR),
        Data::Device(rdev) => (0, *rdev),
        Data::Special => (0, 0),
        Data::Dir(_) | Data::Symlink(_) => (l.content.len() as u64, l.raw_blkaddr),
    };
    let i_format = l.datalayout.i_format(l.extended);
    if l.extended {
        return InodeExtended {
            i_format: i_format.into(),
            i_xattr_icount: l.xattr_icount.into(),
            i_mode: (m.mode as u16).into(),
            i_reserved: 0.into(),
            i_size: size.into(),
            i_u: i_u.into(),
            i_ino: i_ino.into(),
            i_uid: m.uid.into(),
            i_gid: m.gid.into(),
            i_mtime: (m.mtime as u64).into(),
            i_mtime_nsec: m.mtime_nsec.into(),
            i_nlink: l.nlink.into(),
            i_reserved2: [0; 16],
        }
        .as_bytes()
        .to_vec();
    }
    InodeCompact {
        i_format: i_format.into(),
        i_xattr_icount: l.xattr_icount.into(),
        i_mode: (m.mode as u16).into(),
        i_nlink: (l.nlink as u16).into(),
        i_size: (size as u32).into(),
        i_reserved: 0.into(),
        i_u: i_u.into(),
        i_ino: i_ino.into(),
        i_uid: (m.uid as u16).into(),
        i_gid: (m.gid as u16).into(),
        i_reserved2: 0.into(),
    }
    .as_bytes()
    .to_vec()
}

/// One `struct erofs_inode_chunk_index` per chunk, from the start of
/// `out`: the device slot and block the blob placement gave it, or a hole.
fn write_chunk_indexes(out: &mut [u8], chunks: &[Option<ChunkRef>], placement: &Placement) {
    for (c, slot) in chunks
        .iter()
        .zip(out.chunks_exact_mut(size_of::<ChunkIndex>()))
    {
        let (device_id, blkaddr) = match c {
            Some(r) => placement.get(*r),
            None => (0, EROFS_NULL_ADDR),
        };
        let idx = ChunkIndex {
            advise: 0.into(),
            device_id: device_id.into(),
            blkaddr: blkaddr.into(),
        };
        slot.copy_from_slice(idx.as_bytes());
    }
}

/// One device slot per blob: its tag (the blob's name) and size.
fn write_device_table(img: &mut [u8], blobs: &[FinalBlob]) {
    for (k, b) in blobs.iter().enumerate() {
        let mut slot = DeviceSlot::default();
        slot.tag.copy_from_slice(b.tag.as_bytes());
        slot.blocks = b.blocks.into();
        let at = DEVT_OFFSET + 128 * k;
        img[at..at + 128].copy_from_slice(slot.as_bytes());
    }
}

/// Complete `sb` (placement fields already set) with the fixed fields,
/// features and volume name, then a uuid derived from the image content
/// (so builds are reproducible) and the checksum, and write it.
fn write_superblock(
    img: &mut [u8],
    mut sb: SuperBlock,
    names: &XattrNames,
    volume_name: &[u8],
) -> Result<(), BuildError> {
    if volume_name.len() > 16 {
        return Err(BuildError::Invalid(
            "fsid longer than 16 bytes cannot be stored".into(),
        ));
    }
    sb.volume_name[..volume_name.len()].copy_from_slice(volume_name);
    let (long_compat, long_incompat) = if names.long.is_empty() {
        (0, 0)
    } else {
        (
            EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX | EROFS_FEATURE_COMPAT_ISHARE_XATTRS,
            EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES,
        )
    };
    let devices = if sb.extra_devices.get() > 0 {
        EROFS_FEATURE_INCOMPAT_DEVICE_TABLE
    } else {
        0
    };
    sb.magic = EROFS_SUPER_MAGIC_V1.into();
    sb.feature_compat = (EROFS_FEATURE_COMPAT_SB_CHKSUM | long_compat).into();
    sb.blkszbits = 12;
    sb.feature_incompat = (EROFS_FEATURE_INCOMPAT_CHUNKED_FILE | long_incompat | devices).into();
    sb.devt_slotoff = ((DEVT_OFFSET / 128) as u16).into();
    sb.xattr_prefix_count = names.long.len() as u8;
    // The fingerprint's prefix is the first (and only) long prefix.
    sb.ishare_xattr_prefix_id = 0;
    img[1024..1152].copy_from_slice(sb.as_bytes());
    {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&*img);
        sb.uuid.copy_from_slice(&d[..16]);
    }
    img[1024..1152].copy_from_slice(sb.as_bytes());
    sb.checksum = sb_checksum(&img[1024..BLK]).into();
    img[1024..1152].copy_from_slice(sb.as_bytes());
    Ok(())
}
