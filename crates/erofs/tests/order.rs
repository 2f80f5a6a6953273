//! Blob layout follows read order: files in the kernel's directory order
//! (so a layer's blob depends on its content, not on its tar's entry
//! order), and the files of an `--order` list first, for the top layer
//! only (lower layers stay the blobs every image built on them shares).

use erofs::{BuildOptions, Image};
use std::path::Path;

fn layer(path: &Path, names: &[&str]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for n in names {
        let mut h = tar::Header::new_gnu();
        let body = format!("contents of {n}\n").repeat(300);
        h.set_size(body.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, n, body.as_bytes()).unwrap();
    }
    b.finish().unwrap();
}

/// File paths in the order their data sits in device `dev`'s blob.
fn blob_order(boot: &Path, dev: u16) -> Vec<String> {
    let img = Image::open(std::fs::File::open(boot).unwrap()).unwrap();
    let mut at = Vec::new();
    for p in ["a/x", "a/y", "b", "a-z", "c/d/e"] {
        if let Ok(ino) = img.lookup(&format!("/{p}")) {
            if let Ok(erofs::Mapping {
                extent: erofs::Extent::Chunk { device_id, blkaddr },
                ..
            }) = img.map(&ino, 0)
            {
                if device_id == dev {
                    at.push((blkaddr, p.to_string()));
                }
            }
        }
    }
    at.sort();
    at.into_iter().map(|(_, p)| p).collect()
}

fn build(layers: &[std::path::PathBuf], out: &Path, order: Option<&Path>) -> erofs::BuildReport {
    let opts = BuildOptions {
        layer_blobs: true,
        order: order.map(Path::to_path_buf),
        ..Default::default()
    };
    erofs::build(layers, &out.with_extension("blobs"), out, &opts).unwrap()
}

#[test]
fn blobs_follow_directory_order_whatever_the_tar_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one.tar"), tmp.path().join("two.tar"));
    layer(&one, &["c/d/e", "b", "a-z", "a/y", "a/x"]);
    layer(&two, &["a/x", "b", "a/y", "c/d/e", "a-z"]);
    let r1 = build(
        std::slice::from_ref(&one),
        &tmp.path().join("one.boot"),
        None,
    );
    let r2 = build(
        std::slice::from_ref(&two),
        &tmp.path().join("two.boot"),
        None,
    );
    assert_eq!(
        r1.blobs[0].tag, r2.blobs[0].tag,
        "the same layer content, one blob"
    );
    // Depth first, names bytewise: "a/..." before "a-z" ('/' is walked
    // as a directory first, as the kernel lists `a` before `a-z`).
    assert_eq!(
        blob_order(&tmp.path().join("one.boot"), 1),
        ["a/x", "a/y", "a-z", "b", "c/d/e"]
    );
}

#[test]
fn an_order_file_puts_its_files_first_in_the_top_layer_only() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (tmp.path().join("base.tar"), tmp.path().join("top.tar"));
    layer(&base, &["a/x", "a/y", "b"]);
    layer(&top, &["a-z", "c/d/e"]);
    let order = tmp.path().join("order");
    std::fs::write(&order, "# recorded\n/c/d/e\n/b\n/a-z\n").unwrap();
    let layers = [base.clone(), top.clone()];
    let plain = build(&layers, &tmp.path().join("plain.boot"), None);
    let ordered = build(&layers, &tmp.path().join("ordered.boot"), Some(&order));
    assert_eq!(
        plain.blobs[0].tag, ordered.blobs[0].tag,
        "the base layer's blob is the same with or without an order"
    );
    assert_ne!(plain.blobs[1].tag, ordered.blobs[1].tag);
    assert_eq!(
        blob_order(&tmp.path().join("plain.boot"), 2),
        ["a-z", "c/d/e"]
    );
    assert_eq!(
        blob_order(&tmp.path().join("ordered.boot"), 2),
        ["c/d/e", "a-z"]
    );
    // The blocks the ordered files use are recorded as each blob's start:
    // the top blob's is one run at its start, where they were laid out;
    // the base blob's is where the base keeps /b (not moved for it). A
    // build without an order records none.
    let start = |boot: &str, dev: u16| {
        let img = Image::open(std::fs::File::open(tmp.path().join(boot)).unwrap()).unwrap();
        let t = img.chunk_table.as_ref().unwrap();
        t.start(dev).map(|s| {
            s.ranges
                .iter()
                .map(|r| (r.blkaddr.get(), r.nblocks.get()))
                .collect::<Vec<_>>()
        })
    };
    let blocks = |n: &str| ((format!("contents of {n}\n").len() * 300).div_ceil(4096)) as u32;
    let img = Image::open(std::fs::File::open(tmp.path().join("ordered.boot")).unwrap()).unwrap();
    let b_at = match img.map(&img.lookup("/b").unwrap(), 0).unwrap().extent {
        erofs::Extent::Chunk { blkaddr, .. } => blkaddr,
        other => panic!("/b is {other:?}"),
    };
    assert_eq!(start("ordered.boot", 1), Some(vec![(b_at, blocks("b"))]));
    assert_eq!(
        start("ordered.boot", 2),
        Some(vec![(0, blocks("c/d/e") + blocks("a-z"))])
    );
    assert_eq!(
        (start("plain.boot", 1), start("plain.boot", 2)),
        (None, None)
    );
    // Every file still reads back right.
    let img = Image::open(std::fs::File::open(tmp.path().join("ordered.boot")).unwrap()).unwrap();
    let blobs = tmp.path().join("ordered.blobs");
    let files = erofs::BlobFiles(
        (1..=2)
            .map(|d| std::fs::File::open(blobs.join(img.device_tag(d).unwrap())).unwrap())
            .collect(),
    );
    for p in ["a/x", "a/y", "b", "a-z", "c/d/e"] {
        let ino = img.lookup(&format!("/{p}")).unwrap();
        let mut got = Vec::new();
        img.read_file(&ino, &files, &mut |b, n| {
            match b {
                Some(b) => got.extend_from_slice(b),
                None => got.resize(got.len() + n as usize, 0),
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(
            got,
            format!("contents of {p}\n").repeat(300).into_bytes(),
            "{p}"
        );
    }
    // A relative path is refused, naming the line.
    std::fs::write(&order, "/b\nrelative\n").unwrap();
    let err = erofs::build(
        &layers,
        &tmp.path().join("x.blobs"),
        &tmp.path().join("x.boot"),
        &BuildOptions {
            order: Some(order.clone()),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 2") && err.contains("absolute"), "{err}");
}
