//! Daemon-hosted mounts: FUSE sessions the daemon serves, and kernel
//! (fanotify, fscache) mounts whose data the daemon supplies. All are
//! recorded in `mounts.json`: a restarted daemon adopts the kernel mounts
//! and re-establishes FUSE mounts that died with its predecessor.

use crate::daemon::{do_bind, ApiError, Daemon, MountRequest};
use axum::http::StatusCode;
use shoal_core::{BoundImage, Registry};
use shoal_fanotify::Frontend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    frontend: String,
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
    pub fn new(features: &crate::features::Features, cfg: &crate::daemon::Config) -> Self {
        let have = |name: &str| {
            features.features.iter().find(|f| f.name == name).map_or(
                Err(format!("{name}: not detected")),
                |f| {
                    if f.available {
                        Ok(())
                    } else {
                        Err(f.detail.clone())
                    }
                },
            )
        };
        KernelMountPolicy {
            directio: cfg.directio == Some(true) && have("erofs directio").is_ok(),
            page_cache_share: if cfg.page_cache_share == Some(false) {
                Err("page_cache_share = false in the settings".into())
            } else {
                have("erofs inode_share")
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

pub struct Mounts {
    path: PathBuf,
    map: Mutex<BTreeMap<PathBuf, Entry>>,
}

/// Mount points in this namespace (`/proc/self/mountinfo`, field 5, with
/// its octal escapes undone).
pub fn mounted(mp: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mp.as_os_str().as_encoded_bytes();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|f| shoal_sys::mount::unescape(f) == want)
    })
}

fn kind_name(k: &Kind) -> &'static str {
    match k {
        Kind::Fuse { .. } => "fuse",
        Kind::Fanotify => "fanotify",
        Kind::Fscache => "fscache",
    }
}

impl Mounts {
    /// Load the records of an earlier run and adopt the fanotify mounts that
    /// are still mounted and whose binding was restored.
    pub fn load(work_dir: &Path, reg: &Registry, fan: &Arc<Frontend>) -> Mounts {
        let path = work_dir.join("mounts.json");
        let records: Vec<Record> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut map = BTreeMap::new();
        for r in records {
            if r.frontend == "fuse" {
                // A FUSE mount dies with its daemon: detach the dead one and
                // serve the same image at the same place again.
                let _ = shoal_sys::umount_lazy(&r.mountpoint);
                match reg
                    .get(r.domain.as_deref(), &r.fsid)
                    .map_err(|e| e.to_string())
                    .and_then(|img| {
                        shoal_fuse::mount(img, &r.mountpoint).map_err(|e| e.to_string())
                    }) {
                    Ok(session) => {
                        tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, "fuse mount re-established");
                        map.insert(
                            r.mountpoint,
                            Entry {
                                domain: r.domain,
                                fsid: r.fsid,
                                kind: Kind::Fuse { _session: session },
                                bind: r.bind,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(mountpoint = %r.mountpoint.display(), error = %e, "fuse mount not re-established")
                    }
                }
                continue;
            }
            if !matches!(r.frontend.as_str(), "fanotify" | "fscache") {
                continue;
            }
            if !mounted(&r.mountpoint) {
                // Unmounted while no daemon ran, or the daemon stopped
                // before it could record the umount: the binding the
                // mount made goes with it.
                if reg.get(r.domain.as_deref(), &r.fsid).is_ok() {
                    tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, "mount gone: its binding is released");
                    let _ = reg.unbind(r.domain.as_deref(), &r.fsid);
                }
                continue;
            }
            let bound = reg
                .get(r.domain.as_deref(), &r.fsid)
                .or_else(|e| match &r.bind {
                    // Mounted, but bindings.json missed it: bind it again.
                    Some(spec) => reg.bind(spec.clone()),
                    None => Err(e),
                });
            match bound {
                Ok(img) => {
                    let kind = if r.frontend == "fanotify" {
                        fan.adopt(&img);
                        Kind::Fanotify
                    } else {
                        Kind::Fscache
                    };
                    tracing::info!(mountpoint = %r.mountpoint.display(), fsid = %r.fsid, frontend = %r.frontend, "mount adopted");
                    map.insert(
                        r.mountpoint,
                        Entry {
                            domain: r.domain,
                            fsid: r.fsid,
                            kind,
                            bind: r.bind,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(mountpoint = %r.mountpoint.display(), error = %e, "mount without binding")
                }
            }
        }
        let m = Mounts {
            path,
            map: Mutex::new(map),
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
                frontend: kind_name(&e.kind).into(),
                bind: e.bind.clone(),
            })
            .collect();
        let work_dir = self.path.parent().unwrap_or(Path::new("."));
        let r = shoal_core::state::write_atomic(
            work_dir,
            &self.path,
            &serde_json::to_vec_pretty(&records).unwrap(),
        );
        if let Err(e) = r {
            tracing::error!(path = %self.path.display(), error = %e, "saving mounts");
        }
    }

    /// Bind and mount through `frontend` (`auto` resolved from `features`).
    pub fn mount(
        &self,
        d: &Daemon,
        req: MountRequest,
    ) -> Result<(Arc<BoundImage>, &'static str), ApiError> {
        let (reg, fan, features) = (&*d.reg, &d.fan, &d.features);
        let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
        let feature = |name: &str| features.features.iter().find(|f| f.name == name);
        let frontend: &'static str = match req.frontend.as_str() {
            "auto" => features.auto.ok_or_else(|| {
                bad(format!(
                    "no frontend works on this kernel: {}",
                    features.reasons.join("; ")
                ))
            })?,
            "fanotify" => {
                let f = feature("fanotify pre-content").unwrap();
                if !f.available {
                    return Err(bad(format!("fanotify frontend unavailable: {}", f.detail)));
                }
                "fanotify"
            }
            "fuse" => "fuse",
            "fscache" => "fscache",
            other => return Err(bad(format!("unknown frontend {other:?}"))),
        };
        let mp = std::fs::canonicalize(&req.mountpoint)
            .map_err(|e| bad(format!("mountpoint {}: {e}", req.mountpoint.display())))?;
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
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!("{} is already a shoal mount", mp.display()),
            ));
        }
        let (domain, fsid) = (req.bind.domain.clone(), req.bind.fsid.clone());
        let img = do_bind(reg, req.bind).map_err(|e| {
            if e.0 == StatusCode::CONFLICT {
                let d = domain
                    .as_deref()
                    .map_or("its private volume".to_string(), |d| format!("domain {d}"));
                ApiError(e.0, format!("fsid {fsid} is already mounted in {d}"))
            } else {
                e
            }
        })?;
        let kind = match frontend {
            "fuse" => shoal_fuse::mount(img.clone(), &mp)
                .map(|s| Kind::Fuse { _session: s })
                .map_err(|e| format!("fuse mount at {}: {e}", mp.display())),
            "fscache" => d.fscache().map_err(|e| e.1).and_then(|_| {
                shoal_sys::mount_erofs_fscache(&fsid, domain.as_deref(), &mp)
                    .map(|()| Kind::Fscache)
                    .map_err(|e| format!("fscache mount at {}: {e}", mp.display()))
            }),
            _ => {
                let domain_id = domain.as_deref().map(kernel_domain_id);
                let opts = d.kernel_mounts.options(&img, domain_id.as_deref());
                fan.mount(&img, &mp, &opts)
            }
            .map(|()| Kind::Fanotify)
            .map_err(|e| e.to_string()),
        };
        let kind = match kind {
            Ok(k) => k,
            Err(e) => {
                let _ = reg.unbind(domain.as_deref(), &fsid);
                return Err(ApiError(StatusCode::BAD_GATEWAY, e));
            }
        };
        tracing::info!(mountpoint = %mp.display(), fsid = %fsid, frontend, "mounted");
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

    /// Unmount and unbind. `Ok(None)`: not a daemon-hosted mount.
    pub fn umount(&self, d: &Daemon, mp: &Path) -> Result<Option<String>, ApiError> {
        let (reg, fan) = (&*d.reg, &d.fan);
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
                return Err(ApiError(StatusCode::CONFLICT, err));
            }
        }
        if let Kind::Fscache = e.kind {
            if let Err(err) = shoal_sys::umount(mp) {
                map.insert(mp.to_path_buf(), e);
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!("unmounting {}: {err}", mp.display()),
                ));
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
                return Err(ApiError(StatusCode::CONFLICT, why));
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

    pub fn list(&self, d: &Daemon) -> Vec<serde_json::Value> {
        self.map
            .lock()
            .unwrap()
            .iter()
            .map(|(mp, e)| {
                let (directio, share) = page_cache(d, mp, e);
                serde_json::json!({
                    "mountpoint": mp, "domain": e.domain, "fsid": e.fsid,
                    "frontend": kind_name(&e.kind),
                    "directio": directio,
                    "page_cache_share": share,
                })
            })
            .collect()
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

/// Whether a mount reads its backing files with direct I/O, and whether
/// it shares page cache with its domain ("active", or "off: why"), from
/// the options the kernel really applied to it.
fn page_cache(d: &Daemon, mp: &Path, e: &Entry) -> (bool, String) {
    let off = |why: &str| format!("off: {why}");
    if !matches!(e.kind, Kind::Fanotify) {
        return (
            false,
            off(&format!(
                "the {} frontend does not use it",
                kind_name(&e.kind)
            )),
        );
    }
    let opts = shoal_sys::mount_super_options(mp).unwrap_or_default();
    let has = |o: &str| opts.iter().any(|x| x == o);
    let share = if has("inode_share") {
        "active".to_string()
    } else if e.domain.is_none() {
        off("no domain (mounts without one never share)")
    } else if let Err(why) = &d.kernel_mounts.page_cache_share {
        off(why)
    } else if let Some(Err(why)) = d
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

/// EBUSY, as `std::io::Error::raw_os_error` reports it.
fn libc_ebusy() -> i32 {
    rustix::io::Errno::BUSY.raw_os_error()
}
