//! The commands' walk of an image: [`erofs::Image::walk`], strict. A
//! directory reached twice (a cycle or a hard-linked directory, which a
//! hostile image may hold) is reported as corruption: a listing or an
//! extraction by path would otherwise show one directory under two names.

use erofs::{Image, Inode, ReadAt};

pub use erofs::WalkEntry as Entry;

/// Pre-order walk from `start` (directories before their contents, entries
/// of a directory in on-disk, i.e. sorted, order), calling `f` for every
/// name (a hard-linked file once per link: see [`Entry::first`]).
pub fn walk<R: ReadAt>(
    img: &Image<R>,
    start: Inode,
    prefix: &[u8],
    mut f: impl FnMut(&Entry) -> erofs::Result<()>,
) -> erofs::Result<()> {
    img.walk(start, prefix, |e| {
        if e.inode.is_dir() && !e.first {
            return Err(erofs::Error::Corrupt {
                nid: e.inode.nid,
                what: format!(
                    "directory reached twice (cycle or hard-linked directory) at {:?}",
                    String::from_utf8_lossy(&e.path)
                ),
            });
        }
        f(e)
    })
}

/// [`walk`], collected.
pub fn entries<R: ReadAt>(
    img: &Image<R>,
    start: Inode,
    prefix: &[u8],
) -> erofs::Result<Vec<Entry>> {
    let mut out = Vec::new();
    walk(img, start, prefix, |e| {
        out.push(e.clone());
        Ok(())
    })?;
    Ok(out)
}
