//! System interfaces shoal needs beyond what safe crates wrap: the new
//! mount API (safe, via rustix) and fanotify (raw `libc` calls: rustix has
//! no fanotify). This is the only crate allowed `unsafe`, and each use is
//! one documented syscall.

pub mod fanotify;
mod mount;

pub use mount::{mount_erofs, mount_erofs_fscache, umount, umount_lazy};
pub mod cachefiles;
