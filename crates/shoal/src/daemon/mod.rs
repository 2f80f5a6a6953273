//! `shoal daemon`: the domain registry behind a control API (HTTP/JSON on a
//! Unix socket, mode 0600), Prometheus metrics, periodic GC. Restores the
//! bindings of its last run at start, so cached blobs are reused.

mod api;
mod config;
mod metrics;

pub use api::router;
pub use config::Config;

use crate::mounts::CACHEFILES_KEY;
use anyhow::{Context, Result};
use shoal_core::pool::WorkerPool;
use shoal_core::{Registry, RegistryOptions, WorkDir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
pub const DEFAULT_WORK_DIR: &str = "/var/lib/shoal";

/// What the control API handlers share: the registry and the mount
/// manager (which owns the frontends and the kernel's features).
pub struct Daemon {
    pub(crate) reg: Arc<Registry>,
    pub(crate) mounts: crate::mounts::Mounts,
}

impl std::ops::Deref for Daemon {
    type Target = Registry;
    fn deref(&self) -> &Registry {
        &self.reg
    }
}

type Shared = Arc<Daemon>;

/// Start-up, in the order failover needs: the work dir, the pump (whose
/// kept fds are the cache files' pre-mark descriptors) before bindings are
/// restored, bindings before events are answered, mounts before the socket
/// exists (so a client that can connect sees them).
pub fn run(socket: &Path, work_dir: &Path, cfg: &Config) -> Result<()> {
    shoal_registry::warm_tls();
    // Absolute, because the fanotify pump (another process, its own cwd)
    // and clients are handed paths below it.
    let work_dir = &std::path::absolute(work_dir)
        .with_context(|| format!("work dir {}", work_dir.display()))?;
    let work = WorkDir::new(work_dir);
    let features = crate::features::detect(&work);
    let policy =
        crate::mounts::KernelMountPolicy::new(&features, cfg.directio, cfg.page_cache_share);
    for f in &features.features {
        tracing::info!(feature = f.name, available = f.available, detail = %f.detail, "kernel feature");
    }
    make_private_dir(work_dir)?;
    // One pool of workers serves every frontend's reads, fairly by remote.
    let pool = WorkerPool::new("shoal-read", cfg.read_threads.unwrap_or(8))
        .context("starting the read workers")?;
    let fan = fanotify_frontend(&work, pool.clone())?;
    let reg = restore_registry(work_dir, cfg, &fan)?;
    fan.serve(&reg);
    let fscache = restore_cachefiles(&fan, &reg, &pool);
    spawn_housekeeping(&reg, cfg);
    claim_socket(socket)?;
    let daemon = Arc::new(Daemon {
        reg: reg.clone(),
        mounts: crate::mounts::Mounts::load(&reg, &fan, pool, features, policy, fscache),
    });
    serve(socket, work_dir, daemon)?;
    reg.flush_all();
    Ok(())
}

/// Caches, bindings and sockets: the daemon's alone, whatever the umask.
fn make_private_dir(work_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", work_dir.display()))
}

/// The pump owns the fanotify group where pre-content events work, and
/// keeps the cachefiles device everywhere; connecting to a running one
/// comes before restoring bindings, since its stored fds are the cache
/// files' pre-mark descriptors.
fn fanotify_frontend(
    work: &WorkDir,
    pool: Arc<WorkerPool>,
) -> Result<Arc<shoal_fanotify::Frontend>> {
    let pump_socket = work.pump_socket();
    let launcher = shoal_fanotify::PumpLauncher {
        program: std::env::current_exe().context("locating the shoal binary")?,
        args: vec![
            "fanotify-pump".into(),
            "--socket".into(),
            pump_socket.to_string_lossy().into_owned(),
        ],
        log: work.pump_log(),
    };
    Ok(shoal_fanotify::Frontend::new(
        &pump_socket,
        Some(launcher),
        pool,
    ))
}

/// The domain registry with the bindings of the last run, so cached blobs
/// are reused; a binding that cannot be restored is logged, not fatal.
fn restore_registry(
    work_dir: &Path,
    cfg: &Config,
    fan: &Arc<shoal_fanotify::Frontend>,
) -> Result<Arc<Registry>> {
    let mut opts = RegistryOptions::default();
    if let Some(r) = cfg.retries {
        opts.retries = r.max(1);
    }
    opts.http = cfg.http_options()?;
    opts.data_files = fan.clone();
    let reg = Arc::new(Registry::new(work_dir, opts)?);
    for (fsid, e) in &reg.restore()? {
        tracing::error!(fsid, error = %e, "binding not restored");
    }
    Ok(reg)
}

/// A cachefiles device kept from an earlier run: restore it, so the
/// kernel re-sends what the dead daemon had not answered.
fn restore_cachefiles(
    fan: &shoal_fanotify::Frontend,
    reg: &Arc<Registry>,
    pool: &Arc<WorkerPool>,
) -> Option<Arc<shoal_fscache::Frontend>> {
    let dev = fan.kept(CACHEFILES_KEY)?;
    match shoal_fscache::Frontend::start(dev, reg, pool.clone(), true) {
        Ok(f) => {
            tracing::info!("cachefiles device restored");
            Some(f)
        }
        Err(e) => {
            tracing::error!(error = %e, "restoring /dev/cachefiles");
            None
        }
    }
}

/// Readiness reaches the disk every 100 ms; every second the cache files'
/// clean pages are dropped, so a byte read through a mount is cached once,
/// by the mount (see `BlobCache::trim_pages`); GC runs on its interval.
fn spawn_housekeeping(reg: &Arc<Registry>, cfg: &Config) {
    let r = reg.clone();
    std::thread::spawn(move || {
        for tick in 1u64.. {
            std::thread::sleep(Duration::from_millis(100));
            r.flush_all();
            if tick % 10 == 0 {
                r.trim_page_cache();
            }
        }
    });
    if let (Some(every), Some(max)) = (cfg.gc_interval_secs.filter(|s| *s > 0), cfg.gc_max_bytes) {
        let r = reg.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(every));
            if let Err(e) = r.gc(max) {
                tracing::warn!(error = %e, "periodic gc failed");
            }
        });
    }
}

/// One daemon per socket: refuse when another answers on it, else take
/// the path over from a dead one.
fn claim_socket(socket: &Path) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        anyhow::bail!("another daemon is listening on {}", socket.display());
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// Serve the control API (mode 0600) until SIGINT or SIGTERM, then shut
/// the mounts' frontends down.
fn serve(socket: &Path, work_dir: &Path, daemon: Shared) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(socket = %socket.display(), work_dir = %work_dir.display(), "daemon listening");
        println!("shoal daemon listening on {}", socket.display());
        axum::serve(listener, router(daemon.clone()))
            .with_graceful_shutdown(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing the SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            })
            .await
            .context("serving the control API")?;
        daemon.mounts.shutdown();
        anyhow::Ok(())
    })
}
