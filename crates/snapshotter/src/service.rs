//! The gRPC face: containerd's Snapshots service on a Unix socket, each
//! request run on the blocking pool against the one engine.

use crate::engine::{Engine, Mount, TARGET};
use crate::error::SnapError;
use crate::proto::containerd::services::snapshots::v1 as pb;
use crate::proto::containerd::types;
use crate::store::{Kind, Snapshot, Store};
use crate::Mounter;
use pb::snapshots_server::{Snapshots, SnapshotsServer};
use shoal_registry::{Client, HttpOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

pub use crate::engine::DomainPolicy;

#[derive(Clone, Debug)]
pub struct SnapshotterOptions {
    pub root: PathBuf,
    pub policy: DomainPolicy,
    pub http: HttpOptions,
    /// Mount a shoal image as soon as its bootstrap layer is pulled (as
    /// nydus-snapshotter does), in the background, so the daemon fetches
    /// the image's recorded start while containerd still pulls and
    /// creates the container; else at its first container.
    pub mount_on_pull: bool,
}

/// The service: one engine behind a lock (operations are short, except a
/// bootstrap fetch at pull time).
#[derive(Clone)]
pub struct Snapshotter {
    engine: Arc<Mutex<Engine>>,
    /// For bootstrap fetches outside the engine's lock.
    client: Client,
    bootstraps: PathBuf,
    mount_on_pull: bool,
}

impl Snapshotter {
    pub fn open(
        opts: &SnapshotterOptions,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Snapshotter, SnapError> {
        let store = Store::open(&opts.root)
            .map_err(|e| SnapError::io("opening the snapshotter root", e))?;
        let bootstraps = store.bootstraps_dir();
        let mut engine = Engine {
            store,
            mounter,
            client: Client::new(opts.http.clone()),
            policy: opts.policy.clone(),
        };
        engine.recover();
        Ok(Snapshotter {
            client: engine.client.clone(),
            engine: Arc::new(Mutex::new(engine)),
            bootstraps,
            mount_on_pull: opts.mount_on_pull,
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Engine) -> Result<T, SnapError> + Send + 'static,
    ) -> Result<T, Status> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || f(&mut engine.lock().unwrap()))
            .await
            .map_err(|e| Status::internal(format!("snapshot operation failed: {e}")))?
            .map_err(Status::from)
    }
}

/// The containerd namespace a request is made in: containerd's metadata
/// layer names backend snapshots `<namespace>/<id>/<key>` (proxy plugins
/// do not get the namespace header), else the header, else `default`.
fn namespace<T>(r: &Request<T>, key: &str) -> String {
    match key.split_once('/') {
        Some((ns, _)) if !ns.is_empty() => ns.to_string(),
        _ => r
            .metadata()
            .get("containerd-namespace")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("default")
            .to_string(),
    }
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn ts((secs, nanos): (i64, u32)) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: nanos as i32,
    })
}

fn info((name, s): (String, Snapshot)) -> pb::Info {
    pb::Info {
        name,
        parent: s.parent,
        kind: match s.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: ts(s.created),
        updated_at: ts(s.updated),
        labels: s.labels.into_iter().collect(),
    }
}

fn mounts(m: Vec<Mount>) -> Vec<types::Mount> {
    m.into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Snapshots for Snapshotter {
    async fn prepare(
        &self,
        r: Request<pb::PrepareSnapshotRequest>,
    ) -> Reply<pb::PrepareSnapshotResponse> {
        let ns = namespace(&r, &r.get_ref().key);
        let q = r.into_inner();
        tracing::debug!(key = q.key, parent = q.parent, labels = ?q.labels, "prepare");
        let l = labels(q.labels.clone());
        let pulled = crate::engine::is_bootstrap_layer(&l).then(|| l[TARGET].clone());
        if pulled.is_some() {
            let (client, dir) = (self.client.clone(), self.bootstraps.clone());
            tokio::task::spawn_blocking(move || crate::engine::ensure_bootstrap(&client, &l, &dir))
                .await
                .map_err(|e| Status::internal(format!("fetching the bootstrap: {e}")))??;
        }
        let ns2 = ns.clone();
        let r = self
            .run(move |e| e.prepare(&q.key, &q.parent, labels(q.labels), Kind::Active, &ns2))
            .await;
        if let (Some(target), Err(s)) = (pulled, &r) {
            if s.code() == tonic::Code::AlreadyExists && self.mount_on_pull {
                // containerd goes on while the image mounts: a container's
                // Prepare that comes first mounts it itself.
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = me
                        .run(move |e| {
                            e.mount_pulled(&target, &ns);
                            Ok(())
                        })
                        .await;
                });
            }
        }
        let m = r?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(&self, r: Request<pb::ViewSnapshotRequest>) -> Reply<pb::ViewSnapshotResponse> {
        let ns = namespace(&r, &r.get_ref().key);
        let q = r.into_inner();
        let m = self
            .run(move |e| e.prepare(&q.key, &q.parent, labels(q.labels), Kind::View, &ns))
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(&self, r: Request<pb::MountsRequest>) -> Reply<pb::MountsResponse> {
        let q = r.into_inner();
        let m = self.run(move |e| e.mounts(&q.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(&self, r: Request<pb::CommitSnapshotRequest>) -> Reply<()> {
        let q = r.into_inner();
        self.run(move |e| e.commit(&q.name, &q.key, labels(q.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(&self, r: Request<pb::RemoveSnapshotRequest>) -> Reply<()> {
        let q = r.into_inner();
        self.run(move |e| e.remove(&q.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(&self, r: Request<pb::StatSnapshotRequest>) -> Reply<pb::StatSnapshotResponse> {
        let q = r.into_inner();
        let s = self.run(move |e| e.stat(&q.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(s)),
        }))
    }

    async fn update(
        &self,
        r: Request<pb::UpdateSnapshotRequest>,
    ) -> Reply<pb::UpdateSnapshotResponse> {
        let q = r.into_inner();
        let i = q
            .info
            .ok_or_else(|| Status::invalid_argument("update without info"))?;
        let paths = q.update_mask.map(|m| m.paths).unwrap_or_default();
        let name = i.name.clone();
        let s = self
            .run(move |e| e.update(&i.name, labels(i.labels), &paths))
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info((name, s))),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

    /// Every snapshot (filters are applied by containerd's metadata layer,
    /// which lists the backend only to walk it whole).
    #[allow(clippy::result_large_err)] // tonic's stream item type is fixed
    async fn list(&self, _r: Request<pb::ListSnapshotsRequest>) -> Reply<Self::ListStream> {
        let all = self.run(|e| Ok(e.list())).await?;
        let pages: Vec<_> = all
            .chunks(100)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(pages)))
    }

    async fn usage(&self, r: Request<pb::UsageRequest>) -> Reply<pb::UsageResponse> {
        let q = r.into_inner();
        let (size, inodes) = self.run(move |e| e.usage(&q.key)).await?;
        Ok(Response::new(pb::UsageResponse { size, inodes }))
    }

    async fn cleanup(&self, _r: Request<pb::CleanupRequest>) -> Reply<()> {
        self.run(|e| e.cleanup()).await?;
        Ok(Response::new(()))
    }
}

/// Serve on `socket` until the future is dropped or the process ends.
pub async fn serve(socket: &Path, snapshotter: Snapshotter) -> Result<(), SnapError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SnapError::io("creating the socket directory", e))?;
    }
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(SnapError::io("removing the old socket", e))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .map_err(|e| SnapError::io("binding the socket", e))?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(snapshotter))
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| SnapError::Internal(format!("serving: {e}")))
}
