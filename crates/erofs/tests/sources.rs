//! A layer's image is a function of its content, not of how it arrives:
//! a directory and GNU tar's archives of it (entries in the disk's order,
//! or sorted by name) build the same bootstrap and blob, over files of
//! every shape: small ones, multi-chunk ones with an all-zero chunk,
//! sparse ones, hard links, and chunks two files share (laid out for the
//! file a walk meets first, whichever the tar lists first).

use erofs::{BuildOptions, Image};
use std::path::Path;
use std::process::Command;

fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    for i in 0..300u32 {
        let body = noise((i as usize * 977) % 20_000 + 1, i);
        w(&format!("small/{:02}/{i}", i % 17), &body);
    }
    w("empty", b"");
    // Three chunks, the middle one all zero (a hole).
    let mut holed = noise(1 << 20, 1);
    holed.extend(vec![0u8; 1 << 20]);
    holed.extend(noise(1_500_000, 2));
    w("lib/holed.so", &holed);
    // A chunk two files share, the larger one met last by a walk.
    let head = noise(1 << 20, 3);
    w("lib/head", &head);
    let mut large = head.clone();
    large.extend(noise(9 << 20, 4));
    w("var/large.bin", &large);
    w("lib/dup-a", &noise(70_000, 5));
    w("lib/dup-b", &noise(70_000, 5));
    let sparse = root.join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(3 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"tail", (3 << 20) - 4).unwrap();
    std::fs::hard_link(root.join("lib/dup-a"), root.join("lib/dup-a.link")).unwrap();
    std::os::unix::fs::symlink("lib/head", root.join("link")).unwrap();
    // Whole seconds: tar's headers keep no more.
    let st = Command::new("find")
        .arg(root)
        .args(["-exec", "touch", "-h", "-d", "@1700000000", "{}", "+"])
        .status()
        .unwrap();
    assert!(st.success());
}

fn build(src: &Path, dir: &Path, threads: usize) -> (Vec<u8>, erofs::BuildReport) {
    let out = dir.join("image.boot");
    let opts = BuildOptions {
        threads,
        source_date_epoch: Some(1_700_000_000),
        ..Default::default()
    };
    let report = erofs::build(&[src.to_path_buf()], &dir.join("blobs"), &out, &opts).unwrap();
    (std::fs::read(&out).unwrap(), report)
}

fn tar_of(src: &Path, tar: &Path, sort: &str) {
    let st = Command::new("tar")
        .args(["--sparse", "--numeric-owner", sort, "-C"])
        .arg(src)
        .arg("-cf")
        .arg(tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn a_directory_and_its_tars_build_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let (dir_img, r1) = build(&src, &tmp.path().join("dir"), 2);
    assert!(r1.stats.chunks_deduped >= 2, "{:?}", r1.stats);
    assert!(r1.stats.holes >= 3, "{:?}", r1.stats);
    for sort in ["--sort=none", "--sort=name", "--sort=inode"] {
        let tar = tmp.path().join("layer.tar");
        tar_of(&src, &tar, sort);
        let (img, r) = build(&tar, &tmp.path().join(&sort[7..]), 1);
        assert_eq!(r.blobs[0].tag, r1.blobs[0].tag, "tar {sort}: same blob");
        assert!(img == dir_img, "tar {sort} builds another bootstrap");
    }

    // Every file reads back.
    let dir = tmp.path().join("dir");
    let img = Image::open(std::fs::File::open(dir.join("image.boot")).unwrap()).unwrap();
    let blobs = erofs::BlobFiles(vec![std::fs::File::open(
        dir.join("blobs").join(&r1.blobs[0].tag),
    )
    .unwrap()]);
    for f in [
        "lib/holed.so",
        "var/large.bin",
        "lib/dup-a.link",
        "sparse",
        "small/03/3",
    ] {
        let ino = img.lookup(&format!("/{f}")).unwrap();
        let mut got = Vec::new();
        img.read_file(&ino, &blobs, &mut |b, n| {
            match b {
                Some(b) => got.extend_from_slice(b),
                None => got.resize(got.len() + n as usize, 0),
            }
            Ok(())
        })
        .unwrap();
        assert!(got == std::fs::read(src.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn a_chunk_an_upper_layer_shares_leaves_the_lower_blob_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (tmp.path().join("base"), tmp.path().join("top"));
    for (i, name) in ["usr/lib/a", "usr/lib/b", "usr/lib/c"].iter().enumerate() {
        let p = base.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, noise(300_000, i as u32)).unwrap();
    }
    // The top layer has a copy of the base's last file, listed first in
    // its order, and a walk meets it before the base's copy.
    std::fs::create_dir_all(top.join("a")).unwrap();
    std::fs::write(top.join("a/c"), noise(300_000, 2)).unwrap();
    std::fs::write(top.join("a/own"), noise(50_000, 9)).unwrap();
    let order = tmp.path().join("order");
    std::fs::write(&order, "/a/c\n/a/own\n").unwrap();
    let build = |layers: &[std::path::PathBuf], name: &str, order: Option<&Path>| {
        let opts = BuildOptions {
            layer_blobs: true,
            order: order.map(Path::to_path_buf),
            ..Default::default()
        };
        let out = tmp.path().join(name);
        erofs::build(layers, &out.with_extension("blobs"), &out, &opts).unwrap()
    };
    let alone = build(std::slice::from_ref(&base), "alone.boot", None);
    let both = build(&[base.clone(), top.clone()], "both.boot", Some(&order));
    assert_eq!(both.blobs[0].tag, alone.blobs[0].tag, "the base blob moved");
    assert_eq!(both.blobs.len(), 2);
}
