//! `shoal daemon`: the domain registry behind a control API (HTTP/JSON on a
//! Unix socket, mode 0600), Prometheus metrics, periodic GC. Restores the
//! bindings of its last run at start, so cached blobs are reused.

use crate::api::{
    BindRequest, DoctorReply, ErrorReply, GcRequest, ImageReply, ImageRequest, MountReply,
    MountRequest, PrefetchReply, PrefetchRequest, ReadRequest, UmountReply, UmountRequest,
    UnbindReply,
};
use crate::mounts::{MountError, CACHEFILES_KEY};
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use shoal_core::domain::{BlobStatus, GcReport};
use shoal_core::{CoreError, Registry, RegistryOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
pub const DEFAULT_WORK_DIR: &str = "/var/lib/shoal";

/// Daemon settings: a TOML file, overridden by flags.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub socket: Option<PathBuf>,
    pub work_dir: Option<PathBuf>,
    /// Run GC every this many seconds (0 or absent: never).
    pub gc_interval_secs: Option<u64>,
    /// The cache size GC shrinks to.
    pub gc_max_bytes: Option<u64>,
    /// Fetch attempts for transient remote errors.
    pub retries: Option<u32>,
    pub connect_timeout_secs: Option<u64>,
    pub read_timeout_secs: Option<u64>,
    /// The most one remote request may take (body included), and the
    /// budget of a read's retries: reads fail within about this when a
    /// remote is down, hangs or trickles (default 30).
    pub fetch_deadline_secs: Option<u64>,
    /// Threads answering fanotify events.
    pub fanotify_threads: Option<usize>,
    /// `http://host:port`: an HTTP(S) proxy (CONNECT) for every remote.
    pub proxy: Option<String>,
    /// Hosts reached without the proxy (`host`, `host:port`, `.suffix`).
    #[serde(default)]
    pub no_proxy: Vec<String>,
    /// Registries reached over plain http although not loopback.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registry mirrors, tried in order before the origin (`[[mirror]]`).
    #[serde(default)]
    pub mirror: Vec<shoal_registry::Mirror>,
    /// Mount file-backed with `directio` where the kernel has it (default
    /// false). Either way a byte is cached once once the daemon has trimmed
    /// the cache files (every second); direct I/O also avoids the brief
    /// second copy, but costs the backing file's readahead and makes every
    /// lazy read wait for the fill's writeback: measured 1.6x slower lazy
    /// and 2.4x slower cold whole-tree reads (scripts/bench-pagecache.sh).
    pub directio: Option<bool>,
    /// Mounts of one domain share the page cache of equal files
    /// (`inode_share`, Linux 7.0+; default true). Images of a domain then
    /// trust each other's fingerprints: turn it off for a domain that mixes
    /// images from parties that do not trust each other.
    pub page_cache_share: Option<bool>,
}

/// Where settings are read from when no flag names a file.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/shoal.toml";

impl Config {
    /// The settings file: the flag's, else `$SHOAL_CONFIG`, else
    /// [`DEFAULT_CONFIG`] if it exists.
    pub fn path(flag: Option<PathBuf>) -> Option<PathBuf> {
        flag.or_else(|| std::env::var_os("SHOAL_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()))
    }

    /// Timeouts, proxy, mirrors and insecure registries for every remote.
    pub fn http_options(&self) -> Result<shoal_core::remote::HttpOptions> {
        let mut http = shoal_core::remote::HttpOptions::default();
        if let Some(s) = self.connect_timeout_secs {
            http.connect_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.read_timeout_secs {
            http.read_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.fetch_deadline_secs {
            http.deadline = Duration::from_secs(s.max(1));
        }
        http.proxy = self.proxy.clone();
        http.no_proxy = self.no_proxy.clone();
        http.insecure = self.insecure_registries.clone();
        http.mirrors = self.mirror.clone();
        http.validate().map_err(anyhow::Error::msg)?;
        Ok(http)
    }

    pub fn load(path: Option<&Path>) -> Result<Config> {
        match path {
            None => Ok(Config::default()),
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))
            }
        }
    }
}

/// What the control API handlers share: the registry and the mount
/// manager (which owns the frontends and the kernel's features).
pub struct Daemon {
    pub(crate) reg: Arc<Registry>,
    mounts: crate::mounts::Mounts,
}

impl std::ops::Deref for Daemon {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.reg
    }
}

type Shared = Arc<Daemon>;

pub struct ApiError(pub StatusCode, pub String);

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let code = match &e {
            CoreError::Exists { .. } => StatusCode::CONFLICT,
            CoreError::NotBound { .. } => StatusCode::NOT_FOUND,
            CoreError::InvalidName { .. }
            | CoreError::Unusable { .. }
            | CoreError::Image { .. } => StatusCode::BAD_REQUEST,
            CoreError::Io { source, .. }
                if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) =>
            {
                StatusCode::INSUFFICIENT_STORAGE
            }
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError(code, e.to_string())
    }
}

impl From<MountError> for ApiError {
    fn from(e: MountError) -> Self {
        let code = match &e {
            MountError::Invalid(_) => StatusCode::BAD_REQUEST,
            MountError::Conflict(_) => StatusCode::CONFLICT,
            MountError::NotFound(_) => StatusCode::NOT_FOUND,
            MountError::Frontend(_) => StatusCode::BAD_GATEWAY,
            MountError::Core(_) => {
                let MountError::Core(c) = e else {
                    unreachable!()
                };
                return c.into();
            }
        };
        ApiError(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorReply { error: self.1 })).into_response()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

fn access_file(reg: &Registry, domain: Option<&str>, fsid: &str) -> PathBuf {
    reg.work_dir
        .join("access")
        .join(domain.unwrap_or("-"))
        .join(format!("{fsid}.order"))
}

/// Keep an image's access order so far (chunks in first-touch order) for
/// a later recorded prefetch or `shoal order`.
fn save_access_order(reg: &Registry, domain: Option<&str>, fsid: &str) {
    let Ok(img) = reg.get(domain, fsid) else {
        return;
    };
    let order = img.access_order();
    if order.is_empty() {
        return;
    }
    let path = access_file(reg, domain, fsid);
    let text: String = order.iter().map(|(d, b)| format!("{d} {b}\n")).collect();
    if let Err(e) =
        std::fs::create_dir_all(path.parent().unwrap()).and_then(|_| std::fs::write(&path, text))
    {
        tracing::warn!(path = %path.display(), error = %e, "keeping the access order");
    }
}

async fn bind(
    State(d): State<Shared>,
    Json(req): Json<BindRequest>,
) -> Result<Json<ImageReply>, ApiError> {
    blocking(move || Ok(Json(ImageReply::from(&*d.mounts.bind(req)?)))).await
}

/// Bind and mount through a daemon-hosted frontend (fanotify or FUSE;
/// `auto` picks by the kernel's features).
async fn mount(
    State(d): State<Shared>,
    Json(req): Json<MountRequest>,
) -> Result<Json<MountReply>, ApiError> {
    blocking(move || {
        let (img, frontend) = d.mounts.mount(req)?;
        Ok(Json(MountReply {
            image: ImageReply::from(&*img),
            frontend,
        }))
    })
    .await
}

async fn umount(
    State(d): State<Shared>,
    Json(req): Json<UmountRequest>,
) -> Result<Json<UmountReply>, ApiError> {
    blocking(move || {
        let mp = std::fs::canonicalize(&req.mountpoint).unwrap_or(req.mountpoint.clone());
        // The image's access order, kept for `prefetch --recorded` and
        // `shoal order` (the image stays bound until unbound).
        if let Some(m) = d.mounts.list().into_iter().find(|m| m.mountpoint == mp) {
            save_access_order(&d, m.domain.as_deref(), &m.fsid);
        }
        let fsid = d.mounts.umount(&mp)?.ok_or_else(|| {
            MountError::NotFound(format!("{} is not a shoal mount", mp.display()))
        })?;
        Ok(Json(UmountReply {
            unmounted: mp,
            fsid,
        }))
    })
    .await
}

/// Kernel features, the frontend `auto` picks, and live mounts.
async fn doctor(State(d): State<Shared>) -> Json<DoctorReply> {
    Json(DoctorReply {
        features: d.mounts.features().clone(),
        mounts: Some(d.mounts.list()),
        fanotify: d.mounts.fanotify_status(),
        fscache: d.mounts.fscache_status(),
    })
}

async fn unbind(
    State(reg): State<Shared>,
    Json(req): Json<ImageRequest>,
) -> Result<Json<UnbindReply>, ApiError> {
    blocking(move || {
        save_access_order(&reg, req.domain.as_deref(), &req.fsid);
        // A mounted image stays bound: unbinding it would let GC evict cache
        // files the mount reads, and a rebind make a second cache object.
        if let Some(mp) = reg.mounts.mountpoint_of(req.domain.as_deref(), &req.fsid) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "fsid {} is mounted at {} (EBUSY): `shoal umount` it, which also unbinds it",
                    req.fsid,
                    mp.display()
                ),
            ));
        }
        reg.unbind(req.domain.as_deref(), &req.fsid)?;
        Ok(Json(UnbindReply { unbound: req.fsid }))
    })
    .await
}

async fn status(State(reg): State<Shared>) -> impl IntoResponse {
    Json(reg.status())
}

async fn gc(
    State(reg): State<Shared>,
    Json(req): Json<GcRequest>,
) -> Result<Json<GcReport>, ApiError> {
    blocking(move || Ok(Json(reg.gc(req.max_bytes)?))).await
}

async fn prefetch(
    State(reg): State<Shared>,
    Json(req): Json<PrefetchRequest>,
) -> Result<Json<PrefetchReply>, ApiError> {
    let img = reg.get(req.domain.as_deref(), &req.fsid)?;
    let order: Vec<(u16, u32)> = if req.recorded {
        let path = access_file(&reg, req.domain.as_deref(), &req.fsid);
        std::fs::read_to_string(&path)
            .map_err(|e| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    format!("no recorded order at {}: {e}", path.display()),
                )
            })?
            .lines()
            .filter_map(|l| {
                let (d, b) = l.split_once(' ')?;
                Some((d.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    } else {
        Vec::new()
    };
    let fsid = req.fsid.clone();
    let recorded = order.len();
    std::thread::spawn(move || match img.prefetch(&order, 4) {
        Ok(bytes) => tracing::info!(fsid, bytes, "prefetch done"),
        Err(e) => tracing::warn!(fsid, error = %e, "prefetch stopped"),
    });
    Ok(Json(PrefetchReply {
        prefetching: req.fsid,
        recorded_chunks: recorded,
    }))
}

/// Stream a file of a bound image, read through the domain cache.
async fn read(
    State(reg): State<Shared>,
    Query(req): Query<ReadRequest>,
) -> Result<Response, ApiError> {
    let img = reg.get(req.domain.as_deref(), &req.fsid)?;
    let ino = img
        .image
        .lookup(&req.path)
        .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
    if ino.file_type() != erofs::tree::S_IFREG {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{} is not a regular file", req.path),
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    std::thread::spawn(move || {
        // The frontends' read path: chunks verified once, into the cache.
        let mut pos = 0;
        while pos < ino.size {
            let mut buf = vec![0u8; (ino.size - pos).min(1 << 20) as usize];
            match img.read_at(&ino, pos, &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    pos += n as u64;
                    if tx.blocking_send(Ok(buf)).is_err() {
                        return; // client gone
                    }
                }
                Err(e) => {
                    tracing::error!(fsid = %req.fsid, path = %req.path, offset = pos, error = %e, "read failed");
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            }
        }
    });
    Ok(Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )))
}

/// Per-blob Prometheus series: (name, help, type, value).
type BlobMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BlobStatus) -> u64,
);

const BLOB_METRICS: &[BlobMetric] = &[
    (
        "shoal_blob_fetched_bytes_total",
        "Bytes fetched from remotes and verified.",
        "counter",
        |b| b.stats.fetched_bytes,
    ),
    (
        "shoal_blob_requests_total",
        "Ranged requests made to remotes (round trips).",
        "counter",
        |b| b.stats.requests,
    ),
    (
        "shoal_blob_wire_bytes_total",
        "Bytes received from remotes (compressed, when the remote stores the blob so).",
        "counter",
        |b| b.stats.wire_bytes,
    ),
    (
        "shoal_blob_fetches_total",
        "Chunks fetched.",
        "counter",
        |b| b.stats.fetches,
    ),
    (
        "shoal_blob_hits_total",
        "Chunk reads served from the cache.",
        "counter",
        |b| b.stats.hits,
    ),
    (
        "shoal_blob_misses_total",
        "Chunk reads that needed a fetch.",
        "counter",
        |b| b.stats.misses,
    ),
    (
        "shoal_blob_fetch_failures_total",
        "Fetches that failed after retries.",
        "counter",
        |b| b.stats.failures,
    ),
    (
        "shoal_blob_inflight_fetches",
        "Fetches in progress.",
        "gauge",
        |b| b.stats.inflight,
    ),
    (
        "shoal_blob_cached_bytes",
        "Verified bytes in the cache.",
        "gauge",
        |b| b.cached_bytes,
    ),
    (
        "shoal_blob_refs",
        "Images of the volume using the blob.",
        "gauge",
        |b| b.refs as u64,
    ),
];

async fn metrics(State(reg): State<Shared>) -> impl IntoResponse {
    use std::fmt::Write;
    let st = reg.status();
    let mut out = String::new();
    for (name, help, kind, value) in BLOB_METRICS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in &st {
            for b in &d.blobs {
                let _ = writeln!(
                    out,
                    "{name}{{volume=\"{}\",blob=\"{}\"}} {}",
                    d.volume_key,
                    b.name,
                    value(b)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP shoal_volume_images Images bound per volume.\n# TYPE shoal_volume_images gauge"
    );
    for d in &st {
        let _ = writeln!(
            out,
            "shoal_volume_images{{volume=\"{}\"}} {}",
            d.volume_key,
            d.images.len()
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out)
}

pub fn router(reg: Shared) -> Router {
    Router::new()
        .route("/v1/bind", post(bind))
        .route("/v1/unbind", post(unbind))
        .route("/v1/status", get(status))
        .route("/v1/gc", post(gc))
        .route("/v1/prefetch", post(prefetch))
        .route("/v1/read", get(read))
        .route("/v1/mount", post(mount))
        .route("/v1/umount", post(umount))
        .route("/v1/doctor", get(doctor))
        .route("/metrics", get(metrics))
        .with_state(reg)
}

pub fn run(socket: &Path, work_dir: &Path, cfg: &Config) -> Result<()> {
    let mut opts = RegistryOptions::default();
    if let Some(r) = cfg.retries {
        opts.retries = r.max(1);
    }
    opts.http = cfg.http_options()?;
    let features = crate::features::detect(work_dir);
    let policy =
        crate::mounts::KernelMountPolicy::new(&features, cfg.directio, cfg.page_cache_share);
    for f in &features.features {
        tracing::info!(feature = f.name, available = f.available, detail = %f.detail, "kernel feature");
    }
    // Connect to a running pump before restoring bindings: its stored fds
    // are the cache files' pre-mark descriptors.
    let pump_socket = work_dir.join("fanotify-pump.sock");
    // The pump owns the fanotify group where pre-content events work, and
    // keeps the cachefiles device everywhere.
    let launcher = shoal_fanotify::PumpLauncher {
        program: std::env::current_exe().context("locating the shoal binary")?,
        args: vec![
            "fanotify-pump".into(),
            "--socket".into(),
            pump_socket.to_string_lossy().into_owned(),
        ],
        log: work_dir.join("fanotify-pump.log"),
    };
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    // Caches, bindings and sockets: the daemon's alone, whatever the umask.
    std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", work_dir.display()))?;
    let fan = shoal_fanotify::Frontend::new(
        &pump_socket,
        Some(launcher),
        cfg.fanotify_threads.unwrap_or(8),
    );
    opts.data_files = fan.clone();
    let reg = Arc::new(Registry::new(work_dir, opts)?);
    let failed = reg.restore()?;
    for (fsid, e) in &failed {
        tracing::error!(fsid, error = %e, "binding not restored");
    }
    fan.serve(&reg);
    // A cachefiles device kept from an earlier run: restore it, so the
    // kernel re-sends what the dead daemon had not answered.
    let fscache = match fan.kept(CACHEFILES_KEY) {
        Some(dev) => match shoal_fscache::Frontend::start(dev, &reg, 8, true) {
            Ok(f) => {
                tracing::info!("cachefiles device restored");
                Some(f)
            }
            Err(e) => {
                tracing::error!(error = %e, "restoring /dev/cachefiles");
                None
            }
        },
        None => None,
    };
    {
        let reg = reg.clone();
        // Readiness reaches the disk every 100 ms; every second the cache
        // files' clean pages are dropped, so a byte read through a mount is
        // cached once, by the mount (see `BlobCache::trim_pages`).
        std::thread::spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(Duration::from_millis(100));
                reg.flush_all();
                if tick % 10 == 0 {
                    reg.trim_page_cache();
                }
            }
        });
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!("another daemon is listening on {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    if let (Some(every), Some(max)) = (cfg.gc_interval_secs.filter(|s| *s > 0), cfg.gc_max_bytes) {
        let reg = reg.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(every));
            if let Err(e) = reg.gc(max) {
                tracing::warn!(error = %e, "periodic gc failed");
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Mounts are adopted or re-established before the socket exists, so a
    // client that can connect sees them.
    let daemon = Arc::new(Daemon {
        reg: reg.clone(),
        mounts: crate::mounts::Mounts::load(work_dir, &reg, &fan, features, policy, fscache),
    });
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(socket = %socket.display(), work_dir = %work_dir.display(), "daemon listening");
        println!("shoal daemon listening on {}", socket.display());
        axum::serve(listener, router(daemon.clone()))
            .with_graceful_shutdown(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            })
            .await
            .context("serving the control API")?;
        daemon.mounts.shutdown();
        anyhow::Ok(())
    })?;
    reg.flush_all();
    Ok(())
}
