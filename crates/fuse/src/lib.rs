//! FUSE frontend: a thin adapter from FUSE requests to a [`BoundImage`] of
//! the domain core. Metadata comes from the format reader, file data from
//! the domain cache, so images of one domain share blobs exactly as on the
//! kernel frontends. The image is immutable: attributes and entries are
//! cached by the kernel for a day and file pages are kept across opens.
#![forbid(unsafe_code)]

use erofs::ondisk::EROFS_FT_DIR;
use erofs::tree::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFSOCK};
use erofs::{DirEntry, Inode};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, FUSE_ROOT_ID,
};
use shoal_core::pool::WorkerPool;
use shoal_core::BoundImage;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(86400);

pub struct ShoalFs {
    img: Arc<BoundImage>,
    root_nid: u64,
    /// Reads that miss run on the daemon's worker pool: a fetch from a
    /// slow remote must not stall lookups and cached reads.
    pool: Arc<WorkerPool>,
    /// Decoded inodes and directories; the image never changes, and both
    /// are bounded by its size.
    inodes: HashMap<u64, Inode>,
    dirs: HashMap<u64, Arc<Vec<DirEntry>>>,
}

impl ShoalFs {
    pub fn new(img: Arc<BoundImage>, pool: Arc<WorkerPool>) -> Self {
        ShoalFs {
            root_nid: img.image.root_nid(),
            img,
            pool,
            inodes: HashMap::new(),
            dirs: HashMap::new(),
        }
    }

    fn nid(&self, ino: u64) -> u64 {
        if ino == FUSE_ROOT_ID {
            self.root_nid
        } else {
            ino - 2
        }
    }

    fn ino(&self, nid: u64) -> u64 {
        if nid == self.root_nid {
            FUSE_ROOT_ID
        } else {
            nid + 2
        }
    }

    fn inode(&mut self, ino: u64) -> Result<Inode, i32> {
        if ino != FUSE_ROOT_ID && ino < 2 {
            return Err(libc::ENOENT);
        }
        self.inode_by_nid(self.nid(ino))
    }

    fn inode_by_nid(&mut self, nid: u64) -> Result<Inode, i32> {
        if let Some(i) = self.inodes.get(&nid) {
            return Ok(i.clone());
        }
        let i = self.img.image.inode(nid).map_err(|e| {
            tracing::error!(nid, error = %e, "reading inode");
            libc::EIO
        })?;
        self.inodes.insert(nid, i.clone());
        Ok(i)
    }

    /// A directory's entries, sorted by name as on disk.
    fn dir(&mut self, ino: u64) -> Result<Arc<Vec<DirEntry>>, i32> {
        let d = self.inode(ino)?;
        if !d.is_dir() {
            return Err(libc::ENOTDIR);
        }
        if let Some(e) = self.dirs.get(&d.nid) {
            return Ok(e.clone());
        }
        let mut entries = self.img.image.read_dir(&d).map_err(|e| {
            tracing::error!(nid = d.nid, error = %e, "reading directory");
            libc::EIO
        })?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let entries = Arc::new(entries);
        self.dirs.insert(d.nid, entries.clone());
        Ok(entries)
    }

    fn attr(&self, i: &Inode) -> FileAttr {
        let mtime = system_time(i.mtime, i.mtime_nsec);
        FileAttr {
            ino: self.ino(i.nid),
            size: i.size,
            blocks: i.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: kind(i.mode),
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: match i.file_type() {
                S_IFCHR | S_IFBLK => i.i_u,
                _ => 0,
            },
            blksize: 4096,
            flags: 0,
        }
    }
}

/// An inode's time as a `SystemTime`: before 1970 (a negative mtime)
/// counts back from the epoch (`UNIX_EPOCH + Duration` panicked on the
/// huge value a negative time was as `u64`). Checked arithmetic: never a
/// panic, whatever the image says.
fn system_time(sec: i64, nsec: u32) -> SystemTime {
    let secs = Duration::from_secs(sec.unsigned_abs());
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(secs)
    } else {
        UNIX_EPOCH.checked_sub(secs)
    };
    t.and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nsec.min(999_999_999)))))
        .unwrap_or(UNIX_EPOCH)
}

fn kind(mode: u32) -> FileType {
    match mode & S_IFMT {
        S_IFDIR => FileType::Directory,
        S_IFLNK => FileType::Symlink,
        S_IFCHR => FileType::CharDevice,
        S_IFBLK => FileType::BlockDevice,
        S_IFIFO => FileType::NamedPipe,
        S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl Filesystem for ShoalFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(1 << 20);
        // The image is immutable: let the kernel cache symlink targets too.
        let _ = config.add_capabilities(fuser::consts::FUSE_CACHE_SYMLINKS);
        // READDIRPLUS: entries arrive with their attributes (fewer lookups).
        let _ = config.add_capabilities(
            fuser::consts::FUSE_DO_READDIRPLUS | fuser::consts::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    /// ENOSYS: zero-message opens (FUSE_NO_OPENDIR_SUPPORT). The kernel
    /// stops sending OPENDIR/RELEASEDIR and caches every directory's
    /// contents (`FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE` is its default then),
    /// which is right for an immutable image and saves two round trips per
    /// directory walked.
    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.error(libc::ENOSYS)
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let entries = match self.dir(parent) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        match entries.binary_search_by(|e| e.name.as_slice().cmp(name.as_bytes())) {
            Ok(k) => match self.inode_by_nid(entries[k].nid) {
                Ok(i) => reply.entry(&TTL, &self.attr(&i), 0),
                Err(e) => reply.error(e),
            },
            Err(_) => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.inode(ino) {
            Ok(i) => reply.attr(&TTL, &self.attr(&i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self
            .inode(ino)
            .and_then(|i| self.img.image.read_link(&i).map_err(|_| libc::EIO))
        {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    /// ENOSYS: zero-message opens (FUSE_NO_OPEN_SUPPORT), as for
    /// directories: no OPEN/RELEASE round trips per file, and the kernel
    /// keeps file pages cached across opens (`FOPEN_KEEP_CACHE`, its default
    /// then). Writes never get here: the mount is read-only.
    fn open(&mut self, _req: &Request<'_>, _ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.error(libc::ENOSYS)
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let i = match self.inode(ino) {
            Ok(i) => i,
            Err(e) => return reply.error(e),
        };
        let img = self.img.clone();
        // Hits are answered here; only misses (fetches) go to the workers.
        let mut buf = vec![0u8; size as usize];
        match img.read_cached(&i, offset.max(0) as u64, &mut buf) {
            Ok(Some(n)) => return reply.data(&buf[..n]),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(fsid = %img.spec.fsid, nid = i.nid, offset, size, error = %e, "read failed: EIO");
                return reply.error(libc::EIO);
            }
        }
        // Fair by the remote of the image's first (lowest) blob: the one
        // most reads of a cold image fetch from.
        let key = img
            .blobs
            .first()
            .map(|b| b.remote_key())
            .unwrap_or_default();
        self.pool.submit(key, move || {
            let mut buf = vec![0u8; size as usize];
            match img.read_at(&i, offset.max(0) as u64, &mut buf) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    tracing::error!(fsid = %img.spec.fsid, nid = i.nid, offset, size, error = %e, "read failed: EIO");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.dir(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (k, e) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            let kind = match e.file_type {
                EROFS_FT_DIR => FileType::Directory,
                _ => match self.inode_by_nid(e.nid) {
                    Ok(i) => kind(i.mode),
                    Err(_) => FileType::RegularFile,
                },
            };
            let child = if e.name == b".." && ino == FUSE_ROOT_ID {
                FUSE_ROOT_ID
            } else {
                self.ino(e.nid)
            };
            if reply.add(child, (k + 1) as i64, kind, OsStr::from_bytes(&e.name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let entries = match self.dir(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        for (k, e) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            let i = match self.inode_by_nid(e.nid) {
                Ok(i) => i,
                Err(err) => return reply.error(err),
            };
            let mut attr = self.attr(&i);
            if e.name == b".." && ino == FUSE_ROOT_ID {
                attr.ino = FUSE_ROOT_ID;
            }
            if reply.add(
                attr.ino,
                (k + 1) as i64,
                OsStr::from_bytes(&e.name),
                &TTL,
                &attr,
                0,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let sb = &self.img.image.sb;
        let blocks: u64 = u64::from(sb.blocks.get())
            + self
                .img
                .blobs
                .iter()
                .map(|b| u64::from(b.cache.blocks))
                .sum::<u64>();
        reply.statfs(blocks, 0, 0, sb.inos.get(), 0, 4096, 255, 4096);
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let x = match self
            .inode(ino)
            .and_then(|i| self.img.image.xattrs(&i).map_err(|_| libc::EIO))
        {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match x.iter().find(|(n, _)| n == name.as_bytes()) {
            None => reply.error(libc::ENODATA),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() > size as usize => reply.error(libc::ERANGE),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let x = match self
            .inode(ino)
            .and_then(|i| self.img.image.xattrs(&i).map_err(|_| libc::EIO))
        {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (n, _) in x {
            names.extend_from_slice(&n);
            names.push(0);
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() > size as usize {
            reply.error(libc::ERANGE)
        } else {
            reply.data(&names)
        }
    }
}

/// Mount `img` at `mountpoint` in the background; dropping the session
/// unmounts.
pub fn mount(
    img: Arc<BoundImage>,
    mountpoint: &Path,
    pool: Arc<WorkerPool>,
) -> std::io::Result<fuser::BackgroundSession> {
    let name = format!("shoal:{}", img.spec.fsid);
    let opts = [
        MountOption::RO,
        MountOption::FSName(name),
        MountOption::Subtype("shoal".into()),
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
    ];
    fuser::spawn_mount2(ShoalFs::new(img, pool), mountpoint, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_and_extremes() {
        let at = |s, ns| system_time(s, ns);
        assert_eq!(at(5, 7), UNIX_EPOCH + Duration::new(5, 7));
        // -5 s + 0.5 s is 4.5 s before the epoch.
        assert_eq!(
            at(-5, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(4500)
        );
        assert!(at(i64::MIN, 0) < UNIX_EPOCH && at(i64::MAX, 999_999_999) > UNIX_EPOCH);
        assert_eq!(
            at(0, u32::MAX),
            UNIX_EPOCH + Duration::from_nanos(999_999_999)
        );
    }
}
