//! Shared helpers for the integration tests: the shoal binary, skip
//! detection, a reference applier of tar layers (GNU tar), a tree
//! comparator and a mount guard.
#![allow(dead_code)]

pub mod oci;
pub mod servers;

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

/// Run shoal, panic with its stderr on failure, return stdout.
pub fn run_shoal(args: &[&std::ffi::OsStr]) -> String {
    let out = shoal().args(args).output().expect("running shoal");
    assert!(
        out.status.success(),
        "shoal {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `shoal extract IMG OUT --blob-dir BLOBS`.
pub fn extract(img: &Path, blobs: &Path, out: &Path) {
    run_shoal(&[
        "extract".as_ref(),
        img.as_os_str(),
        out.as_os_str(),
        "--blob-dir".as_ref(),
        blobs.as_os_str(),
    ]);
}

#[macro_export]
macro_rules! os {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

/// `shoal build --layer-blobs -o DIR/NAME.img --blob-dir BLOBS LAYERS...`:
/// one blob per layer, so images sharing a base share its blob.
pub fn build_layer_blobs(dir: &Path, name: &str, layers: &[PathBuf], blobs: &Path) -> PathBuf {
    build_layer_blobs_with(dir, name, layers, blobs, "none")
}

/// [`build_layer_blobs`] with `--compress COMPRESS`.
pub fn build_layer_blobs_with(
    dir: &Path,
    name: &str,
    layers: &[PathBuf],
    blobs: &Path,
    compress: &str,
) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    let mut args: Vec<&std::ffi::OsStr> =
        os!["build", "--layer-blobs", "--compress", compress, "-o"].to_vec();
    args.push(img.as_os_str());
    args.extend(os!["--blob-dir"]);
    args.push(blobs.as_os_str());
    args.extend(layers.iter().map(|l| l.as_os_str()));
    run_shoal(&args);
    img
}

pub fn corpus_dir() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("../../../shared/corpus")
}

/// The name a remote serves device 1 of `img` by: its compressed object
/// if it has one, else the blob's tag.
pub fn base_remote_name(img: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&run_shoal(os!["inspect", img.as_os_str(), "--json"])).unwrap();
    let d = &v["devices"][0];
    d["remote_object"]["object"]
        .as_str()
        .or(d["tag"].as_str())
        .unwrap()
        .to_string()
}

/// Why kernel-mount tests cannot run here, if they cannot.
pub fn kernel_mount_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.contains("erofs") {
        // erofs may be a module that loads on first use
        let _ = Command::new("modprobe").arg("erofs").status();
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs.contains("erofs") {
            return Some("kernel has no erofs".into());
        }
    }
    None
}

/// erofs-utils 1.9.3's fsck.erofs from ../shared/peers: it knows every
/// feature shoal writes (Debian's 1.5 predates the fingerprints' long xattr
/// prefixes and refuses such images).
/// Whether this kernel has `feature` (a name `shoal doctor` prints, e.g.
/// "fanotify pre-content"): `Err` says why not, as doctor does.
pub fn kernel_feature(feature: &str) -> Result<(), String> {
    let o = shoal()
        .args(["doctor", "--json", "--socket", "/nonexistent"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let f = v["features"]["features"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["name"] == feature)
        .ok_or_else(|| format!("doctor does not know {feature}"))?;
    match f["available"] == true {
        true => Ok(()),
        false => Err(f["detail"].as_str().unwrap_or(feature).to_string()),
    }
}

pub fn peer_fsck_erofs() -> Option<PathBuf> {
    let p = corpus_dir().join("../peers/bin/fsck.erofs");
    p.exists().then_some(p)
}

pub fn skip(reason: &str) {
    println!("skipped: {reason}");
}

/// Unmounts on drop.
pub struct Mounted(pub PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

pub fn mount(image: &Path, blob_dir: &Path, mnt: &Path) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    run_shoal(&[
        "mount".as_ref(),
        image.as_os_str(),
        mnt.as_os_str(),
        "--blob-dir".as_ref(),
        blob_dir.as_os_str(),
    ]);
    Mounted(mnt.to_path_buf())
}

fn keep_mtime<F: FnOnce()>(dir: &Path, f: F) {
    let md = std::fs::symlink_metadata(dir).ok();
    f();
    if let Some(md) = md {
        let t = rustix::fs::Timespec {
            tv_sec: md.mtime(),
            tv_nsec: md.mtime_nsec() as _,
        };
        let _ = rustix::fs::utimensat(
            rustix::fs::CWD,
            dir,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        );
    }
}

/// Apply OCI layers with GNU tar, independently of shoal: whiteouts of a
/// layer are applied to the lower layers first, then the layer is extracted
/// without its whiteout files.
pub fn reference_tree(layers: &[PathBuf], dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    // A directory's metadata comes from the topmost layer with an entry for
    // it; files a layer adds to it must not bump it (extracting them does).
    let mut dir_times: BTreeMap<PathBuf, (i64, u32)> = BTreeMap::new();
    for layer in layers {
        let list = Command::new("tar").arg("-tf").arg(layer).output().unwrap();
        assert!(list.status.success(), "tar -t {}", layer.display());
        let mut implied = Vec::new();
        for name in list.stdout.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let p = Path::new(std::ffi::OsStr::from_bytes(name));
            let Some(base) = p.file_name() else { continue };
            let parent = dest.join(p.parent().unwrap_or(Path::new("")));
            let base = base.as_bytes();
            if base.starts_with(b".wh.") {
                implied.push(p.parent().unwrap_or(Path::new("")).to_path_buf());
            }
            if base == b".wh..wh..opq" {
                keep_mtime(&parent, || {
                    if let Ok(rd) = std::fs::read_dir(&parent) {
                        for e in rd.flatten() {
                            let path = e.path();
                            if path.is_dir() && !path.is_symlink() {
                                std::fs::remove_dir_all(&path).unwrap();
                            } else {
                                std::fs::remove_file(&path).unwrap();
                            }
                        }
                    }
                });
            } else if let Some(hidden) = base.strip_prefix(b".wh.") {
                let victim = parent.join(std::ffi::OsStr::from_bytes(hidden));
                keep_mtime(&parent, || {
                    if let Ok(md) = std::fs::symlink_metadata(&victim) {
                        if md.is_dir() {
                            std::fs::remove_dir_all(&victim).unwrap();
                        } else {
                            std::fs::remove_file(&victim).unwrap();
                        }
                    }
                });
            }
        }
        let st = Command::new("tar")
            .args([
                "--xattrs",
                "--xattrs-include=*",
                "--acls",
                "--numeric-owner",
                "-xpf",
            ])
            .arg(layer)
            .arg("--exclude=.wh.*")
            .arg("-C")
            .arg(dest)
            .status()
            .unwrap();
        assert!(st.success(), "tar -x {}", layer.display());
        for dir in &implied {
            create_implied_dirs(dest, dir);
        }
        // GNU tar does not restore POSIX ACLs carried as
        // SCHILY.xattr.system.posix_acl_* (containerd does): set them too.
        // GNU tar restores a directory's mtime when it leaves it; entries
        // landing in it later (layers are not sorted) bump it again, and a
        // second `tar -x` leaves existing directories alone. So set
        // directory times from the layer's directory entries (listed by
        // Python's tarfile, exact PAX time strings) once more.
        let py = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import os,sys,tarfile,subprocess\np=sys.argv[1]\nf=open(p,'rb')\nif f.read(4)==b'\\x28\\xb5\\x2f\\xfd':\n    t=tarfile.open(fileobj=subprocess.Popen(['zstd','-dc',p],stdout=subprocess.PIPE).stdout,mode='r|')\nelse:\n    t=tarfile.open(p)\nfor m in t:\n    m.isdir() and sys.stdout.buffer.write(m.name.encode('utf-8','surrogateescape')+b'\\0'+m.pax_headers.get('mtime',str(m.mtime)).encode()+b'\\0')\n    for k,v in m.pax_headers.items():\n        k.startswith('SCHILY.xattr.system.posix_acl_') and os.setxattr(os.path.join(sys.argv[2],m.name),k[13:],v.encode('utf-8','surrogateescape'),follow_symlinks=False)",
            ])
            .arg(layer)
            .arg(dest)
            .output()
            .unwrap();
        assert!(
            py.status.success(),
            "listing directories: {}",
            String::from_utf8_lossy(&py.stderr)
        );
        let fields: Vec<&[u8]> = py.stdout.split(|&b| b == 0).collect();
        for pair in fields.chunks_exact(2) {
            let dir = dest.join(std::ffi::OsStr::from_bytes(pair[0]));
            let t = std::str::from_utf8(pair[1]).unwrap();
            let (sec, frac) = t.split_once('.').unwrap_or((t, "0"));
            let nsec: u32 = format!("{frac:0<9}")[..9].parse().unwrap();
            dir_times.insert(dir, (sec.parse().unwrap(), nsec));
        }
        for (dir, (sec, nsec)) in &dir_times {
            let ts = rustix::fs::Timespec {
                tv_sec: *sec,
                tv_nsec: *nsec as _,
            };
            let _ = rustix::fs::utimensat(
                rustix::fs::CWD,
                dir,
                &rustix::fs::Timestamps {
                    last_access: ts,
                    last_modification: ts,
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            );
        }
    }
}

/// A whiteout's directory exists in the layer even when no entry declares
/// it (containerd creates it; overlayfs shows it): create what is missing
/// as shoal records an implied directory, 0755 root with mtime 0.
fn create_implied_dirs(dest: &Path, rel: &Path) {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        let next = cur.join(c);
        if std::fs::symlink_metadata(&next).is_err() {
            keep_mtime(&cur, || std::fs::create_dir(&next).unwrap());
            std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let zero = rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &next,
                &rustix::fs::Timestamps {
                    last_access: zero,
                    last_modification: zero,
                },
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .unwrap();
        }
        cur = next;
    }
}

/// Bytes of all files directly in `dir` (a blob directory).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for n in xattr::list(p).unwrap() {
        if let Some(v) = xattr::get(p, &n).unwrap() {
            m.insert(n.as_bytes().to_vec(), v);
        }
    }
    m
}

fn file_digest(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let md = std::fs::symlink_metadata(&abs).unwrap();
        if md.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&abs)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        }
        out.push(rel);
    }
    out
}

/// Compare two trees in content and metadata: type, mode, uid, gid, mtime
/// (ns), size, rdev, nlink, xattrs, symlink targets, file contents and
/// hard-link groups. Returns the differences (empty when equal). The roots'
/// own metadata is not compared.
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let pa = walk(a);
    let pb = walk(b);
    if pa != pb {
        let sa: std::collections::BTreeSet<_> = pa.iter().collect();
        let sb: std::collections::BTreeSet<_> = pb.iter().collect();
        for p in sa.difference(&sb).take(20) {
            diffs.push(format!("only in {}: {}", a.display(), p.display()));
        }
        for p in sb.difference(&sa).take(20) {
            diffs.push(format!("only in {}: {}", b.display(), p.display()));
        }
        return diffs;
    }
    let mut groups_a: HashMap<u64, Vec<&PathBuf>> = HashMap::new();
    let mut groups_b: HashMap<u64, Vec<&PathBuf>> = HashMap::new();
    for rel in pa.iter().skip(1) {
        let (x, y) = (a.join(rel), b.join(rel));
        let (mx, my) = (
            std::fs::symlink_metadata(&x).unwrap(),
            std::fs::symlink_metadata(&y).unwrap(),
        );
        let mut d = |what: &str, l: String, r: String| {
            if l != r {
                diffs.push(format!("{}: {what} {l} != {r}", rel.display()));
            }
        };
        d(
            "mode",
            format!("{:o}", mx.mode()),
            format!("{:o}", my.mode()),
        );
        d("uid", mx.uid().to_string(), my.uid().to_string());
        d("gid", mx.gid().to_string(), my.gid().to_string());
        d(
            "mtime",
            format!("{}.{:09}", mx.mtime(), mx.mtime_nsec()),
            format!("{}.{:09}", my.mtime(), my.mtime_nsec()),
        );
        d("nlink", mx.nlink().to_string(), my.nlink().to_string());
        d("rdev", mx.rdev().to_string(), my.rdev().to_string());
        d(
            "xattrs",
            format!("{:?}", xattrs(&x)),
            format!("{:?}", xattrs(&y)),
        );
        if mx.is_file() {
            d("size", mx.len().to_string(), my.len().to_string());
            d("content", file_digest(&x), file_digest(&y));
        }
        if mx.is_symlink() {
            d(
                "target",
                format!("{:?}", std::fs::read_link(&x).ok()),
                format!("{:?}", std::fs::read_link(&y).ok()),
            );
        }
        if !mx.is_dir() && mx.nlink() > 1 {
            groups_a.entry(mx.ino()).or_default().push(rel);
            groups_b.entry(my.ino()).or_default().push(rel);
        }
    }
    let mut ga: Vec<_> = groups_a.into_values().collect();
    let mut gb: Vec<_> = groups_b.into_values().collect();
    ga.sort();
    gb.sort();
    if ga != gb {
        diffs.push(format!(
            "hard-link groups differ: {} vs {}",
            ga.len(),
            gb.len()
        ));
    }
    diffs
}

/// Read every regular file under `b` and compare it with the same path
/// under `a`; returns what differed or failed.
pub fn compare_contents(a: &Path, b: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = b.join(&rel);
        let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(r) => r.map(|e| e.unwrap()).collect(),
            Err(e) => {
                bad.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                match std::fs::read(b.join(&r)) {
                    Ok(got) => {
                        if got != std::fs::read(a.join(&r)).unwrap() {
                            bad.push(format!("{}: wrong bytes", r.display()));
                        }
                    }
                    Err(e) => bad.push(format!("{}: {e}", r.display())),
                }
            }
        }
    }
    bad
}

/// Why the VM tests cannot run here (`kernel`: a bzImage in ../shared/vm,
/// None for its default 6.12), if they cannot.
pub fn vm_unavailable(kernel: Option<&str>) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    let vm = corpus_dir().join("../vm/run-in-vm.sh");
    if !vm.exists() {
        return Some("no ../shared/vm/run-in-vm.sh".into());
    }
    if let Some(k) = kernel {
        if !corpus_dir().join("../vm").join(k).exists() {
            return Some(format!("no ../shared/vm/{k}"));
        }
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        return Some("qemu-system-x86 not installed".into());
    }
    None
}

/// Run this test binary's ignored `suite` inside ../shared/vm (with
/// `kernel`, else the default 6.12) on `input` (read-only in the guest, as
/// `SHOAL_VM_INPUT`), assert it passed, and print its `vm: ` lines.
pub fn run_vm_suite(kernel: Option<&str>, suite: &str, input: &Path, vm_args: &[&str]) {
    let vm_dir = corpus_dir().join("../vm");
    let mut cmd = Command::new(vm_dir.join("run-in-vm.sh"));
    if let Some(k) = kernel {
        cmd.arg("--kernel").arg(vm_dir.join(k));
    }
    let out = cmd
        .args(vm_args)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            suite,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SHOAL_VM_INPUT", input)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the VM suite failed:\n{text}");
    assert!(
        text.contains("test result: ok. 1 passed"),
        "the VM suite did not run:\n{text}"
    );
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("vm: ")).collect();
    println!("{}", lines.join("\n"));
}
