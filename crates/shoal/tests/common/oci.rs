//! OCI images for the registry and containerd tests: layouts written
//! from corpus layers (tests/fixtures/oci_image.py), skopeo, and shoal
//! convert.

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Why this test cannot run here, if it cannot.
pub fn missing(tools: &[&str]) -> Option<String> {
    if !corpus_dir().join("base.tar.gz").exists() {
        return Some("no corpus (../shared/corpus)".into());
    }
    tools
        .iter()
        .find(|t| !have(t))
        .map(|t| format!("{t} not installed"))
}

/// An OCI layout of corpus layers, as an image builder would write it.
pub fn layout(dir: &Path, tag: &str, layers: &[&str], extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("layout-{tag}"));
    let mut cmd = Command::new("python3");
    cmd.arg(fixture("oci_image.py")).arg(&out).arg(tag);
    for l in layers {
        cmd.arg(corpus_dir().join(l));
    }
    let o = cmd.args(extra).output().unwrap();
    assert!(
        o.status.success(),
        "oci_image.py: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `skopeo copy` a layout into a registry (as `host/repo:tag`).
pub fn skopeo_push(layout: &Path, tag: &str, dest: &str, extra: &[&str]) {
    let o = Command::new("skopeo")
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn convert(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = shoal();
    c.arg("convert")
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("SHOAL_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub fn convert_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = convert(&a, &[]);
    assert!(
        o.status.success(),
        "shoal convert {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

pub fn skopeo_inspect(reference: &str, extra: &[&str]) -> serde_json::Value {
    let o = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .args(extra)
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}
