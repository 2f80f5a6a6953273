//! The control API's handlers: one per endpoint, typed requests and
//! replies from `crate::api`; errors become HTTP status codes here and
//! nowhere else.

use super::Shared;
use crate::api::{
    BindRequest, DoctorReply, ErrorReply, GcRequest, ImageReply, ImageRequest, MountReply,
    MountRequest, PrefetchReply, PrefetchRequest, ReadRequest, UmountReply, UmountRequest,
    UnbindReply,
};
use crate::mounts::MountError;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use shoal_core::domain::GcReport;
use shoal_core::{CoreError, Registry};
use std::path::PathBuf;

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
    reg.work_dir.access_order(domain, fsid)
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
    blocking(move || {
        let img = d.mounts.bind(req)?;
        Ok(Json(ImageReply::from(&*img)))
    })
    .await
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
        .route("/metrics", get(super::metrics::metrics))
        .with_state(reg)
}
