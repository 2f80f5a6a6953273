//! Compressed remote objects: the frame table round-trips, every frame
//! decompresses to exactly its blocks of the blob, builds are reproducible
//! whatever the thread count, reuse keeps a blob's object, and hostile
//! frame tables are refused with a reason.

use erofs::chunktable::{Trailer, TRAILER_SIZE};
use erofs::frames::{FrameEntry, FRAMES_MAGIC};
use erofs::{BuildOptions, Compression, Image};
use sha2::{Digest, Sha256};
use std::path::Path;
use zerocopy::{FromBytes, IntoBytes};

/// A tree of many small files (batched into frames) and a few big ones
/// (a frame per chunk), some compressible and some not.
fn tree(root: &Path, seed: u32) {
    std::fs::create_dir_all(root.join("small")).unwrap();
    for i in 0..300u32 {
        let body = format!("file {i} of seed {seed}\n").repeat((i % 40 + 1) as usize);
        std::fs::write(root.join(format!("small/{i:03}")), body).unwrap();
    }
    let mut x = 0x9e37_79b9u32 ^ seed;
    let noise: Vec<u8> = (0..3_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(root.join("noise.bin"), &noise).unwrap();
    let text: Vec<u8> = (0..2_200_000u32)
        .map(|i| b"abcdefgh\n"[(i % 9) as usize])
        .collect();
    std::fs::write(root.join("text.txt"), text).unwrap();
}

fn build(src: &Path, blobs: &Path, out: &Path, threads: usize) -> erofs::BuildReport {
    let opts = BuildOptions {
        compress: Compression::Zstd { level: 3 },
        threads,
        source_date_epoch: Some(1_700_000_000),
        ..Default::default()
    };
    erofs::build(&[src.to_path_buf()], blobs, out, &opts).unwrap()
}

#[test]
fn frames_decompress_to_the_blob_and_builds_reproduce() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, 1);
    let (blobs, out) = (tmp.path().join("blobs"), tmp.path().join("a.boot"));
    let report = build(&src, &blobs, &out, 1);
    assert_eq!(report.objects.len(), 1);
    let img = Image::open(std::fs::File::open(&out).unwrap()).unwrap();
    let table = img.chunk_table.as_ref().unwrap();
    let f = table.frames(1).expect("device 1 has frames");
    let blob = std::fs::read(blobs.join(img.device_tag(1).unwrap())).unwrap();
    let object = std::fs::read(blobs.join(f.object_name())).unwrap();
    assert_eq!(object.len() as u64, f.object_size);
    assert_eq!(Sha256::digest(&object).as_slice(), f.object_sha256);
    assert!(
        object.len() < blob.len() * 3 / 4,
        "compression pays: {} of {}",
        object.len(),
        blob.len()
    );
    // Small files are batched; big chunks stay whole.
    assert!(f.frames.len() < 20, "{} frames", f.frames.len());
    for fr in &f.frames {
        let c = &object[fr.coffset.get() as usize..fr.coffset_end() as usize];
        let raw = f.decompress(fr, c).unwrap();
        let at = fr.blkaddr.get() as usize * 4096;
        assert!(
            raw == blob[at..at + raw.len()],
            "frame at {}",
            fr.blkaddr.get()
        );
    }
    // Every chunk lies in one frame.
    for e in table.entries(1).unwrap() {
        let a = f.frame_of(e.blkaddr.get());
        assert_eq!(a, f.frame_of(e.blkaddr.get() + e.nblocks.get() - 1));
    }
    // Reproducible, whatever the number of threads.
    let (blobs2, out2) = (tmp.path().join("blobs2"), tmp.path().join("b.boot"));
    let again = build(&src, &blobs2, &out2, 4);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(again.objects[0].object, report.objects[0].object);
    // Without compression: no table section, no object, same blob.
    let (blobs3, out3) = (tmp.path().join("blobs3"), tmp.path().join("c.boot"));
    let plain = erofs::build(
        std::slice::from_ref(&src),
        &blobs3,
        &out3,
        &BuildOptions {
            source_date_epoch: Some(1_700_000_000),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(plain.objects.is_empty());
    assert_eq!(plain.blobs[0].tag, report.blobs[0].tag);
    let img3 = Image::open(std::fs::File::open(&out3).unwrap()).unwrap();
    assert!(img3.chunk_table.unwrap().frames.is_empty());
    assert_eq!(std::fs::read_dir(&blobs3).unwrap().count(), 1);
}

#[test]
fn reused_blobs_keep_their_object() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (tmp.path().join("base"), tmp.path().join("top"));
    tree(&base, 1);
    std::fs::create_dir_all(&top).unwrap();
    std::fs::write(top.join("new"), b"a file of the upper layer").unwrap();
    let blobs = tmp.path().join("blobs");
    let a = build(&base, &blobs, &tmp.path().join("a.boot"), 2);
    let opts = BuildOptions {
        compress: Compression::Zstd { level: 3 },
        reuse: vec![tmp.path().join("a.boot")],
        layer_blobs: true,
        ..Default::default()
    };
    let b = erofs::build(
        &[base.clone(), top.clone()],
        &tmp.path().join("blobs-b"),
        &tmp.path().join("b.boot"),
        &opts,
    )
    .unwrap();
    let reused = b
        .objects
        .iter()
        .find(|o| !o.written)
        .expect("a reused object");
    assert_eq!(reused.object, a.objects[0].object);
    assert_eq!(reused.tag, a.objects[0].tag);
}

/// Text of words drawn from a small vocabulary: compressible, and more so
/// at a higher level (unlike a repeated line, which every level flattens).
fn words(seed: u32, len: usize) -> Vec<u8> {
    const VOCAB: [&str; 12] = [
        "erofs ", "chunk ", "blob ", "domain ", "fsid ", "cookie ", "frame ", "lazy ", "start\n",
        "kernel ", "cache ", "device ",
    ];
    let mut x = 0x2545_f491u32 ^ seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(VOCAB[(x % 12) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn recorded_start_frames_take_the_start_level_and_lower_layers_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, top) = (tmp.path().join("base"), tmp.path().join("top"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(top.join("app")).unwrap();
    for i in 0..3u32 {
        std::fs::write(base.join(format!("lib{i}")), words(i, 900_000)).unwrap();
        std::fs::write(top.join(format!("app/{i}")), words(10 + i, 900_000)).unwrap();
    }
    // The start reads a top file and a base file.
    let order = tmp.path().join("order");
    std::fs::write(&order, "/app/2\n/lib1\n").unwrap();
    let build = |name: &str, start_level: i32| {
        let out = tmp.path().join(format!("{name}.boot"));
        let opts = BuildOptions {
            compress: Compression::Zstd { level: 1 },
            layer_blobs: true,
            order: Some(order.clone()),
            start_level,
            source_date_epoch: Some(1_700_000_000),
            ..Default::default()
        };
        let blobs = tmp.path().join(format!("{name}.blobs"));
        erofs::build(&[base.clone(), top.clone()], &blobs, &out, &opts).unwrap();
        (
            Image::open(std::fs::File::open(&out).unwrap()).unwrap(),
            blobs,
        )
    };
    let (hot, hot_blobs) = build("hot", 19);
    let (flat, flat_blobs) = build("flat", 1);
    let (ht, ft) = (
        hot.chunk_table.as_ref().unwrap(),
        flat.chunk_table.as_ref().unwrap(),
    );
    // The base layer's object is the same bytes whatever the start level:
    // images built on it share it.
    assert_eq!(hot.device_tag(1), flat.device_tag(1));
    assert_eq!(
        ht.frames(1).unwrap().object_name(),
        ft.frames(1).unwrap().object_name()
    );
    // The top layer: frames holding start blocks are compressed at 19,
    // the others at 1, byte for byte.
    let start = ht
        .starts
        .iter()
        .find(|s| s.device_id == 2)
        .expect("top start");
    let f = ht.frames(2).unwrap();
    let blob = std::fs::read(hot_blobs.join(hot.device_tag(2).unwrap())).unwrap();
    let object = std::fs::read(hot_blobs.join(f.object_name())).unwrap();
    let (mut hot_frames, mut cold_frames) = (0, 0);
    for fr in &f.frames {
        let (b, e) = (fr.blkaddr.get(), fr.blkaddr.get() + fr.nblocks.get());
        let in_start = start
            .ranges
            .iter()
            .any(|r| r.blkaddr.get() < e && u64::from(b) < r.end());
        let raw = &blob[b as usize * 4096..e as usize * 4096];
        let level = if in_start { 19 } else { 1 };
        let got = &object[fr.coffset.get() as usize..fr.coffset_end() as usize];
        assert_eq!(
            got,
            erofs::frames::compress_frame(level, raw).unwrap(),
            "frame at {b}"
        );
        if in_start {
            hot_frames += 1;
            assert!(got.len() < erofs::frames::compress_frame(1, raw).unwrap().len());
        } else {
            cold_frames += 1;
        }
    }
    assert!(
        hot_frames > 0 && cold_frames > 0,
        "{hot_frames} hot, {cold_frames} cold"
    );
    // Same blob for the kernel either way; only the remote object differs.
    assert_eq!(hot.device_tag(2), flat.device_tag(2));
    let flat_object = flat_blobs.join(ft.frames(2).unwrap().object_name());
    assert!(object.len() < std::fs::metadata(flat_object).unwrap().len() as usize);
}

/// Replace the frame section of a compressed bootstrap with `edit`'s
/// result and re-seal the table digest (as a hostile builder would).
fn tamper(boot: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let t = Trailer::read_from_bytes(&boot[boot.len() - TRAILER_SIZE as usize..]).unwrap();
    let (off, len) = (t.table_offset.get() as usize, t.table_len.get() as usize);
    let mut table = boot[off..off + len].to_vec();
    let at = table
        .windows(8)
        .position(|w| w == FRAMES_MAGIC)
        .expect("a frame section");
    let mut frames = table.split_off(at);
    edit(&mut frames);
    table.extend_from_slice(&frames);
    let mut out = boot[..off].to_vec();
    out.extend_from_slice(&table);
    let t = Trailer {
        table_len: (table.len() as u64).into(),
        table_sha256: Sha256::digest(&table).into(),
        ..t
    };
    out.extend_from_slice(t.as_bytes());
    out
}

const HEADER: usize = 16;
const BLOB_HEADER: usize = 48;
const FRAME: usize = size_of::<FrameEntry>();

fn frame_mut(frames: &mut [u8], i: usize) -> &mut FrameEntry {
    let at = HEADER + BLOB_HEADER + i * FRAME;
    FrameEntry::mut_from_bytes(&mut frames[at..at + FRAME]).unwrap()
}

#[test]
fn hostile_frame_tables_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, 2);
    let out = tmp.path().join("a.boot");
    build(&src, &tmp.path().join("blobs"), &out, 2);
    let boot = std::fs::read(&out).unwrap();
    // Untampered, re-sealed: still fine.
    Image::open(tamper(&boot, |_| {}).as_slice()).unwrap();
    type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "a gap between frames",
            Box::new(|f| {
                let e = frame_mut(f, 1);
                e.blkaddr = (e.blkaddr.get() + 1).into();
            }),
        ),
        (
            "bytes that do not continue",
            Box::new(|f| {
                let e = frame_mut(f, 1);
                e.coffset = (e.coffset.get() + 1).into();
            }),
        ),
        (
            "past the object",
            Box::new(|f| {
                // object_size at header + 8
                let at = HEADER + 8;
                let size = u64::from_le_bytes(f[at..at + 8].try_into().unwrap());
                f[at..at + 8].copy_from_slice(&(size - 1).to_le_bytes());
            }),
        ),
        (
            "an empty frame",
            Box::new(|f| frame_mut(f, 0).nblocks = 0.into()),
        ),
        (
            "a zero-length frame",
            Box::new(|f| frame_mut(f, 0).clen = 0.into()),
        ),
        (
            "a frame bigger than any chunk",
            Box::new(|f| frame_mut(f, 0).nblocks = u32::MAX.into()),
        ),
        ("an unknown algorithm", Box::new(|f| f[HEADER + 2] = 9)),
        ("an unknown device", Box::new(|f| f[HEADER] = 7)),
        (
            "a frame count past the table",
            Box::new(|f| f[HEADER + 4..HEADER + 8].copy_from_slice(&u32::MAX.to_le_bytes())),
        ),
        ("trailing bytes", Box::new(|f| f.push(0))),
        ("a truncated section", Box::new(|f| f.truncate(HEADER + 10))),
    ];
    for (what, edit) in cases {
        match Image::open(tamper(&boot, edit).as_slice()) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("frame table"), "{what}: {msg}");
            }
        }
    }
}
