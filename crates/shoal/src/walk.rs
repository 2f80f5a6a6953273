//! Walk an image's tree once, safely: each directory is entered at most
//! once, so cyclic or hard-linked directories in a hostile image are
//! reported instead of looping.

use erofs::{Image, Inode, ReadAt};
use std::collections::HashSet;

pub struct Entry {
    /// Path relative to the root ("" for the root).
    pub path: Vec<u8>,
    pub inode: Inode,
}

/// Pre-order walk from `start` (directories before their contents, entries
/// of a directory in on-disk, i.e. sorted, order).
pub fn walk<R: ReadAt>(img: &Image<R>, start: Inode, prefix: &[u8]) -> erofs::Result<Vec<Entry>> {
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut stack = vec![(prefix.to_vec(), start)];
    while let Some((path, inode)) = stack.pop() {
        if inode.is_dir() {
            if !seen_dirs.insert(inode.nid) {
                return Err(erofs::Error::Corrupt {
                    nid: inode.nid,
                    what: format!(
                        "directory reached twice (cycle or hard-linked directory) at {:?}",
                        String::from_utf8_lossy(&path)
                    ),
                });
            }
            let entries = img.read_dir(&inode)?;
            let mut children = Vec::with_capacity(entries.len());
            for e in entries {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                children.push((p, img.inode(e.nid)?));
            }
            out.push(Entry { path, inode });
            stack.extend(children.into_iter().rev());
        } else {
            out.push(Entry { path, inode });
        }
    }
    Ok(out)
}
