//! The cachefiles on-demand frontend. The host kernel lacks
//! CONFIG_CACHEFILES_ONDEMAND, so the host test builds the images and runs
//! `fscache_suite_in_vm` inside ../shared/vm (Linux 6.12 with it), where
//! the daemon serves /dev/cachefiles for real erofs `fsid=`/`domain_id=`
//! mounts: content equals the layers, one OPEN (and one fetch) per blob
//! per domain with a CLOSE only after the last unmount, EIO from a failing
//! remote and recovery, and kill -9 of the daemon during cold reads.

mod common;
use common::servers::*;
use common::*;
use std::path::{Path, PathBuf};

#[test]
fn fscache_frontend_in_vm() {
    if std::env::var_os("IN_TEST_VM").is_some() {
        return; // inside the VM only the suite itself runs
    }
    if let Some(why) = vm_unavailable(None) {
        return skip(&why);
    }
    let c = corpus_dir();
    if !c.join("base.tar.gz").exists() {
        return skip("no corpus");
    }
    // Inputs are built here (fast) and read by the VM, which sees the
    // host's root file system read-only.
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let blobs = tmp.path().join("blobs");
    let py = build_layer_blobs(
        tmp.path(),
        "py",
        &[c.join("base.tar.gz"), c.join("py-layer.tar.gz")],
        &blobs,
    );
    build_layer_blobs(
        tmp.path(),
        "web",
        &[c.join("base.tar.gz"), c.join("web-layer.tar.zst")],
        &blobs,
    );
    // The same image with its blobs stored as zstd objects on the remote.
    build_layer_blobs_with(
        tmp.path(),
        "pyz",
        &[c.join("base.tar.gz"), c.join("py-layer.tar.gz")],
        &blobs,
        "zstd",
    );
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    build_layer_blobs(tmp.path(), "demo", &[ex.join("base")], &blobs);
    extract(&py, &blobs, &tmp.path().join("py-tree"));
    run_vm_suite(
        None,
        "fscache_suite_in_vm",
        tmp.path(),
        &[
            "--timeout",
            "1200",
            "--mem",
            "2G",
            "--smp",
            "2",
            "--disk",
            "4G",
        ],
    );
}

/// What the daemon's cachefiles frontend reports.
fn fscache_state(d: &Daemon) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&d.ok(&["doctor", "--json"])).unwrap();
    v["fscache"].clone()
}

fn objects_named(d: &Daemon, name: &str) -> usize {
    fscache_state(d)["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| *o == name)
        .count()
}

fn mount(d: &Daemon, dom: &str, fsid: &str, img: &Path, remote: &str, mnt: &Path) -> Vec<u8> {
    d.mount(&MountArgs {
        frontend: "fscache",
        domain: Some(dom),
        fsid,
        img,
        remote,
        mnt,
    })
}

fn device_tag(img: &Path, slot: usize) -> String {
    let v: serde_json::Value = serde_json::from_str(&run_shoal(&[
        "inspect".as_ref(),
        img.as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    v["devices"][slot]["tag"].as_str().unwrap().to_string()
}

#[test]
#[ignore = "runs inside ../shared/vm, driven by fscache_frontend_in_vm"]
fn fscache_suite_in_vm() {
    let input = PathBuf::from(std::env::var_os("SHOAL_VM_INPUT").expect("SHOAL_VM_INPUT"));
    let scratch = std::env::var_os("VM_SCRATCH").unwrap_or("/scratch".into());
    // cachefiles needs a real file system for its cache (not tmpfs).
    let tmp = tempfile::tempdir_in(scratch).unwrap();
    let blobs = input.join("blobs");
    let (py, web, demo) = (
        input.join("py.img"),
        input.join("web.img"),
        input.join("demo.img"),
    );
    let srv = Faulty::start(&blobs, tmp.path());
    let mut d = Daemon::start(tmp.path());
    let m = |n: &str| tmp.path().join(n);
    let base = device_tag(&py, 0);

    // Content through fscache equals the layers (as extracted on the host,
    // which the host suite compares with GNU tar's view).
    mount(&d, "dom", "py", &py, &srv.url(), &m("py"));
    let diffs = compare_trees(&input.join("py-tree"), &m("py"));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let fetched = srv.bytes_for(&base);
    assert!(fetched > 0);
    println!("vm: py tree equal through fscache; base blob fetched {fetched} bytes");

    // Only one process can hold /dev/cachefiles: a second daemon says so.
    let other = tempfile::tempdir_in(tmp.path()).unwrap();
    let d2 = Daemon::start(other.path());
    let o = d2.mount_cli(&MountArgs {
        frontend: "fscache",
        domain: None,
        fsid: "demo",
        img: &demo,
        remote: &srv.url(),
        mnt: &m("busy"),
    });
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("/dev/cachefiles is busy"),
        "{err}"
    );
    drop(d2);
    println!("vm: a second daemon is told /dev/cachefiles is busy");

    // Same domain: the shared base blob is one cookie, one OPEN, one fetch.
    let opens = fscache_state(&d)["opens"].as_u64().unwrap();
    mount(&d, "dom", "web", &web, &srv.url(), &m("web"));
    assert_eq!(
        objects_named(&d, &base),
        1,
        "base opened twice in one domain"
    );
    assert_eq!(fscache_state(&d)["opens"].as_u64().unwrap(), opens + 2);
    assert!(compare_contents(&m("web"), &m("web")).is_empty());
    assert_eq!(
        srv.bytes_for(&base),
        fetched,
        "base fetched twice in one domain"
    );
    // Another domain: its own OPEN and its own fetch.
    mount(&d, "other", "web", &web, &srv.url(), &m("web2"));
    assert_eq!(objects_named(&d, &base), 2);
    assert!(compare_contents(&m("web2"), &m("web2")).is_empty());
    assert!(
        srv.bytes_for(&base) > fetched,
        "other domain shared the cache"
    );
    // The same fsid twice in a domain is refused, clearly.
    std::fs::create_dir_all(m("again")).unwrap();
    let o = d.cli(&[
        "mount",
        "--frontend",
        "fscache",
        "--domain",
        "dom",
        "--fsid",
        "py",
        py.to_str().unwrap(),
        m("again").to_str().unwrap(),
        "--remote",
        &srv.url(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("fsid py is already mounted in domain dom"),
        "{err}"
    );
    // CLOSE of the shared blob only after its last user in the domain.
    d.ok(&["umount", m("py").to_str().unwrap()]);
    assert_eq!(objects_named(&d, &base), 2);
    d.ok(&["umount", m("web").to_str().unwrap()]);
    assert_eq!(objects_named(&d, &base), 1);
    d.ok(&["umount", m("web2").to_str().unwrap()]);
    assert_eq!(objects_named(&d, &base), 0);
    println!("vm: one OPEN per blob per domain, CLOSE after the last unmount");

    // A failing remote gives EIO, never wrong bytes; recovery works.
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    mount(&d, "f", "demo", &demo, &srv.url(), &m("demo"));
    let file = m("demo").join("usr/share/doc/shoal-demo/glossary.txt");
    let want = std::fs::read(ex.join("base/usr/share/doc/shoal-demo/glossary.txt")).unwrap();
    for mode in ["s500", "wrong"] {
        srv.set_mode(mode);
        let e = std::fs::read(&file).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5), "{mode}: {e}");
    }
    srv.set_mode("ok");
    assert_eq!(std::fs::read(&file).unwrap(), want);
    d.ok(&["umount", m("demo").to_str().unwrap()]);
    println!("vm: failing remote -> EIO, then recovery");

    // From zstd objects: the same tree; the domain's cache file of the
    // base is the one the uncompressed image of the same blob uses.
    let pyz = input.join("pyz.img");
    mount(&d, "z", "pyz", &pyz, &srv.url(), &m("pyz"));
    let diffs = compare_trees(&input.join("py-tree"), &m("pyz"));
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let object = base_remote_name(&pyz);
    assert_ne!(object, base);
    let before = srv.bytes_for(&base);
    mount(&d, "z", "py", &py, &srv.url(), &m("pyz-plain"));
    assert!(compare_contents(&input.join("py-tree"), &m("pyz-plain")).is_empty());
    assert_eq!(
        srv.bytes_for(&base),
        before,
        "cached once for both encodings"
    );
    d.ok(&["umount", m("pyz-plain").to_str().unwrap()]);
    d.ok(&["umount", m("pyz").to_str().unwrap()]);
    println!("vm: zstd objects through fscache: tree equal, one cache for both encodings");

    // kill -9 during cold reads (of zstd frames): the pump keeps
    // /dev/cachefiles, the new daemon writes `restore`, and every read
    // completes with right bytes (nothing unverified was marked ready).
    srv.set_mode("delay2");
    mount(&d, "k", "pyz", &pyz, &srv.url(), &m("k"));
    // The first kill comes before the reader starts: its first reads wait
    // in the kept device with no daemon at all. Later kills land mid-read.
    d.kill9();
    let mut kills = 1;
    let (t, mp) = (input.join("py-tree"), m("k"));
    let reader = std::thread::spawn(move || compare_contents(&t, &mp));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    d.restart();
    while !reader.is_finished() && kills < 3 {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        d.kill9();
        kills += 1;
        d.restart();
    }
    let bad = reader.join().unwrap();
    assert!(
        bad.is_empty(),
        "after {kills} kills:\n{}\n{}",
        bad[..bad.len().min(20)].join("\n"),
        d.log_text()
            .lines()
            .filter(|l| !l.contains("INFO"))
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    d.ok(&["umount", m("k").to_str().unwrap()]);
    println!("vm: {kills} kill -9 during cold reads: no EIO, no wrong bytes");
}
