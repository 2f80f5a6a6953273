//! `shoal extract`: write an image's tree under a destination directory.
//!
//! The image is hostile input and the destination may already hold
//! entries, so nothing is ever resolved by path from the destination:
//! every entry is created in the fd of its parent directory, a directory
//! that extract itself created (or found as a real directory) and opened
//! with `O_NOFOLLOW`, and metadata is applied through that fd or the
//! entry's own, never following a symlink. No syscall sees a path longer
//! than one name, so trees deeper than `PATH_MAX` extract too.
//!
//! The walk is depth-first with an explicit stack holding the open
//! directories along the current path only; past [`MAX_OPEN`] levels the
//! oldest are closed and reopened through `..` on the way back up
//! (checked against the device and inode they had), so a deep hostile
//! tree costs a bounded number of fds.

use anyhow::{bail, Context, Result};
use erofs::tree::{S_IFLNK, S_IFMT, S_IFREG};
use erofs::{BlobSource, DirEntry, Image, Inode, ReadAt};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags, CWD};
use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// Open directory fds kept along the current path (besides the root).
const MAX_OPEN: usize = 64;

/// One directory on the current path.
struct Frame {
    inode: Inode,
    name: Vec<u8>,
    /// `None` while closed to bound the open fds (see [`MAX_OPEN`]).
    fd: Option<OwnedFd>,
    /// (device, inode) of the directory created, to check a reopen.
    id: (u64, u64),
    /// Entries not yet extracted, last first.
    todo: Vec<DirEntry>,
}

struct Extractor<'a, R> {
    img: &'a Image<R>,
    blobs: &'a dyn BlobSource,
    is_root: bool,
    stack: Vec<Frame>,
    /// Frames `1..first_open` have their fd closed.
    first_open: usize,
    seen_dirs: HashSet<u64>,
    /// Directory nid -> (parent nid, name): how to find it again from the
    /// root to hard-link to a file in it, without building a path string.
    dir_parent: HashMap<u64, (u64, Vec<u8>)>,
    /// Non-directory nid -> (parent directory nid, name) of its first link.
    first_link: HashMap<u64, (u64, Vec<u8>)>,
    count: usize,
}

/// Extract the whole tree of `img` under `dest` (created if missing; an
/// existing directory is merged into, any other existing entry is an
/// error). Returns the number of entries extracted, the root included.
pub fn extract<R: ReadAt>(img: &Image<R>, blobs: &dyn BlobSource, dest: &Path) -> Result<usize> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    // DEST itself is the user's: it may be a symlink to where they want
    // the tree. Nothing below it is followed.
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = rustix::fs::open(dest, flags, Mode::empty())
        .with_context(|| format!("opening {}", dest.display()))?;
    let root = img.inode(img.root_nid())?;
    let mut x = Extractor {
        img,
        blobs,
        is_root: rustix::process::geteuid().is_root(),
        stack: Vec::new(),
        first_open: 1,
        seen_dirs: HashSet::from([root.nid]),
        dir_parent: HashMap::new(),
        first_link: HashMap::new(),
        count: 1,
    };
    x.push(root, Vec::new(), fd)?;
    while let Some(top) = x.stack.last_mut() {
        match top.todo.pop() {
            Some(e) if e.name == b"." || e.name == b".." => {}
            Some(e) => x.entry(e)?,
            None => x.leave()?,
        }
    }
    Ok(x.count)
}

/// A directory opened to create entries in: never through a symlink.
fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn stat_id(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// `/proc/self/fd/N[/NAME]`: a path naming what an fd (or an entry of a
/// directory fd) is, for the few calls that have no fd form. The magic
/// link jumps to the fd's own inode, `NAME` is the one component resolved.
fn proc_path(fd: BorrowedFd<'_>, name: Option<&[u8]>) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if let Some(n) = name {
        p.push(b'/');
        p.extend_from_slice(n);
    }
    p
}

impl<R: ReadAt> Extractor<'_, R> {
    /// The current directory's fd (always open: only ancestors are closed).
    fn cwd(&self) -> BorrowedFd<'_> {
        self.stack.last().unwrap().fd.as_ref().unwrap().as_fd()
    }

    /// The entry being extracted, as a path under the destination (for
    /// messages only).
    fn shown(&self) -> String {
        let mut p = String::new();
        for f in self.stack.iter().skip(1) {
            p.push('/');
            p.push_str(&String::from_utf8_lossy(&f.name));
        }
        p.push('/');
        p
    }

    fn shown_entry(&self, name: &[u8]) -> String {
        format!("{}{}", self.shown(), String::from_utf8_lossy(name))
    }

    fn push(&mut self, inode: Inode, name: Vec<u8>, fd: OwnedFd) -> Result<()> {
        let mut todo = self
            .img
            .read_dir(&inode)
            .with_context(|| format!("reading directory {}", self.shown_entry(&name)))?;
        todo.reverse();
        let id = stat_id(fd.as_fd())?;
        self.stack.push(Frame {
            inode,
            name,
            fd: Some(fd),
            id,
            todo,
        });
        if self.stack.len() - self.first_open > MAX_OPEN {
            self.stack[self.first_open].fd = None;
            self.first_open += 1;
        }
        Ok(())
    }

    /// Done with the current directory: reopen its parent if it was
    /// closed, then set the directory's own metadata (last, so its mode
    /// cannot stop the extraction of its contents and their creation does
    /// not move its mtime).
    fn leave(&mut self) -> Result<()> {
        let shown = self.shown();
        let done = self.stack.pop().unwrap();
        let fd = done.fd.unwrap();
        let depth = self.stack.len();
        // The root (frame 0) is never closed; frames 1..first_open are.
        if depth > 1 && depth - 1 < self.first_open {
            let parent = rustix::fs::openat(&fd, "..", dir_flags(), Mode::empty())?;
            if stat_id(parent.as_fd())? != self.stack[depth - 1].id {
                bail!("{shown}..: the directory was moved during extraction");
            }
            self.stack[depth - 1].fd = Some(parent);
            self.first_open = depth - 1;
        }
        self.meta_fd(fd.as_fd(), &done.inode)
            .with_context(|| format!("setting metadata of {shown}"))
    }

    fn entry(&mut self, e: DirEntry) -> Result<()> {
        let i = self
            .img
            .inode(e.nid)
            .with_context(|| format!("reading {}", self.shown_entry(&e.name)))?;
        self.count += 1;
        let parent = self.stack.last().unwrap().inode.nid;
        if i.is_dir() {
            return self.enter(i, e.name, parent);
        }
        if let Some((dir, first)) = self.first_link.get(&i.nid) {
            let (dir, first) = (*dir, first.clone());
            return self
                .link(dir, &first, &e.name)
                .with_context(|| format!("extracting {}", self.shown_entry(&e.name)));
        }
        self.first_link.insert(i.nid, (parent, e.name.clone()));
        match i.file_type() {
            S_IFREG => self.file(&i, &e.name),
            S_IFLNK => self.symlink(&i, &e.name),
            _ => self.node(&i, &e.name),
        }
        .with_context(|| format!("extracting {}", self.shown_entry(&e.name)))
    }

    /// Create (or reuse, if it is a real directory) and enter a directory.
    /// One it creates stays 0700 until left, whatever its final mode, so
    /// no one else can meddle with it meanwhile.
    fn enter(&mut self, i: Inode, name: Vec<u8>, parent: u64) -> Result<()> {
        let shown = self.shown_entry(&name);
        if !self.seen_dirs.insert(i.nid) {
            bail!(
                "corrupt image: directory nid {} reached twice (cycle or hard-linked directory) at {}",
                i.nid,
                shown
            );
        }
        match rustix::fs::mkdirat(self.cwd(), name.as_slice(), Mode::RWXU) {
            Err(rustix::io::Errno::EXIST) | Ok(()) => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", shown)),
        }
        let fd = rustix::fs::openat(self.cwd(), name.as_slice(), dir_flags(), Mode::empty())
            .map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => anyhow::anyhow!(
                    "{} exists and is not a directory (symlinks are not followed)",
                    shown
                ),
                e => anyhow::Error::new(e).context(format!("opening {}", shown)),
            })?;
        self.dir_parent.insert(i.nid, (parent, name.clone()));
        self.push(i, name, fd)
    }

    /// A regular file: created exclusively (never through an existing
    /// name), data first, then metadata through its fd.
    fn file(&self, i: &Inode, name: &[u8]) -> Result<()> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.cwd(), name, flags, Mode::RUSR | Mode::WUSR)?;
        let mut f = std::fs::File::from(fd);
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
        self.img
            .read_file(i, self.blobs, &mut |bytes, len| match bytes {
                Some(b) => w.write_all(b),
                None => w.seek(SeekFrom::Current(len as i64)).map(|_| ()),
            })?;
        w.flush()?;
        drop(w);
        f.set_len(i.size)?;
        self.meta_fd(f.as_fd(), i)
    }

    fn symlink(&self, i: &Inode, name: &[u8]) -> Result<()> {
        let target = self.img.read_link(i)?;
        rustix::fs::symlinkat(target.as_slice(), self.cwd(), name)?;
        let dir = self.cwd();
        if self.is_root {
            chown_at(dir, name, i, AtFlags::SYMLINK_NOFOLLOW)?;
        }
        // A symlink has no mode; its xattrs (trusted.*, security.*) are set
        // by a path whose last component is not followed.
        for (k, v) in self.img.xattrs(i)? {
            rustix::fs::lsetxattr(
                proc_path(dir, Some(name)).as_slice(),
                k.as_slice(),
                &v,
                XattrFlags::empty(),
            )?;
        }
        rustix::fs::utimensat(dir, name, &times(i), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }

    /// A device, fifo or socket: created, then opened `O_PATH` (it is not
    /// opened for I/O: a fifo would block) and checked to be what was
    /// created; the calls without an fd form go through its `/proc` link.
    fn node(&self, i: &Inode, name: &[u8]) -> Result<()> {
        let ft = FileType::from_raw_mode(i.file_type());
        let (ma, mi) = i.rdev();
        let dev = rustix::fs::makedev(ma, mi);
        rustix::fs::mknodat(self.cwd(), name, ft, Mode::RUSR | Mode::WUSR, dev)?;
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.cwd(), name, flags, Mode::empty())?;
        if rustix::fs::fstat(&fd)?.st_mode & S_IFMT != i.file_type() {
            bail!("replaced while being extracted");
        }
        let p = proc_path(fd.as_fd(), None);
        if self.is_root {
            chown_at(CWD, p.as_slice(), i, AtFlags::empty())?;
        }
        rustix::fs::chmodat(CWD, p.as_slice(), perm(i), AtFlags::empty())?;
        for (k, v) in self.img.xattrs(i)? {
            rustix::fs::setxattr(p.as_slice(), k.as_slice(), &v, XattrFlags::empty())?;
        }
        rustix::fs::utimensat(CWD, p.as_slice(), &times(i), AtFlags::empty())?;
        Ok(())
    }

    /// Ownership, then mode, then xattrs, then times, in that order: chown
    /// clears setuid/setgid and `security.capability`, and a POSIX ACL
    /// sets the group mode bits.
    fn meta_fd(&self, fd: BorrowedFd<'_>, i: &Inode) -> Result<()> {
        if self.is_root {
            rustix::fs::fchown(
                fd,
                Some(rustix::fs::Uid::from_raw(i.uid)),
                Some(rustix::fs::Gid::from_raw(i.gid)),
            )?;
        }
        rustix::fs::fchmod(fd, perm(i))?;
        for (k, v) in self.img.xattrs(i)? {
            rustix::fs::fsetxattr(fd, k.as_slice(), &v, XattrFlags::empty())
                .with_context(|| format!("xattr {}", String::from_utf8_lossy(&k)))?;
        }
        rustix::fs::futimens(fd, &times(i))?;
        Ok(())
    }

    /// Hard-link `name` in the current directory to the first link of the
    /// same inode, `first` in directory `dir`.
    fn link(&self, dir: u64, first: &[u8], name: &[u8]) -> Result<()> {
        let open = self
            .stack
            .iter()
            .find(|f| f.inode.nid == dir)
            .and_then(|f| f.fd.as_ref());
        let reopened;
        let olddir = match open {
            Some(fd) => fd.as_fd(),
            None => {
                reopened = self.reopen(dir)?;
                reopened.as_fd()
            }
        };
        rustix::fs::linkat(olddir, first, self.cwd(), name, AtFlags::empty())
            .with_context(|| format!("linking to {}", String::from_utf8_lossy(first)))?;
        Ok(())
    }

    /// Open an extracted directory again, one component at a time from
    /// the root (two fds at a time, whatever the depth).
    fn reopen(&self, nid: u64) -> Result<OwnedFd> {
        let mut names = Vec::new();
        let mut at = nid;
        while let Some((parent, name)) = self.dir_parent.get(&at) {
            names.push(name.as_slice());
            at = *parent;
        }
        let root = self.stack[0].fd.as_ref().unwrap();
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut fd = rustix::fs::openat(root, ".", flags, Mode::empty())?;
        for n in names.iter().rev() {
            fd = rustix::fs::openat(&fd, *n, flags, Mode::empty())?;
        }
        Ok(fd)
    }
}

fn perm(i: &Inode) -> Mode {
    Mode::from_raw_mode(i.mode & 0o7777)
}

fn times(i: &Inode) -> Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: i.mtime,
        tv_nsec: i.mtime_nsec as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn chown_at<P: rustix::path::Arg>(dir: BorrowedFd<'_>, p: P, i: &Inode, f: AtFlags) -> Result<()> {
    let (u, g) = (
        rustix::fs::Uid::from_raw(i.uid),
        rustix::fs::Gid::from_raw(i.gid),
    );
    rustix::fs::chownat(dir, p, Some(u), Some(g), f)?;
    Ok(())
}
