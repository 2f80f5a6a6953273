//! What this kernel offers each frontend, and which one `--frontend auto`
//! picks: fanotify pre-content where it works, else cachefiles on-demand,
//! else FUSE. `shoal doctor` prints this; the daemon decides with it.

use shoal_core::WorkDir;
use std::io::Read;
use std::path::Path;

use crate::api::{Feature, Features, Frontend, Kernel};

fn feature(kind: Kernel, r: Result<String, String>) -> Feature {
    let (available, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Feature {
        kind,
        name: kind.name().to_string(),
        available,
        detail,
    }
}

/// The kernel's build configuration, from /proc/config.gz or /boot.
fn kernel_config(release: &str) -> Option<String> {
    if let Ok(f) = std::fs::File::open("/proc/config.gz") {
        let mut s = String::new();
        if flate2::read::GzDecoder::new(f)
            .read_to_string(&mut s)
            .is_ok()
        {
            return Some(s);
        }
    }
    std::fs::read_to_string(format!("/boot/config-{release}")).ok()
}

fn config_has(config: &Option<String>, opt: &str) -> Option<bool> {
    let c = config.as_ref()?;
    Some(
        c.lines()
            .any(|l| l == format!("{opt}=y") || l == format!("{opt}=m")),
    )
}

fn version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// What the probes read once: the running kernel's release, version and
/// build configuration (when /proc/config.gz or /boot has it).
struct Probed {
    release: String,
    version: (u32, u32),
    config: Option<String>,
}

pub fn detect(work: &WorkDir) -> Features {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let k = Probed {
        config: kernel_config(&release),
        version: version(&release),
        release,
    };
    let features = vec![
        probe_erofs(&k),
        probe_file_backed(&k),
        feature(
            Kernel::Fanotify,
            shoal_fanotify::probe(&work.probe())
                .map(|()| "FAN_CLASS_PRE_CONTENT group and FAN_PRE_ACCESS mark work".to_string()),
        ),
        probe_cachefiles(&k),
        feature(
            Kernel::Fuse,
            if Path::new("/dev/fuse").exists() {
                Ok("/dev/fuse".into())
            } else {
                Err("no /dev/fuse".into())
            },
        ),
        probe_directio(&k),
        probe_inode_share(&k),
    ];
    let (auto, reasons) = choose_frontend(&features);
    Features {
        kernel: k.release,
        features,
        auto,
        reasons,
    }
}

fn probe_erofs(k: &Probed) -> Feature {
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    feature(
        Kernel::Erofs,
        if filesystems.lines().any(|l| l.trim_end().ends_with("erofs")) {
            Ok("in /proc/filesystems".into())
        } else if config_has(&k.config, "CONFIG_EROFS_FS") == Some(true) {
            Ok("module (CONFIG_EROFS_FS=m)".into())
        } else {
            Err("not in /proc/filesystems".into())
        },
    )
}

fn probe_file_backed(k: &Probed) -> Feature {
    let release = &k.release;
    feature(
        Kernel::FileBacked,
        match config_has(&k.config, "CONFIG_EROFS_FS_BACKED_BY_FILE") {
            Some(true) => Ok("CONFIG_EROFS_FS_BACKED_BY_FILE".into()),
            Some(false) => Err("kernel built without CONFIG_EROFS_FS_BACKED_BY_FILE".into()),
            None if k.version >= (6, 12) => Ok(format!("assumed from kernel {release}")),
            None => Err(format!("kernel {release} predates 6.12")),
        },
    )
}

fn probe_cachefiles(k: &Probed) -> Feature {
    feature(
        Kernel::Cachefiles,
        match (
            Path::new("/dev/cachefiles").exists(),
            config_has(&k.config, "CONFIG_CACHEFILES_ONDEMAND"),
            config_has(&k.config, "CONFIG_EROFS_FS_ONDEMAND"),
        ) {
            (_, Some(false), _) => Err("kernel built without CONFIG_CACHEFILES_ONDEMAND".into()),
            (_, _, Some(false)) => Err("kernel built without CONFIG_EROFS_FS_ONDEMAND".into()),
            (false, _, _) => Err("no /dev/cachefiles (modprobe cachefiles?)".into()),
            (true, Some(true), _) => Ok("/dev/cachefiles, CONFIG_CACHEFILES_ONDEMAND".into()),
            (true, None, _) => Ok("/dev/cachefiles (config unknown)".into()),
        },
    )
}

/// erofs refuses a parameter it does not know at fsconfig time, so
/// setting it on a throw-away context tells what this kernel has.
fn probe_directio(k: &Probed) -> Feature {
    feature(
        Kernel::Directio,
        if shoal_sys::erofs_knows_flag("directio") {
            Ok("erofs can read backing files with direct I/O (used with `directio = true`)".into())
        } else {
            Err(format!(
                "kernel {} has no erofs directio (Linux 6.13+)",
                k.release
            ))
        },
    )
}

fn probe_inode_share(k: &Probed) -> Feature {
    feature(
        Kernel::InodeShare,
        match (
            shoal_sys::erofs_knows_flag("inode_share"),
            config_has(&k.config, "CONFIG_EROFS_FS_PAGE_CACHE_SHARE"),
        ) {
            (false, _) => Err(format!(
                "kernel {} has no erofs inode_share (Linux 7.0+): each mount caches its own pages",
                k.release
            )),
            (true, Some(false)) => {
                Err("kernel built without CONFIG_EROFS_FS_PAGE_CACHE_SHARE".into())
            }
            (true, _) => Ok(
                "mounts of one domain share the page cache of files with equal fingerprints".into(),
            ),
        },
    )
}

/// The frontend `auto` picks (fanotify, else fscache, else FUSE), and a
/// line for every frontend: chosen, passed over, or impossible.
fn choose_frontend(features: &[Feature]) -> (Option<Frontend>, Vec<String>) {
    let get = |kind| features.iter().find(|f| f.kind == kind).expect("probed");
    let (erofs, file_backed, fanotify) = (
        get(Kernel::Erofs),
        get(Kernel::FileBacked),
        get(Kernel::Fanotify),
    );
    let (cachefiles, fuse) = (get(Kernel::Cachefiles), get(Kernel::Fuse));
    let missing = |fs: &[&Feature]| {
        fs.iter()
            .filter(|f| !f.available)
            .map(|f| format!("{}: {}", f.name, f.detail))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut reasons = Vec::new();
    let mut auto = None;
    if erofs.available && file_backed.available && fanotify.available {
        reasons
            .push("fanotify: chosen (erofs file-backed mounts and pre-content events work)".into());
        auto = Some(Frontend::Fanotify);
    } else {
        reasons.push(format!(
            "fanotify: unavailable ({})",
            missing(&[erofs, file_backed, fanotify])
        ));
    }
    match (erofs.available && cachefiles.available, auto) {
        (false, _) => reasons.push(format!("not fscache: {}", missing(&[erofs, cachefiles]))),
        (true, None) => {
            reasons
                .push("fscache: chosen (cachefiles on-demand; erofs fsid/domain_id mounts)".into());
            auto = Some(Frontend::Fscache);
        }
        (true, Some(_)) => {
            reasons.push("fscache: available, used only when asked for (--frontend fscache)".into())
        }
    }
    match (auto, fuse.available) {
        (None, true) => {
            reasons.push("fuse: chosen (/dev/fuse is present)".into());
            auto = Some(Frontend::Fuse);
        }
        (Some(_), true) => {
            reasons.push("fuse: available, used only when asked for (--frontend fuse)".into())
        }
        (_, false) => reasons.push("not fuse: no /dev/fuse".into()),
    }
    (auto, reasons)
}
