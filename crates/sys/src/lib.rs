//! System interfaces shoal needs beyond what safe crates wrap: the new
//! mount API (safe, via rustix), fanotify (raw `libc` calls: rustix has no
//! fanotify) and `/dev/cachefiles` (its messages carry fds the kernel
//! installed; its ioctl). This is the only crate allowed `unsafe`, and each
//! use is one documented syscall or fd adoption.

pub mod fanotify;
pub mod mount;
mod signal;

pub use mount::{
    erofs_knows_flag, mount_erofs, mount_erofs_fscache, mount_super_options, umount, umount_lazy,
    ErofsOptions,
};
pub use signal::default_sigpipe;
pub mod cachefiles;
