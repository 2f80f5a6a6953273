//! System interfaces shoal needs beyond what safe crates wrap: the new
//! mount API (safe, via rustix), fanotify (raw `libc` calls: rustix has no
//! fanotify) and `/dev/cachefiles` (its messages carry fds the kernel
//! installed; its ioctl). This is the only crate allowed `unsafe`, and each
//! use is one documented syscall or fd adoption.

pub mod fanotify;
mod mount;
mod signal;

pub use mount::{mount_erofs, mount_erofs_fscache, umount, umount_lazy};
pub use signal::default_sigpipe;
pub mod cachefiles;
