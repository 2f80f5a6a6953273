//! Sources of a build: tar layers (plain, gzip or zstd, streamed) and
//! directories, applied to a [`Tree`] with their file data stored as chunks.

use crate::blob::ChunkStore;
use crate::error::BuildError;
use crate::ondisk::encode_rdev;
use crate::tree::*;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Read a file's data in chunks into the store. `holes` says, for a chunk
/// start, whether the whole chunk is known to be a hole (sparse sources).
fn store_data(
    store: &mut ChunkStore,
    r: &mut dyn Read,
    size: u64,
    buf: &mut Vec<u8>,
    mut is_hole: impl FnMut(u64, u64) -> bool,
    skip: &mut dyn FnMut(u64) -> std::io::Result<()>,
) -> Result<Vec<Option<ChunkRef>>, std::io::Error> {
    let cs = store.chunk_size();
    // `size` may come from a hostile tar header: reserve only what a few
    // chunks need and grow as data really arrives.
    let mut chunks = Vec::with_capacity(size.div_ceil(cs).min(1024) as usize);
    let mut pos = 0;
    while pos < size {
        let len = cs.min(size - pos);
        if is_hole(pos, len) {
            skip(len)?;
            store.note_hole(len);
            chunks.push(None);
            pos += len;
            continue;
        }
        buf.resize(len as usize, 0);
        r.read_exact(buf)?;
        chunks.push(
            store
                .add_chunk(buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
        );
        pos += len;
    }
    Ok(chunks)
}

/// A tar header uid/gid, which must fit the image's 32 bits.
fn id32(v: std::io::Result<u64>, what: &str) -> Result<u32, String> {
    let v = v.map_err(|e| e.to_string())?;
    u32::try_from(v).map_err(|_| format!("{what} {v} does not fit 32 bits"))
}

/// PAX `mtime` ("secs[.frac]") as (secs, nsec).
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nsec = 0u32;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nsec += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    if neg {
        if nsec > 0 {
            Some((-secs - 1, 1_000_000_000 - nsec))
        } else {
            Some((-secs, 0))
        }
    } else {
        Some((secs, nsec))
    }
}

fn open_layer(path: &Path) -> Result<Box<dyn Read>, BuildError> {
    let f = File::open(path).map_err(|source| BuildError::Io {
        path: path.into(),
        source,
    })?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = r.fill_buf().map_err(|source| BuildError::Io {
        path: path.into(),
        source,
    })?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(r).map_err(|source| BuildError::Io {
                path: path.into(),
                source,
            })?,
        )
    } else {
        Box::new(r)
    })
}

/// Apply one tar layer (compression detected from its bytes).
pub fn apply_tar(
    tree: &mut Tree,
    store: &mut ChunkStore,
    layer: usize,
    path: &Path,
) -> Result<(), BuildError> {
    let lname = path.display().to_string();
    let mut ar = tar::Archive::new(open_layer(path)?);
    let io_err = |source| BuildError::Io {
        path: path.into(),
        source,
    };
    let mut buf = Vec::new();
    for entry in ar.entries().map_err(io_err)? {
        let mut e = entry.map_err(io_err)?;
        let raw_path = e.path_bytes().into_owned();
        let ename = String::from_utf8_lossy(&raw_path).into_owned();
        let bad = |why: String| BuildError::BadEntry {
            layer: lname.clone(),
            entry: ename.clone(),
            why,
        };
        let comps = split_path(&raw_path).map_err(|why| BuildError::UnsafePath {
            layer: lname.clone(),
            entry: ename.clone(),
            why,
        })?;
        let h = e.header().clone();
        let kind = h.entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let mut meta = Meta {
            mode: h.mode().map_err(|e| bad(e.to_string()))? & 0o7777,
            uid: id32(h.uid(), "uid").map_err(bad)?,
            gid: id32(h.gid(), "gid").map_err(bad)?,
            mtime: h.mtime().map_err(|e| bad(e.to_string()))? as i64,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        };
        if let Some(pax) = e.pax_extensions().map_err(|e| bad(e.to_string()))? {
            for ext in pax {
                let ext = ext.map_err(|e| bad(e.to_string()))?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let value = ext.value_bytes();
                    match crate::ondisk::xattr_split_name(name) {
                        Some((_, suffix)) if suffix.len() <= 255 && value.len() <= 0xffff => {}
                        _ => {
                            return Err(bad(format!(
                                "xattr {:?} ({} bytes) cannot be stored in EROFS",
                                String::from_utf8_lossy(name),
                                value.len()
                            )))
                        }
                    }
                    meta.xattrs.insert(name.to_vec(), value.to_vec());
                } else if key == b"mtime" {
                    (meta.mtime, meta.mtime_nsec) = parse_pax_time(ext.value_bytes())
                        .ok_or_else(|| bad("bad PAX mtime".into()))?;
                } else if key == b"uid" || key == b"gid" {
                    let v: u32 = std::str::from_utf8(ext.value_bytes())
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| bad("bad PAX uid/gid".into()))?;
                    if key == b"uid" {
                        meta.uid = v;
                    } else {
                        meta.gid = v;
                    }
                }
            }
        }
        let data = if kind.is_file() || kind == tar::EntryType::Continuous {
            meta.mode |= S_IFREG;
            let size = e.size();
            let chunks = store_data(store, &mut e, size, &mut buf, |_, _| false, &mut |_| Ok(()))
                .map_err(|err| bad(format!("reading data: {err}")))?;
            Data::File { size, chunks }
        } else if kind.is_dir() {
            meta.mode |= S_IFDIR;
            Data::Dir(BTreeMap::new())
        } else if kind.is_symlink() {
            meta.mode |= S_IFLNK;
            let target = e
                .link_name_bytes()
                .ok_or_else(|| bad("symlink without target".into()))?;
            if target.contains(&0) {
                return Err(bad("symlink target contains NUL".into()));
            }
            if target.is_empty() || target.len() > 4095 {
                return Err(bad(format!("symlink target of {} bytes", target.len())));
            }
            Data::Symlink(target.into_owned())
        } else if kind.is_hard_link() {
            let target = e
                .link_name_bytes()
                .ok_or_else(|| bad("hard link without target".into()))?;
            let tcomps = split_path(&target).map_err(|why| BuildError::UnsafePath {
                layer: lname.clone(),
                entry: ename.clone(),
                why: format!("hard link target: {why}"),
            })?;
            tree.link(&comps, &tcomps, layer)
                .map_err(|e| bad(e.to_string()))?;
            continue;
        } else if kind.is_character_special() || kind.is_block_special() {
            meta.mode |= if kind.is_character_special() {
                S_IFCHR
            } else {
                S_IFBLK
            };
            let major = h
                .device_major()
                .map_err(|e| bad(e.to_string()))?
                .unwrap_or(0);
            let minor = h
                .device_minor()
                .map_err(|e| bad(e.to_string()))?
                .unwrap_or(0);
            if major > 0xfff || minor > 0xfffff {
                return Err(bad(format!("device number {major}:{minor} too large")));
            }
            Data::Device(encode_rdev(major, minor))
        } else if kind.is_fifo() {
            meta.mode |= S_IFIFO;
            Data::Special
        } else {
            return Err(bad(format!("unsupported entry type {:?}", kind)));
        };
        tree.apply(&comps, Node { meta, data, layer })
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// Apply a directory as a layer: a sorted walk, hard links by (dev, ino),
/// sparse files read around their holes.
pub fn apply_dir(
    tree: &mut Tree,
    store: &mut ChunkStore,
    layer: usize,
    root: &Path,
) -> Result<(), BuildError> {
    let mut links: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut buf = Vec::new();
    let mut stack: Vec<(std::path::PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    let lname = root.display().to_string();
    while let Some((path, rel)) = stack.pop() {
        let io_err = |source| BuildError::Io {
            path: path.clone(),
            source,
        };
        let md = std::fs::symlink_metadata(&path).map_err(io_err)?;
        let comps = split_path(&rel).map_err(|why| BuildError::UnsafePath {
            layer: lname.clone(),
            entry: String::from_utf8_lossy(&rel).into_owned(),
            why,
        })?;
        let bad = |why: String| BuildError::BadEntry {
            layer: lname.clone(),
            entry: String::from_utf8_lossy(&rel).into_owned(),
            why,
        };
        let mut xattrs = BTreeMap::new();
        for name in xattr::list(&path).map_err(io_err)? {
            if let Some(v) = xattr::get(&path, &name).map_err(io_err)? {
                xattrs.insert(name.as_bytes().to_vec(), v);
            }
        }
        let meta = Meta {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            xattrs,
        };
        let ft = md.file_type();
        if !ft.is_dir() && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = links.get(&key).and_then(|v| v.first()) {
                let target = split_path(first).unwrap();
                tree.link(&comps, &target, layer)
                    .map_err(|e| bad(e.to_string()))?;
                continue;
            }
            links.entry(key).or_default().push(rel.clone());
        }
        let data = match meta.mode & S_IFMT {
            S_IFDIR => {
                let mut names: Vec<_> = std::fs::read_dir(&path)
                    .map_err(io_err)?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(io_err)?;
                names.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
                for n in names {
                    let mut r = rel.clone();
                    if !r.is_empty() {
                        r.push(b'/');
                    }
                    r.extend_from_slice(n.as_bytes());
                    stack.push((path.join(&n), r));
                }
                Data::Dir(BTreeMap::new())
            }
            S_IFREG => {
                let mut f = File::open(&path).map_err(io_err)?;
                let size = md.len();
                let fd = f.try_clone().map_err(io_err)?;
                let sparse = md.blocks() * 512 < size;
                let chunks = store_data(
                    store,
                    &mut f,
                    size,
                    &mut buf,
                    |pos, len| {
                        use rustix::fs::{seek, SeekFrom};
                        if !sparse {
                            return false;
                        }
                        // SEEK_DATA moves the shared offset: put it back.
                        let hole = match seek(&fd, SeekFrom::Data(pos)) {
                            Ok(d) => d >= pos + len,
                            Err(e) => e == rustix::io::Errno::NXIO,
                        };
                        let _ = seek(&fd, SeekFrom::Start(pos));
                        hole
                    },
                    &mut |len| {
                        use std::io::Seek;
                        (&fd)
                            .seek(std::io::SeekFrom::Current(len as i64))
                            .map(|_| ())
                    },
                )
                .map_err(io_err)?;
                Data::File { size, chunks }
            }
            S_IFLNK => Data::Symlink(
                std::fs::read_link(&path)
                    .map_err(io_err)?
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
        };
        tree.apply(&comps, Node { meta, data, layer })
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_pax_time;

    #[test]
    fn pax_times() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1700000000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"1.123456789999"), Some((1, 123_456_789)));
        assert_eq!(parse_pax_time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
