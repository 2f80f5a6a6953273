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

pub fn bootstrap_layer(digest: Digest, size: u64, fsid: Option<&str>) -> Descriptor {
    let mut d = Descriptor::new(BOOTSTRAP_MEDIA_TYPE, digest, size);
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
        l.media_type == BOOTSTRAP_MEDIA_TYPE || l.media_type == LEGACY_BOOTSTRAP_MEDIA_TYPE
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
        BOOTSTRAP_MEDIA_TYPE,
        LEGACY_BLOB_MEDIA_TYPE,
        LEGACY_BOOTSTRAP_MEDIA_TYPE,
    ]
    .contains(&l.media_type.as_str())
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
}
