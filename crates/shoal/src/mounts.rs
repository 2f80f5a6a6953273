//! Daemon-hosted mounts: FUSE sessions the daemon serves, and kernel
//! (fanotify, fscache) mounts whose data the daemon supplies. All are
//! recorded in `mounts.json`: a restarted daemon adopts the kernel mounts
//! and re-establishes FUSE mounts that died with its predecessor.

use crate::api::{
    BindRequest, FanotifyStatus, Features, Frontend, FscacheStatus, ImageReply, Kernel,
    MountRequest, MountStatus,
};
use shoal_core::pool::WorkerPool;
use shoal_core::{BindSpec, BoundImage, CoreError, Registry};
use shoal_fanotify::frontend::Frontend as FanotifyFrontend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What a mount, umount or bind can fail with; the daemon maps each kind
/// to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The request cannot work as asked (bad mountpoint, unknown remote
    /// scheme, a frontend this kernel lacks).
    #[error("{0}")]
    Invalid(String),
    /// Busy or already there: files open on the mount, fsid mounted.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The frontend or the kernel refused the mount.
    #[error("{0}")]
    Frontend(String),
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// The pump keeps the bound `/dev/cachefiles` under this key across
/// daemon restarts.
pub const CACHEFILES_KEY: &str = "/dev/cachefiles";

impl From<&BoundImage> for ImageReply {
    fn from(img: &BoundImage) -> Self {
        ImageReply {
            fsid: img.spec.fsid.clone(),
            domain: img.key.domain_id().map(str::to_string),
            bootstrap: img.spec.bootstrap.clone(),
            blobs: img
                .blobs
                .iter()
                .map(|b| b.cache.data_path().to_path_buf())
                .collect(),
        }
    }
}

pub enum Kind {
    /// Dropping the session unmounts it.
    Fuse {
        _session: fuser::BackgroundSession,
    },
    Fanotify,
    Fscache,
}

pub struct Entry {
    domain: Option<String>,
    fsid: String,
    kind: Kind,
    bind: Option<shoal_core::BindSpec>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    mountpoint: PathBuf,
    domain: Option<String>,
    fsid: String,
    frontend: Frontend,
    /// The binding the mount made, so a restart can restore it from the
    /// mount alone (should bindings.json have missed it).
    #[serde(default)]
    bind: Option<shoal_core::BindSpec>,
}

/// What kernel mounts ask erofs for, from the settings and the kernel.
pub struct KernelMountPolicy {
    pub directio: bool,
    /// `Err(why not)` when mounts of a domain do not share page cache.
    pub page_cache_share: Result<(), String>,
}

impl KernelMountPolicy {
    /// From the kernel's features and the settings `directio` (default
    /// off) and `page_cache_share` (default on).
    pub fn new(
        features: &Features,
        directio: Option<bool>,
        page_cache_share: Option<bool>,
    ) -> Self {
        KernelMountPolicy {
            directio: directio == Some(true) && features.has(Kernel::Directio).is_ok(),
            page_cache_share: if page_cache_share == Some(false) {
                Err("page_cache_share = false in the settings".into())
            } else {
                features.has(Kernel::InodeShare)
            },
        }
    }

    /// The erofs options of a file-backed mount of `img` in `domain_id`:
    /// sharing only when the kernel has it and core has checked the
    /// image's fingerprints against its domain's.
    fn options<'a>(
        &self,
        img: &BoundImage,
        domain_id: Option<&'a str>,
    ) -> shoal_sys::ErofsOptions<'a> {
        shoal_sys::ErofsOptions {
            directio: self.directio,
            inode_share: domain_id
                .filter(|_| self.page_cache_share.is_ok() && img.page_cache_share.is_ok()),
        }
    }
}

/// The kernel's `domain_id` for a shoal domain, prefixed so that shoal's
/// domains never share page cache with erofs mounts of other tools that
/// happen to use the same name.
fn kernel_domain_id(domain: &str) -> String {
    format!("shoal.{domain}")
}

/// The mount manager: the daemon-hosted mounts and the frontends that
/// serve them.
pub struct Mounts {
    path: PathBuf,
    map: Mutex<BTreeMap<PathBuf, Entry>>,
    reg: Arc<Registry>,
    fan: Arc<FanotifyFrontend>,
    /// The daemon's workers, shared by every frontend.
    pool: Arc<WorkerPool>,
    features: Features,
    policy: KernelMountPolicy,
    /// `/dev/cachefiles`, bound on the first fscache mount.
    fscache: Mutex<Option<Arc<shoal_fscache::Frontend>>>,
}

/// Mount points in this namespace (`/proc/self/mountinfo`, field 5, with
/// its octal escapes undone).
pub fn mounted(mp: &Path) -> bool {
    shoal_sys::mount_super_options(mp).is_some()
}

impl Kind {
    fn frontend(&self) -> Frontend {
        match self {
            Kind::Fuse { .. } => Frontend::Fuse,
            Kind::Fanotify => Frontend::Fanotify,
            Kind::Fscache => Frontend::Fscache,
        }
    }
}

/// A FUSE mount dies with its daemon: detach the dead one and serve the
/// same image at the same place again.
fn revive_fuse(reg: &Arc<Registry>, pool: &Arc<WorkerPool>, r: &Record) -> Option<Kind> {
    let _ = shoal_sys::umount_lazy(&r.mountpoint);
    let session = reg
        .get(r.domain.as_deref(), &r.fsid)
        .map_err(|e| e.to_string())
        .and_then(|img| {
            shoal_fuse::mount(img, &r.mountpoint, pool.clone()).map_err(|e| e.to_string())
        });
    match session {
        Ok(session) => {
            tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, "fuse mount re-established");
            Some(Kind::Fuse { _session: session })
        }
        Err(e) => {
            tracing::error!(mountpoint = %r.mountpoint.display(), error = %e, "fuse mount not re-established");
            None
        }
    }
}

/// A kernel mount (fanotify, fscache) outlives its daemon: adopt it when
/// it is still mounted, rebinding it if bindings.json missed it; release
/// the binding of one unmounted while no daemon ran (or before the daemon
/// could record the umount).
fn adopt_kernel_mount(
    reg: &Arc<Registry>,
    fan: &Arc<FanotifyFrontend>,
    r: &Record,
) -> Option<Kind> {
    if !mounted(&r.mountpoint) {
        if reg.get(r.domain.as_deref(), &r.fsid).is_ok() {
            tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, "mount gone: its binding is released");
            let _ = reg.unbind(r.domain.as_deref(), &r.fsid);
        }
        return None;
    }
    let bound = reg
        .get(r.domain.as_deref(), &r.fsid)
        .or_else(|e| match &r.bind {
            Some(spec) => reg.bind(spec.clone()),
            None => Err(e),
        });
    match bound {
        Ok(img) => {
            let kind = if r.frontend == Frontend::Fanotify {
                fan.adopt(&img);
                Kind::Fanotify
            } else {
                Kind::Fscache
            };
            tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, frontend = %r.frontend, "mount adopted");
            Some(kind)
        }
        Err(e) => {
            tracing::error!(mountpoint = %r.mountpoint.display(), error = %e, "mount without binding");
            None
        }
    }
}

impl Mounts {
    /// Load the records of an earlier run and adopt the fanotify mounts that
    /// are still mounted and whose binding was restored.
    pub fn load(
        reg: &Arc<Registry>,
        fan: &Arc<FanotifyFrontend>,
        pool: Arc<WorkerPool>,
        features: Features,
        policy: KernelMountPolicy,
        fscache: Option<Arc<shoal_fscache::Frontend>>,
    ) -> Mounts {
        let path = reg.work_dir.mounts();
        let records: Vec<Record> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut map = BTreeMap::new();
        for r in records {
            let kind = match r.frontend {
                Frontend::Fuse => revive_fuse(reg, &pool, &r),
                Frontend::Fanotify | Frontend::Fscache => adopt_kernel_mount(reg, fan, &r),
                _ => None,
            };
            if let Some(kind) = kind {
                let entry = Entry {
                    domain: r.domain,
                    fsid: r.fsid,
                    kind,
                    bind: r.bind,
                };
                map.insert(r.mountpoint, entry);
            }
        }
        let m = Mounts {
            path,
            map: Mutex::new(map),
            reg: reg.clone(),
            fan: fan.clone(),
            pool,
            features,
            policy,
            fscache: Mutex::new(fscache),
        };
        m.save(&m.map.lock().unwrap());
        m
    }

    fn save(&self, map: &BTreeMap<PathBuf, Entry>) {
        let records: Vec<Record> = map
            .iter()
            .map(|(mp, e)| Record {
                mountpoint: mp.clone(),
                domain: e.domain.clone(),
                fsid: e.fsid.clone(),
                frontend: e.kind.frontend(),
                bind: e.bind.clone(),
            })
            .collect();
        let r = shoal_core::state::write_atomic(
            &self.reg.work_dir,
            &self.path,
            &serde_json::to_vec_pretty(&records).unwrap(),
        );
        if let Err(e) = r {
            tracing::error!(path = %self.path.display(), error = %e, "saving mounts");
        }
    }

    /// Bind an image (a bootstrap path with a remote, or an `oci://`
    /// reference whose bootstrap is pulled).
    pub fn bind(&self, req: BindRequest) -> Result<Arc<BoundImage>, MountError> {
        let reg = &self.reg;
        let (bootstrap, remote) = match (&req.bootstrap, &req.reference) {
            (Some(b), _) => (
                b.clone(),
                req.remote
                    .clone()
                    .ok_or_else(|| MountError::Invalid("a bootstrap needs a remote".into()))?,
            ),
            (None, Some(r)) => {
                let (b, default_remote) =
                    shoal_core::publish::pull_bootstrap(r, &reg.work_dir, reg.http_options())?;
                (b, req.remote.clone().unwrap_or(default_remote))
            }
            (None, None) => {
                return Err(MountError::Invalid(
                    "need a bootstrap or a reference".into(),
                ))
            }
        };
        // A remote URL that cannot work is the caller's mistake, not a
        // failing remote.
        shoal_core::remote::open(&remote, reg.http_options())
            .map_err(|e| MountError::Invalid(format!("remote {remote}: {e}")))?;
        let img = reg.bind(BindSpec {
            domain: req.domain,
            fsid: req.fsid,
            bootstrap,
            remote,
            reference: req.reference,
        })?;
        fetch_recorded_start(&img);
        Ok(img)
    }

    /// `frontend` as this kernel can serve it (`auto` resolved).
    fn resolve(&self, frontend: Frontend) -> Result<Frontend, MountError> {
        let f = &self.features;
        match frontend {
            Frontend::Auto => f.auto.ok_or_else(|| {
                MountError::Invalid(format!(
                    "no frontend works on this kernel: {}",
                    f.reasons.join("; ")
                ))
            }),
            Frontend::Fanotify => f
                .has(Kernel::Fanotify)
                .map(|()| Frontend::Fanotify)
                .map_err(|why| {
                    MountError::Invalid(format!("fanotify frontend unavailable: {why}"))
                }),
            other => Ok(other),
        }
    }

    /// Bind and mount through `req.frontend` (`auto` resolved from the
    /// kernel's features).
    pub fn mount(&self, req: MountRequest) -> Result<(Arc<BoundImage>, Frontend), MountError> {
        let reg = &*self.reg;
        let frontend = self.resolve(req.frontend)?;
        let mp = std::fs::canonicalize(&req.mountpoint).map_err(|e| {
            MountError::Invalid(format!("mountpoint {}: {e}", req.mountpoint.display()))
        })?;
        // A mount unmounted behind our back (`fusermount3 -u`, `umount`)
        // leaves a stale record: forget it and its binding.
        let stale = {
            let mut map = self.map.lock().unwrap();
            let stale = map.contains_key(&mp) && !mounted(&mp);
            let e = if stale { map.remove(&mp) } else { None };
            if e.is_some() {
                self.save(&map);
            }
            e
        };
        if let Some(e) = stale {
            tracing::info!(mountpoint = %mp.display(), fsid = %e.fsid, "forgetting a mount unmounted elsewhere");
            let _ = reg.unbind(e.domain.as_deref(), &e.fsid);
        }
        if self.map.lock().unwrap().contains_key(&mp) {
            return Err(MountError::Conflict(format!(
                "{} is already a shoal mount",
                mp.display()
            )));
        }
        let (domain, fsid) = (req.bind.domain.clone(), req.bind.fsid.clone());
        let img = self.bind(req.bind).map_err(|e| match e {
            MountError::Core(CoreError::Exists { .. }) => {
                let d = domain
                    .as_deref()
                    .map_or("its private volume".to_string(), |d| format!("domain {d}"));
                MountError::Conflict(format!("fsid {fsid} is already mounted in {d}"))
            }
            e => e,
        })?;
        let kind = match self.mount_with(frontend, &img, &mp) {
            Ok(k) => k,
            Err(e) => {
                let _ = reg.unbind(domain.as_deref(), &fsid);
                return Err(MountError::Frontend(e));
            }
        };
        tracing::info!(mountpoint = %mp.display(), fsid = %fsid, %frontend, "mounted");
        let mut map = self.map.lock().unwrap();
        let bind = Some(img.spec.clone());
        map.insert(
            mp,
            Entry {
                domain,
                fsid,
                kind,
                bind,
            },
        );
        self.save(&map);
        Ok((img, frontend))
    }

    /// Mount a bound image with a resolved frontend.
    fn mount_with(
        &self,
        frontend: Frontend,
        img: &Arc<BoundImage>,
        mp: &Path,
    ) -> Result<Kind, String> {
        let domain = img.key.domain_id();
        match frontend {
            Frontend::Fuse => shoal_fuse::mount(img.clone(), mp, self.pool.clone())
                .map(|s| Kind::Fuse { _session: s })
                .map_err(|e| format!("fuse mount at {}: {e}", mp.display())),
            Frontend::Fscache => self.fscache().and_then(|_| {
                shoal_sys::mount_erofs_fscache(&img.spec.fsid, domain, mp)
                    .map(|()| Kind::Fscache)
                    .map_err(|e| format!("fscache mount at {}: {e}", mp.display()))
            }),
            Frontend::Fanotify | Frontend::Auto => {
                let domain_id = domain.map(kernel_domain_id);
                let opts = self.policy.options(img, domain_id.as_deref());
                self.fan
                    .mount(img, mp, &opts)
                    .map(|()| Kind::Fanotify)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The cachefiles frontend, binding `/dev/cachefiles` on first use.
    fn fscache(&self) -> Result<Arc<shoal_fscache::Frontend>, String> {
        let mut g = self.fscache.lock().unwrap();
        if let Some(f) = g.as_ref() {
            return Ok(f.clone());
        }
        let dir = self.reg.work_dir.fscache();
        let dev = shoal_fscache::open_device(&dir, "shoal").map_err(|e| e.to_string())?;
        // The pump keeps the bound device across daemon restarts: closing
        // it would unbind the cache under live mounts.
        if let Err(e) = self.fan.keep(CACHEFILES_KEY, rustix::fd::AsFd::as_fd(&dev)) {
            tracing::warn!(error = %e, "cannot keep /dev/cachefiles across restarts");
        }
        let f = shoal_fscache::Frontend::start(dev, &self.reg, self.pool.clone(), false)
            .map_err(|e| format!("cachefiles: {e}"))?;
        *g = Some(f.clone());
        Ok(f)
    }

    pub fn fscache_status(&self) -> Option<FscacheStatus> {
        use std::sync::atomic::Ordering::Relaxed;
        self.fscache
            .lock()
            .unwrap()
            .as_ref()
            .map(|f| FscacheStatus {
                opens: f.counters.opens.load(Relaxed),
                closes: f.counters.closes.load(Relaxed),
                reads: f.counters.reads.load(Relaxed),
                failed_reads: f.counters.failed_reads.load(Relaxed),
                objects: f.open_objects(),
            })
    }

    pub fn fanotify_status(&self) -> FanotifyStatus {
        FanotifyStatus {
            pump_connected: self.fan.pump_connected(),
            pump_protocol: self.fan.pump_protocol(),
            marked: self.fan.marked(),
        }
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Unmount and unbind. `Ok(None)`: not a daemon-hosted mount.
    pub fn umount(&self, mp: &Path) -> Result<Option<String>, MountError> {
        let (reg, fan) = (&*self.reg, &self.fan);
        let mut map = self.map.lock().unwrap();
        let Some(e) = map.remove(mp) else {
            return Ok(None);
        };
        if let Kind::Fanotify = e.kind {
            let r = match reg.get(e.domain.as_deref(), &e.fsid) {
                Ok(img) => fan.umount(&img, mp).map_err(|e| e.to_string()),
                Err(_) => {
                    shoal_sys::umount(mp).map_err(|e| format!("unmounting {}: {e}", mp.display()))
                }
            };
            if let Err(err) = r {
                map.insert(mp.to_path_buf(), e);
                return Err(MountError::Conflict(err));
            }
        }
        if let Kind::Fscache = e.kind {
            if let Err(err) = shoal_sys::umount(mp) {
                map.insert(mp.to_path_buf(), e);
                return Err(MountError::Conflict(format!(
                    "unmounting {}: {err}",
                    mp.display()
                )));
            }
        }
        if let Kind::Fuse { .. } = e.kind {
            // Unmount first: dropping the session would detach a busy mount
            // and report success while it stays.
            if let Err(err) = shoal_sys::umount(mp) {
                let busy = err.raw_os_error() == Some(libc_ebusy());
                map.insert(mp.to_path_buf(), e);
                let why = if busy {
                    format!(
                        "{} is busy (EBUSY): files are open on it; it stays mounted",
                        mp.display()
                    )
                } else {
                    format!("unmounting {}: {err}", mp.display())
                };
                return Err(MountError::Conflict(why));
            }
        }
        // Dropping a FUSE session ends it (the mount is gone already).
        drop(e.kind);
        // Unbind before the record goes: a restart in between finds the
        // record of a mount that is gone and releases the binding.
        reg.unbind(e.domain.as_deref(), &e.fsid)?;
        self.save(&map);
        drop(map);
        Ok(Some(e.fsid))
    }

    /// Where `fsid` of `domain` is mounted, if it is.
    pub fn mountpoint_of(&self, domain: Option<&str>, fsid: &str) -> Option<PathBuf> {
        let map = self.map.lock().unwrap();
        map.iter()
            .find(|(_, e)| e.domain.as_deref() == domain && e.fsid == fsid)
            .map(|(mp, _)| mp.clone())
    }

    pub fn list(&self) -> Vec<MountStatus> {
        self.map
            .lock()
            .unwrap()
            .iter()
            .map(|(mp, e)| {
                let (directio, page_cache_share) = self.page_cache(mp, e);
                MountStatus {
                    mountpoint: mp.clone(),
                    domain: e.domain.clone(),
                    fsid: e.fsid.clone(),
                    frontend: e.kind.frontend(),
                    directio,
                    page_cache_share,
                }
            })
            .collect()
    }

    /// Whether a mount reads its backing files with direct I/O, and whether
    /// it shares page cache with its domain ("active", or "off: why"), from
    /// the options the kernel really applied to it.
    fn page_cache(&self, mp: &Path, e: &Entry) -> (bool, String) {
        let off = |why: &str| format!("off: {why}");
        if !matches!(e.kind, Kind::Fanotify) {
            return (
                false,
                off(&format!(
                    "the {} frontend does not use it",
                    e.kind.frontend()
                )),
            );
        }
        let opts = shoal_sys::mount_super_options(mp).unwrap_or_default();
        let has = |o: &str| opts.iter().any(|x| x == o);
        let share = if has("inode_share") {
            "active".to_string()
        } else if e.domain.is_none() {
            off("no domain (mounts without one never share)")
        } else if let Err(why) = &self.policy.page_cache_share {
            off(why)
        } else if let Some(Err(why)) = self
            .reg
            .get(e.domain.as_deref(), &e.fsid)
            .ok()
            .map(|img| img.page_cache_share.clone())
        {
            off(&why)
        } else {
            off("the image has no inode fingerprints (rebuild it with shoal build or convert)")
        };
        (has("directio"), share)
    }

    /// On a clean stop: FUSE mounts end with the daemon (and are not
    /// re-established); kernel mounts stay (the pump holds their events or
    /// device until the next daemon).
    pub fn shutdown(&self) {
        let mut map = self.map.lock().unwrap();
        map.retain(|_, e| !matches!(e.kind, Kind::Fuse { .. }));
        self.save(&map);
    }
}

/// EBUSY, as `std::io::Error::raw_os_error` reports it.
fn libc_ebusy() -> i32 {
    rustix::io::Errno::BUSY.raw_os_error()
}

/// An image built with a recorded start (`--order`) has its start fetched
/// the moment it is bound, in parallel runs: before the kernel mount and the
/// frontend are set up (a mount waits for nothing the stream needs), so the
/// workload's first reads find the bytes ready or in flight.
fn fetch_recorded_start(img: &Arc<BoundImage>) {
    if !img.has_start() {
        return;
    }
    let img = img.clone();
    std::thread::spawn(move || match img.prefetch_start(4) {
        Ok(bytes) => tracing::info!(fsid = %img.spec.fsid, bytes, "recorded start fetched"),
        Err(e) => tracing::warn!(fsid = %img.spec.fsid, error = %e, "recorded start not fetched"),
    });
}
