//! The new mount API for file-backed EROFS mounts (rustix wraps it safely).

use rustix::fd::{AsFd, BorrowedFd};
use rustix::mount::{
    fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount, unmount,
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};
use std::path::Path;

/// Options of a file-backed EROFS mount beyond its devices.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErofsOptions<'a> {
    /// `directio` (Linux 6.13+): read the backing files with direct I/O,
    /// so a page read through the mount is cached once, by erofs, instead
    /// of twice (erofs's page and the backing file's).
    pub directio: bool,
    /// `inode_share,domain_id=D` (Linux 7.0+): regular files whose
    /// fingerprints are equal share one page cache with every mount of D.
    pub inode_share: Option<&'a str>,
}

/// Mount an EROFS bootstrap file-backed at `target`, with one `device=` per
/// data blob in device-slot order (mount(8) cannot pass files as devices).
pub fn mount_erofs(
    source: &Path,
    devices: &[&Path],
    target: &Path,
    opts: &ErofsOptions<'_>,
) -> std::io::Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    let ctx = |e: rustix::io::Errno, what: &str| {
        std::io::Error::new(std::io::Error::from(e).kind(), format!("erofs {what}: {e}"))
    };
    fsconfig_set_string(fs.as_fd(), "source", source).map_err(|e| ctx(e, "source"))?;
    for d in devices {
        fsconfig_set_string(fs.as_fd(), "device", *d).map_err(|e| ctx(e, "device"))?;
    }
    if opts.directio {
        fsconfig_set_flag(fs.as_fd(), "directio").map_err(|e| ctx(e, "directio"))?;
    }
    if let Some(domain) = opts.inode_share {
        fsconfig_set_flag(fs.as_fd(), "inode_share").map_err(|e| ctx(e, "inode_share"))?;
        fsconfig_set_string(fs.as_fd(), "domain_id", domain).map_err(|e| ctx(e, "domain_id"))?;
    }
    attach(fs.as_fd(), target).map_err(|(e, what)| ctx(e, what))
}

/// Whether this kernel's erofs knows the flag parameter `name` (a kernel
/// without it refuses the parameter when it is set, before any mount).
/// A kernel that knows the name but was built without the feature accepts
/// it and only logs; the mount's options then tell (see
/// [`mount_super_options`]).
pub fn erofs_knows_flag(name: &str) -> bool {
    let Ok(fs) = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC) else {
        return false;
    };
    fsconfig_set_flag(fs.as_fd(), name).is_ok()
}

/// The superblock options of the mount at `target` as the kernel shows
/// them (`/proc/self/mountinfo`, the last field): what the filesystem
/// really applied, e.g. whether erofs kept `inode_share` for this image.
pub fn mount_super_options(target: &Path) -> Option<Vec<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = target.as_os_str().as_encoded_bytes();
    info.lines().rev().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        if unescape(fields.get(4)?) != want {
            return None;
        }
        let opts = fields.get(sep + 3)?;
        Some(opts.split(',').map(str::to_string).collect())
    })
}

/// Undo mountinfo's octal escapes (`\040` for a space, …).
pub fn unescape(f: &str) -> Vec<u8> {
    let b = f.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&f[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// The end of every mount through the new API: create the superblock of
/// a configured context, mount it read-only, and attach it at `target`.
/// An error names the step that failed.
fn attach(fs: BorrowedFd<'_>, target: &Path) -> Result<(), (rustix::io::Errno, &'static str)> {
    fsconfig_create(fs).map_err(|e| (e, "create"))?;
    let mnt = fsmount(
        fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY,
    )
    .map_err(|e| (e, "fsmount"))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| (e, "move_mount"))
}

pub fn umount(target: &Path) -> std::io::Result<()> {
    unmount(target, UnmountFlags::empty())?;
    Ok(())
}

/// Detach `target` now, however busy (`umount -l`); e.g. a FUSE mount
/// whose daemon died.
pub fn umount_lazy(target: &Path) -> std::io::Result<()> {
    unmount(target, UnmountFlags::DETACH)?;
    Ok(())
}

/// Mount an EROFS image in fscache (cachefiles on-demand) mode: the
/// bootstrap is the cookie `fsid` in volume `erofs,<domain_id or fsid>`,
/// read through the cachefiles daemon (`mount -t erofs none -o fsid=F[,domain_id=D]`).
pub fn mount_erofs_fscache(
    fsid: &str,
    domain_id: Option<&str>,
    target: &Path,
) -> std::io::Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    let ctx = |e: rustix::io::Errno, what: &str| {
        let kind = std::io::Error::from(e).kind();
        (e, std::io::Error::new(kind, format!("erofs {what}: {e}")))
    };
    let step = |r: rustix::io::Result<()>, what: &str| r.map_err(|e| ctx(e, what));
    let run = || -> Result<(), (rustix::io::Errno, std::io::Error)> {
        step(fsconfig_set_string(fs.as_fd(), "source", "none"), "source")?;
        step(fsconfig_set_string(fs.as_fd(), "fsid", fsid), "fsid")?;
        if let Some(d) = domain_id {
            step(fsconfig_set_string(fs.as_fd(), "domain_id", d), "domain_id")?;
        }
        attach(fs.as_fd(), target).map_err(|(e, what)| ctx(e, what))
    };
    run().map_err(|(e, err)| {
        if e == rustix::io::Errno::EXIST {
            let d = domain_id.map_or(String::from("its private volume"), |d| {
                format!("domain {d}")
            });
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("fsid {fsid} is already mounted in {d}"),
            )
        } else {
            err
        }
    })
}
