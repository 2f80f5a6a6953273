//! Determinism pinned byte for byte: a fixed tar layer (names, modes,
//! owners, times, xattrs, a hard link, a symlink, a sparse-looking zero
//! run) must build the same bootstrap and blob on every machine and in
//! every release. A change to these digests is a format change: say so in
//! docs/format.md and update them deliberately.

use erofs::BuildOptions;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The layer, written with explicit metadata so nothing depends on the
/// machine (umask, uid, clock, file system order).
fn golden_layer(path: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    };
    add("etc/", tar::EntryType::Directory, 0o755, b"", None);
    add(
        "etc/os-release",
        tar::EntryType::Regular,
        0o644,
        b"ID=golden\n",
        None,
    );
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    add(
        "usr/lib/libbig.so",
        tar::EntryType::Regular,
        0o755,
        &big,
        None,
    );
    add(
        "usr/lib/zeros",
        tar::EntryType::Regular,
        0o644,
        &vec![0u8; 2 << 20],
        None,
    );
    add("usr/lib/empty", tar::EntryType::Regular, 0o600, b"", None);
    add(
        "usr/lib/link",
        tar::EntryType::Link,
        0o755,
        b"",
        Some("usr/lib/libbig.so"),
    );
    add(
        "usr/bin/sh",
        tar::EntryType::Symlink,
        0o777,
        b"",
        Some("../lib/libbig.so"),
    );
    b.finish().unwrap();
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn golden_bootstrap_and_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer.tar");
    golden_layer(&layer);
    let (out, blobs) = (tmp.path().join("golden.boot"), tmp.path().join("blobs"));
    let opts = BuildOptions {
        chunk_size: 1 << 20,
        fsid: Some("golden".into()),
        source_date_epoch: Some(1_700_000_000),
        ..Default::default()
    };
    let report = erofs::build(&[layer], &blobs, &out, &opts).unwrap();
    let blob_tags: Vec<&str> = report.blobs.iter().map(|b| b.tag.as_str()).collect();
    println!("bootstrap {} blobs {blob_tags:?}", sha(&out));
    assert_eq!(sha(&out), GOLDEN_BOOTSTRAP, "the bootstrap's bytes changed");
    assert_eq!(blob_tags, vec![GOLDEN_BLOB], "the blob's bytes changed");
}

/// The same layer with zstd frames: the blob is unchanged, the object and
/// the bootstrap (with its frame table) are pinned too, so that a zstd
/// upgrade that changes its output is noticed (it would republish every
/// object) rather than found in a registry.
#[test]
fn golden_compressed_object() {
    let tmp = tempfile::tempdir().unwrap();
    let layer = tmp.path().join("layer.tar");
    golden_layer(&layer);
    let (out, blobs) = (tmp.path().join("golden.boot"), tmp.path().join("blobs"));
    let opts = BuildOptions {
        chunk_size: 1 << 20,
        fsid: Some("golden".into()),
        source_date_epoch: Some(1_700_000_000),
        compress: erofs::Compression::ZSTD,
        threads: 3,
        ..Default::default()
    };
    let report = erofs::build(&[layer], &blobs, &out, &opts).unwrap();
    assert_eq!(report.blobs[0].tag, GOLDEN_BLOB);
    let objects: Vec<&str> = report.objects.iter().map(|o| o.object.as_str()).collect();
    println!("bootstrap {} objects {objects:?}", sha(&out));
    assert_eq!(objects, vec![GOLDEN_OBJECT], "the object's bytes changed");
    assert_eq!(sha(&blobs.join(GOLDEN_OBJECT)), GOLDEN_OBJECT);
    assert_eq!(
        sha(&out),
        GOLDEN_ZSTD_BOOTSTRAP,
        "the bootstrap's bytes changed"
    );
}

const GOLDEN_OBJECT: &str = "39b662c13be1ebac46f52a1085679b013c223852d1410c3ff61ac24ed5dea3c4";
const GOLDEN_ZSTD_BOOTSTRAP: &str =
    "917e24736c57e72660fc5c1ca2649786bf1a070de2458efeb51f35d78d4c9635";
const GOLDEN_BOOTSTRAP: &str = "c1f0ad12d5f48eb615ad7177317c96d9077877cfadf314c42b5759653b797f98";
const GOLDEN_BLOB: &str = "cdf2f8b44ce301ecea7262f4e86859bdfd866a0254432054dbbd597f9a471595";
