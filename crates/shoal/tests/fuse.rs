//! The FUSE frontend: the daemon serves bound images over /dev/fuse. Same
//! tree comparison as the kernel mounts; domain sharing counted at nginx;
//! EIO from a failing remote and recovery; the daemon's death leaves no
//! wrong data and a documented recovery.

mod common;
use common::servers::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fuse_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    None
}

fn build(dir: &Path, name: &str, layers: &[PathBuf], blobs: &Path) -> PathBuf {
    let img = dir.join(format!("{name}.img"));
    let mut args: Vec<&std::ffi::OsStr> = os!["build", "--layer-blobs", "-o"].to_vec();
    args.push(img.as_os_str());
    args.extend(os!["--blob-dir"]);
    args.push(blobs.as_os_str());
    args.extend(layers.iter().map(|l| l.as_os_str()));
    run_shoal(&args);
    img
}

fn layers(names: &[&str]) -> Option<Vec<PathBuf>> {
    let c = corpus_dir();
    c.join("base.tar.gz")
        .exists()
        .then(|| names.iter().map(|n| c.join(n)).collect())
}

/// Unmounts (lazily, in case the daemon is gone) on drop.
struct FuseMount(PathBuf);
impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn mount(d: &Daemon, dom: &str, fsid: &str, img: &Path, remote: &str, mnt: &Path) -> FuseMount {
    std::fs::create_dir_all(mnt).unwrap();
    d.ok(&[
        "mount",
        "--frontend",
        "fuse",
        "--domain",
        dom,
        "--fsid",
        fsid,
        img.to_str().unwrap(),
        mnt.to_str().unwrap(),
        "--remote",
        remote,
    ]);
    FuseMount(mnt.to_path_buf())
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
    if let Some(why) = fuse_unavailable() {
        return skip(&why);
    }
    let Some(py_layers) = layers(&["base.tar.gz", "py-layer.tar.gz"]) else {
        return skip("no corpus");
    };
    let web_layers = layers(&["base.tar.gz", "web-layer.tar.zst"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let blobs = tmp.path().join("blobs");
    let py = build(tmp.path(), "py", &py_layers, &blobs);
    let web = build(tmp.path(), "web", &web_layers, &blobs);
    let Some(nginx) = Nginx::start(&blobs, tmp.path()) else {
        return skip("nginx not installed");
    };
    let d = Daemon::start(tmp.path());
    let m1 = mount(&d, "dom", "py", &py, &nginx.url(), &tmp.path().join("m1"));
    let reference = tmp.path().join("ref");
    reference_tree(&py_layers, &reference);
    let diffs = compare_trees(&reference, &m1.0);
    assert!(
        diffs.is_empty(),
        "fuse view differs from the layers:\n{}",
        diffs.join("\n")
    );
    let v: serde_json::Value = serde_json::from_str(&run_shoal(&[
        "inspect".as_ref(),
        py.as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    let base_blob = v["devices"][0]["tag"].as_str().unwrap().to_string();
    let after_first = nginx.bytes_for(&base_blob);
    assert!(after_first > 0);
    // The second image of the domain reads the shared base from the cache.
    let m2 = mount(&d, "dom", "web", &web, &nginx.url(), &tmp.path().join("m2"));
    read_all(&m2.0);
    assert_eq!(
        nginx.bytes_for(&base_blob),
        after_first,
        "base fetched twice in one domain"
    );
    // Another domain fetches its own copy.
    let m3 = mount(
        &d,
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
        "fuse",
        "--domain",
        "dom",
        "--fsid",
        "py",
        py.to_str().unwrap(),
        tmp.path().join("m4").to_str().unwrap(),
        "--remote",
        &nginx.url(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already bound"));
    for m in [&m1, &m2, &m3] {
        d.ok(&["umount", m.0.to_str().unwrap()]);
    }
    assert!(d.status().as_array().unwrap().is_empty(), "umount unbinds");
}

#[test]
fn fuse_read_fails_with_eio_then_recovers_and_survives_daemon_death() {
    if let Some(why) = fuse_unavailable() {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    let blobs = tmp.path().join("blobs");
    let img = build(tmp.path(), "demo", &[ex.join("base")], &blobs);
    let srv = Faulty::start(&blobs, tmp.path());
    let mut d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    let m = mount(&d, "f", "demo", &img, &srv.url(), &mnt);
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
    // Documented recovery: lazy-unmount the dead mount, restart, mount again.
    assert!(Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .status()
        .unwrap()
        .success());
    d.restart();
    d.ok(&["unbind", "--domain", "f", "demo"]); // the restored binding of the dead mount
    let _m = mount(&d, "f", "demo", &img, &srv.url(), &mnt);
    assert_eq!(std::fs::read(&file).unwrap(), want);
    drop(m);
}

fn libc_eio() -> i32 {
    5
}
