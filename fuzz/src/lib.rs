//! Shared by the fuzz targets: a bounded walk over everything an image
//! offers, checking the reader's invariants on the way. Errors are fine;
//! panics, hangs and huge allocations are the bugs being looked for.
#![forbid(unsafe_code)]

use erofs::tree::{S_IFDIR, S_IFLNK, S_IFREG};
use erofs::{BlobSource, Image, Inode, ReadAt};
use std::collections::HashSet;

/// Recompute the superblock checksum and the chunk table digest of a
/// mutated image, so the fuzzer gets past them into the structures they
/// protect (the unsealed image is tried too).
pub fn reseal(img: &mut [u8]) {
    use sha2::Digest;
    if let Some(&bits) = img.get(1024 + 12) {
        if (9..=16).contains(&bits) {
            let len = ((1usize << bits).saturating_sub(1024)).max(128);
            if img.len() >= 1024 + len {
                img[1028..1032].fill(0);
                let c = erofs::ondisk::sb_checksum(&img[1024..1024 + len]);
                img[1028..1032].copy_from_slice(&c.to_le_bytes());
            }
        }
    }
    let Some(t) = img.len().checked_sub(64) else {
        return;
    };
    if img[t..t + 8] != *b"SHOALEND" {
        return;
    }
    let off = u64::from_le_bytes(img[t + 8..t + 16].try_into().unwrap());
    let len = u64::from_le_bytes(img[t + 16..t + 24].try_into().unwrap());
    if off.checked_add(len) == Some(t as u64) {
        let d = sha2::Sha256::digest(&img[off as usize..t]);
        img[t + 24..t + 56].copy_from_slice(&d);
    }
}

/// Every device reads from the same bytes.
pub struct SliceBlobs<'a>(pub &'a [u8]);

impl BlobSource for SliceBlobs<'_> {
    fn read_blob(&self, _device_id: u16, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        ReadAt::read_exact_at(&self.0, buf, offset)
    }
}

/// Limits that keep one input's work small whatever the image claims.
pub struct Budget {
    pub inodes: usize,
    pub file_bytes: u64,
    pub chunks: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            inodes: 4096,
            file_bytes: 64 << 20,
            chunks: 256,
        }
    }
}

/// Walk the tree once (each directory and file at most once), calling every
/// read entry point. Returns the number of inodes visited and whether the
/// whole tree was walked without error.
pub fn walk<R: ReadAt>(
    img: &Image<R>,
    blobs: &dyn BlobSource,
    mut budget: Budget,
) -> (usize, bool) {
    let mut clean = true;
    for d in 0..=img.devices.len() as u16 + 1 {
        let _ = img.device_tag(d);
    }
    if let Some(t) = &img.chunk_table {
        for (dev, entries) in &t.blobs {
            for e in entries.iter().take(budget.chunks) {
                let len = u64::from(e.nblocks.get()) * img.block_size();
                if len > budget.file_bytes {
                    break;
                }
                budget.file_bytes -= len;
                let _ = img.read_chunk(*dev, e.blkaddr.get(), len, blobs);
            }
        }
    }
    let _ = img.lookup("a/b/../c/./d");
    let mut seen = HashSet::new();
    let Ok(root) = img.inode(img.root_nid()) else {
        return (0, false);
    };
    let mut stack: Vec<Inode> = vec![root];
    let mut n = 0;
    while let Some(ino) = stack.pop() {
        if n == budget.inodes {
            break;
        }
        if !seen.insert(ino.nid) {
            // Hard links (fine) or a cycle (the walk must not loop).
            continue;
        }
        n += 1;
        let _ = ino.rdev();
        clean &= img.xattrs(&ino).is_ok();
        match ino.file_type() {
            S_IFDIR => match img.read_dir(&ino) {
                Ok(entries) => {
                    for e in entries {
                        assert!(!e.name.is_empty() && !e.name.contains(&b'/'));
                        if e.name == b"." || e.name == b".." || seen.contains(&e.nid) {
                            continue;
                        }
                        match img.inode(e.nid) {
                            Ok(i) => stack.push(i),
                            Err(_) => clean = false,
                        }
                        if stack.len() > budget.inodes {
                            break;
                        }
                    }
                }
                Err(_) => clean = false,
            },
            S_IFLNK => match img.read_link(&ino) {
                Ok(t) => assert_eq!(t.len() as u64, ino.size),
                Err(_) => clean = false,
            },
            S_IFREG => {
                // Map a few positions, then read the whole file if it fits
                // the budget, checking the sink sees exactly `size` bytes.
                for pos in [0, ino.size / 2, ino.size.saturating_sub(1), ino.size] {
                    if let Ok(m) = img.map(&ino, pos) {
                        assert!(m.la <= pos && pos < m.end() && m.end() <= ino.size);
                    }
                }
                if ino.size > budget.file_bytes {
                    continue;
                }
                budget.file_bytes -= ino.size;
                let mut total = 0u64;
                let r = img.read_file(&ino, blobs, &mut |bytes, len| {
                    if let Some(b) = bytes {
                        assert_eq!(b.len() as u64, len);
                    }
                    total += len;
                    Ok(())
                });
                match r {
                    Ok(()) => assert_eq!(total, ino.size),
                    Err(_) => clean = false,
                }
            }
            _ => {}
        }
    }
    (n, clean)
}
