//! `shoal snapshotter`: containerd's proxy snapshotter, mounting shoal
//! images through the shoal daemon (`SHOAL_SOCKET` or `--daemon-socket`),
//! so one daemon serves containers and `shoal mount` alike.

use crate::api::{BindRequest, Frontend, MountRequest, UmountRequest};
use anyhow::{Context, Result};
use shoal_snapshotter::{DomainPolicy, MountSpec, Mounter, Snapshotter, SnapshotterOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct SnapshotterArgs {
    /// Where containerd reaches it (`[proxy_plugins.shoal] address`).
    #[arg(long, default_value = "/run/shoal/snapshotter.sock")]
    socket: PathBuf,
    /// Snapshots, bootstraps, mountpoints and metadata.
    #[arg(long, default_value = "/var/lib/shoal/snapshotter")]
    root: PathBuf,
    /// The shoal daemon's control socket (default: $SHOAL_SOCKET, else
    /// /run/shoal/shoal.sock).
    #[arg(long)]
    daemon_socket: Option<PathBuf>,
    /// Which domain images join: `namespace` (one per containerd
    /// namespace, `containerd-<ns>`), `shared:NAME` (one for all) or `none`.
    #[arg(long, default_value = "namespace")]
    domains: String,
    /// Mount a shoal image as soon as it is pulled (as nydus-snapshotter
    /// does), not when its first container starts: the daemon then fetches
    /// the image's recorded start while containerd is still pulling and
    /// creating the container. The image stays mounted until it is removed
    /// (and the daemon keeps its access recording only then).
    #[arg(long)]
    mount_on_pull: bool,
    /// Settings (proxy, mirrors) as the daemon's TOML, for bootstrap fetches.
    #[arg(long, value_name = "FILE")]
    settings: Option<PathBuf>,
}

/// Mounts through the daemon's control API.
struct DaemonMounter {
    socket: PathBuf,
}

impl DaemonMounter {
    /// POST a typed request to the control API; the error, said whole.
    fn post(&self, path: &str, req: &impl serde::Serialize) -> Result<(), String> {
        let body = serde_json::to_value(req).expect("requests serialize");
        crate::client::call(&self.socket, "POST", path, Some(&body))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }
}

impl Mounter for DaemonMounter {
    fn check(&self) -> Result<(), String> {
        crate::client::call(&self.socket, "GET", "/v1/status", None)
            .map(|_| ())
            .map_err(|e| format!("the shoal daemon does not answer: {e:#}"))
    }

    fn mount(&self, spec: &MountSpec) -> Result<(), String> {
        let req = MountRequest {
            bind: BindRequest {
                domain: spec.domain.clone(),
                fsid: spec.fsid.clone(),
                bootstrap: Some(spec.bootstrap.clone()),
                remote: Some(spec.remote.clone()),
                reference: None,
            },
            mountpoint: spec.mountpoint.clone(),
            frontend: Frontend::Auto,
        };
        self.post("/v1/mount", &req)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), String> {
        let req = UmountRequest {
            mountpoint: mountpoint.into(),
        };
        self.post("/v1/umount", &req)
    }
}

fn policy(s: &str) -> Result<DomainPolicy> {
    Ok(match s {
        "namespace" => DomainPolicy::PerNamespace {
            prefix: "containerd-".into(),
        },
        "none" => DomainPolicy::None,
        _ => match s.strip_prefix("shared:") {
            Some(name) if !name.is_empty() => DomainPolicy::Fixed(name.into()),
            _ => anyhow::bail!("--domains {s:?}: want namespace, shared:NAME or none"),
        },
    })
}

pub fn run(a: SnapshotterArgs) -> Result<()> {
    shoal_registry::warm_tls();
    let cfg =
        crate::daemon::Config::load(crate::daemon::Config::path(a.settings.clone()).as_deref())?;
    let opts = SnapshotterOptions {
        root: a.root.clone(),
        policy: policy(&a.domains)?,
        http: cfg.http_options()?,
        mount_on_pull: a.mount_on_pull,
    };
    let mounter = Arc::new(DaemonMounter {
        socket: crate::client::socket_path(a.daemon_socket.clone()),
    });
    let sn = Snapshotter::open(&opts, mounter)
        .with_context(|| format!("snapshotter root {}", a.root.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    tracing::info!(socket = %a.socket.display(), root = %a.root.display(), "shoal snapshotter serving");
    rt.block_on(async {
        tokio::select! {
            r = shoal_snapshotter::serve(&a.socket, sn) => r.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = sigterm() => Ok(()),
        }
    })
    .with_context(|| format!("serving {}", a.socket.display()))
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
