//! How a shoal image is laid out in a registry: an ordinary OCI image
//! manifest that containerd pulls, whose layers are the image's data blobs
//! (first, in device-slot order) and its EROFS bootstrap (last), with media
//! types under `application/vnd.oci.image.layer.` (containerd 1.6's
//! unpacker hands only those to a snapshotter) and a
//! `containerd.io/snapshot/shoal.layer` annotation on each (containerd
//! passes `containerd.io/snapshot/*` annotations to the snapshotter as
//! labels). Also reads the artifact layout `shoal push` wrote before
//! (artifactType `application/vnd.shoal.image.v1`, bootstrap first). See
//! docs/registry.md.

use crate::manifest::{Descriptor, Manifest, OCI_MANIFEST};
use crate::reference::Digest;

pub const BLOB_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.shoal.blob.v1";
pub const BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.shoal.bootstrap.v1";
/// The bootstrap layer as `shoal push` writes it: one zstd frame of the
/// bootstrap (EROFS metadata and the digest table shrink to about 40%: a
/// pull moves a megabyte less per corpus image). Its diff ID is the
/// bootstrap's own sha256. [`bootstrap_bytes`] reads either.
pub const BOOTSTRAP_ZSTD_MEDIA_TYPE: &str =
    "application/vnd.oci.image.layer.shoal.bootstrap.v1+zstd";
/// The zstd level of pushed bootstraps: pinned, so pushes are repeatable.
pub const BOOTSTRAP_ZSTD_LEVEL: i32 = 3;
/// Layer annotation (and snapshotter label): `blob` or `bootstrap`.
pub const LAYER_ANNOTATION: &str = "containerd.io/snapshot/shoal.layer";
/// Bootstrap annotation: the image's fsid, if it was built with one.
pub const FSID_ANNOTATION: &str = "containerd.io/snapshot/shoal.fsid";
/// Blob layer annotation of a compressed object: the tag (sha256 of the
/// uncompressed blob) it decompresses to. Informative: the bootstrap's
/// frame table is what readers trust.
pub const COMPRESSED_BLOB_ANNOTATION: &str = "dev.shoal.blob.uncompressed";
/// Manifest annotation naming the format version.
pub const FORMAT_ANNOTATION: &str = "dev.shoal.image.format";
pub const FORMAT_VERSION: &str = "1";

/// Bootstraps larger than this are refused before they are fetched
/// (bind by reference, chunk dictionaries, the snapshotter).
pub const MAX_BOOTSTRAP: u64 = 1 << 30;

/// The artifact layout of earlier `shoal push`es, still read.
pub const LEGACY_ARTIFACT_TYPE: &str = "application/vnd.shoal.image.v1";
pub const LEGACY_BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.shoal.bootstrap.v1";
pub const LEGACY_BLOB_MEDIA_TYPE: &str = "application/vnd.shoal.blob.v1";

/// A data blob layer: its digest is the device slot's tag.
pub fn blob_layer(digest: Digest, size: u64) -> Descriptor {
    let mut d = Descriptor::new(BLOB_MEDIA_TYPE, digest, size);
    d.annotations.insert(LAYER_ANNOTATION.into(), "blob".into());
    d
}

/// The bootstrap layer of a push: `digest` and `size` are the compressed
/// layer's ([`BOOTSTRAP_ZSTD_MEDIA_TYPE`]).
pub fn bootstrap_layer(digest: Digest, size: u64, fsid: Option<&str>) -> Descriptor {
    let mut d = Descriptor::new(BOOTSTRAP_ZSTD_MEDIA_TYPE, digest, size);
    d.annotations
        .insert(LAYER_ANNOTATION.into(), "bootstrap".into());
    if let Some(f) = fsid.filter(|f| !f.is_empty()) {
        d.annotations.insert(FSID_ANNOTATION.into(), f.into());
    }
    d
}

/// The image manifest: blobs, then the bootstrap.
pub fn image_manifest(
    config: Descriptor,
    blobs: Vec<Descriptor>,
    bootstrap: Descriptor,
) -> Manifest {
    let mut layers = blobs;
    layers.push(bootstrap);
    let mut annotations = std::collections::BTreeMap::new();
    annotations.insert(FORMAT_ANNOTATION.into(), FORMAT_VERSION.into());
    Manifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: None,
        config,
        layers,
        annotations,
    }
}

/// The bootstrap layer of a shoal image in either layout, or `None` when
/// the manifest is not a shoal image.
pub fn find_bootstrap(m: &Manifest) -> Option<&Descriptor> {
    let is_boot = |l: &&Descriptor| {
        [
            BOOTSTRAP_ZSTD_MEDIA_TYPE,
            BOOTSTRAP_MEDIA_TYPE,
            LEGACY_BOOTSTRAP_MEDIA_TYPE,
        ]
        .contains(&l.media_type.as_str())
    };
    let boots: Vec<&Descriptor> = m.layers.iter().filter(is_boot).collect();
    // Exactly one: two bootstraps would make the image ambiguous.
    match boots.as_slice() {
        [one] => Some(one),
        _ => None,
    }
}

/// Whether a layer is one of a shoal image's (blob or bootstrap).
pub fn is_shoal_layer(l: &Descriptor) -> bool {
    [
        BLOB_MEDIA_TYPE,
        BOOTSTRAP_ZSTD_MEDIA_TYPE,
        BOOTSTRAP_MEDIA_TYPE,
        LEGACY_BLOB_MEDIA_TYPE,
        LEGACY_BOOTSTRAP_MEDIA_TYPE,
    ]
    .contains(&l.media_type.as_str())
}

/// zstd's frame magic, which an EROFS image never starts with (its first
/// 1 KiB is left to boot loaders; mkfs.erofs and shoal write zeros).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// A bootstrap layer's bytes as the kernel reads them: decompressed when
/// the layer is zstd (as pushed now), else as they are (earlier pushes).
/// By content, not media type: the snapshotter only sees the digest. At
/// most [`MAX_BOOTSTRAP`] bytes come out, however small the layer.
pub fn bootstrap_bytes(layer: Vec<u8>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if !layer.starts_with(&ZSTD_MAGIC) {
        return Ok(layer);
    }
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(layer.as_slice())
        .and_then(|d| d.take(MAX_BOOTSTRAP + 1).read_to_end(&mut out))
        .map_err(|e| format!("the zstd bootstrap layer does not decompress: {e}"))?;
    if out.len() as u64 > MAX_BOOTSTRAP {
        return Err(format!(
            "the zstd bootstrap layer decompresses to more than {MAX_BOOTSTRAP} bytes"
        ));
    }
    Ok(out)
}

/// The layer `shoal push` uploads for a bootstrap.
pub fn compress_bootstrap(bootstrap: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(bootstrap, BOOTSTRAP_ZSTD_LEVEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let cfg = Descriptor::new(crate::manifest::OCI_CONFIG, Digest::of(b"c"), 1);
        let m = image_manifest(
            cfg,
            vec![blob_layer(Digest::of(b"b"), 4096)],
            bootstrap_layer(Digest::of(b"boot"), 8192, Some("app")),
        );
        assert_eq!(find_bootstrap(&m).unwrap().size, 8192);
        assert!(m
            .layers
            .iter()
            .all(|l| l.media_type.starts_with("application/vnd.oci.image.layer.")));
        assert_eq!(m.layers[1].annotations[FSID_ANNOTATION], "app");
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["layers"][0]["annotations"][LAYER_ANNOTATION], "blob");
        // What `shoal push` wrote before: an artifact, bootstrap first.
        let (b, c) = (Digest::of(b"boot"), Digest::of(b"{}"));
        let legacy = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","artifactType":"{LEGACY_ARTIFACT_TYPE}","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{c}","size":2}},"layers":[{{"mediaType":"{LEGACY_BOOTSTRAP_MEDIA_TYPE}","digest":"{b}","size":4}},{{"mediaType":"{LEGACY_BLOB_MEDIA_TYPE}","digest":"{}","size":4096}}]}}"#,
            Digest::of(b"blob")
        );
        let crate::manifest::ManifestKind::Image(old) =
            crate::manifest::ManifestKind::parse(legacy.as_bytes(), None).unwrap()
        else {
            panic!("not an image manifest")
        };
        assert_eq!(find_bootstrap(&old).unwrap().digest, b);
        assert!(old.layers.iter().all(is_shoal_layer));
        let mut two = m.clone();
        two.layers.push(two.layers[1].clone());
        assert!(find_bootstrap(&two).is_none());
    }

    #[test]
    fn bootstrap_layers_plain_and_zstd() {
        let boot: Vec<u8> = std::iter::repeat_n(0u8, 1024)
            .chain((0..50_000u32).map(|i| (i % 251) as u8))
            .collect();
        assert_eq!(bootstrap_bytes(boot.clone()).unwrap(), boot);
        let z = compress_bootstrap(&boot).unwrap();
        assert!(z.len() < boot.len() / 4);
        assert_eq!(bootstrap_bytes(z.clone()).unwrap(), boot);
        let mut cut = z.clone();
        cut.truncate(z.len() / 2);
        assert!(bootstrap_bytes(cut)
            .unwrap_err()
            .contains("does not decompress"));
    }
}
