//! Small state files (bindings, mounts) written so that a full disk does
//! not make them lie. Each write is atomic (temporary file, fsync, rename).
//! A reserve file of [`RESERVE`] bytes is kept allocated in the work
//! directory: when a write meets ENOSPC the reserve is given back and the
//! write retried, so state still reaches the disk when cache fills have
//! taken every other block; the reserve is taken again once there is room.

use crate::workdir::WorkDir;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Room for many state writes: a binding is a few hundred bytes.
pub const RESERVE: u64 = 1 << 20;

/// Allocate the reserve if it is missing and the disk has room for it
/// several times over (best effort: on a full disk it stays missing until
/// there is room again).
pub fn take_reserve(work: &WorkDir) {
    let path = work.state_reserve();
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE) {
        return;
    }
    // Taken back only with room to spare: a reserve just given up must not
    // be re-taken from its own freed blocks while the disk is still full.
    let room = rustix::fs::statvfs(work.root())
        .map(|v| v.f_bavail.saturating_mul(v.f_frsize))
        .unwrap_or(0);
    if room < 4 * RESERVE {
        return;
    }
    let r = std::fs::File::create(&path).and_then(|f| {
        rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE)?;
        f.sync_all()
    });
    if let Err(e) = r {
        let _ = std::fs::remove_file(&path);
        tracing::debug!(path = %path.display(), error = %e, "state reserve not taken");
    }
}

fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Write `bytes` to `path` atomically, using the reserve of `work`
/// when the disk is full.
pub fn write_atomic(work: &WorkDir, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match write_once(path, bytes) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) => {
            let reserve = work.state_reserve();
            if std::fs::remove_file(&reserve).is_err() {
                return Err(e);
            }
            tracing::warn!(path = %path.display(), "disk full: state written into the reserve");
            write_once(path, bytes)
        }
        r => {
            if r.is_ok() {
                take_reserve(work);
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_keeps_a_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let work = WorkDir::new(dir.path());
        let p = dir.path().join("state.json");
        write_atomic(&work, &p, b"[1]").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"[1]");
        assert_eq!(
            std::fs::metadata(dir.path().join(".state-reserve"))
                .unwrap()
                .len(),
            RESERVE
        );
        assert!(!dir.path().join("state.json.tmp").exists());
    }
}
