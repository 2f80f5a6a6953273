//! Write an OCI image layout from gzip tar layers (used by `shoal demo
//! --containers` to have an ordinary image to convert without a network).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

fn put(dir: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let d = hex::encode(Sha256::digest(bytes));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join(&d), bytes)?;
    Ok((format!("sha256:{d}"), bytes.len() as u64))
}

/// The layout at `dir`, tagged `tag`, of `layers` (gzip tars, stored as
/// they are) running `cmd`.
pub fn write(dir: &Path, tag: &str, layers: &[PathBuf], cmd: &[&str]) -> Result<()> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let bytes = std::fs::read(l).with_context(|| format!("reading {}", l.display()))?;
        let mut h = Sha256::new();
        let mut z = flate2::read::MultiGzDecoder::new(&bytes[..]);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = z
                .read(&mut buf)
                .with_context(|| format!("gunzipping {}", l.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        diff_ids.push(format!("sha256:{}", hex::encode(h.finalize())));
        let (digest, size) = put(dir, &bytes)?;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
    }
    let config = serde_json::json!({
        "architecture": shoal_registry::Platform::host().architecture, "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs) = put(dir, &serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms) = put(dir, &serde_json::to_vec(&manifest)?)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}
