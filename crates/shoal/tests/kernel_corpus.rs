//! Kernel compatibility on the real corpus: each tree is built with shoal,
//! mounted by the host kernel (file-backed, blobs as `device=`), and must
//! equal the same layers applied by GNU tar; `fsck.erofs` must accept the
//! bootstrap; `shoal extract` must equal the kernel's view.

mod common;
use common::*;
use std::path::PathBuf;

fn check_combo(name: &str, layers: &[&str]) {
    let corpus = corpus_dir();
    if !corpus.join("base.tar.gz").exists() {
        return skip(&format!("no corpus at {}", corpus.display()));
    }
    if let Some(why) = kernel_mount_unavailable() {
        return skip(&why);
    }
    let layers: Vec<PathBuf> = layers.iter().map(|l| corpus.join(l)).collect();
    let tmp = tempfile::tempdir().unwrap();
    let (img, blobs) = (
        tmp.path().join(format!("{name}.img")),
        tmp.path().join("blobs"),
    );
    let mut args: Vec<&std::ffi::OsStr> = os!["build", "-o"].to_vec();
    args.push(img.as_os_str());
    args.extend(os!["--blob-dir"]);
    args.push(blobs.as_os_str());
    args.extend(layers.iter().map(|l| l.as_os_str()));
    run_shoal(&args);

    // fsck.erofs (erofs-utils 1.9.3) accepts the bootstrap with its blobs.
    match peer_fsck_erofs() {
        Some(bin) => {
            let mut fsck = std::process::Command::new(bin);
            for e in std::fs::read_dir(&blobs).unwrap() {
                fsck.arg(format!("--device={}", e.unwrap().path().display()));
            }
            let out = fsck.arg(&img).output().unwrap();
            assert!(
                out.status.success(),
                "fsck.erofs rejected {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => println!("fsck.erofs not run: no erofs-utils 1.9.3 in ../shared/peers"),
    }

    let reference = tmp.path().join("ref");
    reference_tree(&layers, &reference);
    let mnt = tmp.path().join("mnt");
    let _m = mount(&img, &blobs, &mnt);
    let diffs = compare_trees(&reference, &mnt);
    assert!(
        diffs.is_empty(),
        "{name}: kernel view differs from the layers:\n{}",
        diffs.join("\n")
    );

    let out = tmp.path().join("extract");
    extract(&img, &blobs, &out);
    let diffs = compare_trees(&mnt, &out);
    assert!(
        diffs.is_empty(),
        "{name}: extract differs from the kernel:\n{}",
        diffs.join("\n")
    );
    run_shoal(&[
        "verify".as_ref(),
        img.as_os_str(),
        "--blob-dir".as_ref(),
        blobs.as_os_str(),
    ]);
}

#[test]
fn corpus_base() {
    check_combo("base", &["base.tar.gz"]);
}

#[test]
fn corpus_base_py() {
    check_combo("py", &["base.tar.gz", "py-layer.tar.gz"]);
}

#[test]
fn corpus_base_py_slim() {
    check_combo(
        "slim",
        &["base.tar.gz", "py-layer.tar.gz", "slim-layer.tar.gz"],
    );
}

#[test]
fn corpus_base_web_zstd() {
    check_combo("web", &["base.tar.gz", "web-layer.tar.zst"]);
}
