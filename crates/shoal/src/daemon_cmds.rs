//! Client-side commands that talk to the daemon's control API.

use crate::client::{call, request};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The fsid to bind an image under when none is given: the superblock's
/// volume name (`build --fsid`), else the bootstrap's file stem.
pub fn default_fsid(bootstrap: &Path) -> Result<String> {
    let img = crate::image_cmds::open_image(bootstrap)?;
    let vn = String::from_utf8_lossy(&img.sb.volume_name)
        .trim_end_matches('\0')
        .to_string();
    if !vn.is_empty() {
        return Ok(vn);
    }
    let stem = bootstrap
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(stem)
}

/// The bind request body for a bootstrap path or an `oci://` reference.
fn bind_body(
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
) -> Result<serde_json::Value> {
    Ok(if image.starts_with("oci://") {
        let fsid = fsid.unwrap_or_else(|| {
            image
                .rsplit(['/', ':', '@'])
                .next()
                .unwrap_or("image")
                .chars()
                .take(64)
                .collect()
        });
        json!({"domain": domain, "fsid": fsid, "reference": image, "remote": remote})
    } else {
        let path = std::fs::canonicalize(image).with_context(|| format!("bootstrap {image}"))?;
        let fsid = match fsid {
            Some(f) => f,
            None => default_fsid(&path)?,
        };
        let Some(remote) = remote else {
            bail!("binding a bootstrap needs --remote URL (file://, http(s)://, oci://)");
        };
        json!({"domain": domain, "fsid": fsid, "bootstrap": path, "remote": remote})
    })
}

pub fn bind(
    socket: &Path,
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
) -> Result<serde_json::Value> {
    call(
        socket,
        "POST",
        "/v1/bind",
        Some(&bind_body(domain, fsid, image, remote)?),
    )
}

/// Bind and mount through the daemon with `frontend`.
pub fn mount(
    socket: &Path,
    frontend: &str,
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
    mountpoint: &Path,
) -> Result<()> {
    let mut body = bind_body(domain, fsid, image, remote)?;
    let mp = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    body["mountpoint"] = json!(mp);
    body["frontend"] = json!(frontend);
    let v = call(socket, "POST", "/v1/mount", Some(&body))?;
    println!(
        "mounted {},{} at {} ({})",
        v["domain"].as_str().unwrap_or("-"),
        v["fsid"].as_str().unwrap_or("?"),
        mp.display(),
        v["frontend"].as_str().unwrap_or(frontend),
    );
    Ok(())
}

/// The daemon's view when one runs (it probed its own work dir), else a
/// local probe.
pub fn doctor(socket: &Path, as_json: bool) -> Result<()> {
    let daemon = std::os::unix::net::UnixStream::connect(socket)
        .ok()
        .and_then(|_| call(socket, "GET", "/v1/doctor", None).ok());
    let v = match daemon {
        Some(v) => v,
        None => {
            let dir = std::env::temp_dir().join(format!("shoal-doctor-{}", std::process::id()));
            let f = crate::features::detect(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            json!({ "features": f })
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = &v["features"];
    println!("kernel {}", f["kernel"].as_str().unwrap_or("?"));
    for x in f["features"].as_array().into_iter().flatten() {
        println!(
            "  {:<26} {:<4} {}",
            x["name"].as_str().unwrap_or("?"),
            if x["available"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            x["detail"].as_str().unwrap_or("")
        );
    }
    println!("frontend auto: {}", f["auto"].as_str().unwrap_or("none"));
    for r in f["reasons"].as_array().into_iter().flatten() {
        println!("  {}", r.as_str().unwrap_or(""));
    }
    if let Some(m) = v["mounts"].as_array() {
        println!("daemon on {}: {} mount(s)", socket.display(), m.len());
        for x in m {
            println!(
                "  {} {},{} ({}{}), page cache sharing {}",
                x["mountpoint"].as_str().unwrap_or("?"),
                x["domain"].as_str().unwrap_or("-"),
                x["fsid"].as_str().unwrap_or("?"),
                x["frontend"].as_str().unwrap_or("?"),
                if x["directio"].as_bool() == Some(true) {
                    ", directio"
                } else {
                    ""
                },
                x["page_cache_share"].as_str().unwrap_or("?")
            );
        }
        let fan = &v["fanotify"];
        println!(
            "  fanotify pump: {}, {} blob(s) marked",
            if fan["pump_connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not running"
            },
            fan["marked"].as_array().map_or(0, |a| a.len())
        );
    } else {
        println!("no daemon on {}", socket.display());
    }
    Ok(())
}

/// Unmount through the daemon when it hosts the mount, else directly.
pub fn umount(socket: &Path, mountpoint: &Path) -> Result<()> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf());
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        let mut r = request(
            socket,
            "POST",
            "/v1/umount",
            Some(&json!({"mountpoint": mp})),
        )?;
        if r.status < 400 {
            return Ok(());
        }
        let mut t = String::new();
        r.body.read_to_string(&mut t)?;
        if r.status != 404 {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or(json!({"error": t}));
            bail!("{}", v["error"].as_str().unwrap_or("umount failed"));
        }
    }
    shoal_sys::umount(&mp).with_context(|| format!("unmounting {}", mp.display()))
}

pub fn unbind(socket: &Path, domain: Option<String>, fsid: &str) -> Result<()> {
    call(
        socket,
        "POST",
        "/v1/unbind",
        Some(&json!({"domain": domain, "fsid": fsid})),
    )?;
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1}MiB", b as f64 / (1 << 20) as f64)
}

pub fn status(socket: &Path, as_json: bool) -> Result<()> {
    let v = call(socket, "GET", "/v1/status", None)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let domains = v.as_array().cloned().unwrap_or_default();
    if domains.is_empty() {
        println!("no images bound");
    }
    for d in &domains {
        let did = d["domain_id"].as_str().unwrap_or("-");
        let blobs = d["blobs"].as_array().cloned().unwrap_or_default();
        for i in d["images"].as_array().into_iter().flatten() {
            let names: Vec<&str> = i["blobs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_str())
                .collect();
            let (mut size, mut cached) = (0, 0);
            for b in blobs
                .iter()
                .filter(|b| names.contains(&b["name"].as_str().unwrap_or("")))
            {
                size += b["size"].as_u64().unwrap_or(0);
                cached += b["cached_bytes"].as_u64().unwrap_or(0);
            }
            println!(
                "{did},{}  blobs={} cached={}/{} remote={}",
                i["fsid"].as_str().unwrap_or("?"),
                names.len(),
                mib(cached),
                mib(size),
                i["remote"].as_str().unwrap_or("?")
            );
        }
        for b in &blobs {
            let s = &b["stats"];
            println!(
                "  blob {} refs={} cached={}/{} fetched={} hits={} misses={} failures={} inflight={}",
                &b["name"].as_str().unwrap_or("?")[..16.min(b["name"].as_str().unwrap_or("").len())],
                b["refs"],
                mib(b["cached_bytes"].as_u64().unwrap_or(0)),
                mib(b["size"].as_u64().unwrap_or(0)),
                mib(s["fetched_bytes"].as_u64().unwrap_or(0)),
                s["hits"],
                s["misses"],
                s["failures"],
                s["inflight"]
            );
        }
    }
    // Which frontend `auto` uses here, and why (details: `shoal doctor`).
    if let Ok(v) = call(socket, "GET", "/v1/doctor", None) {
        let f = &v["features"];
        let found: Vec<&str> = f["features"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["available"] == true)
            .filter_map(|x| x["name"].as_str())
            .collect();
        println!(
            "frontend auto: {} (kernel {}: {}); mounts: {}",
            f["auto"].as_str().unwrap_or("none"),
            f["kernel"].as_str().unwrap_or("?"),
            found.join(", "),
            v["mounts"].as_array().map_or(0, |m| m.len())
        );
        for r in f["reasons"].as_array().into_iter().flatten() {
            println!("  {}", r.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

pub fn read(socket: &Path, domain: Option<String>, fsid: &str, path: &str) -> Result<()> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("fsid", fsid).append_pair("path", path);
    if let Some(d) = &domain {
        query.append_pair("domain", d);
    }
    let q = format!("/v1/read?{}", query.finish());
    let mut reply = request(socket, "GET", &q, None)?;
    if reply.status >= 400 {
        let mut t = String::new();
        reply.body.read_to_string(&mut t)?;
        let v: serde_json::Value = serde_json::from_str(&t).unwrap_or(json!({"error": t}));
        bail!("{}", v["error"].as_str().unwrap_or("read failed"));
    }
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut reply.body, &mut out).context("reading through the daemon (EIO)")?;
    out.flush()?;
    Ok(())
}

pub fn gc(socket: &Path, max_bytes: u64) -> Result<()> {
    let v = call(
        socket,
        "POST",
        "/v1/gc",
        Some(&json!({"max_bytes": max_bytes})),
    )?;
    println!(
        "evicted {} blobs, freed {} bytes, {} bytes remain",
        v["evicted"].as_array().map_or(0, |a| a.len()),
        v["freed_bytes"],
        v["remaining_bytes"]
    );
    Ok(())
}

pub fn prefetch(socket: &Path, domain: Option<String>, fsid: &str, recorded: bool) -> Result<()> {
    let v = call(
        socket,
        "POST",
        "/v1/prefetch",
        Some(&json!({"domain": domain, "fsid": fsid, "recorded": recorded})),
    )?;
    println!(
        "prefetching {fsid} ({} chunks in recorded order first)",
        v["recorded_chunks"]
    );
    Ok(())
}

pub fn socket_arg(s: Option<PathBuf>) -> PathBuf {
    crate::client::socket_path(s)
}
