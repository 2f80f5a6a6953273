//! The new mount API for file-backed EROFS mounts (rustix wraps it safely).

use rustix::fd::AsFd;
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};
use std::path::Path;

/// Mount an EROFS bootstrap file-backed at `target`, with one `device=` per
/// data blob in device-slot order (mount(8) cannot pass files as devices).
pub fn mount_erofs(source: &Path, devices: &[&Path], target: &Path) -> std::io::Result<()> {
    let fs = fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    let ctx = |e: rustix::io::Errno, what: &str| {
        std::io::Error::new(std::io::Error::from(e).kind(), format!("erofs {what}: {e}"))
    };
    fsconfig_set_string(fs.as_fd(), "source", source).map_err(|e| ctx(e, "source"))?;
    for d in devices {
        fsconfig_set_string(fs.as_fd(), "device", *d).map_err(|e| ctx(e, "device"))?;
    }
    fsconfig_create(fs.as_fd()).map_err(|e| ctx(e, "create"))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY,
    )
    .map_err(|e| ctx(e, "fsmount"))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| ctx(e, "move_mount"))?;
    Ok(())
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
        step(fsconfig_create(fs.as_fd()), "create")?;
        let mnt = fsmount(
            fs.as_fd(),
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_RDONLY,
        )
        .map_err(|e| ctx(e, "fsmount"))?;
        step(
            move_mount(
                mnt.as_fd(),
                "",
                rustix::fs::CWD,
                target,
                MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
            ),
            "move_mount",
        )
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
