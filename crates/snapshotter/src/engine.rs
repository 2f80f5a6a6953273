//! The snapshot operations, synchronous, over the store: what each
//! containerd request does to snapshots, shoal images and mounts.

use crate::error::SnapError;
use crate::store::{now, Bootstrap, Image, Kind, Remote, Snapshot, Store};
use crate::{MountSpec, Mounter};
use shoal_registry::{shoal, Client, Digest, Reference};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// containerd's label naming the snapshot a Prepare would commit to.
pub(crate) const TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference and layer digest, as CRI and ctr-remote label them.
const IMAGE_REF: [&str; 2] = [
    "containerd.io/snapshot/cri.image-ref",
    "containerd.io/snapshot/remote/stargz.reference",
];
const LAYER_DIGEST: [&str; 2] = [
    "containerd.io/snapshot/cri.layer-digest",
    "containerd.io/snapshot/remote/stargz.digest",
];

/// A mount in containerd's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Which domain a containerd namespace's images join.
#[derive(Clone, Debug)]
pub enum DomainPolicy {
    /// `<prefix><namespace>`: images of one namespace share blobs.
    PerNamespace { prefix: String },
    /// One domain for every namespace.
    Fixed(String),
    /// No domain: every image has its own cache.
    None,
}

impl DomainPolicy {
    fn domain(&self, namespace: &str) -> Option<String> {
        match self {
            DomainPolicy::PerNamespace { prefix } => Some(format!("{prefix}{namespace}")),
            DomainPolicy::Fixed(d) => Some(d.clone()),
            DomainPolicy::None => None,
        }
    }
}

enum Lower {
    Dir(PathBuf),
    Image(String),
}

pub struct Engine {
    pub store: Store,
    pub mounter: Arc<dyn Mounter>,
    pub client: Client,
    pub policy: DomainPolicy,
}

/// Whether a Prepare carries a shoal bootstrap layer to commit remotely.
pub fn is_bootstrap_layer(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(TARGET)
        && labels.get(shoal::LAYER_ANNOTATION).map(String::as_str) == Some("bootstrap")
}

/// Fetch the bootstrap the labels name into `dir` (named by its sha256
/// hex), checked against its digest and opened as an EROFS image, unless it
/// is there; returns its hex and the image's reference. Needs no engine
/// state, so the service runs it before taking the engine's lock: a slow
/// registry delays only its own pull.
pub fn ensure_bootstrap(
    client: &Client,
    labels: &BTreeMap<String, String>,
    dir: &Path,
) -> Result<(String, Reference), SnapError> {
    let missing = |what: &str| {
        SnapError::InvalidArgument(format!(
            "the shoal bootstrap layer arrived without its {what} label: pull with `ctr-remote images rpull` or through CRI, which pass layer labels (plain `ctr images pull` does not)"
        ))
    };
    let image_ref = label(labels, &IMAGE_REF).ok_or_else(|| missing("image reference"))?;
    let digest = label(labels, &LAYER_DIGEST).ok_or_else(|| missing("layer digest"))?;
    let digest = Digest::parse(digest).map_err(SnapError::InvalidArgument)?;
    let r = Reference::parse(&format!("oci://{}", docker_hub(image_ref)))
        .map_err(|e| SnapError::InvalidArgument(format!("image reference {image_ref:?}: {e}")))?;
    let hex = digest.hex().to_string();
    let path = dir.join(&hex);
    if path.exists() {
        return Ok((hex, r));
    }
    let bytes = client
        .repository(&r)
        .get_blob_by_digest(&digest, shoal::MAX_BOOTSTRAP)
        .map_err(|e| {
            SnapError::Unavailable(format!("fetching the bootstrap of {image_ref}: {e}"))
        })?;
    let bytes = shoal::bootstrap_bytes(bytes).map_err(|why| {
        SnapError::FailedPrecondition(format!("bootstrap {digest} of {image_ref}: {why}"))
    })?;
    erofs::Image::open(bytes.clone()).map_err(|e| {
        SnapError::FailedPrecondition(format!(
            "bootstrap {digest} of {image_ref} is not a usable image: {e}"
        ))
    })?;
    let store = |()| -> std::io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut tmp, &bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    };
    store(()).map_err(|e| SnapError::io("storing the bootstrap", e))?;
    Ok((hex, r))
}

/// `docker.io/…` is served by `registry-1.docker.io`.
fn docker_hub(r: &str) -> String {
    match r.strip_prefix("docker.io/") {
        Some(rest) => format!("registry-1.docker.io/{rest}"),
        None => r.to_string(),
    }
}

fn label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k)).map(String::as_str)
}

/// Whether `path` is a mount point (a different device than its parent).
fn is_mounted(path: &Path) -> bool {
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

impl Engine {
    /// After a restart: images recorded as mounted that are not (a reboot,
    /// an unmount behind our back) are mounted again when next used.
    pub fn recover(&mut self) {
        for (key, img) in self.store.state.images.iter_mut() {
            if let Some(mp) = &img.mountpoint {
                if !is_mounted(mp) {
                    tracing::warn!(image = key, mountpoint = %mp.display(), "recorded mount is gone");
                    img.mountpoint = None;
                }
            }
        }
    }

    fn save(&self) -> Result<(), SnapError> {
        self.store
            .save()
            .map_err(|e| SnapError::io("saving metadata", e))
    }

    fn get(&self, key: &str) -> Result<&Snapshot, SnapError> {
        self.store
            .state
            .snapshots
            .get(key)
            .ok_or_else(|| SnapError::NotFound(key.into()))
    }

    pub fn stat(&self, key: &str) -> Result<(String, Snapshot), SnapError> {
        Ok((key.to_string(), self.get(key)?.clone()))
    }

    pub fn list(&self) -> Vec<(String, Snapshot)> {
        self.store
            .state
            .snapshots
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Prepare or View: a remote layer of a shoal image is committed at
    /// once (ALREADY_EXISTS tells containerd to skip it); anything else
    /// gets a directory and mounts.
    pub fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
        namespace: &str,
    ) -> Result<Vec<Mount>, SnapError> {
        if let (Some(target), Some(layer), Kind::Active) = (
            labels.get(TARGET),
            labels.get(shoal::LAYER_ANNOTATION),
            kind,
        ) {
            let (target, layer) = (target.clone(), layer.clone());
            return Err(self.commit_remote(&target, parent, &layer, labels));
        }
        self.create(key, parent, labels, kind, self.policy.domain(namespace))?;
        self.mounts(key)
    }

    /// Commit a shoal layer as a placeholder; always an error for
    /// containerd: ALREADY_EXISTS when it worked.
    fn commit_remote(
        &mut self,
        target: &str,
        parent: &str,
        layer: &str,
        labels: BTreeMap<String, String>,
    ) -> SnapError {
        if self.store.state.snapshots.contains_key(target) {
            return SnapError::AlreadyExists(target.into());
        }
        if !parent.is_empty() && !self.store.state.snapshots.contains_key(parent) {
            return SnapError::NotFound(parent.into());
        }
        let remote = match layer {
            "blob" => Remote::Blob,
            "bootstrap" => match self.add_bootstrap(&labels) {
                Ok(bootstrap) => Remote::Bootstrap { bootstrap },
                Err(e) => return e,
            },
            other => {
                return SnapError::InvalidArgument(format!("unknown shoal layer kind {other:?}"))
            }
        };
        let t = now();
        let id = self.store.next_id();
        let snap = Snapshot {
            id,
            kind: Kind::Committed,
            parent: parent.into(),
            labels,
            created: t,
            updated: t,
            remote: Some(remote),
            domain: None,
        };
        self.store.state.snapshots.insert(target.into(), snap);
        match self.save() {
            Ok(()) => {
                tracing::info!(snapshot = target, layer, "shoal layer committed remotely");
                SnapError::AlreadyExists(target.into())
            }
            Err(e) => e,
        }
    }

    /// Mount the image whose bootstrap layer `target` just committed, in
    /// the namespace's domain, with `target` as a user: containers of the
    /// image find it mounted, and it stays so until the image's layer
    /// snapshot is removed. Best effort: if it fails, the first container
    /// mounts it (and says why it cannot). A no-op if `target` is not (or
    /// no longer) a shoal image's bootstrap layer.
    pub fn mount_pulled(&mut self, target: &str, namespace: &str) {
        let Some(Remote::Bootstrap { bootstrap }) = self
            .store
            .state
            .snapshots
            .get(target)
            .and_then(|s| s.remote.clone())
        else {
            return;
        };
        let domain = self.policy.domain(namespace);
        match self.use_image(&bootstrap, domain.as_deref(), target) {
            Ok(()) => {
                if let Err(e) = self.save() {
                    tracing::warn!(snapshot = target, error = %e, "saving the pull-time mount");
                }
            }
            Err(e) => {
                tracing::warn!(snapshot = target, error = %e, "mounting at pull failed; the first container mounts the image")
            }
        }
    }

    /// Record the bootstrap the labels name (fetching it unless the
    /// service did already, outside the engine's lock); returns its hex.
    fn add_bootstrap(&mut self, labels: &BTreeMap<String, String>) -> Result<String, SnapError> {
        self.mounter.check().map_err(SnapError::Unavailable)?;
        let (hex, r) = ensure_bootstrap(&self.client, labels, &self.store.bootstraps_dir())?;
        let (remote, path) = (r.repository_url(), self.store.bootstrap_path(&hex));
        self.store
            .state
            .bootstraps
            .entry(hex.clone())
            .or_insert(Bootstrap { remote, path });
        Ok(hex)
    }

    fn create(
        &mut self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        kind: Kind,
        domain: Option<String>,
    ) -> Result<(), SnapError> {
        if self.store.state.snapshots.contains_key(key) {
            return Err(SnapError::AlreadyExists(key.into()));
        }
        if !parent.is_empty() && self.get(parent)?.kind != Kind::Committed {
            return Err(SnapError::FailedPrecondition(format!(
                "parent {parent} is not committed"
            )));
        }
        let lowers = self.lowers(parent)?;
        for l in &lowers {
            if let Lower::Image(hex) = l {
                self.use_image(hex, domain.as_deref(), key)?;
            }
        }
        let id = self.store.next_id();
        for d in [self.store.fs_dir(id), self.store.work_dir(id)] {
            std::fs::create_dir_all(&d)
                .map_err(|e| SnapError::io("creating the snapshot directory", e))?;
        }
        let t = now();
        let snap = Snapshot {
            id,
            kind,
            parent: parent.into(),
            labels,
            created: t,
            updated: t,
            remote: None,
            domain,
        };
        self.store.state.snapshots.insert(key.into(), snap);
        self.save()
    }

    /// The lower layers under `parent`, topmost first: directories of
    /// ordinary snapshots, and the shoal image whose bootstrap is reached
    /// first (it holds every layer below it).
    fn lowers(&self, parent: &str) -> Result<Vec<Lower>, SnapError> {
        let mut out = Vec::new();
        let mut cur = parent.to_string();
        for _ in 0..=self.store.state.snapshots.len() {
            if cur.is_empty() {
                return Ok(out);
            }
            let s = self.get(&cur)?;
            match &s.remote {
                None => out.push(Lower::Dir(self.store.fs_dir(s.id))),
                Some(Remote::Bootstrap { bootstrap }) => {
                    out.push(Lower::Image(bootstrap.clone()));
                    return Ok(out);
                }
                Some(Remote::Blob) => {
                    return Err(SnapError::FailedPrecondition(format!(
                        "shoal layer {cur} has no bootstrap layer above it: the image is incomplete"
                    )))
                }
            }
            cur = s.parent.clone();
        }
        Err(SnapError::Internal(format!(
            "the parents of {parent} form a cycle"
        )))
    }

    fn image_key(domain: Option<&str>, hex: &str) -> String {
        format!("{}/{hex}", domain.unwrap_or("-"))
    }

    /// Count `user` among the users of bootstrap `hex`'s image in
    /// `domain`, mounting it if it is not.
    fn use_image(&mut self, hex: &str, domain: Option<&str>, user: &str) -> Result<(), SnapError> {
        let key = Self::image_key(domain, hex);
        let mp = self.store.mountpoint(&key);
        let boot = self
            .store
            .state
            .bootstraps
            .get(hex)
            .cloned()
            .ok_or_else(|| SnapError::Internal(format!("bootstrap {hex} is not recorded")))?;
        let img = self
            .store
            .state
            .images
            .entry(key.clone())
            .or_insert_with(|| Image {
                bootstrap: hex.into(),
                domain: domain.unwrap_or_default().into(),
                fsid: hex[..32].to_string(),
                mountpoint: None,
                users: Default::default(),
            });
        if img.mountpoint.is_none() {
            std::fs::create_dir_all(&mp)
                .map_err(|e| SnapError::io("creating the mountpoint", e))?;
            let spec = MountSpec {
                bootstrap: boot.path.clone(),
                remote: boot.remote.clone(),
                domain: domain.map(str::to_string),
                fsid: img.fsid.clone(),
                mountpoint: mp.clone(),
            };
            self.mounter.mount(&spec).map_err(|e| {
                SnapError::Unavailable(format!("mounting shoal image {}: {e}", boot.remote))
            })?;
            tracing::info!(image = key, mountpoint = %mp.display(), "shoal image mounted");
            img.mountpoint = Some(mp);
        }
        img.users.insert(user.into());
        Ok(())
    }

    /// Drop `user` from every image it uses; unmount images nobody uses.
    fn release(&mut self, user: &str) -> Result<(), SnapError> {
        for (key, img) in self.store.state.images.iter_mut() {
            if !img.users.remove(user) || !img.users.is_empty() {
                continue;
            }
            if let Some(mp) = img.mountpoint.take() {
                if let Err(e) = self.mounter.unmount(&mp) {
                    img.users.insert(user.into());
                    img.mountpoint = Some(mp);
                    return Err(SnapError::FailedPrecondition(format!(
                        "unmounting shoal image {key}: {e}"
                    )));
                }
                tracing::info!(image = key, "shoal image unmounted");
            }
        }
        Ok(())
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapError> {
        let s = self.get(key)?;
        let mut lowers = Vec::new();
        for l in self.lowers(&s.parent)? {
            lowers.push(match l {
                Lower::Dir(d) => d,
                Lower::Image(hex) => {
                    let k = Self::image_key(s.domain.as_deref(), &hex);
                    self.store
                        .state
                        .images
                        .get(&k)
                        .and_then(|i| i.mountpoint.clone())
                        .ok_or_else(|| SnapError::Internal(format!("image {k} is not mounted")))?
                }
            });
        }
        let show = |p: &Path| p.display().to_string();
        let bind = |p: &Path, ro: bool| Mount {
            kind: "bind".into(),
            source: show(p),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let lowerdir = format!(
            "lowerdir={}",
            lowers.iter().map(|p| show(p)).collect::<Vec<_>>().join(":")
        );
        Ok(vec![match (s.kind, lowers.len()) {
            (Kind::Active, 0) => bind(&self.store.fs_dir(s.id), false),
            (Kind::Active, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", show(&self.store.work_dir(s.id))),
                    format!("upperdir={}", show(&self.store.fs_dir(s.id))),
                    lowerdir,
                ],
            },
            (Kind::View, 0) => bind(&self.store.fs_dir(s.id), true),
            (Kind::View, 1) => bind(&lowers[0], true),
            (Kind::View, _) => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![lowerdir],
            },
            (Kind::Committed, _) => {
                return Err(SnapError::FailedPrecondition(format!(
                    "{key} is committed: it has no mounts"
                )))
            }
        }])
    }

    pub fn commit(
        &mut self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapError> {
        if self.store.state.snapshots.contains_key(name) {
            return Err(SnapError::AlreadyExists(name.into()));
        }
        if self.get(key)?.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "{key} is not an active snapshot"
            )));
        }
        self.release(key)?;
        let mut s = self
            .store
            .state
            .snapshots
            .remove(key)
            .expect("checked above");
        s.kind = Kind::Committed;
        s.labels = labels;
        s.updated = now();
        self.store.state.snapshots.insert(name.into(), s);
        self.save()
    }

    pub fn remove(&mut self, key: &str) -> Result<(), SnapError> {
        let s = self.get(key)?.clone();
        if let Some((child, _)) = self
            .store
            .state
            .snapshots
            .iter()
            .find(|(_, c)| c.parent == key)
        {
            return Err(SnapError::FailedPrecondition(format!(
                "{key} has a child snapshot {child}"
            )));
        }
        self.release(key)?;
        if let Some(Remote::Bootstrap { bootstrap }) = &s.remote {
            self.drop_bootstrap(bootstrap);
        }
        self.store.state.snapshots.remove(key);
        self.save()?;
        match std::fs::remove_dir_all(self.store.snapshot_dir(s.id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(snapshot = key, error = %e, "removing the snapshot directory")
            }
            _ => {}
        }
        Ok(())
    }

    /// Forget a bootstrap whose layer snapshot is gone, with its images
    /// (unmounted by then: their users were children of that layer).
    fn drop_bootstrap(&mut self, hex: &str) {
        let Some(b) = self.store.state.bootstraps.remove(hex) else {
            return;
        };
        let _ = std::fs::remove_file(&b.path);
        let keys: Vec<String> = self
            .store
            .state
            .images
            .iter()
            .filter(|(_, i)| i.bootstrap == hex)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.store.state.images.remove(&k);
            let _ = std::fs::remove_dir(self.store.mountpoint(&k));
        }
    }

    pub fn update(
        &mut self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snapshot, SnapError> {
        let s = self
            .store
            .state
            .snapshots
            .get_mut(key)
            .ok_or_else(|| SnapError::NotFound(key.into()))?;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            s.labels = labels;
        } else {
            for p in paths {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(SnapError::InvalidArgument(format!(
                        "cannot update field {p:?}"
                    )));
                };
                match labels.get(k) {
                    Some(v) => s.labels.insert(k.into(), v.clone()),
                    None => s.labels.remove(k),
                };
            }
        }
        s.updated = now();
        let s = s.clone();
        self.save()?;
        Ok(s)
    }

    /// Bytes and inodes of a snapshot's own files (remote layers: none).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapError> {
        let s = self.get(key)?;
        if s.remote.is_some() {
            return Ok((0, 0));
        }
        let (mut bytes, mut inodes) = (0i64, 0i64);
        let mut stack = vec![self.store.fs_dir(s.id)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let Ok(md) = e.path().symlink_metadata() else {
                    continue;
                };
                inodes += 1;
                bytes += (md.blocks() * 512) as i64;
                if md.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        Ok((bytes, inodes))
    }

    /// Remove directories no snapshot owns.
    pub fn cleanup(&mut self) -> Result<(), SnapError> {
        let ids: std::collections::BTreeSet<String> = self
            .store
            .state
            .snapshots
            .values()
            .map(|s| s.id.to_string())
            .collect();
        let root = self.store.snapshots_root();
        let rd = std::fs::read_dir(&root).map_err(|e| SnapError::io("listing snapshots", e))?;
        for e in rd.flatten() {
            if !ids.contains(&e.file_name().to_string_lossy().into_owned()) {
                tracing::info!(dir = %e.path().display(), "cleanup: removing an orphaned snapshot directory");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }
}
