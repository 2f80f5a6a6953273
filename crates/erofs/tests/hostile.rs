//! Hostile input: images and tar layers corrupted in targeted ways must
//! yield a typed error naming what and where, never a panic, a hang or a
//! huge allocation. Every image here is a real build of a real directory,
//! patched at offsets found through the reader's own API.

use erofs::ondisk::{sb_checksum, Dirent, EROFS_SUPER_OFFSET};
use erofs::reader::DataSink;
use erofs::{
    BlobFiles, BlobSource, BuildError, BuildOptions, Error, Extent, Image, Inode, NoBlobs,
};
use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use zerocopy::FromBytes;

const DEVT: usize = 1152;

// ---------------------------------------------------------------------------
// Fixture: a small tree with files, subdirectories, a symlink, a hard link
// and user xattrs (one inline, one shared by two inodes).

struct Fixture {
    tmp: tempfile::TempDir,
    blob_dir: PathBuf,
    image: Vec<u8>,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn make_tree(src: &Path, seed: u8) {
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), pattern(10_000, seed)).unwrap();
    std::fs::write(src.join("sub/b.txt"), b"hello from b\n").unwrap();
    std::fs::write(src.join("sub/deeper/c.bin"), pattern(5000, seed ^ 0x55)).unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    std::fs::hard_link(src.join("sub/b.txt"), src.join("hard")).unwrap();
    xattr::set(src.join("a.txt"), "user.only", b"inline value").unwrap();
    xattr::set(src.join("a.txt"), "user.shared", b"same").unwrap();
    xattr::set(src.join("sub/deeper/c.bin"), "user.shared", b"same").unwrap();
    // A directory spanning several blocks (plain blocks plus an inline tail).
    std::fs::create_dir(src.join("many")).unwrap();
    for i in 0..200 {
        File::create(src.join(format!("many/file-with-a-longish-name-{i:03}"))).unwrap();
    }
}

fn build_from(tmp: &Path, sources: &[PathBuf], layer_blobs: bool) -> (PathBuf, Vec<u8>) {
    let blob_dir = tmp.join("blobs");
    let out = tmp.join("image.erofs");
    erofs::build(
        sources,
        &blob_dir,
        &out,
        &BuildOptions {
            chunk_size: 4096,
            layer_blobs,
            ..Default::default()
        },
    )
    .unwrap();
    (blob_dir, std::fs::read(&out).unwrap())
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src, 7);
    let (blob_dir, image) = build_from(tmp.path(), &[src], false);
    Fixture {
        tmp,
        blob_dir,
        image,
    }
}

/// Two layers, one blob each: device ids 1 and 2 (so the device id mask is
/// 3 and device 3 is addressable but absent).
fn two_blob_fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (l1, l2) = (tmp.path().join("l1"), tmp.path().join("l2"));
    make_tree(&l1, 1);
    std::fs::create_dir(&l2).unwrap();
    std::fs::write(l2.join("top.bin"), pattern(9000, 99)).unwrap();
    let (blob_dir, image) = build_from(tmp.path(), &[l1, l2], true);
    Fixture {
        tmp,
        blob_dir,
        image,
    }
}

impl Fixture {
    fn img(&self) -> Image<Vec<u8>> {
        Image::open(self.image.clone()).unwrap()
    }

    fn blobs(&self, img: &Image<Vec<u8>>) -> BlobFiles {
        BlobFiles(
            (1..=img.devices.len() as u16)
                .map(|d| File::open(self.blob_dir.join(img.device_tag(d).unwrap())).unwrap())
                .collect(),
        )
    }
}

// ---------------------------------------------------------------------------
// Helpers to find and patch things.

/// Recompute the superblock checksum after a patch, so the test reaches
/// the check it targets instead of stopping at the checksum.
fn reseal(img: &mut [u8]) {
    img[1028..1032].fill(0);
    let c = sb_checksum(&img[1024..4096]);
    img[1028..1032].copy_from_slice(&c.to_le_bytes());
}

fn put16(img: &mut [u8], at: u64, v: u16) {
    img[at as usize..at as usize + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(img: &mut [u8], at: u64, v: u32) {
    img[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(img: &mut [u8], at: u64, v: u64) {
    img[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

/// Open patched bytes, resealing the superblock checksum first (whole
/// blocks only: a truncated image is opened as it is).
fn open(mut bytes: Vec<u8>) -> erofs::Result<Image<Vec<u8>>> {
    if bytes.len() >= 4096 {
        reseal(&mut bytes);
    }
    Image::open(bytes)
}

fn lookup(img: &Image<Vec<u8>>, path: &str) -> Inode {
    img.lookup(path).unwrap()
}

/// Image offset of a directory's (single) block and its bytes.
fn dir_block(img: &Image<Vec<u8>>, dir: &Inode) -> (u64, Vec<u8>) {
    assert!(dir.size <= 4096, "fixture directories fit one block");
    let m = img.map(dir, 0).unwrap();
    assert_eq!((m.la, m.end()), (0, dir.size));
    let ext = m.extent;
    let Extent::Image { offset } = ext else {
        panic!("directory data not in the image: {ext:?}")
    };
    let bytes = img.source()[offset as usize..(offset + dir.size) as usize].to_vec();
    (offset, bytes)
}

/// Image offset of the dirent named `name` in `dir`.
fn dirent_at(img: &Image<Vec<u8>>, dir: &Inode, name: &[u8]) -> u64 {
    let (off, _) = dir_block(img, dir);
    let k = img
        .read_dir(dir)
        .unwrap()
        .iter()
        .position(|e| e.name == name)
        .unwrap();
    off + 12 * k as u64
}

/// Image offset of chunk index `k` of a chunk-based file (8-byte indexes).
fn chunk_index_at(ino: &Inode, k: u64) -> u64 {
    (ino.offset + ino.inode_isize + ino.xattr_isize).div_ceil(8) * 8 + 8 * k
}

/// Offset of `i_size` in the inode (compact: u32 at 8; extended: u64 at 8).
fn size_at(ino: &Inode) -> u64 {
    ino.offset + 8
}

fn read_all(img: &Image<Vec<u8>>, ino: &Inode, blobs: &dyn BlobSource) -> erofs::Result<Vec<u8>> {
    let mut out = Vec::new();
    let sink: &mut DataSink<'_> = &mut |b, len| {
        match b {
            Some(b) => out.extend_from_slice(b),
            None => out.resize(out.len() + len as usize, 0),
        }
        Ok(())
    };
    img.read_file(ino, blobs, sink)?;
    Ok(out)
}

/// Walk the whole tree (as `shoal`'s walker does: each directory entered at
/// most once), reading every symlink, xattr set and file. Returns the number
/// of entries seen or the first error.
fn walk_all(img: &Image<Vec<u8>>, blobs: &dyn BlobSource) -> erofs::Result<usize> {
    let mut seen_dirs = HashSet::new();
    let mut stack = vec![img.inode(img.root_nid())?];
    let mut n = 0;
    while let Some(ino) = stack.pop() {
        n += 1;
        img.xattrs(&ino)?;
        match ino.file_type() {
            erofs::tree::S_IFDIR => {
                if !seen_dirs.insert(ino.nid) {
                    return Err(Error::Corrupt {
                        nid: ino.nid,
                        what: "directory reached twice".into(),
                    });
                }
                for e in img.read_dir(&ino)? {
                    if e.name != b"." && e.name != b".." {
                        stack.push(img.inode(e.nid)?);
                    }
                }
            }
            erofs::tree::S_IFLNK => {
                img.read_link(&ino)?;
            }
            erofs::tree::S_IFREG => {
                read_all(img, &ino, blobs)?;
            }
            _ => {}
        }
    }
    Ok(n)
}

fn corrupt_what(r: erofs::Result<impl std::fmt::Debug>) -> (u64, String) {
    match r {
        Err(Error::Corrupt { nid, what }) => (nid, what),
        other => panic!("expected Error::Corrupt, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The valid image, as a baseline.

#[test]
fn valid_image_reads_back() {
    let f = fixture();
    let img = f.img();
    let blobs = f.blobs(&img);
    assert_eq!(walk_all(&img, &blobs).unwrap(), 9 + 200);
    assert!(lookup(&img, "many").size > 4096);
    let a = lookup(&img, "a.txt");
    assert!(read_all(&img, &a, &blobs).unwrap() == pattern(10_000, 7));
    let x = img.xattrs(&a).unwrap();
    assert!(x.contains(&(b"user.only".to_vec(), b"inline value".to_vec())));
    assert!(x.contains(&(b"user.shared".to_vec(), b"same".to_vec())));
    assert_eq!(img.read_link(&lookup(&img, "link")).unwrap(), b"a.txt");
    assert_eq!(lookup(&img, "hard").nid, lookup(&img, "sub/b.txt").nid);
    assert!(img.chunk_table.is_some());
}

// ---------------------------------------------------------------------------
// Superblock, device table, chunk table.

#[test]
fn truncated_images() {
    let f = fixture();
    let fs_end = u64::from(f.img().sb.blocks.get()) * 4096;
    let len = f.image.len() as u64;
    for cut in [0, 1, 1000, 1024, 1100, 1151] {
        let r = open(f.image[..cut].to_vec());
        assert!(
            matches!(
                r,
                Err(Error::Io {
                    what: "superblock",
                    offset: 1024,
                    ..
                })
            ),
            "cut {cut}: {:?}",
            r.err()
        );
    }
    for cut in [1152, 2000, 4095] {
        let r = open(f.image[..cut].to_vec());
        assert!(
            matches!(
                r,
                Err(Error::Io {
                    what: "superblock block",
                    ..
                })
            ),
            "cut {cut}: {:?}",
            r.err()
        );
    }
    assert!(fs_end > 8192);
    for cut in [4096, 4097, fs_end - 4096, fs_end - 1] {
        match open(f.image[..cut as usize].to_vec()) {
            Err(Error::CorruptSuper(m)) => assert!(m.contains("truncated"), "{m}"),
            r => panic!("cut {cut}: {:?}", r.err()),
        }
    }
    // Cut exactly at the end of the filesystem: a plain EROFS image, no
    // table. Cut inside the chunk table: refused, never silently unverified.
    let img = open(f.image[..fs_end as usize].to_vec()).unwrap();
    assert!(img.chunk_table.is_none());
    walk_all(&img, &f.blobs(&img)).unwrap();
    for cut in [fs_end + 1, len - 64, len - 1] {
        match open(f.image[..cut as usize].to_vec()) {
            Err(Error::ChunkTable(m)) => assert!(m.contains("truncated"), "cut {cut}: {m}"),
            r => panic!("cut {cut}: {:?}", r.err()),
        }
    }
}

#[test]
fn bad_magic() {
    let f = fixture();
    let mut b = f.image.clone();
    put32(&mut b, EROFS_SUPER_OFFSET, 0x1234_5678);
    assert!(matches!(open(b), Err(Error::BadMagic(0x1234_5678))));
    assert!(matches!(open(vec![0; 8192]), Err(Error::BadMagic(0))));
}

#[test]
fn bad_superblock_checksum() {
    let f = fixture();
    let mut b = f.image.clone();
    b[1024 + 0x40] ^= 0xff; // volume name
    match Image::open(b) {
        Err(Error::BadChecksum { stored, computed }) => assert_ne!(stored, computed),
        r => panic!("{:?}", r.err()),
    }
}

#[test]
fn bad_block_size_and_features() {
    let f = fixture();
    let mut b = f.image.clone();
    b[1024 + 12] = 40; // blkszbits
    reseal(&mut b);
    match open(b) {
        Err(Error::CorruptSuper(m)) => assert!(m.contains("block size bits 40"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
    let mut b = f.image.clone();
    put32(&mut b, 1024 + 0x50, 0x8000_0000); // feature_incompat
    reseal(&mut b);
    match open(b) {
        Err(Error::Unsupported(m)) => assert!(m.contains("0x80000000"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
}

#[test]
fn device_tags_must_be_64_hex_chars() {
    let f = fixture();
    let bad: [&[u8]; 4] = [
        b"../../etc/passwd",
        &[b'A'; 64],
        &[b'a'; 63],
        b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde/",
    ];
    for tag in bad {
        let mut b = f.image.clone();
        b[DEVT..DEVT + 64].fill(0);
        b[DEVT..DEVT + tag.len()].copy_from_slice(tag);
        reseal(&mut b);
        match open(b) {
            Err(Error::BadTag { slot: 1, tag: t }) => {
                let shown = tag.split(|&c| c == 0).next().unwrap();
                assert_eq!(t.as_bytes(), shown);
            }
            r => panic!("{:?}: {:?}", String::from_utf8_lossy(tag), r.err()),
        }
    }
    // Without resealing, the checksum catches it first.
    let mut b = f.image.clone();
    b[DEVT..DEVT + 16].copy_from_slice(b"../../etc/passwd");
    assert!(matches!(Image::open(b), Err(Error::BadChecksum { .. })));
}

#[test]
fn device_table_overrunning_the_image() {
    let f = fixture();
    let mut b = f.image.clone();
    put16(&mut b, 1024 + 0x56, 60_000); // extra_devices
    reseal(&mut b);
    match open(b) {
        Err(Error::CorruptSuper(m)) => assert!(m.contains("60000 device slots"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
}

#[test]
fn corrupt_chunk_table() {
    let f = fixture();
    let len = f.image.len();
    // A flipped table byte: the trailer's digest no longer matches.
    let mut b = f.image.clone();
    let table_off = u64::from_le_bytes(b[len - 56..len - 48].try_into().unwrap()) as usize;
    b[table_off + 30] ^= 1;
    match open(b) {
        Err(Error::ChunkTable(m)) => assert!(m.contains("digest mismatch"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
    // A trailer pointing elsewhere, or claiming a huge length.
    for (off, tlen) in [(0u64, 10u64), (table_off as u64, u64::MAX - 10)] {
        let mut b = f.image.clone();
        put64(&mut b, (len - 56) as u64, off);
        put64(&mut b, (len - 48) as u64, tlen);
        match open(b) {
            Err(Error::ChunkTable(m)) => assert!(m.contains("misplaced"), "{m}"),
            r => panic!("{:?}", r.err()),
        }
    }
}

// ---------------------------------------------------------------------------
// Chunk indexes and blobs.

#[test]
fn chunk_index_to_a_missing_device() {
    let f = two_blob_fixture();
    let img = f.img();
    assert_eq!(img.devices.len(), 2);
    let a = lookup(&img, "a.txt");
    let mut b = f.image.clone();
    put16(&mut b, chunk_index_at(&a, 1) + 2, 3);
    let img = open(b).unwrap();
    let (nid, what) = corrupt_what(img.map(&a, 4096));
    assert_eq!(nid, a.nid);
    assert!(what.contains("chunk 1: device 3 does not exist"), "{what}");
    let (nid, _) = corrupt_what(read_all(&img, &a, &f.blobs(&img)));
    assert_eq!(nid, a.nid);
}

#[test]
fn chunk_index_beyond_the_blob() {
    let f = fixture();
    let img = f.img();
    let a = lookup(&img, "a.txt");
    let mut b = f.image.clone();
    put32(&mut b, chunk_index_at(&a, 0) + 4, 1_000_000);
    let img = open(b).unwrap();
    let (nid, what) = corrupt_what(img.map(&a, 0));
    assert_eq!(nid, a.nid);
    assert!(
        what.contains("chunk 0: blocks 1000000+1 beyond device 1"),
        "{what}"
    );
}

#[test]
fn chunk_index_beyond_the_image() {
    // Device 0 is the image itself: a block past its end.
    let f = fixture();
    let img = f.img();
    let a = lookup(&img, "a.txt");
    let mut b = f.image.clone();
    put16(&mut b, chunk_index_at(&a, 2) + 2, 0);
    put32(&mut b, chunk_index_at(&a, 2) + 4, 4000);
    let img = open(b).unwrap();
    let (nid, what) = corrupt_what(img.map(&a, 8192));
    assert_eq!(nid, a.nid);
    assert!(what.contains("chunk 2 beyond the image end"), "{what}");
}

#[test]
fn chunk_not_pinned_by_the_table() {
    // Point chunk 0 of a.txt at a block of the blob that holds no chunk
    // start: the table has no digest for it, so it is refused.
    let f = fixture();
    let img = f.img();
    let blocks = img.devices[0].blocks.get();
    let starts: HashSet<u32> = img
        .chunk_table
        .as_ref()
        .unwrap()
        .entries(1)
        .unwrap()
        .iter()
        .map(|e| e.blkaddr.get())
        .collect();
    assert_eq!(
        starts.len() as u32,
        blocks,
        "4 KiB chunks: one entry per block"
    );
    // Every block starts a chunk, so grow the slot's block count to make
    // room for an unpinned address.
    let a = lookup(&img, "a.txt");
    let mut b = f.image.clone();
    put32(&mut b, (DEVT + 64) as u64, blocks + 10);
    put32(&mut b, chunk_index_at(&a, 0) + 4, blocks + 5);
    reseal(&mut b);
    let img = open(b).unwrap();
    match read_all(&img, &a, &f.blobs(&img)) {
        Err(Error::Verify {
            blob, blkaddr, why, ..
        }) => {
            assert_eq!(Some(blob), img.device_tag(1));
            assert_eq!(blkaddr, blocks + 5);
            assert!(why.contains("no chunk table entry"), "{why}");
        }
        r => panic!("{:?}", r.err()),
    }
}

#[test]
fn tampered_blob_fails_verification() {
    let f = fixture();
    let img = f.img();
    let tag = img.device_tag(1).unwrap();
    let a = lookup(&img, "a.txt");
    let ext = img.map(&a, 4096).unwrap().extent;
    let Extent::Chunk {
        device_id: 1,
        blkaddr,
    } = ext
    else {
        panic!("{ext:?}")
    };
    let path = f.blob_dir.join(&tag);
    let mut blob = std::fs::read(&path).unwrap();
    blob[blkaddr as usize * 4096 + 17] ^= 0x40;
    std::fs::write(&path, &blob).unwrap();
    match read_all(&img, &a, &f.blobs(&img)) {
        Err(Error::Verify {
            blob,
            blkaddr: at,
            nblocks,
            why,
        }) => {
            assert_eq!(blob, tag);
            assert_eq!((at, nblocks), (blkaddr, 1));
            assert_eq!(why, "sha256 mismatch");
        }
        r => panic!("{:?}", r.err()),
    }
    // Other files in the same blob still read.
    let b = lookup(&img, "sub/b.txt");
    assert_eq!(
        read_all(&img, &b, &f.blobs(&img)).unwrap(),
        b"hello from b\n"
    );
}

#[test]
fn short_blob_is_an_io_error() {
    let f = fixture();
    let img = f.img();
    let tag = img.device_tag(1).unwrap();
    let path = f.blob_dir.join(&tag);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let c = lookup(&img, "sub/deeper/c.bin");
    match read_all(&img, &c, &f.blobs(&img)) {
        Err(Error::Io {
            what: "data blob",
            source,
            ..
        }) => assert!(source.to_string().contains(&tag), "{source}"),
        r => panic!("{:?}", r.err()),
    }
}

/// Records the largest read asked of it, so a test can bound allocations.
struct Recording<'a> {
    inner: &'a dyn BlobSource,
    largest: Cell<usize>,
}
impl BlobSource for Recording<'_> {
    fn read_blob(&self, device_id: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.largest.set(self.largest.get().max(buf.len()));
        self.inner.read_blob(device_id, buf, offset)
    }
}

#[test]
fn hostile_sizes_do_not_over_allocate() {
    // Without a chunk table, a 4 GiB file in 1 TiB chunks on a device that
    // claims 2^32 blocks: the reader must not allocate the chunk up front.
    let f = fixture();
    let img = f.img();
    let fs_end = u64::from(img.sb.blocks.get()) * 4096;
    let a = lookup(&img, "a.txt");
    let mut b = f.image[..fs_end as usize].to_vec();
    put32(&mut b, (DEVT + 64) as u64, u32::MAX);
    put32(&mut b, size_at(&a), u32::MAX);
    put16(&mut b, a.offset + 16, 0x20 | 28); // chunk bits 12 + 28 = 40
    reseal(&mut b);
    let img = open(b).unwrap();
    let a = img.inode(a.nid).unwrap();
    let blobs = f.blobs(&img);
    for src in [&blobs as &dyn BlobSource, &NoBlobs] {
        let rec = Recording {
            inner: src,
            largest: Cell::new(0),
        };
        match read_all(&img, &a, &rec) {
            Err(Error::Io {
                what: "data blob", ..
            }) => {}
            r => panic!("{:?}", r.err()),
        }
        assert!(rec.largest.get() <= 1 << 20, "{}", rec.largest.get());
    }
    // A regular file claiming more chunk indexes than the image holds.
    let mut b = f.image.clone();
    put32(&mut b, size_at(&a), u32::MAX);
    let img = open(b).unwrap();
    let (nid, what) = corrupt_what(read_all(&img, &img.inode(a.nid).unwrap(), &NoBlobs));
    assert_eq!(nid, a.nid);
    assert!(
        what.contains("chunk indexes beyond the image end"),
        "{what}"
    );
}

// ---------------------------------------------------------------------------
// Inodes, directories, xattrs.

#[test]
fn directory_cycle_terminates() {
    let f = fixture();
    let img = f.img();
    let root = img.inode(img.root_nid()).unwrap();
    let sub = lookup(&img, "sub");
    let mut b = f.image.clone();
    // root/sub -> root, and sub/deeper -> sub: two cycles.
    put64(&mut b, dirent_at(&img, &root, b"sub"), root.nid);
    put64(&mut b, dirent_at(&img, &sub, b"deeper"), sub.nid);
    let img = open(b).unwrap();
    let entries = img.read_dir(&root).unwrap();
    let e = entries.iter().find(|e| e.name == b"sub").unwrap();
    assert_eq!(e.nid, root.nid);
    // Path lookup is bounded by the path, not the tree.
    let deep = ["sub"; 1000].join("/");
    assert_eq!(img.lookup(&deep).unwrap().nid, root.nid);
    match walk_all(&img, &NoBlobs) {
        Err(Error::Corrupt { nid, what }) => {
            assert_eq!(nid, root.nid);
            assert!(what.contains("reached twice"), "{what}");
        }
        r => panic!("{r:?}"),
    }
    // The other cycle, on its own.
    let mut b = f.image.clone();
    put64(&mut b, dirent_at(&f.img(), &sub, b"deeper"), sub.nid);
    match walk_all(&open(b).unwrap(), &NoBlobs) {
        Err(Error::Corrupt { nid, .. }) => assert_eq!(nid, sub.nid),
        r => panic!("{r:?}"),
    }
}

#[test]
fn bogus_nameoff() {
    let f = fixture();
    let img = f.img();
    let root = img.inode(img.root_nid()).unwrap();
    let (off, blk) = dir_block(&img, &root);
    let n = u16::from_le_bytes([blk[8], blk[9]]) as u64 / 12;
    assert!(n >= 4);
    for (k, v, want) in [
        (0, 5u16, "dir block 0: bad nameoff 5".to_string()),
        (0, 0, "dir block 0: bad nameoff 0".into()),
        (0, 0xffff, "dir block 0: bad nameoff 65535".into()),
        (0, 13, "dir block 0: bad nameoff 13".into()),
        (2, 1, "dir block 0 entry 1: bad name bounds".into()),
        (2, 0xfff0, "dir block 0 entry 1: bad name bounds".into()),
        (
            n - 1,
            0xfff0,
            format!("dir block 0 entry {}: bad name bounds", n - 2),
        ),
    ] {
        let mut b = f.image.clone();
        let d = Dirent::read_from_bytes(&blk[12 * k as usize..12 * k as usize + 12]).unwrap();
        assert_ne!(d.nameoff.get(), v);
        put16(&mut b, off + 12 * k + 8, v);
        let img = open(b).unwrap();
        let (nid, what) = corrupt_what(img.read_dir(&root));
        assert_eq!(nid, root.nid);
        assert!(what.starts_with(&want), "entry {k} = {v}: {what}");
        assert!(walk_all(&img, &NoBlobs).is_err());
    }
    // A name with a '/' in it.
    let mut b = f.image.clone();
    let name_at = off + u64::from(Dirent::read_from_bytes(&blk[36..48]).unwrap().nameoff.get());
    b[name_at as usize] = b'/';
    let (_, what) = corrupt_what(open(b).unwrap().read_dir(&root));
    assert!(what.contains("invalid name"), "{what}");
}

/// Image offset of the name bytes of the entry `name` in `dir`.
fn name_at(img: &Image<Vec<u8>>, dir: &Inode, name: &[u8]) -> u64 {
    let (off, blk) = dir_block(img, dir);
    let k = (dirent_at(img, dir, name) - off) as usize;
    off + u64::from(u16::from_le_bytes([blk[k + 8], blk[k + 9]]))
}

#[test]
fn duplicate_and_unsorted_names() {
    let f = fixture();
    let img = f.img();
    let root = img.inode(img.root_nid()).unwrap();
    // Same-length renames in place: a duplicate (a symlink and a file both
    // called "hard"), a name after its successor, one before "..".
    for (from, to, want) in [
        (
            &b"link"[..],
            &b"hard"[..],
            r#"duplicate directory entry "hard""#,
        ),
        (
            b"hard",
            b"zzzz",
            r#"directory entry "link" out of order (after "zzzz")"#,
        ),
        (
            b"a.txt",
            b"!a.tx",
            r#"directory entry "!a.tx" out of order (after "..")"#,
        ),
    ] {
        let mut b = f.image.clone();
        let at = name_at(&img, &root, from) as usize;
        b[at..at + to.len()].copy_from_slice(to);
        let img = open(b).unwrap();
        let (nid, what) = corrupt_what(img.read_dir(&root));
        assert_eq!((nid, what.as_str()), (root.nid, want));
        assert!(walk_all(&img, &NoBlobs).is_err());
        assert!(img.lookup("sub/b.txt").is_err());
    }
    // Across blocks: block 1 of "many" starts with a name from block 0.
    let many = lookup(&img, "many");
    let Extent::Image { offset } = img.map(&many, 4096).unwrap().extent else {
        panic!("directory block not in the image")
    };
    let blk1 = img.source()[offset as usize..offset as usize + 4096].to_vec();
    let start = u16::from_le_bytes([blk1[8], blk1[9]]) as usize;
    let name = &blk1[start..start + 28];
    assert!(name.starts_with(b"file-with-a-longish-name-"), "{name:?}");
    let mut b = f.image.clone();
    b[offset as usize + start + 25..offset as usize + start + 28].copy_from_slice(b"000");
    let (nid, what) = corrupt_what(open(b).unwrap().read_dir(&many));
    assert_eq!(nid, many.nid);
    assert!(
        what.starts_with(r#"directory entry "file-with-a-longish-name-000" out of order"#),
        "{what}"
    );
}

#[test]
fn hostile_nids() {
    let f = fixture();
    let img = f.img();
    let root = img.inode(img.root_nid()).unwrap();
    let at = dirent_at(&img, &root, b"a.txt");
    for (nid, want) in [
        (u64::MAX, "nid out of range"),
        (u64::MAX / 32, "inode beyond the image end"),
        (u64::MAX / 32 - 1, "inode beyond the image end"),
        (1 << 40, "inode beyond the image end"),
        (100_000, "inode beyond the image end"),
    ] {
        let mut b = f.image.clone();
        put64(&mut b, at, nid);
        let img = open(b).unwrap();
        let (n, what) = corrupt_what(img.lookup("a.txt"));
        assert_eq!((n, what.as_str()), (nid, want));
    }
    // A nid into the middle of another inode's data: garbage, refused or
    // read as some inode, but walking never panics.
    for nid in [1, 2, 33, 37, root.nid + 1] {
        let mut b = f.image.clone();
        put64(&mut b, at, nid);
        let _ = walk_all(&open(b).unwrap(), &NoBlobs);
    }
}

#[test]
fn corrupt_inode_fields() {
    let f = fixture();
    let img = f.img();
    let a = lookup(&img, "a.txt");
    let sub = lookup(&img, "sub");
    let link = lookup(&img, "link");
    let case = |at: u64,
                bytes: &[u8],
                nid: u64,
                want: &str,
                read: &dyn Fn(&Image<Vec<u8>>) -> erofs::Result<()>| {
        let mut b = f.image.clone();
        b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let img = open(b).unwrap();
        let (n, what) = corrupt_what(read(&img));
        assert_eq!(n, nid);
        assert!(what.contains(want), "{want}: {what}");
    };
    let inode = |nid: u64| move |img: &Image<Vec<u8>>| img.inode(nid).map(|_| ());
    case(
        a.offset,
        &0x20u16.to_le_bytes(),
        a.nid,
        "unknown i_format",
        &inode(a.nid),
    );
    case(
        a.offset,
        &(5u16 << 1).to_le_bytes(),
        a.nid,
        "unknown data layout 5",
        &inode(a.nid),
    );
    case(
        a.offset + 4,
        &0o000644u16.to_le_bytes(),
        a.nid,
        "unknown file type",
        &inode(a.nid),
    );
    case(
        a.offset + 2,
        &0xffffu16.to_le_bytes(),
        a.nid,
        "inode body beyond",
        &inode(a.nid),
    );
    // Directory size larger than the image.
    case(
        size_at(&sub),
        &u32::MAX.to_le_bytes(),
        sub.nid,
        "exceeds the image",
        &|img| img.read_dir(&img.inode(sub.nid)?).map(|_| ()),
    );
    // Directory content claimed inline but crossing the block: the tail
    // starts at least 32 bytes (the inode) after the inode's offset, so
    // this size always ends 16 bytes or more past the block, wherever
    // mtimes (compact or extended inodes) placed the inode.
    let crossing = 4096 - (sub.offset % 4096) as u32 - 16;
    case(
        size_at(&sub),
        &crossing.to_le_bytes(),
        sub.nid,
        "",
        &|img| img.read_dir(&img.inode(sub.nid)?).map(|_| ()),
    );
    // Symlink sizes.
    for (size, want) in [
        (0u32, "symlink size 0"),
        (5000, "symlink size 5000"),
        (4096, ""),
    ] {
        case(
            size_at(&link),
            &size.to_le_bytes(),
            link.nid,
            want,
            &|img| img.read_link(&img.inode(link.nid)?).map(|_| ()),
        );
    }
    // Flat data blocks beyond the image end.
    let mut fmt = [0u8; 2];
    fmt.copy_from_slice(&f.image[sub.offset as usize..sub.offset as usize + 2]);
    let plain = u16::from_le_bytes(fmt) & 1; // FLAT_PLAIN, same version bit
    let mut b = f.image.clone();
    put16(&mut b, sub.offset, plain);
    put32(&mut b, sub.offset + 16, 0xffff_fff0);
    let img2 = open(b).unwrap();
    let (n, what) = corrupt_what(img2.read_dir(&img2.inode(sub.nid).unwrap()));
    assert_eq!(n, sub.nid);
    assert!(what.contains("beyond the image end"), "{what}");
    // Extended inode format on the very last inode slot of the image.
    let mut b = f.image.clone();
    let fs_end = u64::from(img.sb.blocks.get()) * 4096;
    let last_nid = fs_end / 32 - 1;
    put16(&mut b, fs_end - 32, 1);
    b.truncate(fs_end as usize);
    let (n, what) = corrupt_what(open(b).unwrap().inode(last_nid));
    assert_eq!(n, last_nid);
    assert!(
        what.contains("extended inode beyond the image end"),
        "{what}"
    );
    // An inline symlink in the block's last slot: its tail would start at
    // the next block, which the format forbids (the tail shares the inode's
    // block). Found by CI, where mtimes happened to lay an inode out there.
    let mut b = f.image.clone();
    b.truncate(fs_end as usize);
    let at = fs_end - 32;
    b[at as usize..fs_end as usize].fill(0);
    put16(&mut b, at, 2 << 1); // compact, FLAT_INLINE
    put16(&mut b, at + 4, 0o120777);
    put16(&mut b, at + 6, 1);
    put32(&mut b, at + 8, 5);
    b.extend_from_slice(&[b'x'; 4096]);
    put32(&mut b, 1024 + 36, img.sb.blocks.get() + 1);
    reseal(&mut b);
    let img3 = open(b).unwrap();
    let (n, what) = corrupt_what(img3.read_link(&img3.inode(last_nid).unwrap()));
    assert_eq!(n, last_nid);
    assert!(what.contains("crosses a block boundary"), "{what}");
}

#[test]
fn corrupt_xattrs() {
    let f = fixture();
    let img = f.img();
    let a = lookup(&img, "a.txt");
    let body = a.offset + a.inode_isize;
    let shared = u64::from(f.image[body as usize + 4]);
    assert_eq!(shared, 1, "user.shared is shared");
    let first = body + 12 + 4 * shared;
    for (at, bytes, want) in [
        (body + 4, vec![255u8], "shared xattr count overruns"),
        (first, vec![200u8], "xattr entry overruns"),
        (first + 1, vec![99u8], "unknown xattr name index 99"),
        (
            first + 2,
            0xffffu16.to_le_bytes().to_vec(),
            "xattr entry overruns",
        ),
    ] {
        let mut b = f.image.clone();
        b[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        let img = open(b).unwrap();
        let (nid, what) = corrupt_what(img.xattrs(&a));
        assert_eq!(nid, a.nid);
        assert!(what.contains(want), "{want}: {what}");
    }
    // A shared xattr id pointing past the image end.
    let mut b = f.image.clone();
    put32(&mut b, body + 12, u32::MAX);
    let (nid, what) = corrupt_what(open(b).unwrap().xattrs(&a));
    assert_eq!(nid, a.nid);
    assert!(
        what.contains("shared xattr id 4294967295 beyond the image end"),
        "{what}"
    );
}

/// Files laid out FLAT_PLAIN (no inline tail) read back at their exact
/// size: the last block's padding is not file data.
#[test]
fn flat_plain_file_reads_exact_size() {
    if std::process::Command::new("mkfs.erofs")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipped: mkfs.erofs not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), pattern(10_000, 3)).unwrap();
    let out = tmp.path().join("plain.img");
    let st = std::process::Command::new("mkfs.erofs")
        .args(["-E", "noinline_data"])
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let img = open(std::fs::read(&out).unwrap()).unwrap();
    let f = lookup(&img, "f");
    assert_eq!(f.datalayout, erofs::ondisk::EROFS_INODE_FLAT_PLAIN);
    let data = read_all(&img, &f, &NoBlobs).unwrap();
    assert_eq!(data.len(), 10_000);
    assert!(data == pattern(10_000, 3));
}

// ---------------------------------------------------------------------------
// Tar layers.

struct TarEntry<'a> {
    name: &'a [u8],
    kind: tar::EntryType,
    link: &'a [u8],
    data: &'a [u8],
}

fn entry<'a>(name: &'a [u8], kind: tar::EntryType) -> TarEntry<'a> {
    TarEntry {
        name,
        kind,
        link: b"",
        data: b"",
    }
}

/// A GNU tar with raw names: no sanitizing, as a hostile producer would.
fn header(e: &TarEntry<'_>, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let g = h.as_gnu_mut().unwrap();
    g.name[..e.name.len()].copy_from_slice(e.name);
    g.linkname[..e.link.len()].copy_from_slice(e.link);
    h.set_entry_type(e.kind);
    h.set_mode(if e.kind.is_dir() { 0o755 } else { 0o644 });
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    h
}

fn tar_bytes(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        b.append(&header(e, e.data.len() as u64), e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Build an image from one tar layer with these bytes.
fn build_tar(
    bytes: &[u8],
) -> (
    tempfile::TempDir,
    PathBuf,
    Result<erofs::BuildReport, BuildError>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("evil.tar");
    std::fs::write(&layer, bytes).unwrap();
    let r = erofs::build(
        std::slice::from_ref(&layer),
        &tmp.path().join("blobs"),
        &tmp.path().join("out.erofs"),
        &BuildOptions {
            chunk_size: 4096,
            ..Default::default()
        },
    );
    (tmp, layer, r)
}

#[track_caller]
fn expect_unsafe(bytes: &[u8], entry: &str, why: &str) {
    match build_tar(bytes) {
        (
            _t,
            l,
            Err(BuildError::UnsafePath {
                layer,
                entry: e,
                why: w,
            }),
        ) => {
            assert_eq!(layer, l.display().to_string());
            assert_eq!(e, entry);
            assert!(w.contains(why), "{w}");
        }
        (_, _, r) => panic!("{entry}: expected UnsafePath, got {r:?}"),
    }
}

#[track_caller]
fn expect_bad(bytes: &[u8], entry: &str, why: &str) {
    match build_tar(bytes) {
        (
            _t,
            l,
            Err(BuildError::BadEntry {
                layer,
                entry: e,
                why: w,
            }),
        ) => {
            assert_eq!(layer, l.display().to_string());
            assert_eq!(e, entry);
            assert!(w.contains(why), "{w}");
        }
        (_, _, r) => panic!("{entry}: expected BadEntry, got {r:?}"),
    }
}

#[track_caller]
fn expect_io(bytes: &[u8]) -> String {
    match build_tar(bytes) {
        (_t, l, Err(BuildError::Io { path, source })) => {
            assert_eq!(path, l);
            source.to_string()
        }
        (_, _, r) => panic!("expected Io, got {r:?}"),
    }
}

use tar::EntryType as T;

#[test]
fn tar_paths_escaping_the_tree() {
    let file = |name| TarEntry {
        data: b"x",
        ..entry(name, T::Regular)
    };
    expect_unsafe(
        &tar_bytes(&[file(b"../etc/passwd")]),
        "../etc/passwd",
        "'..'",
    );
    expect_unsafe(&tar_bytes(&[file(b"a/../../b")]), "a/../../b", "'..'");
    expect_unsafe(
        &tar_bytes(&[file(b"/abs/path")]),
        "/abs/path",
        "absolute path",
    );
    expect_unsafe(
        &tar_bytes(&[entry(b"/etc", T::Directory)]),
        "/etc",
        "absolute path",
    );
    // Hard links whose target escapes.
    for target in [&b"../../x"[..], b"/etc/shadow", b"ok/../../../x"] {
        let l = TarEntry {
            link: target,
            ..entry(b"hl", T::Link)
        };
        expect_unsafe(&tar_bytes(&[file(b"f"), l]), "hl", "hard link target");
    }
}

#[test]
fn tar_bad_links_and_parents() {
    let file = |name| TarEntry {
        data: b"data",
        ..entry(name, T::Regular)
    };
    let link = |name, target| TarEntry {
        link: target,
        ..entry(name, T::Link)
    };
    let sym = |name, target| TarEntry {
        link: target,
        ..entry(name, T::Symlink)
    };
    expect_bad(
        &tar_bytes(&[link(b"hl", b"missing")]),
        "hl",
        "hard link target \"missing\" does not exist",
    );
    expect_bad(
        &tar_bytes(&[entry(b"d/", T::Directory), link(b"hl", b"d")]),
        "hl",
        "is a directory",
    );
    expect_bad(
        &tar_bytes(&[file(b"f"), file(b"f/g")]),
        "f/g",
        "parent \"f\" is not a directory",
    );
    // A symlink is never followed: nothing lands outside the tree.
    expect_bad(
        &tar_bytes(&[sym(b"l", b"/etc"), file(b"l/passwd")]),
        "l/passwd",
        "parent \"l\" is not a directory",
    );
    expect_bad(
        &tar_bytes(&[sym(b"l", b"../../.."), link(b"x", b"l/etc/passwd")]),
        "x",
        "does not exist",
    );
    // The root replaced by a file or symlink.
    expect_bad(
        &tar_bytes(&[file(b"./")]),
        "./",
        "root can only be a directory",
    );
    expect_bad(
        &tar_bytes(&[sym(b".", b"/")]),
        ".",
        "root can only be a directory",
    );
    expect_bad(&tar_bytes(&[sym(b"s", b"")]), "s", "symlink without target");
    expect_bad(
        &tar_bytes(&[file(b"x"), entry(b".wh.", T::Regular)]),
        ".wh.",
        "invalid name",
    );
}

#[test]
fn tar_truncated_and_garbage() {
    // The header says 1 MiB, the data ends after 1000 bytes.
    let mut t = header(&entry(b"big", T::Regular), 1 << 20)
        .as_bytes()
        .to_vec();
    t.extend_from_slice(&pattern(1000, 1));
    expect_bad(&t, "big", "reading data");
    // A huge declared size with no data behind it: refused before reading.
    let mut t = header(&entry(b"huge", T::Regular), 1 << 62)
        .as_bytes()
        .to_vec();
    t.extend_from_slice(&[0; 1024]);
    expect_bad(&t, "huge", "needs more than 4194304 chunks");
    // A large one, within the limit, whose data is missing.
    let mut t = header(&entry(b"large", T::Regular), 1 << 30)
        .as_bytes()
        .to_vec();
    t.extend_from_slice(&[0; 1024]);
    expect_bad(&t, "large", "reading data");
    // A header cut in half.
    let t = tar_bytes(&[entry(b"d/", T::Directory)]);
    let _ = expect_io(&t[..300]);
    // A corrupt header checksum.
    let mut t = tar_bytes(&[entry(b"d/", T::Directory)]);
    t[0] ^= 1;
    let m = expect_io(&t);
    assert!(m.contains("checksum"), "{m}");
    // Compressed garbage and truncated compressed streams.
    let _ = expect_io(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xde, 0xad, 0xbe, 0xef]);
    let _ = expect_io(&[0x28, 0xb5, 0x2f, 0xfd, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    let good = one_file_tar();
    let gz = gzip(&good);
    match build_tar(&gz[..gz.len() / 2]) {
        (_t, l, Err(BuildError::BadEntry { layer, entry, .. })) => {
            assert_eq!((layer, entry.as_str()), (l.display().to_string(), "f"));
        }
        (_t, l, Err(BuildError::Io { path, .. })) => assert_eq!(path, l),
        (_, _, r) => panic!("{r:?}"),
    }
    let zst = zstd::encode_all(&good[..], 3).unwrap();
    match build_tar(&zst[..zst.len() / 2]) {
        (_, _, Err(BuildError::BadEntry { .. } | BuildError::Io { .. })) => {}
        (_, _, r) => panic!("{r:?}"),
    }
    // And the whole streams do build.
    assert!(build_tar(&gz).2.is_ok());
    assert!(build_tar(&zst).2.is_ok());
}

fn one_file_tar() -> Vec<u8> {
    tar_bytes(&[TarEntry {
        data: &pattern(50_000, 2),
        ..entry(b"f", T::Regular)
    }])
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A layer stream is read to its very end and checked there: a tar that
/// ends early inside a valid-looking stream is not enough.
#[test]
fn tar_stream_trailers_and_digests() {
    let good = one_file_tar();
    let gz = gzip(&good);
    let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(&good).unwrap();
    let zst = enc.finish().unwrap();
    let n = gz.len();
    let mut bad_crc = gz.clone();
    bad_crc[n - 8] ^= 1;
    let mut bad_size = gz.clone();
    bad_size[n - 1] ^= 0x10;
    let mut bad_sum = zst.clone();
    let z = zst.len();
    bad_sum[z - 1] ^= 1;
    let cases: [(&str, Vec<u8>); 6] = [
        ("gzip CRC flipped", bad_crc),
        ("gzip size flipped", bad_size),
        ("gzip cut before its trailer", gz[..n - 4].to_vec()),
        (
            "gzip with trailing garbage",
            [&gz[..], b"garbage!"].concat(),
        ),
        ("zstd checksum flipped", bad_sum),
        (
            "zstd with trailing garbage",
            [&zst[..], b"garbage!"].concat(),
        ),
    ];
    for (what, bytes) in cases {
        let (_t, l, r) = build_tar(&bytes);
        match r {
            Err(BuildError::Io { path, .. }) => assert_eq!(path, l, "{what}"),
            r => panic!("{what}: expected an I/O error naming the layer, got {r:?}"),
        }
    }
    let (_t, _, r) = build_tar(&zst[..z - 4]);
    assert!(r.is_err(), "zstd cut before its checksum: {r:?}");
    // A known digest is checked against the stored (compressed) bytes.
    let digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&gz))
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut store = erofs::blob::ChunkStore::new(&tmp.path().join("b"), 4096).unwrap();
    let mut tree = erofs::tree::Tree::new();
    erofs::ingest::apply_tar_stream(&mut tree, &mut store, "l", &gz[..], Some(&digest)).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    match erofs::ingest::apply_tar_stream(&mut tree, &mut store, "l", &gz[..], Some(&wrong)) {
        Err(BuildError::Digest {
            layer,
            expected,
            actual,
        }) => {
            assert_eq!((layer.as_str(), expected), ("l", wrong));
            assert_eq!(actual, digest);
        }
        r => panic!("{r:?}"),
    }
}

/// A sparse entry claiming an enormous size without a stored byte is
/// refused at once, not indexed chunk by chunk.
#[test]
fn tar_sparse_claiming_exabytes() {
    let records = b"22 GNU.sparse.major=1\n22 GNU.sparse.minor=0\n43 GNU.sparse.realsize=1152921504606846976\n";
    let mut map = b"0\n".to_vec();
    map.resize(512, 0);
    let bytes = tar_bytes(&[
        TarEntry {
            data: records,
            ..entry(b"PaxHeaders/huge", T::XHeader)
        },
        TarEntry {
            data: &map,
            ..entry(b"huge", T::Regular)
        },
    ]);
    expect_bad(
        &bytes,
        "huge",
        "needs more than 4194304 chunks of 4096 bytes",
    );
}

/// GNU tar's textual ACLs are ignored, as containerd ignores them; ACLs
/// carried as xattrs are kept, newline bytes and all.
#[test]
fn tar_acl_records() {
    let rec = |k: &str, v: &[u8]| {
        let body = [k.as_bytes(), b"=", v, b"\n"].concat();
        let mut n = body.len() + 2;
        while format!("{n} ").len() + body.len() != n {
            n += 1;
        }
        [format!("{n} ").as_bytes(), &body].concat()
    };
    let acl_xattr = [&2u32.to_le_bytes()[..], &[2, 0, 4, 0, 10, 0, 0, 0]].concat();
    let records = [
        rec(
            "SCHILY.acl.access",
            b"user::rw-\nuser:10:r--\ngroup::r--\nmask::r--\nother::r--\n",
        ),
        rec("SCHILY.xattr.system.posix_acl_default", &acl_xattr),
    ]
    .concat();
    let bytes = tar_bytes(&[
        TarEntry {
            data: &records,
            ..entry(b"PaxHeaders/f", T::XHeader)
        },
        TarEntry {
            data: b"x",
            ..entry(b"f", T::Regular)
        },
    ]);
    let (tmp, _, r) = build_tar(&bytes);
    r.unwrap();
    let img = open(std::fs::read(tmp.path().join("out.erofs")).unwrap()).unwrap();
    let xattrs = img.xattrs(&lookup(&img, "f")).unwrap();
    assert_eq!(
        xattrs,
        vec![(b"system.posix_acl_default".to_vec(), acl_xattr)]
    );
}

/// A small layer cannot expand without bound: the build stops at its
/// size limit, naming it.
#[test]
fn tar_max_size() {
    let big = tar_bytes(&[TarEntry {
        data: &pattern(1 << 20, 9),
        ..entry(b"f", T::Regular)
    }]);
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("l.tar");
    std::fs::write(&layer, big).unwrap();
    let opts = |max| BuildOptions {
        chunk_size: 4096,
        max_size: Some(max),
        ..Default::default()
    };
    let (blobs, out) = (tmp.path().join("blobs"), tmp.path().join("out"));
    match erofs::build(std::slice::from_ref(&layer), &blobs, &out, &opts(1 << 19)) {
        Err(BuildError::Limit(m)) => assert!(m.contains("524288 bytes"), "{m}"),
        r => panic!("{r:?}"),
    }
    erofs::build(&[layer], &blobs, &out, &opts(1 << 20)).unwrap();
}

#[test]
fn tar_bad_pax_and_devices() {
    fn pax(records: &[u8]) -> TarEntry<'_> {
        TarEntry {
            data: records,
            ..entry(b"PaxHeaders/f", T::XHeader)
        }
    }
    let file = TarEntry {
        data: b"x",
        ..entry(b"f", T::Regular)
    };
    let f2 = || TarEntry {
        data: b"x",
        ..entry(b"f", T::Regular)
    };
    expect_bad(
        &tar_bytes(&[pax(b"14 mtime=abcd\n"), file]),
        "f",
        "bad PAX mtime",
    );
    expect_bad(
        &tar_bytes(&[pax(b"11 uid=-12\n"), f2()]),
        "f",
        "bad PAX uid/gid",
    );
    // Malformed PAX records (length pointing past the data).
    expect_bad(&tar_bytes(&[pax(b"99 mtime=1\n"), f2()]), "f", "");
    let mut dev = header(&entry(b"dev", T::Char), 0);
    dev.set_device_major(0x1000).unwrap();
    dev.set_device_minor(0).unwrap();
    dev.set_cksum();
    let mut t = dev.as_bytes().to_vec();
    t.extend_from_slice(&[0; 1024]);
    expect_bad(&t, "dev", "device number 4096:0 too large");
    // Ids beyond 32 bits are refused, not truncated (2^32 would be root).
    let mut big = header(&entry(b"u", T::Regular), 0);
    big.set_uid(1 << 32);
    big.set_cksum();
    let mut t = big.as_bytes().to_vec();
    t.extend_from_slice(&[0; 1024]);
    expect_bad(&t, "u", "uid 4294967296 does not fit 32 bits");
    // Xattrs EROFS cannot store are refused at the entry, not at write time.
    expect_bad(
        &tar_bytes(&[pax(b"29 SCHILY.xattr.bogus.name=v\n"), f2()]),
        "f",
        "xattr \"bogus.name\" (1 bytes) cannot be stored",
    );
    let sym = TarEntry {
        link: b"x",
        ..entry(b"s", T::Symlink)
    };
    expect_bad(
        &tar_bytes(&[pax(b"16 linkpath=a\0b\n"), sym]),
        "s",
        "linkpath contains NUL",
    );
}

#[test]
fn tar_deep_and_wide_trees() {
    // 1500 nested directories (a 3 KB path, as a GNU long name) and a
    // directory of 3000 entries: built, then walked without recursion.
    let mut b = tar::Builder::new(Vec::new());
    let deep = "d/".repeat(1500) + "leaf";
    let mut h = header(&entry(b"", T::Regular), 4);
    b.append_data(&mut h, &deep, &b"deep"[..]).unwrap();
    for i in 0..3000 {
        let mut h = header(&entry(b"", T::Regular), 0);
        b.append_data(&mut h, format!("wide/{i}"), &b""[..])
            .unwrap();
    }
    let (tmp, _, r) = build_tar(&b.into_inner().unwrap());
    r.unwrap();
    let img = open(std::fs::read(tmp.path().join("out.erofs")).unwrap()).unwrap();
    assert_eq!(walk_all(&img, &NoBlobs).err().map(|e| e.to_string()), {
        // The one file with data has no blob source here.
        Some(format!(
            "I/O error reading data blob at byte 0: blob {}: no blob source for device 1",
            img.device_tag(1).unwrap()
        ))
    });
    let blobs = BlobFiles(vec![File::open(
        tmp.path().join("blobs").join(img.device_tag(1).unwrap()),
    )
    .unwrap()]);
    assert_eq!(walk_all(&img, &blobs).unwrap(), 1 + 1500 + 1 + 1 + 3000);
    let leaf = img.lookup(&deep).unwrap();
    assert_eq!(read_all(&img, &leaf, &blobs).unwrap(), b"deep");
}

// ---------------------------------------------------------------------------
// Seeds for the fuzz targets (see scripts/fuzz.sh): valid images and tars.

#[test]
#[ignore = "writes fuzz seeds; run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let root = std::env::var_os("SHOAL_FUZZ_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus"));
    let (images, tars) = (root.join("image_reader"), root.join("tar_layer"));
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&tars).unwrap();
    write_frame_table_seed(&root.join("frame_table"));
    // image_reader input: u32 LE image length, the image, then the bytes
    // every device reads from.
    for (name, f) in [("one-blob", fixture()), ("two-blobs", two_blob_fixture())] {
        let img = f.img();
        let mut blob = Vec::new();
        for d in 1..=img.devices.len() as u16 {
            blob.extend(std::fs::read(f.blob_dir.join(img.device_tag(d).unwrap())).unwrap());
        }
        let mut seed = (f.image.len() as u32).to_le_bytes().to_vec();
        seed.extend_from_slice(&f.image);
        if name == "one-blob" {
            seed.extend_from_slice(&blob);
        }
        std::fs::write(images.join(name), seed).unwrap();
        let _ = &f.tmp;
    }
    let file = |name, data| TarEntry {
        data,
        ..entry(name, T::Regular)
    };
    let plain = tar_bytes(&[
        entry(b"./", T::Directory),
        entry(b"d/", T::Directory),
        file(b"d/f", b"hello"),
        file(b"big", &pattern(9000, 5)),
        TarEntry {
            link: b"d/f",
            ..entry(b"d/hard", T::Link)
        },
        TarEntry {
            link: b"../x",
            ..entry(b"sym", T::Symlink)
        },
        TarEntry {
            data: b"29 SCHILY.xattr.user.k=value\n22 mtime=1700000000.5\n",
            ..entry(b"PaxHeaders/e", T::XHeader)
        },
        file(b"e", b""),
        file(b"d/.wh.f", b""),
        file(b"d/.wh..wh..opq", b""),
        entry(b"fifo", T::Fifo),
    ]);
    std::fs::write(tars.join("plain.tar"), &plain).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    std::fs::write(tars.join("plain.tar.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        tars.join("plain.tar.zst"),
        zstd::encode_all(&plain[..], 1).unwrap(),
    )
    .unwrap();
}

/// frame_table input: u32 LE blob blocks, u16 LE section length, a real
/// frame section, then the object's first frame.
fn write_frame_table_seed(dir: &Path) {
    use erofs::chunktable::Trailer;
    std::fs::create_dir_all(dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..40u32 {
        std::fs::write(src.join(format!("f{i}")), format!("{i}\n").repeat(900)).unwrap();
    }
    let (blobs, out) = (tmp.path().join("blobs"), tmp.path().join("img"));
    let opts = BuildOptions {
        compress: erofs::Compression::ZSTD,
        ..Default::default()
    };
    erofs::build(&[src], &blobs, &out, &opts).unwrap();
    let boot = std::fs::read(&out).unwrap();
    let img = Image::open(boot.as_slice()).unwrap();
    let t = Trailer::read_from_bytes(&boot[boot.len() - 64..]).unwrap();
    let table = &boot[t.table_offset.get() as usize..][..t.table_len.get() as usize];
    let at = table.windows(8).position(|w| w == b"SHOALFT1").unwrap();
    let section = &table[at..];
    let f = img.chunk_table.as_ref().unwrap().frames(1).unwrap();
    let object = std::fs::read(blobs.join(f.object_name())).unwrap();
    let mut seed = img.devices[0].blocks.get().to_le_bytes().to_vec();
    seed.extend_from_slice(&(section.len() as u16).to_le_bytes());
    seed.extend_from_slice(section);
    seed.extend_from_slice(&object[..f.frames[0].clen.get() as usize]);
    std::fs::write(dir.join("built"), seed).unwrap();
}

/// The extents of every file tile it exactly (each starts where the last
/// ended, the last ends at the size), each is what `map` says at its
/// start, and `map` is `map_blocks` then `map_dev`; the walk reaches every
/// name once and a hard-linked file first once.
#[test]
fn extents_tile_files_and_walk_reports_links() {
    let f = fixture();
    let img = f.img();
    let root = img.inode(img.root_nid()).unwrap();
    let (mut names, mut first_b) = (Vec::new(), 0);
    img.walk(root, b"", |e| {
        names.push(String::from_utf8_lossy(&e.path).into_owned());
        if e.inode.nid == img.lookup("sub/b.txt").unwrap().nid && e.first {
            first_b += 1;
        }
        if e.inode.is_dir() {
            assert!(e.first, "{:?}: directory reached twice", e.path);
        }
        let mut pos = 0;
        for m in img.extents(&e.inode) {
            let m = m.unwrap();
            assert_eq!(m.la, pos);
            assert!(m.llen > 0);
            assert_eq!(img.map(&e.inode, m.la).unwrap(), m);
            let b = img.map_blocks(&e.inode, m.la).unwrap();
            assert_eq!((b.la, b.llen), (m.la, m.llen));
            assert_eq!(img.map_dev(e.inode.nid, &b).unwrap(), m.extent);
            pos = m.end();
        }
        assert_eq!(pos, e.inode.size);
        Ok(())
    })
    .unwrap();
    assert_eq!(first_b, 1);
    for want in ["", "a.txt", "hard", "sub/b.txt", "sub/deeper/c.bin", "many"] {
        assert!(names.iter().any(|n| n == want), "{want} not walked");
    }
    // In order: a directory before its entries, entries sorted.
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(pos("sub") < pos("sub/b.txt") && pos("a.txt") < pos("hard"));
    // An extents_in range starts inside an extent: the first one is whole.
    let a = img.lookup("a.txt").unwrap();
    let cover: Vec<_> = img.extents_in(&a, 5000..9000).map(|m| m.unwrap()).collect();
    assert_eq!(cover.len(), 2);
    assert_eq!((cover[0].la, cover[1].end()), (4096, 10_000));
}
