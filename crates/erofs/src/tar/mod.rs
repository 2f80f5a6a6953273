//! A streaming tar reader that reads layers the way containerd does.
//!
//! containerd unpacks OCI layers with Go's `archive/tar`, so that reader's
//! semantics decide what tree a layer means: which PAX records apply and
//! how (length-prefixed, later wins, empty values keep the header's),
//! GNU long names over PAX paths, header-only entry types whose size field
//! is ignored, the four sparse encodings expanded to their files, and the
//! end-of-archive rules. This module follows it, and refuses with a
//! clear error what it cannot represent.
//!
//! Why by hand and not the `tar` crate: that crate splits PAX records on
//! newlines (tar-rs #428), for the `path`/`linkpath` it applies itself
//! too, so a crafted value made shoal see another tree than containerd;
//! it expands no PAX sparse format; and its errors carry raw header bytes.
//! The format is small; the semantics are the point, so they live here.

mod header;
mod pax;
pub mod sparse;

use header::{Block, Format, RawHeader, BLOCK};
use pax::Records;
use sparse::{Cursor, PaxSparse, Span};
use std::collections::BTreeMap;
use std::io::{self, Read};

/// Extended headers and GNU long names hold at most this much, as in Go.
const MAX_SPECIAL: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// The stream itself is not a tar archive from here on.
    #[error("tar header at byte {offset}: {why}")]
    Header { offset: u64, why: String },
    /// One entry is malformed or cannot be represented.
    #[error("{why}")]
    Entry { entry: Vec<u8>, why: String },
    #[error("reading the layer at tar byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// What an entry is, after PAX and GNU extensions applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    HardLink,
    Char,
    Block,
    Fifo,
    /// A type containerd does not unpack (contiguous `7`, GNU volume and
    /// multi-volume headers, vendor types): the raw type flag.
    Unsupported(u8),
}

/// One entry's header, as containerd would see it.
#[derive(Debug)]
pub struct Entry {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    /// Permission, setuid, setgid and sticky bits.
    pub mode: u32,
    pub uid: i64,
    pub gid: i64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Logical size of a regular file (sparse files: with their holes).
    pub size: u64,
    pub devmajor: i64,
    pub devminor: i64,
    /// `SCHILY.xattr.*` records, empty values included (containerd sets
    /// xattrs from all of an entry's PAX records).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// PAX keys that carry metadata containerd does not apply either
    /// (`SCHILY.acl.*`, `LIBARCHIVE.xattr.*`), for the caller to report.
    pub ignored: Vec<String>,
    sparse: Option<Cursor>,
}

pub struct Archive<R> {
    r: R,
    /// Bytes consumed from `r`.
    pos: u64,
    /// Unread stored bytes of the current entry, then its block padding.
    left: u64,
    pad: u64,
    /// The current entry's path, to name it when its data is cut short.
    cur: Vec<u8>,
    done: bool,
}

fn pad_of(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> Archive<R> {
    pub fn new(r: R) -> Self {
        Archive {
            r,
            pos: 0,
            left: 0,
            pad: 0,
            cur: Vec::new(),
            done: false,
        }
    }

    fn entry_err(&self, why: String) -> TarError {
        TarError::Entry {
            entry: self.cur.clone(),
            why,
        }
    }

    /// Fill `buf` as far as the stream goes; the count read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => {
                    n += k;
                    self.pos += k as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TarError::Io {
                        offset: self.pos,
                        source,
                    })
                }
            }
        }
        Ok(n)
    }

    /// The next raw block: `None` at a clean end of the stream.
    fn block(&mut self) -> Result<Option<Block>, TarError> {
        let mut b = [0u8; BLOCK];
        let offset = self.pos;
        match self.fill(&mut b)? {
            0 => Ok(None),
            BLOCK => Ok(Some(b)),
            n => Err(TarError::Header {
                offset,
                why: format!("the archive ends inside a header block ({n} of 512 bytes)"),
            }),
        }
    }

    /// Discard the rest of the current entry (data and padding).
    fn skip_entry(&mut self) -> Result<(), TarError> {
        let n = self.left + self.pad;
        let got = io::copy(&mut (&mut self.r).take(n), &mut io::sink()).map_err(|source| {
            TarError::Io {
                offset: self.pos,
                source,
            }
        })?;
        self.pos += got;
        (self.left, self.pad) = (0, 0);
        if got < n {
            return Err(self.entry_err(format!(
                "the archive ends {} bytes before the entry's data and padding do",
                n - got
            )));
        }
        Ok(())
    }

    /// Read stored bytes of the current entry; an entry cut short is an
    /// error naming it, never a short file.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        let want = buf.len() as u64;
        if want > self.left {
            return Err(self.entry_err(format!(
                "reading data: {want} bytes wanted, {} stored",
                self.left
            )));
        }
        let n = self.fill(buf)? as u64;
        self.left -= n;
        if n < want {
            return Err(self.entry_err(format!(
                "reading data: the archive ends {} bytes before the entry does",
                self.left
            )));
        }
        Ok(())
    }

    /// The data of an extended header or GNU long name (bounded).
    fn special(&mut self, h: &RawHeader, offset: u64) -> Result<Vec<u8>, TarError> {
        let size = u64::try_from(h.size)
            .ok()
            .filter(|&s| s <= MAX_SPECIAL)
            .ok_or_else(|| TarError::Header {
                offset,
                why: format!("extension header of {} bytes (at most 1 MiB)", h.size),
            })?;
        self.cur = h.name.clone();
        self.left = size;
        self.pad = pad_of(size);
        let mut data = vec![0; size as usize];
        self.read_data(&mut data)?;
        self.skip_entry()?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, TarError> {
        if self.done {
            return Ok(None);
        }
        self.skip_entry()?;
        let mut ext = Extensions::default();
        loop {
            let offset = self.pos;
            let Some(blk) = self.block()? else {
                self.done = true;
                return Ok(None);
            };
            if header::is_zero(&blk) {
                return self.end_of_archive().map(|()| None);
            }
            let h = header::parse(&blk).map_err(|why| TarError::Header { offset, why })?;
            match h.typeflag {
                b'x' => ext.pax = Some(pax::parse(&self.special(&h, offset)?)),
                // Go returns a global header as an entry of its own, which
                // containerd skips: it applies to nothing, and it ends what
                // earlier meta headers said.
                b'g' => {
                    self.special(&h, offset)?;
                    ext = Extensions::default();
                }
                b'L' => ext.long_name = Some(header::cstr(&self.special(&h, offset)?).to_vec()),
                b'K' => ext.long_link = Some(header::cstr(&self.special(&h, offset)?).to_vec()),
                _ => return self.entry(h, &blk, ext).map(Some),
            }
        }
    }

    /// A zero block: the end, if the next block is zero too or missing.
    fn end_of_archive(&mut self) -> Result<(), TarError> {
        let offset = self.pos;
        match self.block()? {
            Some(b) if !header::is_zero(&b) => Err(TarError::Header {
                offset,
                why: "a header follows an end-of-archive block".into(),
            }),
            _ => {
                self.done = true;
                Ok(())
            }
        }
    }

    fn entry(&mut self, h: RawHeader, blk: &Block, ext: Extensions) -> Result<Entry, TarError> {
        let (mut e, records) = ext.apply(h)?;
        self.cur = e.path.clone();
        // Go ignores the size field of header-only types: nothing follows.
        if !matches!(e.kind, Kind::Regular | Kind::Unsupported(_)) {
            e.size = 0;
        }
        self.left = e.size;
        self.pad = pad_of(e.size);
        let raw_map = if blk[156] == b'S' {
            self.old_gnu_sparse(blk, &mut e)?
        } else {
            self.pax_sparse(&mut e, &records)?
        };
        if let Some(raw) = raw_map {
            let segs = sparse::validate(&raw, e.size as i64).map_err(|w| self.entry_err(w))?;
            let cur = Cursor::new(segs);
            if cur.stored_bytes() != self.left {
                return Err(self.entry_err(format!(
                    "sparse map covers {} bytes, the entry stores {}",
                    cur.stored_bytes(),
                    self.left
                )));
            }
            e.sparse = Some(cur);
        }
        Ok(e)
    }

    /// Old GNU sparse (`S`): up to 4 map entries in the header, more in
    /// extension blocks between the header and the data; the logical
    /// size in the header's `realsize`.
    fn old_gnu_sparse(
        &mut self,
        blk: &Block,
        e: &mut Entry,
    ) -> Result<Option<Vec<(i64, i64)>>, TarError> {
        if header::format_of(blk) != Format::Gnu {
            return Err(self.entry_err("old GNU sparse entry without a GNU header".into()));
        }
        let real = header::numeric(&blk[483..495])
            .filter(|&s| s >= 0)
            .ok_or_else(|| self.entry_err("bad old GNU sparse real size".into()))?;
        let mut raw = Vec::new();
        header::gnu_sparse_entries(&blk[386..482], &mut raw).map_err(|w| self.entry_err(w))?;
        let mut extended = blk[482] != 0;
        while extended {
            if raw.len() > sparse::MAX_SEGMENTS {
                return Err(self.entry_err("old GNU sparse map too long".into()));
            }
            let offset = self.pos;
            let ext = self.block()?.ok_or_else(|| TarError::Header {
                offset,
                why: "the archive ends inside an old GNU sparse map".into(),
            })?;
            header::gnu_sparse_entries(&ext[..504], &mut raw).map_err(|w| self.entry_err(w))?;
            extended = ext[504] != 0;
        }
        e.size = real as u64;
        Ok(Some(raw))
    }

    /// PAX sparse 0.0, 0.1 (map in records) and 1.0 (map heading the
    /// data); `GNU.sparse.name` and the real size replace the header's.
    fn pax_sparse(
        &mut self,
        e: &mut Entry,
        r: &Records,
    ) -> Result<Option<Vec<(i64, i64)>>, TarError> {
        let version = sparse::pax_version(r).map_err(|w| self.entry_err(w))?;
        if version == PaxSparse::None {
            return Ok(None);
        }
        if e.kind != Kind::Regular {
            return Err(self.entry_err("GNU sparse records on a non-regular entry".into()));
        }
        if let Some(name) = r.get("GNU.sparse.name").filter(|n| !n.is_empty()) {
            e.path = name.to_vec();
            self.cur = e.path.clone();
        }
        if let Some(real) = sparse::pax_real_size(r).map_err(|w| self.entry_err(w))? {
            e.size =
                u64::try_from(real).map_err(|_| self.entry_err("negative sparse size".into()))?;
        }
        let raw = match version {
            PaxSparse::InData => sparse::map_from_data(|| {
                let mut b = [0u8; BLOCK];
                self.read_data(&mut b).map_err(|e| e.to_string())?;
                Ok(b)
            }),
            _ => sparse::map_from_records(r),
        };
        raw.map(Some).map_err(|w| self.entry_err(w))
    }

    /// Read what follows the end of the archive to the end of the stream,
    /// so that a decompressor checks its trailer (CRC, size, checksum)
    /// and rejects trailing garbage, and a digest sees every byte.
    pub fn finish(mut self) -> Result<R, TarError> {
        if !self.done {
            return Err(self.entry_err("the archive was not read to its end".into()));
        }
        let n = io::copy(&mut self.r, &mut io::sink()).map_err(|source| TarError::Io {
            offset: self.pos,
            source,
        })?;
        self.pos += n;
        Ok(self.r)
    }

    /// The stored bytes of a regular entry as its logical file: holes of a
    /// sparse entry read as zeros and can be skipped without reading.
    pub fn file<'a>(&'a mut self, e: &'a mut Entry) -> FileData<'a, R> {
        FileData {
            size: e.size,
            sparse: e.sparse.as_mut(),
            ar: self,
            pos: 0,
        }
    }
}

/// A regular entry's logical data, read sequentially.
pub struct FileData<'a, R> {
    ar: &'a mut Archive<R>,
    sparse: Option<&'a mut Cursor>,
    size: u64,
    pos: u64,
}

impl<R: Read> FileData<'_, R> {
    /// Whether [pos, pos+len) of the file is all hole (stores no byte).
    pub fn is_hole(&mut self, len: u64) -> bool {
        let (pos, size) = (self.pos, self.size);
        self.sparse
            .as_mut()
            .is_some_and(|c| c.is_hole(pos, len, size))
    }

    /// Move past `len` bytes of hole.
    pub fn skip_hole(&mut self, len: u64) {
        debug_assert!(self.is_hole(len));
        self.pos += len;
    }

    /// Fill `buf` with the next logical bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done) as u64;
            let span = match self.sparse.as_mut() {
                Some(c) => c.span(self.pos, self.size),
                None => Span::Data(self.size - self.pos),
            };
            let (n, hole) = match span {
                Span::Data(n) => (n.min(want), false),
                Span::Hole(n) => (n.min(want), true),
            };
            if n == 0 {
                return Err(self
                    .ar
                    .entry_err("reading data past the end of the file".into()));
            }
            let part = &mut buf[done..done + n as usize];
            if hole {
                part.fill(0);
            } else {
                self.ar.read_data(part)?;
            }
            done += n as usize;
            self.pos += n;
        }
        Ok(())
    }
}

/// What meta headers said about the entry that follows them.
#[derive(Default)]
struct Extensions {
    pax: Option<Result<Records, String>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Extensions {
    /// The entry a header describes once PAX records and GNU long names
    /// apply, in Go's order: PAX over the header, long names over PAX.
    fn apply(self, h: RawHeader) -> Result<(Entry, Records), TarError> {
        let mut path = h.name.clone();
        if let Some(n) = self.long_name.as_ref().filter(|n| !n.is_empty()) {
            path.clone_from(n);
        }
        let records = match self.pax {
            None => Records::default(),
            Some(Ok(r)) => r,
            // The header's data belongs to this entry: name it.
            Some(Err(why)) => return Err(TarError::Entry { entry: path, why }),
        };
        let bad = |path: &[u8], why: &str| TarError::Entry {
            entry: path.to_vec(),
            why: why.to_string(),
        };
        let mut e = Entry {
            path: h.name.clone(),
            link: h.link,
            kind: Kind::Unsupported(h.typeflag),
            mode: (h.mode & 0o7777) as u32,
            uid: h.uid,
            gid: h.gid,
            mtime: h.mtime,
            mtime_nsec: 0,
            size: 0,
            devmajor: h.devmajor,
            devminor: h.devminor,
            xattrs: BTreeMap::new(),
            ignored: Vec::new(),
            sparse: None,
        };
        let mut size = h.size;
        for (k, v) in &records.0 {
            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                e.xattrs.insert(name.to_vec(), v.clone());
                continue;
            }
            if k.starts_with(b"SCHILY.acl.") || k.starts_with(b"LIBARCHIVE.xattr.") {
                e.ignored.push(String::from_utf8_lossy(k).into_owned());
                continue;
            }
            if v.is_empty() {
                continue; // Go keeps the header's value
            }
            match k.as_slice() {
                b"path" => e.path.clone_from(v),
                b"linkpath" => e.link.clone_from(v),
                b"uid" | b"gid" => {
                    let id = pax::int(v)
                        .filter(|&id| id >= 0)
                        .ok_or_else(|| bad(&path, "bad PAX uid/gid"))?;
                    *if k == b"uid" { &mut e.uid } else { &mut e.gid } = id;
                }
                b"mtime" => {
                    (e.mtime, e.mtime_nsec) =
                        pax::time(v).ok_or_else(|| bad(&path, "bad PAX mtime"))?
                }
                b"size" => size = pax::int(v).ok_or_else(|| bad(&path, "bad PAX size"))?,
                _ => {}
            }
        }
        if let Some(n) = self.long_name.filter(|n| !n.is_empty()) {
            e.path = n;
        }
        if let Some(l) = self.long_link.filter(|l| !l.is_empty()) {
            e.link = l;
        }
        e.kind = kind(h.typeflag, &e.path);
        e.size = u64::try_from(size).map_err(|_| bad(&e.path, &format!("negative size {size}")))?;
        Ok((e, records))
    }
}

fn kind(typeflag: u8, path: &[u8]) -> Kind {
    match typeflag {
        b'0' | b'S' => Kind::Regular,
        // Pre-POSIX regular files; a trailing slash made them directories.
        0 if path.ends_with(b"/") => Kind::Directory,
        0 => Kind::Regular,
        b'1' => Kind::HardLink,
        b'2' => Kind::Symlink,
        b'3' => Kind::Char,
        b'4' => Kind::Block,
        b'5' => Kind::Directory,
        b'6' => Kind::Fifo,
        t => Kind::Unsupported(t),
    }
}
