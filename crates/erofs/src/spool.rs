//! A new blob's bytes on their way to disk: written and hashed (the
//! blob's tag is its sha256) on a thread of their own, so that a build
//! reads and hashes chunks on one core while the other writes the blob.
//! Without it a directory build spends most of its time hashing every
//! byte twice on one core (chunk digest, then blob tag).
//!
//! Memory stays bounded: bytes are handed over in batches of
//! [`BATCH`] through a channel of [`DEPTH`] slots, and the batches'
//! buffers come back for reuse.

use crate::error::{io_err, BuildError};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Bytes gathered before they are handed to the writer: small files' 4 KiB
/// chunks would otherwise cost a message and a write each.
const BATCH: usize = 1 << 20;
/// Batches in flight: at most `(DEPTH + 2) * BATCH` bytes are buffered.
const DEPTH: usize = 4;

/// What the writer thread leaves: the file and the sha256 of all of it.
type Written = std::io::Result<(File, Sha256)>;

/// Dropped unfinished (its blob kept nothing), a spool's writer sees the
/// channel close and ends on its own; the temp file goes away with it.
pub(crate) struct Spool {
    tmp: tempfile::NamedTempFile,
    /// Bytes not yet handed over.
    pending: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    /// Emptied buffers coming back from the writer.
    free: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<Written>>,
}

impl Spool {
    /// A spool writing a new temp file in `dir`.
    pub(crate) fn create(dir: &Path) -> Result<Spool, BuildError> {
        let tmp = tempfile::Builder::new()
            .prefix(".blob-")
            .tempfile_in(dir)
            .map_err(io_err(dir))?;
        let file = tmp.reopen().map_err(io_err(tmp.path()))?;
        Self::start(tmp, file)
    }

    /// A spool writing `file`, which is `tmp` reopened (tests: another).
    fn start(tmp: tempfile::NamedTempFile, file: File) -> Result<Spool, BuildError> {
        let (tx, rx) = sync_channel::<Vec<u8>>(DEPTH);
        let (free_tx, free) = sync_channel::<Vec<u8>>(DEPTH + 1);
        let writer = std::thread::Builder::new()
            .name("blob-writer".into())
            .spawn(move || write_batches(file, rx, free_tx))
            .map_err(io_err(tmp.path()))?;
        Ok(Spool {
            tmp,
            pending: Vec::with_capacity(BATCH),
            tx: Some(tx),
            free,
            writer: Some(writer),
        })
    }

    /// Append `data` to the blob.
    pub(crate) fn write(&mut self, data: &[u8]) -> Result<(), BuildError> {
        let mut rest = data;
        while !rest.is_empty() {
            let n = rest.len().min(BATCH - self.pending.len());
            self.pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.pending.len() == BATCH {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    fn hand_over(&mut self) -> Result<(), BuildError> {
        let mut next = self.free.try_recv().unwrap_or_default();
        next.clear();
        next.reserve(BATCH);
        let batch = std::mem::replace(&mut self.pending, next);
        let tx = self.tx.as_ref().expect("a spool hands over until finished");
        if tx.send(batch).is_err() {
            // The writer stopped early: its result says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| self.failed(std::io::Error::other("the blob writer stopped"))));
        }
        Ok(())
    }

    /// Write what is pending and wait for the writer: the file, flushed,
    /// and the sha256 of every byte written.
    pub(crate) fn finish(mut self) -> Result<(tempfile::NamedTempFile, File, Sha256), BuildError> {
        if !self.pending.is_empty() {
            self.hand_over()?;
        }
        let (file, hash) = self.join()?;
        Ok((self.tmp, file, hash))
    }

    fn join(&mut self) -> Result<(File, Sha256), BuildError> {
        self.tx = None;
        let writer = self.writer.take().expect("joined once");
        match writer.join() {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed(std::io::Error::other("the blob writer panicked"))),
        }
    }

    fn failed(&self, source: std::io::Error) -> BuildError {
        io_err(self.tmp.path())(source)
    }
}

/// The writer thread: write and hash each batch, give its buffer back.
fn write_batches(mut file: File, rx: Receiver<Vec<u8>>, free: SyncSender<Vec<u8>>) -> Written {
    let mut hash = Sha256::new();
    for batch in rx {
        file.write_all(&batch)?;
        hash.update(&batch);
        let _ = free.try_send(batch);
    }
    Ok((file, hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn bytes_and_tag_survive_batching() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::create(dir.path()).unwrap();
        let mut all = Vec::new();
        // Odd sizes straddle batch boundaries; enough of them to fill the
        // channel several times over.
        for i in 0..40u32 {
            let piece: Vec<u8> = (0..(i as usize * 77_777 % 300_000 + 1))
                .map(|j| (j as u32 ^ i) as u8)
                .collect();
            spool.write(&piece).unwrap();
            all.extend_from_slice(&piece);
        }
        let (tmp, _, hash) = spool.finish().unwrap();
        let mut on_disk = Vec::new();
        File::open(tmp.path())
            .unwrap()
            .read_to_end(&mut on_disk)
            .unwrap();
        assert_eq!(on_disk, all);
        assert_eq!(hash.finalize(), Sha256::digest(&all));
    }

    #[test]
    fn a_failed_write_names_the_blob_file() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
        let path = tmp.path().to_path_buf();
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut spool = Spool::start(tmp, full).unwrap();
        // The writer fails on the first batch; the error reaches a later
        // write or the finish, never silently.
        let mut failed = None;
        for _ in 0..(DEPTH + 3) {
            if let Err(e) = spool.write(&[7u8; BATCH]) {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => spool.finish().expect_err("writing to /dev/full fails"),
        };
        match err {
            BuildError::Io { path: p, source } => {
                assert_eq!(p, path);
                assert_eq!(source.raw_os_error(), Some(28), "ENOSPC: {source}");
            }
            other => panic!("want an I/O error, got {other}"),
        }
    }
}
