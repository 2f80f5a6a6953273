//! Walk an image's tree once, safely: each directory is entered at most
//! once, so cyclic or hard-linked directories in a hostile image are
//! reported instead of looping.

use erofs::{Image, Inode, ReadAt};
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;

pub struct Entry {
    /// Path relative to the root ("" for the root).
    pub path: Vec<u8>,
    pub inode: Inode,
}

/// Pre-order walk from `start` (directories before their contents, entries
/// of a directory in on-disk, i.e. sorted, order).
pub fn walk<R: ReadAt>(img: &Image<R>, start: Inode, prefix: &[u8]) -> erofs::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut stack = vec![(prefix.to_vec(), start)];
    while let Some((path, inode)) = stack.pop() {
        if inode.is_dir() {
            if !seen_dirs.insert(inode.nid) {
                return Err(erofs::Error::Corrupt {
                    nid: inode.nid,
                    what: format!(
                        "directory reached twice (cycle or hard-linked directory) at {:?}",
                        String::from_utf8_lossy(&path)
                    ),
                });
            }
            let entries = img.read_dir(&inode)?;
            let mut children = Vec::with_capacity(entries.len());
            for e in entries {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                children.push((p, img.inode(e.nid)?));
            }
            out.push(Entry { path, inode });
            stack.extend(children.into_iter().rev());
        } else {
            out.push(Entry { path, inode });
        }
    }
    Ok(out)
}

/// Create one non-link entry at `target` with its data and metadata
/// (directory times are set later, by [`set_times`]).
pub fn create<R: ReadAt>(
    img: &Image<R>,
    blobs: &dyn erofs::BlobSource,
    i: &Inode,
    target: &std::path::Path,
    is_root: bool,
) -> anyhow::Result<()> {
    use erofs::tree::*;
    use rustix::fs::{mknodat, FileType, Mode, CWD};
    use std::io::{Seek, SeekFrom, Write};
    let perm = Mode::from_raw_mode(i.mode & 0o7777);
    match i.file_type() {
        S_IFDIR => match std::fs::create_dir(target) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && target.is_dir() => {}
            r => r?,
        },
        S_IFREG => {
            let mut f = std::fs::File::create(target)?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
            img.read_file(i, blobs, &mut |bytes, len| match bytes {
                Some(b) => w.write_all(b),
                None => w.seek(SeekFrom::Current(len as i64)).map(|_| ()),
            })?;
            w.flush()?;
            drop(w);
            f.set_len(i.size)?;
        }
        S_IFLNK => {
            let t = img.read_link(i)?;
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), target)?;
        }
        t => {
            let ft = FileType::from_raw_mode(t);
            let (ma, mi) = i.rdev();
            mknodat(CWD, target, ft, perm, rustix::fs::makedev(ma, mi))?;
        }
    }
    for (name, value) in img.xattrs(i)? {
        xattr::set(target, std::ffi::OsStr::from_bytes(&name), &value)?;
    }
    if is_root {
        std::os::unix::fs::lchown(target, Some(i.uid), Some(i.gid))?;
    }
    if i.file_type() != S_IFLNK {
        rustix::fs::chmod(target, perm)?;
    }
    if !i.is_dir() {
        set_times(target, i)?;
    }
    Ok(())
}

pub fn set_times(target: &std::path::Path, i: &Inode) -> anyhow::Result<()> {
    use rustix::fs::{utimensat, AtFlags, Timestamps, CWD};
    let t = rustix::fs::Timespec {
        tv_sec: i.mtime as i64,
        tv_nsec: i.mtime_nsec as _,
    };
    let ts = Timestamps {
        last_access: t,
        last_modification: t,
    };
    utimensat(CWD, target, &ts, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}
