//! Client-side commands that talk to the daemon's control API.

use crate::api::{
    BindRequest, DoctorReply, ErrorReply, Frontend, GcRequest, ImageReply, ImageRequest,
    MountReply, MountRequest, PrefetchReply, PrefetchRequest, UmountRequest, UnbindReply,
};
use crate::client::{get, post, request};
use anyhow::{bail, Context, Result};
use shoal_core::domain::{DomainStatus, GcReport};
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

/// The bind request for a bootstrap path or an `oci://` reference.
fn bind_request(
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
) -> Result<BindRequest> {
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
        BindRequest {
            domain,
            fsid,
            bootstrap: None,
            remote,
            reference: Some(image.to_string()),
        }
    } else {
        let path = std::fs::canonicalize(image).with_context(|| format!("bootstrap {image}"))?;
        let fsid = match fsid {
            Some(f) => f,
            None => default_fsid(&path)?,
        };
        let Some(remote) = remote else {
            bail!("binding a bootstrap needs --remote URL (file://, http(s)://, oci://)");
        };
        BindRequest {
            domain,
            fsid,
            bootstrap: Some(path),
            remote: Some(remote),
            reference: None,
        }
    })
}

pub fn bind(
    socket: &Path,
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
) -> Result<ImageReply> {
    post(
        socket,
        "/v1/bind",
        &bind_request(domain, fsid, image, remote)?,
    )
}

/// Bind and mount through the daemon with `frontend`.
pub fn mount(
    socket: &Path,
    frontend: Frontend,
    domain: Option<String>,
    fsid: Option<String>,
    image: &str,
    remote: Option<String>,
    mountpoint: &Path,
) -> Result<()> {
    let mp = std::fs::canonicalize(mountpoint)
        .with_context(|| format!("mountpoint {}", mountpoint.display()))?;
    let req = MountRequest {
        bind: bind_request(domain, fsid, image, remote)?,
        mountpoint: mp.clone(),
        frontend,
    };
    let r: MountReply = post(socket, "/v1/mount", &req)?;
    println!(
        "mounted {},{} at {} ({})",
        r.image.domain.as_deref().unwrap_or("-"),
        r.image.fsid,
        mp.display(),
        r.frontend,
    );
    Ok(())
}

/// The daemon's view when one runs (it probed its own work dir), else a
/// local probe.
pub fn doctor(socket: &Path, as_json: bool) -> Result<()> {
    let daemon = std::os::unix::net::UnixStream::connect(socket)
        .ok()
        .and_then(|_| get::<DoctorReply>(socket, "/v1/doctor").ok());
    let v = match daemon {
        Some(v) => v,
        None => {
            let dir = std::env::temp_dir().join(format!("shoal-doctor-{}", std::process::id()));
            let features = crate::features::detect(&shoal_core::WorkDir::new(&dir));
            let _ = std::fs::remove_dir_all(&dir);
            DoctorReply {
                features,
                mounts: None,
                fanotify: Default::default(),
                fscache: None,
            }
        }
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = &v.features;
    println!("kernel {}", f.kernel);
    for x in &f.features {
        let yes = if x.available { "yes" } else { "no" };
        println!("  {:<26} {:<4} {}", x.name, yes, x.detail);
    }
    let auto = f.auto.map_or("none", |a| a.name());
    println!("frontend auto: {auto}");
    for r in &f.reasons {
        println!("  {r}");
    }
    let Some(mounts) = &v.mounts else {
        println!("no daemon on {}", socket.display());
        return Ok(());
    };
    println!("daemon on {}: {} mount(s)", socket.display(), mounts.len());
    for m in mounts {
        println!(
            "  {} {},{} ({}{}), page cache sharing {}",
            m.mountpoint.display(),
            m.domain.as_deref().unwrap_or("-"),
            m.fsid,
            m.frontend,
            if m.directio { ", directio" } else { "" },
            m.page_cache_share
        );
    }
    println!(
        "  fanotify pump: {}, {} blob(s) marked",
        match (v.fanotify.pump_connected, v.fanotify.pump_protocol) {
            (true, Some(p)) => format!("connected (protocol {p})"),
            (true, None) => "connected".to_string(),
            (false, _) => "not running".to_string(),
        },
        v.fanotify.marked.len()
    );
    Ok(())
}

/// The error a reply carries, else its text.
fn reply_error(r: &mut crate::client::Reply) -> Result<String> {
    let mut t = String::new();
    r.body.read_to_string(&mut t)?;
    Ok(serde_json::from_str::<ErrorReply>(&t).map_or(t, |e| e.error))
}

/// Unmount through the daemon when it hosts the mount, else directly.
pub fn umount(socket: &Path, mountpoint: &Path) -> Result<()> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or(mountpoint.to_path_buf());
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        let body = serde_json::to_value(UmountRequest {
            mountpoint: mp.clone(),
        })?;
        let mut r = request(socket, "POST", "/v1/umount", Some(&body))?;
        if r.status < 400 {
            return Ok(());
        }
        // 404: not a daemon-hosted mount; unmount it here.
        if r.status != 404 {
            bail!("{}", reply_error(&mut r)?);
        }
    }
    match shoal_sys::umount(&mp) {
        // umount(2) says EINVAL for a path that is not a mount point.
        Err(e) if e.raw_os_error() == Some(22) => {
            bail!("unmounting {}: not a mount point", mp.display())
        }
        r => r.with_context(|| format!("unmounting {}", mp.display())),
    }
}

pub fn unbind(socket: &Path, domain: Option<String>, fsid: &str) -> Result<()> {
    let req = ImageRequest {
        domain,
        fsid: fsid.to_string(),
    };
    let _: UnbindReply = post(socket, "/v1/unbind", &req)?;
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1}MiB", b as f64 / (1 << 20) as f64)
}

pub fn status(socket: &Path, as_json: bool) -> Result<()> {
    let domains: Vec<DomainStatus> = get(socket, "/v1/status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&domains)?);
        return Ok(());
    }
    if domains.is_empty() {
        println!("no images bound");
    }
    for d in &domains {
        print_domain(d);
    }
    // Which frontend `auto` uses here, and why (details: `shoal doctor`).
    if let Ok(v) = get::<DoctorReply>(socket, "/v1/doctor") {
        let f = &v.features;
        let found: Vec<&str> = f
            .features
            .iter()
            .filter(|x| x.available)
            .map(|x| x.name.as_str())
            .collect();
        println!(
            "frontend auto: {} (kernel {}: {}); mounts: {}",
            f.auto.map_or("none", |a| a.name()),
            f.kernel,
            found.join(", "),
            v.mounts.map_or(0, |m| m.len())
        );
        for r in &f.reasons {
            println!("  {r}");
        }
    }
    Ok(())
}

/// One line per image, then one per blob with its refcount and counters.
fn print_domain(d: &DomainStatus) {
    let did = d.domain_id.as_deref().unwrap_or("-");
    for i in &d.images {
        let mine = d.blobs.iter().filter(|b| i.blobs.contains(&b.name));
        let (size, cached) = mine.fold((0, 0), |(s, c), b| (s + b.size, c + b.cached_bytes));
        println!(
            "{did},{}  blobs={} cached={}/{} remote={}",
            i.fsid,
            i.blobs.len(),
            mib(cached),
            mib(size),
            i.remote
        );
    }
    for b in &d.blobs {
        let s = &b.stats;
        println!(
            "  blob {} refs={} cached={}/{} fetched={} wire={} requests={} hits={} misses={} failures={} inflight={}",
            &b.name.to_string()[..16],
            b.refs,
            mib(b.cached_bytes),
            mib(b.size),
            mib(s.fetched_bytes),
            mib(s.wire_bytes),
            s.requests,
            s.hits,
            s.misses,
            s.failures,
            s.inflight
        );
    }
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
        bail!("{}", reply_error(&mut reply)?);
    }
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut reply.body, &mut out).context("reading through the daemon (EIO)")?;
    out.flush()?;
    Ok(())
}

pub fn gc(socket: &Path, max_bytes: u64) -> Result<()> {
    let r: GcReport = post(socket, "/v1/gc", &GcRequest { max_bytes })?;
    println!(
        "evicted {} blobs, freed {} bytes, {} bytes remain",
        r.evicted.len(),
        r.freed_bytes,
        r.remaining_bytes
    );
    Ok(())
}

pub fn prefetch(socket: &Path, domain: Option<String>, fsid: &str, recorded: bool) -> Result<()> {
    let req = PrefetchRequest {
        domain,
        fsid: fsid.to_string(),
        recorded,
    };
    let r: PrefetchReply = post(socket, "/v1/prefetch", &req)?;
    println!(
        "prefetching {fsid} ({} chunks in recorded order first)",
        r.recorded_chunks
    );
    Ok(())
}

pub fn socket_arg(s: Option<PathBuf>) -> PathBuf {
    crate::client::socket_path(s)
}
