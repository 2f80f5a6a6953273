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
    let blob_bytes = dir_bytes(&blobs);
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
    // fsck.erofs 1.9.3 (../shared/peers) knows the fingerprints' long xattr
    // prefixes; Debian's 1.5 predates them and checks an image without.
    let peer = peer_fsck_erofs();
    let img = if peer.is_some() {
        img
    } else {
        let plain = tmp.path().join("plain.img");
        build(
            &[&src],
            &plain,
            &blobs,
            &["--chunk-size", "65536", "--no-fingerprints"],
        );
        plain
    };
    let fsck_bin = peer.unwrap_or_else(|| "fsck.erofs".into());
    let fsck = Command::new(&fsck_bin)
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

/// `shoal extract IMG OUT --blob-dir BLOBS`, expected to fail: its stderr.
fn extract_fails(img: &Path, blobs: &Path, out: &Path) -> String {
    let o = shoal()
        .args(["extract".as_ref(), img.as_os_str(), out.as_os_str()])
        .arg("--blob-dir")
        .arg(blobs)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "extract into {} succeeded",
        out.display()
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Rename the root directory's entry `from` to `to` (same length) in
/// place, resealing the superblock checksum: a hostile image no builder
/// writes.
fn rename_root_entry(path: &Path, from: &[u8], to: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let img = erofs::Image::open(bytes.clone()).unwrap();
    let root = img.inode(img.root_nid()).unwrap();
    assert!(root.size <= 4096, "root directory fits one block");
    let erofs::Extent::Image { offset } = img.map(&root, 0).unwrap().extent else {
        panic!("root directory data not in the image")
    };
    let entries = img.read_dir(&root).unwrap();
    let k = entries.iter().position(|e| e.name == from).unwrap();
    let de = offset as usize + 12 * k;
    let name = offset as usize + u16::from_le_bytes([bytes[de + 8], bytes[de + 9]]) as usize;
    assert_eq!(&bytes[name..name + from.len()], from);
    bytes[name..name + to.len()].copy_from_slice(to);
    bytes[1028..1032].fill(0);
    let c = erofs::ondisk::sb_checksum(&bytes[1024..4096]);
    bytes[1028..1032].copy_from_slice(&c.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn extract_never_follows_symlinks_out_of_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(outside.join("victim"), b"keep").unwrap();
    let untouched = |what: &str| {
        assert!(!outside.join("passwd").exists(), "{what}: wrote outside");
        assert_eq!(mode_of(&outside), 0o755, "{what}: chmod outside");
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep");
    };
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::set_permissions(src.join("sub"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(src.join("sub/passwd"), b"root::0:0::/:/bin/sh\n").unwrap();
    std::fs::write(src.join("top"), b"overwritten").unwrap();
    let (img, blobs) = (tmp.path().join("i.img"), tmp.path().join("blobs"));
    build(&[&src], &img, &blobs, &[]);
    // The destination already holds symlinks where the image has a
    // directory and a file.
    let d1 = tmp.path().join("d1");
    std::fs::create_dir(&d1).unwrap();
    std::os::unix::fs::symlink(&outside, d1.join("sub")).unwrap();
    let err = extract_fails(&img, &blobs, &d1);
    assert!(err.contains("/sub exists and is not a directory"), "{err}");
    untouched("symlink for a directory");
    let d2 = tmp.path().join("d2");
    std::fs::create_dir_all(d2.join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.join("victim"), d2.join("top")).unwrap();
    let err = extract_fails(&img, &blobs, &d2);
    assert!(
        err.contains("extracting /top") && err.contains("File exists"),
        "{err}"
    );
    untouched("symlink for a file");
    // A hostile image: a symlink `sub -> OUTSIDE` and a directory `sub`
    // (built as "sua", renamed): refused whole.
    std::fs::rename(src.join("sub"), src.join("sua")).unwrap();
    std::os::unix::fs::symlink(&outside, src.join("sub")).unwrap();
    build(&[&src], &img, &blobs, &[]);
    rename_root_entry(&img, b"sua", b"sub");
    let err = extract_fails(&img, &blobs, &tmp.path().join("d3"));
    assert!(err.contains(r#"duplicate directory entry "sub""#), "{err}");
    untouched("duplicate names");
}

/// A tar (PAX, so names of any length) of `depth` nested directories with
/// ~20-byte names (a path well past PATH_MAX), a file at the bottom and
/// hard links between the top and the bottom, each seen first where its
/// directory is no longer open.
fn deep_tar(path: &Path, depth: usize) {
    let py = r#"
import sys, tarfile, io
out, depth = sys.argv[1], int(sys.argv[2])
t = tarfile.open(out, 'w', format=tarfile.PAX_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b'', mode=0o644, mtime=1000, link=''):
    i = tarfile.TarInfo(name); i.type = kind; i.mode = mode; i.mtime = mtime
    i.size = len(data); i.linkname = link
    t.addfile(i, io.BytesIO(data) if data else None)
path = ''
for k in range(depth):
    path += ('/' if path else '') + 'level-%04d-xxxxxxxxxx' % k
    add(path, tarfile.DIRTYPE, mode=0o750 if k % 2 else 0o755, mtime=2000 + k)
add(path + '/leaf', data=b'deep leaf')
add('top', data=b'top file')
add(path + '/link-to-top', tarfile.LNKTYPE, link='top')
add('link-to-leaf', tarfile.LNKTYPE, link=path + '/leaf')
t.close()
"#;
    let st = Command::new("/usr/bin/python3")
        .args(["-c", py])
        .arg(path)
        .arg(depth.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn extract_deep_tree_by_fds() {
    use rustix::fs::{openat, Mode, OFlags};
    let tmp = tempfile::tempdir().unwrap();
    let depth = 600;
    let tar = tmp.path().join("deep.tar");
    deep_tar(&tar, depth);
    let (img, blobs) = (tmp.path().join("d.img"), tmp.path().join("blobs"));
    build(&[&tar], &img, &blobs, &[]);
    let out = tmp.path().join("out");
    // 600 levels under a limit of 100 fds: only a bounded chain is open.
    let o = Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 100 && exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args(["extract".as_ref(), img.as_os_str(), out.as_os_str()])
        .arg("--blob-dir")
        .arg(&blobs)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "extract: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Walk down by fds (the path is too long for any path-based call).
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
    let mut fd = rustix::fs::open(&out, flags, Mode::empty()).unwrap();
    for k in 0..depth {
        fd = openat(
            &fd,
            format!("level-{k:04}-xxxxxxxxxx"),
            flags,
            Mode::empty(),
        )
        .unwrap();
        let st = rustix::fs::fstat(&fd).unwrap();
        let want = if k % 2 == 1 { 0o750 } else { 0o755 };
        assert_eq!(st.st_mode & 0o7777, want, "level {k} mode");
        assert_eq!(st.st_mtime, 2000 + k as i64, "level {k} mtime");
    }
    let leaf = openat(&fd, "leaf", OFlags::RDONLY, Mode::empty()).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::fs::File::from(leaf), &mut bytes).unwrap();
    assert_eq!(bytes, b"deep leaf");
    let ino = |dir: &rustix::fd::OwnedFd, name: &str| {
        rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .unwrap()
            .st_ino
    };
    let top = rustix::fs::open(&out, flags, Mode::empty()).unwrap();
    assert_eq!(ino(&fd, "leaf"), ino(&top, "link-to-leaf"));
    assert_eq!(ino(&fd, "link-to-top"), ino(&top, "top"));
    assert_eq!(std::fs::read(out.join("top")).unwrap(), b"top file");
}

/// `getfattr -d -m - -h` of a file, without its "# file:" line.
fn getfattr(p: &Path) -> String {
    let o = Command::new("getfattr")
        .args(["-d", "-m", "-", "-h", "--absolute-names"])
        .arg(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "getfattr {}", p.display());
    let s = String::from_utf8_lossy(&o.stdout);
    s.lines()
        .filter(|l| !l.starts_with("# file:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn extract_keeps_capabilities_acls_and_modes_as_the_kernel_mount() {
    if let Some(why) = kernel_mount_unavailable() {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("shared")).unwrap();
    std::fs::write(src.join("ping"), b"\x7fELF not really").unwrap();
    std::fs::write(src.join("suid"), b"#!/bin/sh\n").unwrap();
    std::fs::write(src.join("acl"), b"acl").unwrap();
    std::fs::write(src.join("shared/plain"), b"before the default ACL").unwrap();
    // Ownership first in the source too: chown clears capabilities and
    // setuid, so each is set after it.
    sh(
        "chown 1000:1000 ping suid && chmod 4755 suid && chmod 2750 shared \
         && setfattr -n security.capability -v 0sAQAAAgAgAAAAAAAAAAAAAAAAAAA= ping \
         && setfacl -m u:10:r acl \
         && setfacl -m g:20:rx shared && setfacl -d -m u:10:rwx shared \
         && echo inherits > shared/inherited \
         && ln -s ping sym && chown -h 5:6 sym \
         && mkfifo fifo && mknod null c 1 3 && chown 7:8 null && chmod 620 null \
         && setfattr -h -n trusted.t -v sym sym && setfattr -n trusted.t -v fifo fifo \
         && setfattr -n security.s -v null null \
         && mkdir ro && echo x > ro/f && chmod 555 ro",
        &src,
    );
    set_mtime(&src.join("ping"), 1_600_000_000, 5);
    set_mtime(&src.join("sym"), 1_500_000_000, 7);
    set_mtime(&src.join("shared"), 1_400_000_000, 9);
    let (img, blobs) = (tmp.path().join("c.img"), tmp.path().join("blobs"));
    build(&[&src], &img, &blobs, &[]);
    let mnt = tmp.path().join("mnt");
    let _m = mount(&img, &blobs, &mnt);
    let out = tmp.path().join("out");
    extract(&img, &blobs, &out);
    let caps = getfattr(&out.join("ping"));
    assert!(
        caps.contains("security.capability=0sAQAAAgAgAAAAAAAAAAAAAAAAAAA="),
        "{caps}"
    );
    // Symlinks and special files carry theirs too (set by path, not fd).
    assert!(getfattr(&out.join("sym")).contains("trusted.t=\"sym\""));
    assert!(getfattr(&out.join("fifo")).contains("trusted.t=\"fifo\""));
    assert!(getfattr(&out.join("null")).contains("security.s=\"null\""));
    for f in [
        "ping",
        "acl",
        "shared",
        "shared/plain",
        "shared/inherited",
        "sym",
        "fifo",
        "null",
    ] {
        assert_eq!(getfattr(&out.join(f)), getfattr(&mnt.join(f)), "{f}");
    }
    assert_eq!(mode_of(&out.join("suid")), 0o4755);
    let diffs = compare_trees(&mnt, &out);
    assert!(
        diffs.is_empty(),
        "extract differs from mount:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn ls_shows_times_before_1970_and_special_mode_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("tmp")).unwrap();
    for f in ["old", "older", "suid", "sgid"] {
        std::fs::write(src.join(f), f).unwrap();
    }
    let mode = |p: &str, m| {
        std::fs::set_permissions(src.join(p), std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode("suid", 0o4755);
    mode("sgid", 0o2644);
    mode("tmp", 0o1777);
    set_mtime(&src.join("old"), -5, 0);
    set_mtime(&src.join("older"), -5, 500_000_000); // 4.5 s before 1970
    let (img, blobs) = (tmp.path().join("l.img"), tmp.path().join("blobs"));
    build(&[&src], &img, &blobs, &[]);
    let out = run_shoal(&["ls".as_ref(), img.as_os_str(), "/".as_ref()]);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.ends_with(&format!(" /{name}")))
            .unwrap_or_else(|| panic!("no /{name} in:\n{out}"))
            .to_string()
    };
    assert!(line("old").contains(" -5.000000000 /old"), "{out}");
    assert!(line("older").contains(" -4.500000000 /older"), "{out}");
    assert!(line("suid").starts_with("-rwsr-xr-x "), "{out}");
    assert!(line("sgid").starts_with("-rw-r-Sr-- "), "{out}");
    assert!(line("tmp").starts_with("drwxrwxrwt "), "{out}");
}

#[test]
fn mount_refuses_a_blob_of_the_wrong_size() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("data"), vec![7u8; 10_000]).unwrap();
    let (img, blobs) = (tmp.path().join("m.img"), tmp.path().join("blobs"));
    build(&[&src], &img, &blobs, &[]);
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let good = std::fs::metadata(&blob).unwrap().len();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Checked before any mount attempt, so this needs neither root nor
    // the kernel: a short blob (reads would fail later) and a long one.
    for len in [good - 4096, good + 1] {
        let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
        f.set_len(len).unwrap();
        for dev_args in [
            vec!["--blob-dir".into(), blobs.clone().into_os_string()],
            vec![format!("--device={}", blob.display()).into()],
        ] {
            let o = shoal()
                .args(["mount".as_ref(), img.as_os_str(), mnt.as_os_str()])
                .args(&dev_args)
                .output()
                .unwrap();
            if o.status.success() {
                drop(Mounted(mnt.clone())); // unmount before failing
            }
            let err = String::from_utf8_lossy(&o.stderr);
            let want = format!(
                "blob {}: {len} bytes, but device slot 1 is {good} bytes",
                blob.display()
            );
            assert!(!o.status.success() && err.contains(&want), "{err}");
        }
    }
    assert!(std::fs::read_dir(&mnt).unwrap().next().is_none());
}
