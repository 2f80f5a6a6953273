//! `shoal order`: turn the access order a daemon recorded for an image
//! (chunks in first-touch order, `WORK/access/DOMAIN/FSID.order`) into the
//! file list `shoal build --order` lays a blob out by.

use crate::walk::walk;
use anyhow::{bail, Context, Result};
use erofs::{Extent, Image};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

/// Every chunk (device, block) of the image → the first file (in
/// directory order) whose data starts a chunk there.
fn chunk_owners(img: &Image<std::fs::File>) -> Result<HashMap<(u16, u32), Vec<u8>>> {
    let mut owners = HashMap::new();
    let root = img.inode(img.root_nid())?;
    walk(img, root, b"", |e| {
        if !e.inode.is_reg() {
            return Ok(());
        }
        for m in img.extents(&e.inode) {
            if let Extent::Chunk { device_id, blkaddr } = m?.extent {
                owners
                    .entry((device_id, blkaddr))
                    .or_insert_with(|| e.path.clone());
            }
        }
        Ok(())
    })?;
    Ok(owners)
}

/// Parse `DEV BLKADDR` lines.
fn recorded(path: &Path) -> Result<Vec<(u16, u32)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        match (
            it.next().map(str::parse),
            it.next().map(str::parse),
            it.next(),
        ) {
            (Some(Ok(d)), Some(Ok(b)), None) => out.push((d, b)),
            _ => bail!(
                "{} line {}: want `DEVICE BLOCK`, got {line:?}",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

pub fn order(image: &Path, recording: &Path, output: Option<&Path>) -> Result<()> {
    let f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let img = Image::open(f).with_context(|| format!("reading {}", image.display()))?;
    let owners = chunk_owners(&img)?;
    let mut seen = HashSet::new();
    let mut text = Vec::new();
    let (mut known, mut unknown) = (0, 0);
    for key in recorded(recording)? {
        match owners.get(&key) {
            Some(p) if seen.insert(p.clone()) => {
                text.push(b'/');
                text.extend_from_slice(p);
                text.push(b'\n');
                known += 1;
            }
            Some(_) => {}
            None => unknown += 1,
        }
    }
    match output {
        Some(o) => std::fs::write(o, &text).with_context(|| format!("writing {}", o.display()))?,
        None => std::io::stdout().write_all(&text)?,
    }
    eprintln!("{known} files in first-touch order ({unknown} recorded chunks not in this image)");
    Ok(())
}
