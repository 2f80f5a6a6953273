//! One suite for every daemon-hosted frontend (FUSE, fanotify): the same
//! tree comparison as the kernel mounts; domain sharing counted at nginx;
//! EIO from a failing remote and recovery; and what a daemon's death does
//! (FUSE: ENOTCONN and a documented remount; fanotify: nothing, readers
//! wait for the restarted daemon and get the right bytes).

mod common;
use common::servers::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Why `frontend` cannot run here, if it cannot.
fn unavailable(frontend: &str) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    match frontend {
        "fuse" => (!Path::new("/dev/fuse").exists()).then(|| "no /dev/fuse".into()),
        _ => kernel_feature("fanotify pre-content").err(),
    }
}

fn layers(names: &[&str]) -> Option<Vec<PathBuf>> {
    let c = corpus_dir();
    c.join("base.tar.gz")
        .exists()
        .then(|| names.iter().map(|n| c.join(n)).collect())
}

/// Unmounts (lazily, in case the daemon is gone) on drop.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[allow(clippy::too_many_arguments)]
fn mount(
    d: &Daemon,
    frontend: &str,
    dom: &str,
    fsid: &str,
    img: &Path,
    remote: &str,
    mnt: &Path,
) -> Mount {
    let out = d.mount(&MountArgs {
        frontend,
        domain: Some(dom),
        fsid,
        img,
        remote,
        mnt,
    });
    assert!(String::from_utf8_lossy(&out).contains(&format!("({frontend})")));
    Mount(mnt.to_path_buf())
}

/// The bundled demo tree (examples/demo) and an image of its base layer
/// with the blob under `dir/blobs`: (demo dir, image, blob dir).
fn demo_image(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    let blobs = dir.join("blobs");
    let img = build_layer_blobs(dir, "demo", &[ex.join("base")], &blobs);
    (ex, img, blobs)
}

/// Read every byte of every file under `dir` (as `tar cf - . | cat` does).
fn read_all(dir: &Path) {
    let st = Command::new("sh")
        .arg("-c")
        .arg("tar cf - . | cat > /dev/null")
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn fuse_mounts_equal_the_layers_and_share_a_domain() {
    mounts_equal_the_layers_and_share_a_domain("fuse", "none");
}

#[test]
fn fanotify_mounts_equal_the_layers_and_share_a_domain() {
    mounts_equal_the_layers_and_share_a_domain("fanotify", "none");
}

/// The same from remotes that store the blobs as zstd objects.
#[test]
fn fuse_mounts_from_compressed_remotes_equal_the_layers() {
    mounts_equal_the_layers_and_share_a_domain("fuse", "zstd");
}

#[test]
fn fanotify_mounts_from_compressed_remotes_equal_the_layers() {
    mounts_equal_the_layers_and_share_a_domain("fanotify", "zstd");
}

fn mounts_equal_the_layers_and_share_a_domain(frontend: &str, compress: &str) {
    if let Some(why) = unavailable(frontend) {
        return skip(&why);
    }
    let Some(py_layers) = layers(&["base.tar.gz", "py-layer.tar.gz"]) else {
        return skip("no corpus");
    };
    let web_layers = layers(&["base.tar.gz", "web-layer.tar.zst"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let py = build_layer_blobs_with(tmp.path(), "py", &py_layers, &blobs, compress);
    let web = build_layer_blobs_with(tmp.path(), "web", &web_layers, &blobs, compress);
    let Some(nginx) = Nginx::start(&blobs, tmp.path()) else {
        return skip("nginx not installed");
    };
    let d = Daemon::start(tmp.path());
    let m1 = mount(
        &d,
        frontend,
        "dom",
        "py",
        &py,
        &nginx.url(),
        &tmp.path().join("m1"),
    );
    let reference = tmp.path().join("ref");
    reference_tree(&py_layers, &reference);
    let diffs = compare_trees(&reference, &m1.0);
    assert!(
        diffs.is_empty(),
        "{frontend} view differs from the layers:\n{}",
        diffs.join("\n")
    );
    // What the remote serves the base as: the blob, or its zstd object.
    let base_blob = base_remote_name(&py);
    let after_first = nginx.bytes_for(&base_blob);
    assert!(after_first > 0);
    if compress != "none" {
        let v: serde_json::Value =
            serde_json::from_str(&run_shoal(os!["inspect", py.as_os_str(), "--json"])).unwrap();
        let tag = v["devices"][0]["tag"].as_str().unwrap();
        assert_ne!(tag, base_blob);
        assert_eq!(nginx.bytes_for(tag), 0, "the raw blob is never fetched");
    }
    // The second image of the domain reads the shared base from the cache.
    let m2 = mount(
        &d,
        frontend,
        "dom",
        "web",
        &web,
        &nginx.url(),
        &tmp.path().join("m2"),
    );
    read_all(&m2.0);
    assert_eq!(
        nginx.bytes_for(&base_blob),
        after_first,
        "base fetched twice in one domain"
    );
    // Another domain fetches its own copy.
    let m3 = mount(
        &d,
        frontend,
        "other",
        "web",
        &web,
        &nginx.url(),
        &tmp.path().join("m3"),
    );
    read_all(&m3.0);
    assert!(nginx.bytes_for(&base_blob) > after_first);
    // The same fsid twice in a domain is refused.
    std::fs::create_dir_all(tmp.path().join("m4")).unwrap();
    let o = d.cli(&[
        "mount",
        "--frontend",
        frontend,
        "--domain",
        "dom",
        "--fsid",
        "py",
        py.to_str().unwrap(),
        tmp.path().join("m4").to_str().unwrap(),
        "--remote",
        &nginx.url(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("fsid py is already mounted in domain dom"));
    for m in [&m1, &m2, &m3] {
        d.ok(&["umount", m.0.to_str().unwrap()]);
    }
    assert!(d.status().as_array().unwrap().is_empty(), "umount unbinds");
}

#[test]
fn fuse_read_fails_with_eio_then_recovers_and_survives_daemon_death() {
    if let Some(why) = unavailable("fuse") {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let srv = Faulty::start(&blobs, tmp.path());
    let mut d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    let m = mount(&d, "fuse", "f", "demo", &img, &srv.url(), &mnt);
    let file = mnt.join("usr/share/doc/shoal-demo/glossary.txt");
    let want = std::fs::read(ex.join("base/usr/share/doc/shoal-demo/glossary.txt")).unwrap();
    srv.set_mode("s500");
    let err = std::fs::read(&file).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    srv.set_mode("ok");
    assert_eq!(std::fs::read(&file).unwrap(), want);
    // kill -9: the mount stops answering (ENOTCONN), never with wrong bytes.
    d.kill9();
    let hello = mnt.join("usr/bin/hello");
    match std::fs::read(&hello) {
        Ok(b) => assert_eq!(b, std::fs::read(ex.join("base/usr/bin/hello")).unwrap()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(107), "{e}"), // ENOTCONN
    }
    // Restarting the daemon re-establishes the mount at the same place.
    d.restart();
    assert_eq!(std::fs::read(&file).unwrap(), want);
    assert_eq!(
        std::fs::read(&hello).unwrap(),
        std::fs::read(ex.join("base/usr/bin/hello")).unwrap()
    );
    // fusermount3 -u unmounts it cleanly, as for any FUSE mount.
    if Path::new("/usr/bin/fusermount3").exists() {
        assert!(Command::new("fusermount3")
            .arg("-u")
            .arg(&mnt)
            .status()
            .unwrap()
            .success());
        assert!(!mounted(&mnt));
    } else {
        println!("skipped: fusermount3 -u (fuse3 not installed)");
    }
    // An unmount keeps the image's access order (for `prefetch
    // --recorded` and `shoal order`).
    let m2 = mount(&d, "fuse", "f2", "demo", &img, &srv.url(), &mnt);
    assert_eq!(std::fs::read(&file).unwrap(), want);
    d.ok(&["umount", mnt.to_str().unwrap()]);
    drop(m2);
    let order = std::fs::read_to_string(d.work.join("access/f2/demo.order")).unwrap();
    assert!(!order.trim().is_empty());
    // A clean stop (SIGTERM) unmounts FUSE mounts; the next start does not
    // bring them back.
    let _m2 = mount(&d, "fuse", "f3", "demo", &img, &srv.url(), &mnt);
    assert!(mounted(&mnt));
    d.term();
    assert!(!mounted(&mnt), "SIGTERM left the FUSE mount behind");
    d.restart();
    assert!(!mounted(&mnt));
    drop(m);
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn fanotify_read_fails_with_eio_then_recovers() {
    if let Some(why) = unavailable("fanotify") {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let srv = Faulty::start(&blobs, tmp.path());
    let d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    let m = mount(&d, "fanotify", "f", "demo", &img, &srv.url(), &mnt);
    let file = mnt.join("usr/share/doc/shoal-demo/glossary.txt");
    let want = std::fs::read(ex.join("base/usr/share/doc/shoal-demo/glossary.txt")).unwrap();
    for mode in ["s500", "wrong", "down"] {
        srv.set_mode(mode);
        let err = std::fs::read(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{mode}: {err}");
    }
    srv.set_mode("ok");
    assert_eq!(std::fs::read(&file).unwrap(), want);
    let doctor: serde_json::Value = serde_json::from_slice(&d.ok(&["doctor", "--json"])).unwrap();
    assert_eq!(doctor["features"]["auto"], "fanotify");
    assert_eq!(doctor["mounts"][0]["frontend"], "fanotify");
    assert_eq!(doctor["fanotify"]["marked"].as_array().unwrap().len(), 1);
    // Once every block is present the mark goes: reads run natively.
    read_all(&mnt);
    wait_for("the mark of the complete blob to go", || {
        let v: serde_json::Value = serde_json::from_slice(&d.ok(&["doctor", "--json"])).unwrap();
        v["fanotify"]["marked"].as_array().unwrap().is_empty()
    });
    srv.set_mode("down");
    let tree = tmp.path().join("tree");
    extract(&img, &blobs, &tree);
    assert!(compare_trees(&tree, &mnt).is_empty());
    d.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(!mounted(&mnt));
    drop(m);
    // The kernel's reads were recorded per blob: the unmount kept them as
    // the image's access order, first touch (the glossary) first.
    let recording = d.work.join("access/f/demo.order");
    let paths = run_shoal(&["order".as_ref(), img.as_os_str(), recording.as_os_str()]);
    assert_eq!(
        paths.lines().next(),
        Some("/usr/share/doc/shoal-demo/glossary.txt"),
        "{paths}"
    );
}

/// A daemon started with a relative `--work-dir` (as from a shell) serves
/// fanotify mounts: the pump, another process with another cwd, is handed
/// paths that still name the cache files.
#[test]
fn fanotify_with_a_relative_work_dir() {
    if let Some(why) = unavailable("fanotify") {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let d = Daemon::start_relative(tmp.path());
    let mnt = tmp.path().join("mnt");
    let remote = format!("file://{}", blobs.display());
    let m = mount(&d, "fanotify", "rel", "demo", &img, &remote, &mnt);
    let file = "usr/share/doc/shoal-demo/glossary.txt";
    assert_eq!(
        std::fs::read(mnt.join(file)).unwrap(),
        std::fs::read(ex.join("base").join(file)).unwrap()
    );
    d.ok(&["umount", mnt.to_str().unwrap()]);
    drop(m);
}

/// kill -9 the daemon again and again while a reader reads every byte of
/// a cold corpus mount: every read completes with the right bytes (no EIO,
/// no zeros), because the pump holds the events for the next daemon.
#[test]
fn fanotify_survives_daemon_kill9_during_cold_reads() {
    fanotify_kill9_during_cold_reads("none");
}

/// kill -9 while zstd frames are fetched, decompressed and verified:
/// nothing unverified is ever marked ready.
#[test]
fn fanotify_survives_daemon_kill9_during_compressed_reads() {
    fanotify_kill9_during_cold_reads("zstd");
}

fn fanotify_kill9_during_cold_reads(compress: &str) {
    if let Some(why) = unavailable("fanotify") {
        return skip(&why);
    }
    let Some(base) = layers(&["base.tar.gz"]) else {
        return skip("no corpus");
    };
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let img = build_layer_blobs_with(tmp.path(), "base", &base, &blobs, compress);
    let tree = tmp.path().join("tree");
    extract(&img, &blobs, &tree);
    let srv = Faulty::start(&blobs, tmp.path());
    srv.set_mode("delay5");
    let mut d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    let m = mount(&d, "fanotify", "k", "base", &img, &srv.url(), &mnt);
    // The first kill comes before the reader starts, so its first reads
    // are pending with no daemon at all; later kills land mid-read.
    d.kill9();
    let mut kills = 1;
    let (t, mp) = (tree.clone(), mnt.clone());
    let reader = std::thread::spawn(move || compare_contents(&t, &mp));
    std::thread::sleep(std::time::Duration::from_millis(300));
    d.restart();
    while !reader.is_finished() && kills < 6 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        d.kill9();
        kills += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
        d.restart();
    }
    let bad = reader.join().unwrap();
    println!("{kills} kill -9 during the read");
    assert!(
        bad.is_empty(),
        "after {kills} kills:\n{}\ndaemon log:\n{}",
        bad[..bad.len().min(20)].join("\n"),
        d.log_text()
            .lines()
            .filter(|l| !l.contains(" INFO "))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    srv.set_mode("ok");
    let diffs = compare_trees(&tree, &mnt);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    d.ok(&["umount", mnt.to_str().unwrap()]);
    drop(m);
}

fn mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mp = mnt.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(mp))
}

/// One remote that trickles cannot starve the others (issue 13): with 3
/// fanotify workers, three cold readers hang on a trickling remote, yet a
/// cold read in another domain, from a healthy remote, is answered at once
/// (a remote may hold all workers but two), and the hung readers get EIO
/// within the fetch deadline.
#[test]
fn fanotify_a_trickling_remote_does_not_starve_other_domains() {
    if let Some(why) = unavailable("fanotify") {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let srv = Faulty::start(&blobs, tmp.path());
    let d = Daemon::start_with(tmp.path(), "fetch_deadline_secs = 3\nread_threads = 3\n");
    let (bad, good) = (tmp.path().join("bad"), tmp.path().join("good"));
    let _mb = mount(&d, "fanotify", "slow", "demo", &img, &srv.url(), &bad);
    let healthy = format!("file://{}", blobs.display());
    let _mg = mount(&d, "fanotify", "fine", "demo", &img, &healthy, &good);
    srv.set_mode("trickle");
    let t = std::time::Instant::now();
    let files = [
        "etc/os-release",
        "usr/share/doc/shoal-demo/glossary.txt",
        "usr/share/doc/shoal-demo/README",
    ];
    let readers: Vec<_> = files
        .iter()
        .map(|f| {
            let p = bad.join(f);
            std::thread::spawn(move || std::fs::read(p))
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let want = std::fs::read(ex.join("base/usr/bin/hello")).unwrap();
    assert_eq!(std::fs::read(good.join("usr/bin/hello")).unwrap(), want);
    let healthy_after = t.elapsed();
    assert!(
        healthy_after < std::time::Duration::from_secs(6),
        "the healthy domain's read took {healthy_after:?} behind a trickling remote"
    );
    for r in readers {
        let e = r.join().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc_eio()), "{e}");
    }
    println!(
        "healthy read answered after {healthy_after:?}; trickling reads failed after {:?}",
        t.elapsed()
    );
    srv.set_mode("ok");
    assert_eq!(
        std::fs::read(bad.join(files[0])).unwrap(),
        std::fs::read(ex.join("base").join(files[0])).unwrap()
    );
}

/// Fill `dir`'s file system to the last block.
fn fill_up(dir: &Path, name: &str) -> PathBuf {
    use std::io::Write;
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0xa5u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    // ext4 keeps blocks back from a writer it already refused: take the
    // rest one synced block at a time, as the daemon's state writes would.
    for i in 0.. {
        let q = dir.join(format!("{name}.{i}"));
        let r = std::fs::File::create(&q).and_then(|mut g| {
            g.write_all(&[1u8; 4096])?;
            g.sync_all()
        });
        if r.is_err() {
            let _ = std::fs::remove_file(&q);
            break;
        }
    }
    p
}

/// What `shoal status` says is bound, as (domain, fsid) pairs.
fn bound(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for v in d.status().as_array().unwrap() {
        for i in v["images"].as_array().unwrap() {
            out.push(i["fsid"].as_str().unwrap().to_string());
        }
    }
    out.sort();
    out
}

/// A full work directory (issue 13, item 7): umount still unmounts and
/// unbinds, and the state on disk says so (a reserve holds the last
/// writes); a mount that cannot record its binding is refused (507) and
/// leaves nothing behind; after a restart `shoal status` agrees with
/// /proc/self/mountinfo. A restart also reconciles a mount unmounted while
/// no daemon ran, and a mount whose binding bindings.json lost.
#[test]
fn fanotify_state_stays_true_on_a_full_disk_and_across_restarts() {
    if let Some(why) = unavailable("fanotify") {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let remote = format!("file://{}", blobs.display());
    let dd = tmp.path().join("d");
    let work = dd.join("work");
    std::fs::create_dir_all(&work).unwrap();
    // A small ext4 on a loop device (tmpfs has no pre-content events).
    let fs_img = tmp.path().join("work.ext4");
    std::fs::File::create(&fs_img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&fs_img)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&fs_img)
        .arg(&work)
        .status()
        .unwrap();
    assert!(st.success());
    let _tmpfs = Mount(work.clone());
    let mut d = Daemon::start(&dd);
    let m = |n: &str| tmp.path().join(n);
    let file = "usr/share/doc/shoal-demo/glossary.txt";
    let want = std::fs::read(ex.join("base").join(file)).unwrap();
    let _a = mount(&d, "fanotify", "dom", "a", &img, &remote, &m("a"));
    assert_eq!(std::fs::read(m("a").join(file)).unwrap(), want);

    // Full: umount works, and says so on disk.
    let filler = fill_up(&work, "filler");
    d.ok(&["umount", m("a").to_str().unwrap()]);
    assert!(!mounted(&m("a")));
    assert_eq!(bound(&d), Vec::<String>::new());
    // The reserve gave its room to that save; once that room is taken
    // too, a mount that cannot save its binding is refused and undone.
    let filler2 = fill_up(&work, "filler2");
    let o = d.mount_cli(&MountArgs {
        frontend: "fanotify",
        domain: Some("dom"),
        fsid: "b",
        img: &img,
        remote: &remote,
        mnt: &m("b"),
    });
    let err = String::from_utf8_lossy(&o.stderr);
    let df = Command::new("df").arg(&work).output().unwrap();
    assert!(
        !o.status.success() && err.contains("No space left"),
        "{err} {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&df.stdout)
    );
    assert!(!mounted(&m("b")));
    assert_eq!(bound(&d), Vec::<String>::new());
    d.term();
    d.restart();
    assert_eq!(
        bound(&d),
        Vec::<String>::new(),
        "a restart brought a binding back"
    );

    // Room again: a mount survives a restart, bound and readable.
    for e in std::fs::read_dir(&work).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("filler")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let _ = (filler, filler2);
    let _b = mount(&d, "fanotify", "dom", "b", &img, &remote, &m("b"));
    let _c = mount(&d, "fanotify", "dom", "c", &img, &remote, &m("c"));
    d.term();
    // While no daemon runs: c is unmounted by hand, and bindings.json
    // loses b (as a save that never reached the disk would).
    assert!(Command::new("umount")
        .arg(m("c"))
        .status()
        .unwrap()
        .success());
    std::fs::write(work.join("bindings.json"), "[]").unwrap();
    d.restart();
    assert_eq!(bound(&d), vec!["b".to_string()]);
    assert!(mounted(&m("b")) && !mounted(&m("c")));
    assert_eq!(std::fs::read(m("b").join(file)).unwrap(), want);
    d.ok(&["umount", m("b").to_str().unwrap()]);
    d.term();
    d.restart();
    assert_eq!(bound(&d), Vec::<String>::new());
    // With no mount left and the daemon gone, the fanotify pump exits.
    d.term();
    wait_for("the fanotify pump to exit", || {
        let pat = format!("fanotify-pump --socket {}", work.display());
        !Command::new("pgrep")
            .args(["-f", &pat])
            .status()
            .unwrap()
            .success()
    });
}

/// `img` with its last chunk claiming 64 GiB (device slot and chunk table
/// resealed, superblock checksum recomputed): "valid" but hostile.
fn hostile_copy(img: &Path, out: &Path) {
    use erofs::chunktable::MAX_CHUNK_BLOCKS;
    let mut bytes = std::fs::read(img).unwrap();
    let image = erofs::Image::open(std::fs::File::open(img).unwrap()).unwrap();
    let mut table = image.chunk_table.clone().unwrap();
    let (dev, entries) = table.blobs.last_mut().unwrap();
    let last = entries.last_mut().unwrap();
    let huge: u32 = 16 << 20; // blocks: 64 GiB
    assert!(u64::from(huge) > MAX_CHUNK_BLOCKS);
    last.nblocks = huge.into();
    let blocks = last.blkaddr.get() + huge;
    let slot = 1152 + 128 * (usize::from(*dev) - 1) + 64;
    bytes[slot..slot + 4].copy_from_slice(&blocks.to_le_bytes());
    let end = u64::from(image.sb.blocks.get()) * 4096;
    bytes.truncate(end as usize);
    bytes.extend_from_slice(&table.encode(end));
    bytes[1028..1032].fill(0);
    let sum = erofs::ondisk::sb_checksum(&bytes[1024..4096]);
    bytes[1028..1032].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(out, bytes).unwrap();
}

/// Time to read every file under `dir` (each file whole).
fn timed_read_all(dir: &Path) -> std::time::Duration {
    let t = std::time::Instant::now();
    read_all(dir);
    t.elapsed()
}

/// The daemon under faults (issue 13): a hostile bootstrap, a token
/// endpoint that never ends, a trickling, a hanging and a dead remote, each
/// in a domain of its own with cold readers hanging on it, while another
/// domain reads a healthy image through fanotify and FUSE: the healthy
/// reads take about what they take alone, the daemon's memory stays
/// bounded, every faulty read fails with EIO within the deadline's bound,
/// and once the remotes are fixed the same reads succeed.
#[test]
fn fault_suite_leaves_a_healthy_domain_alone() {
    for f in ["fanotify", "fuse"] {
        if let Some(why) = unavailable(f) {
            return skip(&why);
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = demo_image(tmp.path());
    let d = Daemon::start_with(&tmp.path().join("d"), "fetch_deadline_secs = 3\n");
    let m = |n: &str| tmp.path().join("mnt").join(n);
    let healthy = format!("file://{}", blobs.display());

    // Alone: cold reads of the whole image, through each frontend.
    let _h0 = mount(&d, "fanotify", "healthy0", "h", &img, &healthy, &m("h0"));
    let _f0 = mount(&d, "fuse", "healthy0f", "h", &img, &healthy, &m("f0"));
    let alone = timed_read_all(&m("h0")).max(timed_read_all(&m("f0")));

    // A hostile bootstrap is refused at bind, naming the chunk.
    let bad = tmp.path().join("hostile.img");
    hostile_copy(&img, &bad);
    let o = d.cli(&[
        "bind",
        "--domain",
        "hostile",
        "--fsid",
        "x",
        bad.to_str().unwrap(),
        "--remote",
        &healthy,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("largest chunk"),
        "{err}"
    );

    // One faulty remote per domain, readers hanging on each.
    let mut servers = Vec::new();
    let mut mounts = Vec::new();
    let mut readers = Vec::new();
    let files = ["etc/os-release", "usr/share/doc/shoal-demo/glossary.txt"];
    for mode in ["tokenflood", "trickle", "slow", "down"] {
        let dir = tmp.path().join(mode);
        std::fs::create_dir_all(&dir).unwrap();
        let srv = Faulty::start(&blobs, &dir);
        srv.set_mode(mode);
        let remote = if mode == "tokenflood" {
            format!("oci://127.0.0.1:{}/shoal/demo", srv.port)
        } else {
            srv.url()
        };
        mounts.push(mount(&d, "fanotify", mode, "demo", &img, &remote, &m(mode)));
        for f in files {
            let p = m(mode).join(f);
            readers.push(std::thread::spawn(move || {
                let t = std::time::Instant::now();
                (std::fs::read(&p), t.elapsed())
            }));
        }
        servers.push(srv);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    // The healthy domain, cold again, meanwhile.
    let _h1 = mount(&d, "fanotify", "healthy1", "h", &img, &healthy, &m("h1"));
    let _f1 = mount(&d, "fuse", "healthy1f", "h", &img, &healthy, &m("f1"));
    let busy = timed_read_all(&m("h1")).max(timed_read_all(&m("f1")));
    println!("healthy cold read alone {alone:?}, beside the faults {busy:?}");
    assert!(
        busy <= alone * 3 + std::time::Duration::from_secs(2),
        "healthy reads took {busy:?} beside the faults, {alone:?} alone"
    );
    let rss = d.rss_kib();
    assert!(rss < 256 * 1024, "daemon RSS {rss} KiB");

    // Every faulty read fails with EIO, within the bound of the deadline.
    for r in readers {
        let (res, took) = r.join().unwrap();
        let e = res.expect_err("a read from a faulty remote succeeded");
        assert_eq!(e.raw_os_error(), Some(libc_eio()), "{e}");
        assert!(
            took < std::time::Duration::from_secs(40),
            "EIO after {took:?}"
        );
    }
    let rss = d.rss_kib();
    assert!(rss < 256 * 1024, "daemon RSS {rss} KiB");

    // Fixed remotes: the same reads succeed.
    for s in &servers {
        s.set_mode("ok");
    }
    for mode in ["tokenflood", "trickle", "slow", "down"] {
        for f in files {
            let want = std::fs::read(ex.join("base").join(f)).unwrap();
            assert_eq!(std::fs::read(m(mode).join(f)).unwrap(), want, "{mode} {f}");
        }
    }
    drop(mounts);
}
