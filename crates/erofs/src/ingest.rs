//! Sources of a build: tar layers (plain, gzip or zstd, streamed) and
//! directories, applied to a [`Tree`] with their file data stored as chunks.

use crate::blob::ChunkStore;
use crate::error::BuildError;
use crate::ondisk::encode_rdev;
use crate::tree::*;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where a file's bytes come from while its chunks are stored (a tar
/// entry, a file on disk), with what it knows of its holes.
trait FileSource {
    /// Whether the next `len` bytes are all hole.
    fn is_hole(&mut self, len: u64) -> bool;
    fn skip_hole(&mut self, len: u64) -> std::io::Result<()>;
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), String>;
}

/// Read a file's data in chunks into the store; chunks that are wholly
/// hole in a sparse source are stored as holes without reading.
fn store_data(
    store: &mut ChunkStore,
    src: &mut dyn FileSource,
    size: u64,
    buf: &mut Vec<u8>,
) -> Result<Data, StoreError> {
    let cs = store.chunk_size();
    // A sparse entry can claim any size without storing a byte; every
    // chunk still costs an index entry and a step here.
    if size.div_ceil(cs) > MAX_FILE_CHUNKS {
        return Err(StoreError::Limit(format!(
            "a file of {size} bytes needs more than {MAX_FILE_CHUNKS} chunks of {cs} bytes"
        )));
    }
    // `size` may come from a hostile tar header: reserve only what a few
    // chunks need and grow as data really arrives.
    let mut chunks = Vec::with_capacity(size.div_ceil(cs).min(1024) as usize);
    // The content digest rides along the chunk pass (no second read).
    let mut fingerprint = (size > 0).then(Sha256::new);
    let mut hole_bytes = 0u64;
    let mut pos = 0;
    while pos < size {
        let len = cs.min(size - pos);
        if src.is_hole(len) {
            src.skip_hole(len)
                .map_err(|e| StoreError::Read(e.to_string()))?;
            store.note_hole(len).map_err(StoreError::Build)?;
            chunks.push(None);
            hole_bytes += len;
            if hole_bytes > MAX_HASHED_HOLE {
                fingerprint = None;
            }
            if let Some(h) = fingerprint.as_mut() {
                hash_zeros(h, len);
            }
        } else {
            buf.resize(len as usize, 0);
            src.read_exact(buf).map_err(StoreError::Read)?;
            if let Some(h) = fingerprint.as_mut() {
                h.update(&buf[..]);
            }
            // A one-chunk file (most are): its chunk digest continues the
            // content digest over the padding, one pass over the bytes.
            let stored = match &fingerprint {
                Some(h) if len == size => store.add_absorbed_chunk(buf, h.clone()),
                _ => store.add_chunk(buf),
            };
            chunks.push(stored.map_err(StoreError::Build)?);
        }
        pos += len;
    }
    Ok(Data::File {
        size,
        chunks,
        fingerprint: fingerprint.map(|h| h.finalize().into()),
    })
}

/// A sparse entry may claim terabytes of hole: hashing them would cost
/// minutes, so a file with more hole than this gets no fingerprint (the
/// kernel then simply does not share its page cache).
const MAX_HASHED_HOLE: u64 = 256 << 20;

fn hash_zeros(h: &mut Sha256, mut len: u64) {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..n]);
        len -= n as u64;
    }
}

/// At most this many chunks in one file: 16 GiB with 4 KiB chunks, 4 TiB
/// with the default 1 MiB.
const MAX_FILE_CHUNKS: u64 = 1 << 22;

enum StoreError {
    /// The file is too large to index.
    Limit(String),
    /// The source failed or ended early: the caller names the entry.
    Read(String),
    /// The store refused (an image limit) or could not write.
    Build(BuildError),
}

impl StoreError {
    fn at(self, bad: impl FnOnce(String) -> BuildError) -> BuildError {
        match self {
            StoreError::Read(why) => bad(format!("reading data: {why}")),
            StoreError::Limit(why) => bad(why),
            StoreError::Build(e) => e,
        }
    }
}

/// A tar header uid/gid, which must fit the image's 32 bits.
fn id32(v: i64, what: &str) -> Result<u32, String> {
    u32::try_from(v).map_err(|_| format!("{what} {v} does not fit 32 bits"))
}

/// Hashes the bytes of a layer as they are read, when its digest is to
/// be checked (hashing costs as much as a sixth of a build otherwise).
struct Digesting<R> {
    inner: R,
    hash: Option<std::rc::Rc<std::cell::RefCell<Sha256>>>,
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &self.hash {
            h.borrow_mut().update(&buf[..n]);
        }
        Ok(n)
    }
}

/// The decompressed stream of a layer, compression detected from its
/// magic bytes. Both decoders check their trailers (gzip CRC and size,
/// zstd frame checksum) when read to the end, and refuse bytes after the
/// last member or frame that are not another one.
fn decoder<'a>(raw: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(1 << 20, raw);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r)?)
    } else {
        Box::new(r)
    })
}

/// Apply one tar layer file (plain, gzip or zstd) as the next layer.
pub fn apply_tar(tree: &mut Tree, store: &mut ChunkStore, path: &Path) -> Result<(), BuildError> {
    let f = File::open(path).map_err(|source| BuildError::Io {
        path: path.into(),
        source,
    })?;
    apply_tar_stream(tree, store, &path.display().to_string(), f, None)
}

/// Apply a tar layer read from `raw` (plain, gzip or zstd) as the next
/// layer. The stream is read to its very end and checked there; when the
/// layer's digest (`sha256:<hex>` of the bytes as stored, compressed or
/// not) is known, a layer that does not match it fails the build.
pub fn apply_tar_stream(
    tree: &mut Tree,
    store: &mut ChunkStore,
    name: &str,
    raw: impl Read,
    digest: Option<&str>,
) -> Result<(), BuildError> {
    let io_err = |source| BuildError::Io {
        path: name.into(),
        source,
    };
    let hash = digest.map(|_| std::rc::Rc::new(std::cell::RefCell::new(Sha256::new())));
    let raw = Digesting {
        inner: raw,
        hash: hash.clone(),
    };
    let mut ar = crate::tar::Archive::new(decoder(raw).map_err(io_err)?);
    tree.begin_layer();
    let mut ignored = Ignored::default();
    let mut buf = Vec::new();
    while let Some(mut e) = ar.next_entry().map_err(|e| tar_error(name, e))? {
        apply_entry(tree, store, &mut ar, &mut e, name, &mut buf)?;
        ignored.note(&e);
    }
    ar.finish().map_err(|e| tar_error(name, e))?;
    tree.end_layer();
    ignored.report(name);
    if let (Some(want), Some(hash)) = (digest, hash) {
        let got = format!("sha256:{}", hex::encode(hash.borrow().clone().finalize()));
        if got != want {
            return Err(BuildError::Digest {
                layer: name.into(),
                expected: want.into(),
                actual: got,
            });
        }
    }
    Ok(())
}

fn tar_error(layer: &str, e: crate::tar::TarError) -> BuildError {
    use crate::tar::TarError;
    match e {
        TarError::Entry { entry, why } => BuildError::BadEntry {
            layer: layer.into(),
            entry: String::from_utf8_lossy(&entry).into_owned(),
            why,
        },
        TarError::Header { .. } => BuildError::Io {
            path: layer.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        },
        TarError::Io { source, offset } => BuildError::Io {
            path: layer.into(),
            source: std::io::Error::new(source.kind(), format!("at tar byte {offset}: {source}")),
        },
    }
}

/// PAX records containerd ignores, and so does shoal: `SCHILY.acl.*`
/// (GNU tar `--acls`; image builders carry ACLs as the
/// `SCHILY.xattr.system.posix_acl_*` xattrs, which are applied, and a
/// textual ACL's user names would need the image's passwd) and
/// `LIBARCHIVE.xattr.*`. Applying them would make shoal's tree differ
/// from the one containerd unpacks; they are reported once per layer.
#[derive(Default)]
struct Ignored {
    count: usize,
    first: Option<(String, String)>,
}

impl Ignored {
    fn note(&mut self, e: &crate::tar::Entry) {
        if let Some(k) = e.ignored.first() {
            self.count += 1;
            self.first
                .get_or_insert_with(|| (String::from_utf8_lossy(&e.path).into_owned(), k.clone()));
        }
    }

    fn report(&self, layer: &str) {
        if let Some((entry, key)) = &self.first {
            tracing::warn!(
                layer,
                entries = self.count,
                first = %entry,
                key = %key,
                "PAX records ignored, as containerd ignores them (ACLs travel as SCHILY.xattr.system.posix_acl_*)"
            );
        }
    }
}

/// A tar entry as the tree's metadata.
fn entry_meta(e: &crate::tar::Entry) -> Result<Meta, String> {
    for (name, value) in &e.xattrs {
        match crate::ondisk::xattr_split_name(name) {
            Some((_, suffix)) if suffix.len() <= 255 && value.len() <= 0xffff => {}
            _ => {
                return Err(format!(
                    "xattr {:?} ({} bytes) cannot be stored in EROFS",
                    String::from_utf8_lossy(name),
                    value.len()
                ))
            }
        }
    }
    Ok(Meta {
        mode: e.mode,
        uid: id32(e.uid, "uid")?,
        gid: id32(e.gid, "gid")?,
        mtime: e.mtime,
        mtime_nsec: e.mtime_nsec,
        xattrs: e.xattrs.clone(),
    })
}

fn describe_type(t: u8) -> String {
    let what = match t {
        b'7' => " (contiguous file)",
        b'V' => " (GNU volume header)",
        b'M' => " (GNU multi-volume continuation)",
        b'N' => " (old GNU long name)",
        b'D' => " (GNU dump directory)",
        _ => "",
    };
    if t.is_ascii_graphic() {
        format!("'{}'{what}", t as char)
    } else {
        format!("{t:#04x}")
    }
}

impl<R: Read> FileSource for crate::tar::FileData<'_, R> {
    fn is_hole(&mut self, len: u64) -> bool {
        crate::tar::FileData::is_hole(self, len)
    }
    fn skip_hole(&mut self, len: u64) -> std::io::Result<()> {
        crate::tar::FileData::skip_hole(self, len);
        Ok(())
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        crate::tar::FileData::read_exact(self, buf).map_err(|e| match e {
            crate::tar::TarError::Entry { why, .. } => why,
            e => e.to_string(),
        })
    }
}

fn apply_entry<R: Read>(
    tree: &mut Tree,
    store: &mut ChunkStore,
    ar: &mut crate::tar::Archive<R>,
    e: &mut crate::tar::Entry,
    layer: &str,
    buf: &mut Vec<u8>,
) -> Result<(), BuildError> {
    use crate::tar::Kind;
    let ename = String::from_utf8_lossy(&e.path).into_owned();
    let bad = |why: String| BuildError::BadEntry {
        layer: layer.into(),
        entry: ename.clone(),
        why,
    };
    let unsafe_path = |why: String| BuildError::UnsafePath {
        layer: layer.into(),
        entry: ename.clone(),
        why,
    };
    let path = e.path.clone();
    let comps = split_path(&path).map_err(unsafe_path)?;
    let mut meta = entry_meta(e).map_err(bad)?;
    let data = match e.kind {
        Kind::Regular => {
            meta.mode |= S_IFREG;
            let size = e.size;
            store.begin_file(&comps);
            store_data(store, &mut ar.file(e), size, buf).map_err(|err| err.at(bad))?
        }
        Kind::Directory => {
            meta.mode |= S_IFDIR;
            Data::Dir(BTreeMap::new())
        }
        Kind::Symlink => {
            // Symlinks have no mode of their own on Linux: whatever the
            // header says, containerd's unpacked symlink is 0777.
            meta.mode = S_IFLNK | 0o777;
            symlink_data(&e.link).map_err(bad)?
        }
        Kind::HardLink => {
            if e.link.is_empty() {
                return Err(bad("hard link without target".into()));
            }
            let tcomps = split_path(&e.link)
                .map_err(|why| unsafe_path(format!("hard link target: {why}")))?;
            return tree
                .link(&comps, &tcomps)
                .map_err(|err| bad(err.to_string()));
        }
        Kind::Char | Kind::Block => {
            meta.mode |= if e.kind == Kind::Char {
                S_IFCHR
            } else {
                S_IFBLK
            };
            device_data(e.devmajor, e.devminor).map_err(bad)?
        }
        Kind::Fifo => {
            meta.mode |= S_IFIFO;
            Data::Special
        }
        Kind::Unsupported(t) => {
            return Err(bad(format!(
                "unsupported entry type {}, which containerd does not unpack",
                describe_type(t)
            )))
        }
    };
    tree.apply(&comps, Node { meta, data })
        .map_err(|err| bad(err.to_string()))
}

/// A tar symlink's target, refused where Linux could not create it:
/// empty, with a NUL, or `PATH_MAX` (4096) bytes or more.
fn symlink_data(target: &[u8]) -> Result<Data, String> {
    if target.is_empty() {
        return Err("symlink without target".into());
    }
    if target.contains(&0) {
        return Err("symlink target contains NUL".into());
    }
    if target.len() > 4095 {
        return Err(format!("symlink target of {} bytes", target.len()));
    }
    Ok(Data::Symlink(target.to_vec()))
}

/// A tar device node's number, refused when it does not fit the 12-bit
/// major and 20-bit minor of a Linux `dev_t` (`new_encode_dev`).
fn device_data(major: i64, minor: i64) -> Result<Data, String> {
    if !(0..=0xfff).contains(&major) || !(0..=0xfffff).contains(&minor) {
        return Err(format!("device number {major}:{minor} too large"));
    }
    Ok(Data::Device(encode_rdev(major as u32, minor as u32)))
}

/// A file on disk: holes found with SEEK_DATA when the file is sparse.
struct DiskFile {
    f: File,
    pos: u64,
    sparse: bool,
}

impl FileSource for DiskFile {
    fn is_hole(&mut self, len: u64) -> bool {
        use rustix::fs::{seek, SeekFrom};
        if !self.sparse {
            return false;
        }
        // SEEK_DATA moves the offset: put it back.
        let hole = match seek(&self.f, SeekFrom::Data(self.pos)) {
            Ok(d) => d >= self.pos + len,
            Err(e) => e == rustix::io::Errno::NXIO,
        };
        let _ = seek(&self.f, SeekFrom::Start(self.pos));
        hole
    }
    fn skip_hole(&mut self, len: u64) -> std::io::Result<()> {
        use std::io::Seek;
        self.pos += len;
        self.f.seek(std::io::SeekFrom::Start(self.pos)).map(|_| ())
    }
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.f.read_exact(buf).map_err(|e| e.to_string())?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Apply a directory as a layer: a sorted walk, hard links by (dev, ino),
/// sparse files read around their holes.
pub fn apply_dir(tree: &mut Tree, store: &mut ChunkStore, root: &Path) -> Result<(), BuildError> {
    tree.begin_layer();
    let mut layer = DirLayer {
        tree,
        store,
        name: root.display().to_string(),
        links: HashMap::new(),
        stack: vec![(root.to_path_buf(), Vec::new())],
        buf: Vec::new(),
    };
    while let Some((path, rel)) = layer.stack.pop() {
        layer.apply(&path, &rel)?;
    }
    layer.tree.end_layer();
    Ok(())
}

/// A directory being applied as a layer ([`apply_dir`]).
struct DirLayer<'a> {
    tree: &'a mut Tree,
    store: &'a mut ChunkStore,
    /// The layer in errors: its root's path.
    name: String,
    /// The paths of each multiply-linked non-directory by (dev, ino): the
    /// first one met is the one later names link to.
    links: HashMap<(u64, u64), Vec<Vec<u8>>>,
    /// Entries still to apply (path on disk, path in the layer), next last.
    stack: Vec<(PathBuf, Vec<u8>)>,
    /// Chunk buffer, reused across files.
    buf: Vec<u8>,
}

impl DirLayer<'_> {
    /// Apply one entry: a further name of a hard-linked file becomes a
    /// link to the first; a directory queues its entries.
    fn apply(&mut self, path: &Path, rel: &[u8]) -> Result<(), BuildError> {
        let io_err = |source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        };
        let md = std::fs::symlink_metadata(path).map_err(io_err)?;
        let comps = split_path(rel).map_err(|why| BuildError::UnsafePath {
            layer: self.name.clone(),
            entry: String::from_utf8_lossy(rel).into_owned(),
            why,
        })?;
        let layer = self.name.clone();
        let bad = |why: String| BuildError::BadEntry {
            layer: layer.clone(),
            entry: String::from_utf8_lossy(rel).into_owned(),
            why,
        };
        let meta = disk_meta(path, &md)?;
        if !md.file_type().is_dir() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = self.links.get(&key).and_then(|v| v.first()) {
                let target = split_path(first).unwrap();
                return self
                    .tree
                    .link(&comps, &target)
                    .map_err(|e| bad(e.to_string()));
            }
            self.links.entry(key).or_default().push(rel.to_vec());
        }
        let data = match meta.mode & S_IFMT {
            S_IFDIR => {
                self.queue_dir(path, rel)?;
                Data::Dir(BTreeMap::new())
            }
            S_IFREG => {
                let size = md.len();
                let mut src = DiskFile {
                    f: File::open(path).map_err(io_err)?,
                    pos: 0,
                    sparse: md.blocks() * 512 < size,
                };
                self.store.begin_file(&comps);
                store_data(self.store, &mut src, size, &mut self.buf).map_err(|e| {
                    e.at(|why| BuildError::Io {
                        path: path.to_path_buf(),
                        source: std::io::Error::other(why),
                    })
                })?
            }
            _ => special_data(path, &md)?,
        };
        self.tree
            .apply(&comps, Node { meta, data })
            .map_err(|e| bad(e.to_string()))
    }

    /// Queue a directory's entries so they pop in byte order of name.
    fn queue_dir(&mut self, path: &Path, rel: &[u8]) -> Result<(), BuildError> {
        let io_err = |source| BuildError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(io_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
        for n in names {
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(n.as_bytes());
            self.stack.push((path.join(&n), r));
        }
        Ok(())
    }
}

/// An entry's metadata on disk, xattrs included.
fn disk_meta(path: &Path, md: &std::fs::Metadata) -> Result<Meta, BuildError> {
    let io_err = |source| BuildError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut xattrs = BTreeMap::new();
    for name in xattr::list(path).map_err(io_err)? {
        if let Some(v) = xattr::get(path, &name).map_err(io_err)? {
            xattrs.insert(name.as_bytes().to_vec(), v);
        }
    }
    Ok(Meta {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs,
    })
}

/// The data of a symlink, device node, fifo or socket on disk.
fn special_data(path: &Path, md: &std::fs::Metadata) -> Result<Data, BuildError> {
    Ok(match md.mode() & S_IFMT {
        S_IFLNK => Data::Symlink(
            std::fs::read_link(path)
                .map_err(|source| BuildError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .as_os_str()
                .as_bytes()
                .to_vec(),
        ),
        S_IFCHR | S_IFBLK => {
            let rdev = md.rdev();
            Data::Device(encode_rdev(
                rustix::fs::major(rdev),
                rustix::fs::minor(rdev),
            ))
        }
        _ => Data::Special,
    })
}
