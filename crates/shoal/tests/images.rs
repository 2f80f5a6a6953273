//! Synthetic trees through shoal and erofs-utils: every file type and
//! attribute survives a build and a kernel mount; builds are deterministic;
//! chunk reuse writes only new bytes; erofs-utils images are readable.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(cmd: &str, dir: &Path) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

fn set_mtime(p: &Path, sec: i64, nsec: u32) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// A tree with every file type and attribute the format must carry.
fn synthetic_tree(root: &Path, with_root_only: bool) {
    std::fs::create_dir_all(root.join("dir/empty")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("small"), b"hello\n").unwrap();
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::write(root.join("dir/big"), &big).unwrap();
    std::fs::write(root.join("dir/big-copy"), &big).unwrap(); // dedup
    std::fs::hard_link(root.join("small"), root.join("dir/small-link")).unwrap();
    std::os::unix::fs::symlink("../small", root.join("dir/sym")).unwrap();
    std::os::unix::fs::symlink("x".repeat(3000), root.join("longsym")).unwrap();
    std::fs::write(root.join("n".repeat(255)), b"long name").unwrap();
    // Names sorting before "." and "..": directories are sorted whole, so
    // the kernel's binary search (and the reader's order check) finds them.
    std::fs::write(root.join("!bang"), b"bang").unwrap();
    std::fs::write(root.join("-dash"), b"dash").unwrap();
    std::fs::create_dir(root.join("dir/ sp")).unwrap();
    // > 4 GiB sparse file with data in a few places: holes stay holes.
    let f = std::fs::File::create(root.join("huge")).unwrap();
    f.set_len(5 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"start", 0).unwrap();
    f.write_all_at(b"middle", 3_000_000_000).unwrap();
    f.write_all_at(b"end", (5 << 30) - 3).unwrap();
    // thousands of entries in one directory
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..3000 {
        std::fs::write(
            root.join(format!("many/entry-{i:05}-{}", "p".repeat(i % 40))),
            i.to_string(),
        )
        .unwrap();
    }
    std::fs::set_permissions(root.join("small"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(root.join("dir"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    sh("mkfifo fifo", root);
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    xattr::set(root.join("small"), "user.comment", b"a value").unwrap();
    xattr::set(root.join("dir/big"), "user.comment", b"a value").unwrap(); // shared
    xattr::set(root.join("empty"), "user.empty", b"").unwrap();
    if with_root_only {
        sh("mknod cdev c 1 3 && mknod bdev b 259 70000", root);
        sh(
            "setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= dir/big",
            root,
        );
        sh(
            "setfacl -m u:1000:rwx dir/empty && setfacl -d -m g:2000:r-x dir/empty",
            root,
        );
        sh("setfattr -n trusted.overlay.opaque -v y dir/empty", root);
        std::os::unix::fs::lchown(root.join("dir/big"), Some(100_000), Some(70_000)).unwrap();
        std::os::unix::fs::lchown(root.join("dir/sym"), Some(5), Some(6)).unwrap();
    }
    set_mtime(&root.join("small"), 1_600_000_000, 123_456_789);
    set_mtime(&root.join("dir/sym"), 1_500_000_000, 1);
    set_mtime(&root.join("longsym"), -5, 0);
    set_mtime(&root.join("dir"), 1_700_000_000, 999_999_999);
}

fn build(sources: &[&Path], out: &Path, blobs: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = os!["build", "-o"].to_vec();
    args.push(out.as_os_str());
    args.extend(os!["--blob-dir"]);
    args.push(blobs.as_os_str());
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.extend(sources.iter().map(|s| s.as_os_str()));
    run_shoal(&args)
}

#[test]
fn synthetic_tree_survives_kernel_mount_and_extract() {
    if let Some(why) = kernel_mount_unavailable() {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    synthetic_tree(&src, true);
    let (img, blobs) = (tmp.path().join("s.img"), tmp.path().join("blobs"));
    build(&[&src], &img, &blobs, &["--chunk-size", "65536"]);
    let mnt = tmp.path().join("mnt");
    let _m = mount(&img, &blobs, &mnt);
    let diffs = compare_trees(&src, &mnt);
    assert!(
        diffs.is_empty(),
        "mount differs from source:\n{}",
        diffs.join("\n")
    );
    // The sparse file's holes stay holes in the blob: it holds 3 chunks.
    let blob_bytes: u64 = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    // ~3 MiB of big (deduplicated), 3000 one-block files, 3 chunks of huge.
    assert!(blob_bytes < 16 << 20, "blobs hold {blob_bytes} bytes");
    let out = tmp.path().join("out");
    extract(&img, &blobs, &out);
    let diffs = compare_trees(&mnt, &out);
    assert!(
        diffs.is_empty(),
        "extract differs from mount:\n{}",
        diffs.join("\n")
    );
    let fsck = Command::new("fsck.erofs")
        .arg(format!(
            "--device={}",
            std::fs::read_dir(&blobs)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
                .display()
        ))
        .arg(&img)
        .output();
    if let Ok(o) = fsck {
        assert!(
            o.status.success(),
            "fsck.erofs: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn builds_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    synthetic_tree(&src, false);
    let mut outputs = Vec::new();
    for run in 0..2 {
        let (img, blobs) = (
            tmp.path().join(format!("{run}.img")),
            tmp.path().join(format!("blobs{run}")),
        );
        build(&[&src], &img, &blobs, &["--chunk-size", "65536"]);
        let mut names: Vec<_> = std::fs::read_dir(&blobs)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        outputs.push((std::fs::read(&img).unwrap(), names));
    }
    assert_eq!(outputs[0], outputs[1], "two builds of the same tree differ");
    // SOURCE_DATE_EPOCH sets the superblock time, nothing else changes.
    let img = tmp.path().join("sde.img");
    let out = shoal()
        .env("SOURCE_DATE_EPOCH", "1234567890")
        .args([
            std::ffi::OsStr::new("build"),
            "-o".as_ref(),
            img.as_os_str(),
            "--blob-dir".as_ref(),
        ])
        .arg(tmp.path().join("blobs0"))
        .args(["--chunk-size", "65536"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success());
    let json = run_shoal(&["inspect".as_ref(), img.as_os_str(), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["build_time"], 1234567890);
}

#[test]
fn reuse_and_layer_blobs_write_only_new_bytes() {
    let corpus = corpus_dir();
    if !corpus.join("base.tar.gz").exists() {
        return skip("no corpus");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (base, py): (PathBuf, PathBuf) =
        (corpus.join("base.tar.gz"), corpus.join("py-layer.tar.gz"));
    let blobs = tmp.path().join("blobs");
    let (a, b) = (tmp.path().join("a.img"), tmp.path().join("b.img"));
    let ra: serde_json::Value =
        serde_json::from_str(&build(&[&base], &a, &blobs, &["--json"])).unwrap();
    let rb: serde_json::Value = serde_json::from_str(&build(
        &[&base, &py],
        &b,
        &blobs,
        &["--json", "--reuse-blobs", a.to_str().unwrap()],
    ))
    .unwrap();
    // Everything of A is reused; B's new bytes are the python layer's alone.
    let written_b = rb["stats"]["bytes_written"].as_u64().unwrap();
    let base_bytes = ra["stats"]["bytes_written"].as_u64().unwrap();
    assert_eq!(rb["blobs"][0]["tag"], ra["blobs"][0]["tag"]);
    assert_eq!(rb["blobs"][0]["written"], false);
    let lb = tmp.path().join("layer-blobs");
    let rl: serde_json::Value = serde_json::from_str(&build(
        &[&base, &py],
        &tmp.path().join("l.img"),
        &lb,
        &["--json", "--layer-blobs"],
    ))
    .unwrap();
    let py_blob = rl["blobs"][1]["bytes"].as_u64().unwrap();
    assert!(
        written_b <= py_blob,
        "reuse wrote {written_b} bytes, the python layer blob alone is {py_blob}"
    );
    assert!(written_b < base_bytes / 2, "reuse wrote {written_b} bytes");
    // With --layer-blobs, base's blob is the same file whichever image.
    let rl2: serde_json::Value = serde_json::from_str(&build(
        &[&base],
        &tmp.path().join("l2.img"),
        &lb,
        &["--json", "--layer-blobs"],
    ))
    .unwrap();
    assert_eq!(rl2["blobs"][0]["tag"], rl["blobs"][0]["tag"]);
    for img in [&a, &b] {
        run_shoal(&[
            "verify".as_ref(),
            img.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
        ]);
    }
    // --reuse-blobs DIR: every bootstrap in the directory is a dictionary.
    let dict = tmp.path().join("dict");
    std::fs::create_dir(&dict).unwrap();
    std::fs::copy(&a, dict.join("a.img")).unwrap();
    std::fs::write(dict.join("not-an-image"), b"ignored").unwrap();
    let rd: serde_json::Value = serde_json::from_str(&build(
        &[&base, &py],
        &tmp.path().join("d.img"),
        &blobs,
        &["--json", "--reuse-blobs", dict.to_str().unwrap()],
    ))
    .unwrap();
    assert_eq!(rd["stats"]["bytes_written"], rb["stats"]["bytes_written"]);
}

fn mkfs_available() -> bool {
    Command::new("mkfs.erofs").arg("--help").output().is_ok()
}

#[test]
fn reads_erofs_utils_images() {
    if !mkfs_available() {
        return skip("mkfs.erofs not installed");
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    synthetic_tree(&src, rustix::process::geteuid().is_root());
    std::fs::remove_file(src.join("huge")).unwrap(); // keep mkfs quick
                                                     // erofs-utils 1.5 fails ("Could not format the device") on 255-byte names.
    std::fs::remove_file(src.join("n".repeat(255))).unwrap();
    let mk = |args: &[&str], name: &str| -> PathBuf {
        let img = tmp.path().join(name);
        let out = Command::new("mkfs.erofs")
            .args(args)
            .arg(&img)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mkfs.erofs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        img
    };
    let plain = mk(&[], "plain.img");
    let blob = tmp.path().join("mk.blob");
    let chunked = mk(
        &[
            "--chunksize=65536",
            &format!("--blobdev={}", blob.display()),
        ],
        "chunked.img",
    );
    for (img, dev) in [(&plain, None), (&chunked, Some(&blob))] {
        let out = tmp
            .path()
            .join(format!("x-{}", img.file_name().unwrap().to_str().unwrap()));
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["extract".as_ref(), img.as_os_str(), out.as_os_str()];
        let devarg;
        if let Some(d) = dev {
            devarg = format!("--device={}", d.display());
            args.push(devarg.as_ref());
        }
        run_shoal(&args);
        let diffs = compare_trees(&src, &out);
        let real: Vec<_> = diffs.iter().filter(|d| !d.contains("sock")).collect();
        assert!(
            real.is_empty(),
            "{}: extract differs from the source:\n{:?}",
            img.display(),
            real
        );
        run_shoal(&["ls".as_ref(), img.as_os_str(), "-R".as_ref()]);
    }
    // Compressed inodes: a clear error, not garbage.
    let lz4 = tmp.path().join("lz4.img");
    let out = Command::new("mkfs.erofs")
        .arg("-zlz4")
        .arg(&lz4)
        .arg(&src)
        .output()
        .unwrap();
    if out.status.success() {
        let out = shoal()
            .args(["cat".as_ref(), lz4.as_os_str(), "/dir/big".as_ref()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unsupported: compressed inode"), "{err}");
    } else {
        skip("mkfs.erofs has no lz4");
    }
}
