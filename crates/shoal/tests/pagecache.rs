//! One page cache per domain, and no double caching (issue 15).
//!
//! On this host (6.18): a byte read lazily through a fanotify mount is
//! cached once (erofs's page): the daemon trims the cache files' pages,
//! with or without `directio`.
//! In ../shared/vm's Linux 7.2 (`pagecache_suite_in_vm`): mounts of one
//! domain share the page cache of equal files (`inode_share`), other
//! domains and mounts without one do not, a fingerprint that lies cannot
//! cross a domain, and lazy filling still serves the right bytes.

mod common;
use common::servers::*;
use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// The shared file: large beside the noise of a quiet machine's page cache.
const SHARED_LEN: usize = 16 << 20;

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image whose `lib/shared.so` is `shared` and whose `own` file is its
/// own, built alone so that its blob is its own too: sharing page cache
/// must not depend on sharing a blob.
fn image(dir: &Path, name: &str, shared: &[u8], seed: u32) -> PathBuf {
    image_with(dir, name, shared, seed, &[])
}

fn image_with(dir: &Path, name: &str, shared: &[u8], seed: u32, flags: &[&str]) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/shared.so"), shared).unwrap();
    std::fs::write(src.join("own"), pattern(100_000, seed)).unwrap();
    let img = dir.join(format!("{name}.img"));
    let blobs = dir.join("blobs");
    let mut args: Vec<&std::ffi::OsStr> = os!["build", "-o"].to_vec();
    args.extend([img.as_os_str(), "--blob-dir".as_ref(), blobs.as_os_str()]);
    args.extend(flags.iter().map(std::ffi::OsStr::new));
    args.push(src.as_os_str());
    run_shoal(&args);
    img
}

/// Rewrite the fingerprint of `lib/shared.so` in `img` to `claim`: an image
/// no shoal build writes, as a hostile party would hand it over.
fn lie_about_fingerprint(img: &Path, truth: &[u8], claim: &[u8]) {
    let mut bytes = std::fs::read(img).unwrap();
    let value = |d: &[u8]| [b"sha256:".as_slice(), &Sha256::digest(d)].concat();
    let (from, to) = (value(truth), value(claim));
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("fingerprint in the bootstrap");
    bytes[at..at + to.len()].copy_from_slice(&to);
    bytes[1028..1032].fill(0);
    let sum = erofs::ondisk::sb_checksum(&bytes[1024..4096]);
    bytes[1028..1032].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(img, bytes).unwrap();
}

fn cached_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn drop_caches() {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Page cache (bytes) that reading `path` adds, and what it read: measured
/// once the daemon has trimmed the cache files (it does every second).
fn read_growth(path: &Path) -> (u64, Vec<u8>) {
    let before = cached_kib();
    let data = std::fs::read(path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = cached_kib();
    (after.saturating_sub(before) * 1024, data)
}

/// Resident bytes of a file (`fincore`).
fn resident(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn mount(d: &Daemon, domain: Option<&str>, fsid: &str, img: &Path, remote: &str, mnt: &Path) {
    d.mount(&MountArgs {
        frontend: "fanotify",
        domain,
        fsid,
        img,
        remote,
        mnt,
    });
}

/// `doctor --json`'s record of the mount at `mnt`.
fn mount_report(d: &Daemon, mnt: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&d.ok(&["doctor", "--json"])).unwrap();
    v["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountpoint"].as_str() == mnt.to_str())
        .cloned()
        .unwrap_or_else(|| panic!("{} not in doctor: {v}", mnt.display()))
}

fn fanotify_unavailable(directio: bool) -> Option<String> {
    if let Some(why) = kernel_mount_unavailable() {
        return Some(why);
    }
    if let Err(why) = kernel_feature("fanotify pre-content") {
        return Some(why);
    }
    if directio {
        if let Err(why) = kernel_feature("erofs directio") {
            return Some(why);
        }
    }
    None
}

/// Both in one test: each drops the page cache, which the other measures.
#[test]
fn a_lazily_read_byte_is_cached_once_with_and_without_directio() {
    cached_once(false);
    cached_once(true);
}

/// The host test measures which pages stay resident; the VM test's QEMU
/// (guest memory, host files it reads) makes the host reclaim meanwhile
/// (seen in CI: up to 960 KiB of a just-read file gone). One at a time.
static HOST_MEMORY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cached_once(directio: bool) {
    if std::env::var_os("IN_TEST_VM").is_some() {
        return;
    }
    let _quiet = HOST_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(why) = fanotify_unavailable(directio) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let shared = pattern(SHARED_LEN, 1);
    let img = image(tmp.path(), "a", &shared, 2);
    let d = Daemon::start_with(&tmp.path().join("d"), &format!("directio = {directio}\n"));
    let remote = format!("file://{}", tmp.path().join("blobs").display());
    let mnt = tmp.path().join("a");
    mount(&d, Some("dom"), "a", &img, &remote, &mnt);
    let _guard = Mounted(mnt.clone());
    let report = mount_report(&d, &mnt);
    assert_eq!(report["directio"], directio, "{report}");
    assert!(
        report["page_cache_share"]
            .as_str()
            .unwrap()
            .starts_with("off: "),
        "{report}"
    );

    drop_caches();
    let file = mnt.join("lib/shared.so");
    let t = std::time::Instant::now();
    let data = std::fs::read(&file).unwrap();
    let cold = t.elapsed();
    assert!(data == shared, "cold read returned other bytes");
    // The erofs file holds the pages; the cache file the daemon filled
    // (and, without directio, the kernel read) holds none once trimmed.
    let cache_files: Vec<PathBuf> = walk_files(&d.work.join("domains"))
        .into_iter()
        .filter(|p| p.extension().is_none())
        .collect();
    assert!(!cache_files.is_empty());
    let in_cache = || -> u64 { cache_files.iter().map(|p| resident(p)).sum() };
    let t = std::time::Instant::now();
    while in_cache() > MIB && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (in_cache, in_erofs) = (in_cache(), resident(&file));
    println!(
        "directio {directio}: cold read {:.1} MiB in {cold:?}: erofs file {} KiB resident, cache file {} KiB",
        SHARED_LEN as f64 / MIB as f64,
        in_erofs / 1024,
        in_cache / 1024
    );
    // All of it, but for what reclaim may take back under load (seen in
    // CI with the 7.2 VM running beside: 128 KiB short; with a build
    // beside: 768 KiB); a second copy in the cache file is what this test
    // is after.
    assert!(
        in_erofs + MIB >= SHARED_LEN as u64,
        "erofs file holds only {in_erofs} bytes"
    );
    assert!(
        in_cache <= MIB,
        "cache file keeps {in_cache} bytes of page cache"
    );
    // Warm: from erofs's pages, right again.
    assert!(std::fs::read(&file).unwrap() == shared);
    // Cold from a full cache file.
    drop_caches();
    assert!(std::fs::read(&file).unwrap() == shared);
    if !directio {
        // Read through the cache file's page cache, then trimmed again.
        wait_for("the cache file trimmed", || {
            cache_files.iter().map(|p| resident(p)).sum::<u64>() <= MIB
        });
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn page_cache_sharing_in_vm_7_2() {
    if std::env::var_os("IN_TEST_VM").is_some() {
        return;
    }
    if let Some(why) = vm_unavailable(Some("bzImage-7.2")) {
        return skip(&why);
    }
    let _quiet = HOST_MEMORY.lock().unwrap_or_else(|e| e.into_inner());
    // Inputs are built here and read by the VM (the host's root, read-only).
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let shared = pattern(SHARED_LEN, 1);
    image(tmp.path(), "a", &shared, 2);
    image(tmp.path(), "b", &shared, 3);
    // Same size, other content, and a's fingerprint.
    let other = pattern(SHARED_LEN, 9);
    let liar = image(tmp.path(), "liar", &other, 4);
    lie_about_fingerprint(&liar, &other, &shared);
    image_with(tmp.path(), "old", &shared, 5, &["--no-fingerprints"]);
    run_vm_suite(
        Some("bzImage-7.2"),
        "pagecache_suite_in_vm",
        tmp.path(),
        &[
            "--timeout",
            "900",
            "--mem",
            "2G",
            "--smp",
            "2",
            "--disk",
            "2G",
        ],
    );
}

#[test]
#[ignore = "runs inside ../shared/vm's Linux 7.2, driven by page_cache_sharing_in_vm_7_2"]
fn pagecache_suite_in_vm() {
    let input = PathBuf::from(std::env::var_os("SHOAL_VM_INPUT").expect("SHOAL_VM_INPUT"));
    let scratch = std::env::var_os("VM_SCRATCH").unwrap_or("/scratch".into());
    // File-backed erofs needs its files on a real file system (not 9p).
    let tmp = tempfile::tempdir_in(scratch).unwrap();
    let bootstraps = tmp.path().join("images");
    std::fs::create_dir(&bootstraps).unwrap();
    for name in ["a", "b", "liar", "old"] {
        std::fs::copy(
            input.join(format!("{name}.img")),
            bootstraps.join(format!("{name}.img")),
        )
        .unwrap();
    }
    let img = |n: &str| bootstraps.join(format!("{n}.img"));
    let remote = format!("file://{}", input.join("blobs").display());
    let shared = pattern(SHARED_LEN, 1);
    let d = Daemon::start(&tmp.path().join("d"));
    let m = |n: &str| tmp.path().join("mnt").join(n);
    let mut guards = Vec::new();
    for (dom, fsid, image, at) in [
        (Some("dom"), "a", "a", "a"),
        (Some("dom"), "b", "b", "b"),
        (Some("other"), "b", "b", "b-other"),
        (None, "b2", "b", "b-nodomain"),
        (Some("other"), "liar", "liar", "liar-other"),
    ] {
        mount(&d, dom, fsid, &img(image), &remote, &m(at));
        guards.push(Mounted(m(at)));
    }
    for at in ["a", "b", "b-other"] {
        let r = mount_report(&d, &m(at));
        assert_eq!(r["page_cache_share"], "active", "{r}");
    }
    let r = mount_report(&d, &m("b-nodomain"));
    assert!(
        r["page_cache_share"]
            .as_str()
            .unwrap()
            .contains("no domain"),
        "{r}"
    );

    // Lazily, with sharing on: every mount serves its files' bytes.
    let file = |at: &str| m(at).join("lib/shared.so");
    for at in ["a", "b", "b-other", "b-nodomain"] {
        assert!(std::fs::read(file(at)).unwrap() == shared, "{at}");
    }
    println!("vm: four mounts in two domains and none filled lazily, bytes right");

    // One domain: the second image's copy adds no page cache.
    let len = SHARED_LEN as u64;
    drop_caches();
    let (first, data) = read_growth(&file("a"));
    assert!(data == shared);
    let (second, data) = read_growth(&file("b"));
    assert!(data == shared);
    println!(
        "vm: domain dom: a adds {} KiB, then b (same file, own blob) adds {} KiB",
        first / 1024,
        second / 1024
    );
    assert!(first >= len * 9 / 10, "first read added only {first}");
    assert!(
        second <= len / 20,
        "second mount of the domain added {second}"
    );
    // Another domain, or none: their own copy.
    let (other, data) = read_growth(&file("b-other"));
    assert!(data == shared);
    let (none, data) = read_growth(&file("b-nodomain"));
    assert!(data == shared);
    println!(
        "vm: domain other adds {} KiB, no domain adds {} KiB",
        other / 1024,
        none / 1024
    );
    assert!(other >= len * 9 / 10, "another domain shared: {other}");
    assert!(
        none >= len * 9 / 10,
        "a mount without a domain shared: {none}"
    );

    // A lying fingerprint (a's, on other bytes of the same size). Alone in
    // its domain it shares nothing with domain dom: its own bytes.
    let liar = pattern(SHARED_LEN, 9);
    let at = |n: &str| m(n).join("lib/shared.so");
    mount(
        &d,
        Some("tenant2"),
        "liar",
        &img("liar"),
        &remote,
        &m("liar-alone"),
    );
    guards.push(Mounted(m("liar-alone")));
    assert!(std::fs::read(at("liar-alone")).unwrap() == liar);
    // The kernel compares only domain, fingerprint and size: in domain dom
    // it would hand the liar a's pages. shoal checks each fingerprint
    // against the chunk digests of the domain's images at bind, so the
    // liar mounts without sharing, and reads its own bytes.
    mount(
        &d,
        Some("dom"),
        "liar",
        &img("liar"),
        &remote,
        &m("liar-dom"),
    );
    guards.push(Mounted(m("liar-dom")));
    let r = mount_report(&d, &m("liar-dom"));
    assert!(
        r["page_cache_share"]
            .as_str()
            .unwrap()
            .contains("names other content"),
        "{r}"
    );
    assert!(std::fs::read(at("liar-dom")).unwrap() == liar);
    assert!(std::fs::read(at("a")).unwrap() == shared);
    // Bound first, the liar cannot make an honest image read its bytes:
    // the honest one is the one that then mounts without sharing.
    mount(
        &d,
        Some("order"),
        "liar",
        &img("liar"),
        &remote,
        &m("liar-first"),
    );
    guards.push(Mounted(m("liar-first")));
    assert!(std::fs::read(at("liar-first")).unwrap() == liar);
    mount(&d, Some("order"), "b", &img("b"), &remote, &m("b-second"));
    guards.push(Mounted(m("b-second")));
    let r = mount_report(&d, &m("b-second"));
    assert!(
        r["page_cache_share"].as_str().unwrap().starts_with("off: "),
        "{r}"
    );
    assert!(std::fs::read(at("b-second")).unwrap() == shared);
    println!("vm: a lying fingerprint shares nothing, whichever image is bound first");

    // An image without fingerprints (built before them) still mounts in
    // a sharing domain: the kernel turns sharing off for it.
    mount(&d, Some("dom"), "old", &img("old"), &remote, &m("old"));
    guards.push(Mounted(m("old")));
    let r = mount_report(&d, &m("old"));
    assert!(
        r["page_cache_share"]
            .as_str()
            .unwrap()
            .contains("no inode fingerprints"),
        "{r}"
    );
    assert!(std::fs::read(at("old")).unwrap() == shared);
    drop(guards);
}
