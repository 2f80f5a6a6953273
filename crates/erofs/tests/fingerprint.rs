//! Inode fingerprints for page-cache sharing (`inode_share`, Linux 7.0+):
//! shoal writes what mkfs.erofs 1.9.3 writes with `--xattr-inode-digest`,
//! so the kernel shares page cache between shoal's images and theirs, and
//! never writes a fingerprint that its content does not have.

use erofs::ondisk::*;
use erofs::{BuildOptions, Image};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Files of every shape a fingerprint must handle: empty, tiny, exactly a
/// block, several chunks, a sparse one with a hole chunk, two with equal
/// content (a shared xattr), a hard link, a symlink and xattrs of its own.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("empty", b"");
    w("small.txt", b"hello world\n");
    w("block", &[0u8; 4096]);
    w("lib/big.so", &pattern(2_500_000, 3));
    w("lib/copy-a", &pattern(70_000, 9));
    w("lib/copy-b", &pattern(70_000, 9));
    w("etc/conf", &pattern(1234, 5));
    let sparse = root.join("sparse");
    let f = File::create(&sparse).unwrap();
    f.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tail", (3 << 20) - 4).unwrap();
    std::fs::hard_link(root.join("etc/conf"), root.join("etc/conf.link")).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("link")).unwrap();
    xattr::set(root.join("small.txt"), "user.note", b"kept").unwrap();
}

const FILES: &[&str] = &[
    "empty",
    "small.txt",
    "block",
    "lib/big.so",
    "lib/copy-a",
    "lib/copy-b",
    "etc/conf",
    "etc/conf.link",
    "sparse",
];

fn fingerprints(image: &Path) -> (Image<File>, BTreeMap<String, Option<Vec<u8>>>) {
    let img = Image::open(File::open(image).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for f in FILES {
        let ino = img.lookup(f).unwrap();
        out.insert(f.to_string(), img.fingerprint(&ino).unwrap());
    }
    (img, out)
}

fn build(src: &Path, out: &Path, fingerprints: bool) -> PathBuf {
    let image = out.join("image.erofs");
    let opts = BuildOptions {
        chunk_size: 1 << 20,
        fingerprints,
        ..Default::default()
    };
    erofs::build(&[src.to_path_buf()], out, &image, &opts).unwrap();
    image
}

#[test]
fn every_non_empty_file_carries_the_sha256_of_its_content() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let image = build(&src, tmp.path(), true);
    let (img, fps) = fingerprints(&image);
    for f in FILES {
        let data = std::fs::read(src.join(f)).unwrap();
        let want = (!data.is_empty())
            .then(|| [EROFS_FINGERPRINT_SHA256, Sha256::digest(&data).as_slice()].concat());
        assert_eq!(fps[*f], want, "{f}");
    }
    let sb = &img.sb;
    assert_ne!(
        sb.feature_compat.get() & EROFS_FEATURE_COMPAT_ISHARE_XATTRS,
        0
    );
    assert_ne!(
        sb.feature_compat.get() & EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX,
        0
    );
    assert_ne!(
        sb.feature_incompat.get() & EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES,
        0
    );
    assert_eq!(
        img.xattr_prefixes,
        vec![erofs::reader::LongPrefix {
            base_index: 0,
            infix: EROFS_FINGERPRINT_XATTR.to_vec()
        }]
    );
    // The fingerprint has no namespace: it is not listed, as the kernel
    // does not list it; the file's own xattrs still are.
    let ino = img.lookup("small.txt").unwrap();
    let names: Vec<_> = img.xattrs(&ino).unwrap().into_iter().map(|x| x.0).collect();
    assert_eq!(names, vec![b"user.note".to_vec()]);
    // Deterministic: the same tree builds the same bytes.
    let again = tmp.path().join("again");
    std::fs::create_dir(&again).unwrap();
    let image2 = build(&src, &again, true);
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(&image2).unwrap()
    );
}

#[test]
fn fingerprints_can_be_turned_off() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let image = build(&src, tmp.path(), false);
    let (img, fps) = fingerprints(&image);
    assert!(fps.values().all(|v| v.is_none()), "{fps:?}");
    assert_eq!(
        img.sb.feature_compat.get() & EROFS_FEATURE_COMPAT_ISHARE_XATTRS,
        0
    );
    assert_eq!(
        img.sb.feature_incompat.get() & EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES,
        0
    );
}

/// erofs-utils 1.9.3 from `../shared/peers`, the release that writes
/// fingerprints; Debian's mkfs.erofs predates them.
fn peer_mkfs() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/peers/bin/mkfs.erofs");
    let ok = Command::new(&p)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--xattr-inode-digest"))
        .unwrap_or(false);
    ok.then_some(p)
}

#[test]
fn fingerprints_equal_mkfs_erofs_1_9_3() {
    let Some(mkfs) = peer_mkfs() else {
        println!("skipped: no mkfs.erofs 1.9.3 with --xattr-inode-digest in ../shared/peers");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let ours = build(&src, tmp.path(), true);
    let theirs = tmp.path().join("mkfs.erofs");
    let out = Command::new(&mkfs)
        .args(["--quiet", "--xattr-inode-digest", "--chunksize=1048576"])
        .arg(format!(
            "--blobdev={}",
            tmp.path().join("mkfs.blob").display()
        ))
        .arg(&theirs)
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (our_img, our_fps) = fingerprints(&ours);
    let (their_img, their_fps) = fingerprints(&theirs);
    assert_eq!(our_fps, their_fps);
    assert_eq!(our_img.xattr_prefixes, their_img.xattr_prefixes);
    let bits = EROFS_FEATURE_COMPAT_ISHARE_XATTRS | EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX;
    assert_eq!(our_img.sb.feature_compat.get() & bits, bits);
    assert_eq!(their_img.sb.feature_compat.get() & bits, bits);
    assert_eq!(
        our_img.sb.ishare_xattr_prefix_id,
        their_img.sb.ishare_xattr_prefix_id
    );
}

/// A prefix table that lies (a length beyond the kernel's bound, an ishare
/// id naming no prefix) is a corrupt superblock, named as such.
#[test]
fn hostile_prefix_tables_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let image = build(&src, tmp.path(), true);
    let good = std::fs::read(&image).unwrap();
    let img = Image::open(File::open(&image).unwrap()).unwrap();
    let start = img.sb.xattr_prefix_start.get() as usize * 4;
    let patch = |f: &dyn Fn(&mut Vec<u8>)| -> String {
        let mut bytes = good.clone();
        f(&mut bytes);
        bytes[1028..1032].fill(0);
        let sum = sb_checksum(&bytes[1024..4096]);
        bytes[1028..1032].copy_from_slice(&sum.to_le_bytes());
        let p = tmp.path().join("bad.erofs");
        std::fs::write(&p, &bytes).unwrap();
        match Image::open(File::open(&p).unwrap()) {
            Ok(_) => "opened".into(),
            Err(e) => e.to_string(),
        }
    };
    let long = patch(&|b| b[start..start + 2].copy_from_slice(&300u16.to_le_bytes()));
    assert!(long.contains("long xattr prefix 0: length 300"), "{long}");
    let id = patch(&|b| b[1024 + 0x69] = 3);
    assert!(id.contains("ishare xattr prefix id 3 of 1"), "{id}");
    let beyond = patch(&|b| {
        let at = (b.len() as u32 / 4 + 10).to_le_bytes();
        b[1024 + 0x5c..1024 + 0x60].copy_from_slice(&at);
    });
    assert!(beyond.contains("beyond the image end"), "{beyond}");
}
