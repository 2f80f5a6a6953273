//! fanotify pre-content frontend (Linux 6.14+): file-backed erofs mounts
//! whose device files are the domain's sparse cache files, filled when the
//! kernel first reads them. Upstream's successor to erofs over fscache.
//!
//! Three parts: [`pump`] (a separate, never-restarted process that owns the
//! fanotify group, so a daemon crash cannot turn pending reads into zeros),
//! [`client`] (the daemon's connection to it) and [`frontend`] (marks,
//! mounts, and answering events from the domain core).
#![forbid(unsafe_code)]

pub mod client;
pub mod frontend;
pub mod proto;
pub mod pump;

pub use frontend::{FanotifyError, Frontend, PumpLauncher};

use shoal_sys::fanotify::{Group, FAN_PRE_ACCESS};
use std::path::Path;

/// Whether pre-content events work here: create a group and mark a scratch
/// file in `dir` (the cache's filesystem). `Err` says why not.
pub fn probe(dir: &Path) -> Result<(), String> {
    use rustix::io::Errno;
    let group = Group::pre_content(true).map_err(|e| match e.raw_os_error() {
        Some(x) if x == Errno::INVAL.raw_os_error() => {
            "fanotify_init(FAN_CLASS_PRE_CONTENT) refused: kernel too old".to_string()
        }
        Some(x) if x == Errno::PERM.raw_os_error() => {
            "fanotify_init needs CAP_SYS_ADMIN".to_string()
        }
        _ => format!("fanotify_init: {e}"),
    })?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let f = tempfile_in(dir).map_err(|e| format!("scratch file in {}: {e}", dir.display()))?;
    group
        .mark(true, FAN_PRE_ACCESS, rustix::fd::AsFd::as_fd(&f))
        .map_err(|e| match e.raw_os_error() {
            Some(x) if x == Errno::INVAL.raw_os_error() => "FAN_PRE_ACCESS marks refused: kernel older than 6.14 or built without CONFIG_FANOTIFY_ACCESS_PERMISSIONS".to_string(),
            _ => format!("fanotify_mark(FAN_PRE_ACCESS): {e}"),
        })?;
    Ok(())
}

fn tempfile_in(dir: &Path) -> std::io::Result<std::fs::File> {
    let path = dir.join(format!(".shoal-probe-{}", std::process::id()));
    let f = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(f)
}
