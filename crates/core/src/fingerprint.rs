//! Whether a domain may share page cache for an image. With
//! `inode_share`, the kernel gives every file of a domain whose fingerprint
//! xattr (and size) equals another's the other's pages: it never looks at
//! the bytes. An image that lies about a fingerprint would read another
//! image's file, or, read first, make the other image read its bytes. The
//! chunk digests of a bootstrap are trusted and every fetched chunk is
//! checked against them, so a fingerprint is accepted only if the files
//! that claim it in one domain also agree on their size and chunk digests.

use crate::error::CoreError;
use erofs::{Extent, Image, ImageBytes};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A digest of what a file is made of: size, chunk size, chunk digests.
pub type ContentProof = [u8; 32];

/// Fingerprint → content proof for every fingerprinted file of an image,
/// or why its fingerprints cannot be checked.
pub type Fingerprints = Result<HashMap<Vec<u8>, ContentProof>, String>;

/// The fingerprints an image claims, each with the proof of the content
/// its own trusted chunk digests say the file has.
pub fn image_fingerprints(img: &Image<ImageBytes>) -> Result<Fingerprints, CoreError> {
    let mut out = HashMap::new();
    let mut unverifiable = None;
    let root = img.inode(img.root_nid());
    let walk = root.and_then(|root| {
        img.walk(root, b"", |e| {
            fingerprint_of(img, e, &mut out, &mut unverifiable)
        })
    });
    walk.map_err(|e| CoreError::Unusable {
        path: "bootstrap".into(),
        why: format!("walking inodes for fingerprints: {e}"),
    })?;
    Ok(match unverifiable {
        Some(why) => Err(why),
        None => Ok(out),
    })
}

/// Record the fingerprint of one file reached by the walk (each inode
/// once), or why the image's fingerprints cannot be trusted.
fn fingerprint_of(
    img: &Image<ImageBytes>,
    e: &erofs::WalkEntry,
    out: &mut HashMap<Vec<u8>, ContentProof>,
    unverifiable: &mut Option<String>,
) -> erofs::Result<()> {
    let ino = &e.inode;
    if !e.first || unverifiable.is_some() || !ino.is_reg() {
        return Ok(());
    }
    let Some(fp) = img.fingerprint(ino)? else {
        return Ok(());
    };
    match proof(img, ino)? {
        Ok(p) => {
            // One image naming two contents by one fingerprint lies too.
            if out.insert(fp, p).is_some_and(|old| old != p) {
                *unverifiable = Some(format!(
                    "nid {}: one fingerprint on files of different content",
                    ino.nid
                ));
            }
        }
        Err(why) => *unverifiable = Some(format!("nid {}: {why}", ino.nid)),
    }
    Ok(())
}

fn proof(
    img: &Image<ImageBytes>,
    ino: &erofs::Inode,
) -> erofs::Result<Result<ContentProof, String>> {
    let Some(table) = img.chunk_table.as_ref() else {
        return Ok(Err("the image has no chunk digests".into()));
    };
    let mut h = Sha256::new();
    h.update(ino.size.to_le_bytes());
    for m in img.extents(ino) {
        let m = m?;
        let pos = m.la;
        h.update(m.llen.to_le_bytes());
        match m.extent {
            Extent::Hole => h.update([0u8; 32]),
            Extent::Chunk { device_id, blkaddr } => match table.find(device_id, blkaddr) {
                Some(e) => h.update(e.digest),
                None => return Ok(Err(format!("chunk at {pos} has no digest"))),
            },
            Extent::Image { .. } => {
                return Ok(Err(format!(
                    "data at {pos} is in the bootstrap, undigested"
                )))
            }
        }
    }
    Ok(Ok(h.finalize().into()))
}

/// The fingerprints shared in one domain, with how many bound images
/// claim each.
#[derive(Default)]
pub struct DomainFingerprints {
    claims: HashMap<Vec<u8>, (ContentProof, usize)>,
}

impl DomainFingerprints {
    /// Admit an image's fingerprints, or say which one contradicts a bound
    /// image's (the image then mounts without sharing).
    pub fn admit(&mut self, fps: &HashMap<Vec<u8>, ContentProof>) -> Result<(), String> {
        for (fp, p) in fps {
            if self.claims.get(fp).is_some_and(|(q, _)| q != p) {
                return Err(format!(
                    "fingerprint {} names other content in an image already bound",
                    hex::encode(fp)
                ));
            }
        }
        for (fp, p) in fps {
            self.claims.entry(fp.clone()).or_insert((*p, 0)).1 += 1;
        }
        Ok(())
    }

    pub fn release(&mut self, fps: &HashMap<Vec<u8>, ContentProof>) {
        for fp in fps.keys() {
            if let Some(c) = self.claims.get_mut(fp) {
                c.1 -= 1;
                if c.1 == 0 {
                    self.claims.remove(fp);
                }
            }
        }
    }
}
