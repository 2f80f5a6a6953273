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
