//! Layers mean what containerd says they mean. Hostile and unusual layers
//! (tests/fixtures/layers.py: PAX values with newlines and embedded
//! records, GNU long names, non-UTF-8 and 255-byte names, devices, every
//! whiteout order, opaque at the root, all four GNU sparse formats) are
//! built by shoal, mounted by the kernel, and must equal the same layers
//! applied by GNU tar; layers shoal cannot represent must be refused with
//! an error naming the entry.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Write the fixture layers into `dir`, or say why not.
fn fixture_layers(dir: &Path) -> Result<(), String> {
    for tool in ["python3", "tar"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Err(format!("no {tool}"));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layers.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "layers.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The fixture layers in a temporary directory, when the kernel can mount
/// the images built from them; otherwise says why not and gives `None`.
fn kernel_and_fixture() -> Option<tempfile::TempDir> {
    if let Some(why) = kernel_mount_unavailable() {
        skip(&why);
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    if let Err(why) = fixture_layers(tmp.path()) {
        skip(&why);
        return None;
    }
    Some(tmp)
}

fn build(img: &Path, blobs: &Path, layers: &[PathBuf]) -> std::process::Output {
    let mut cmd = shoal();
    cmd.arg("build")
        .arg("-o")
        .arg(img)
        .arg("--blob-dir")
        .arg(blobs);
    cmd.arg("--chunk-size").arg("1048576");
    cmd.args(layers).output().unwrap()
}

/// Build `layers`, mount the image, and compare it with GNU tar's tree.
fn differential(name: &str, layers: &[PathBuf]) {
    let tmp = tempfile::tempdir().unwrap();
    let (img, blobs) = (tmp.path().join("img"), tmp.path().join("blobs"));
    let out = build(&img, &blobs, layers);
    assert!(
        out.status.success(),
        "{name}: build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = tmp.path().join("reference");
    reference_tree(layers, &reference);
    let _m = mount(&img, &blobs, &tmp.path().join("mnt"));
    let diffs = compare_trees(&reference, &tmp.path().join("mnt"));
    assert!(
        diffs.is_empty(),
        "{name}: kernel view differs from GNU tar:\n{}",
        diffs.join("\n")
    );
    // And the image holds the sparse files' holes as holes: the blobs
    // hold little more than the stored data.
    let stored = dir_bytes(&blobs);
    assert!(stored < 8 << 20, "{name}: {stored} bytes of blobs");
}

#[test]
fn hostile_layers_equal_gnu_tar() {
    let Some(tmp) = kernel_and_fixture() else {
        return;
    };
    let l = |n: &str| tmp.path().join(n);
    differential(
        "all",
        &[
            l("00-base.tar"),
            l("01-whiteouts.tar"),
            l("02-pax.tar"),
            l("03-sparse-0.0.tar"),
            l("04-sparse-0.1.tar"),
            l("05-sparse-1.0.tar"),
            l("06-sparse-gnu.tar"),
        ],
    );
    differential("root-opaque", &[l("00-base.tar"), l("07-root-opaque.tar")]);
}

/// What the kernel shows of the fixture, checked by hand where a
/// newline-splitting or order-dependent reader would differ.
#[test]
fn hostile_layers_specific_results() {
    let Some(tmp) = kernel_and_fixture() else {
        return;
    };
    let layers: Vec<PathBuf> = [
        "00-base.tar",
        "01-whiteouts.tar",
        "02-pax.tar",
        "05-sparse-1.0.tar",
    ]
    .iter()
    .map(|n| tmp.path().join(n))
    .collect();
    let (img, blobs) = (tmp.path().join("img"), tmp.path().join("blobs"));
    assert!(build(&img, &blobs, &layers).status.success());
    let mnt = tmp.path().join("mnt");
    let _m = mount(&img, &blobs, &mnt);
    let m = |p: &str| mnt.join(p);
    assert_eq!(
        std::fs::read_link(m("pax/sym")).unwrap(),
        Path::new("target-ok")
    );
    assert!(!m("evil").exists());
    let nl = xattr::get(m("pax/nl-file"), "user.nl").unwrap().unwrap();
    assert!(
        nl.starts_with(b"x\n") && nl.ends_with(b"path=evil\n"),
        "{nl:?}"
    );
    assert_eq!(
        xattr::get(m("pax/nl-file"), "user.empty").unwrap(),
        Some(vec![])
    );
    let cap = xattr::get(m("pax/cap"), "security.capability")
        .unwrap()
        .unwrap();
    assert_eq!(cap[4], b'\n');
    let acl = Command::new("getfacl").arg("-n").arg(m("pax/acl")).output();
    if let Ok(acl) = acl {
        assert!(String::from_utf8_lossy(&acl.stdout).contains("user:10:r--"));
    }
    // Whiteouts hide lower layers only, whatever the order.
    assert!(!m("a/keep").exists() && !m("a/b/old").exists());
    assert_eq!(std::fs::read(m("a/b/new")).unwrap(), b"new\n");
    assert!(!m("c/old").exists());
    assert_eq!(std::fs::read(m("c/new")).unwrap(), b"c2\n");
    assert!(!m("d/x").exists() && m("d/y").exists());
    assert_eq!(std::fs::read(m("links/hard")).unwrap(), b"linked\n");
    // Sparse: the logical file, holes read as zeros.
    let holes = std::fs::read(m("sparse-1.0/holes")).unwrap();
    assert_eq!(holes.len(), 7 << 20);
    assert_eq!(&holes[..4], b"head");
    assert_eq!(&holes[3 << 20..(3 << 20) + 3], b"mid");
    assert!(holes[1 << 20..3 << 20].iter().all(|&b| b == 0));
}

#[test]
fn unrepresentable_layers_are_refused_naming_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    if let Err(why) = fixture_layers(tmp.path()) {
        return skip(&why);
    }
    for (layer, entry, why) in [
        (
            "contiguous.tar",
            "contig",
            "unsupported entry type '7' (contiguous file)",
        ),
        (
            "sparse-version.tar",
            "sparse-v2",
            "unknown GNU sparse version 2.0",
        ),
        (
            "sparse-map-mismatch.tar",
            "sparse-short",
            "sparse map covers 50 bytes, the entry stores 10",
        ),
        ("dotdot.tar", "../escape", "'..'"),
    ] {
        let path = tmp.path().join("refuse").join(layer);
        let out = build(
            &tmp.path().join("img"),
            &tmp.path().join("blobs"),
            std::slice::from_ref(&path),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{layer} built");
        assert!(err.contains(&path.display().to_string()), "{layer}: {err}");
        assert!(
            err.contains(&format!("{entry:?}")) || entry.is_empty(),
            "{layer}: {err}"
        );
        assert!(err.contains(why), "{layer}: {err}");
    }
}
