//! Domains, as in `fs/erofs/fscache.c`: a domain is one cache volume and a
//! trust boundary. Images (fsids) are bound into it; every data blob they
//! reference is one refcounted entry of the domain, created with its first
//! user and released with its last, fetched and stored once however many
//! images share it. An image bound without a domain gets a private volume.

use crate::blocks::{BLOCK, BLOCK_BITS};
use crate::cache::{BlobCache, BlobStats, DataFiles, PlainFiles};
use crate::error::CoreError;
use crate::fetch::Source;
use crate::fingerprint::ContentProof;
use crate::names::BlobId;
use crate::remote::{self, HttpOptions, Remote, Retrying};
use crate::workdir::WorkDir;
use erofs::chunktable::ChunkEntry;
use erofs::{Image, ImageBytes};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bound::AccessLog;
pub use crate::bound::{BoundImage, ChunkKey};
pub use crate::key::{BindSpec, DomainKey};
pub use crate::shared::SharedBlob;

/// See [`Registry::find_cookie`].
pub enum Cookie {
    Bootstrap(Arc<BoundImage>),
    Blob(Arc<SharedBlob>),
}
pub struct Domain {
    pub key: DomainKey,
    /// Where the volume keeps its blob caches (see [`WorkDir::blob_dir`]).
    pub blob_dir: PathBuf,
    state: Mutex<DomainState>,
}

/// What a domain holds, under its one lock: images, blobs with their
/// reference counts, fingerprints. A blob's count lives beside the map it
/// decides membership of (as `fs/erofs/fscache.c` keeps cookie refcounts
/// under the domain list lock), so a bind taking a reference and the last
/// unbind dropping one can never disagree on whether the blob is there.
#[derive(Default)]
struct DomainState {
    images: BTreeMap<String, Arc<BoundImage>>,
    blobs: HashMap<BlobId, DomainBlob>,
    fingerprints: crate::fingerprint::DomainFingerprints,
}

/// A blob of a domain and how many bound images reference it.
struct DomainBlob {
    blob: Arc<SharedBlob>,
    refs: usize,
}

/// One device of an image being bound: the blob, its size, the chunks the
/// image pins in it, and where the image says it can be fetched from.
struct WantedBlob {
    name: BlobId,
    blocks: u32,
    entries: Vec<ChunkEntry>,
    source: Source,
}

/// The blobs an image's devices name, in device order, each checked to be
/// a blob name (it becomes a path) before anything touches the domain.
fn wanted_blobs(
    spec: &BindSpec,
    image: &Image<ImageBytes>,
    remote: &Arc<dyn Remote>,
) -> Result<Vec<WantedBlob>, CoreError> {
    let table = image.chunk_table.as_ref().expect("checked by open_image");
    let mut wanted = Vec::new();
    for (i, slot) in image.devices.iter().enumerate() {
        let dev = i as u16 + 1;
        let tag = image.device_tag(dev).ok_or_else(|| CoreError::Unusable {
            path: spec.bootstrap.clone(),
            why: format!("device {dev} has no tag"),
        })?;
        let name = BlobId::parse(&tag)?;
        // A blob the image stores compressed is fetched as its object
        // (which is all the remote may hold); others by their tag.
        let source = Source {
            remote: remote.clone(),
            frames: table.frames(dev).cloned().map(Arc::new),
        };
        wanted.push(WantedBlob {
            name,
            blocks: slot.blocks.get(),
            entries: table.entries(dev).unwrap_or(&[]).to_vec(),
            source,
        });
    }
    Ok(wanted)
}

impl Domain {
    /// Add an image to the domain, all or nothing: every blob is checked
    /// and every new cache opened before the domain changes.
    fn attach(
        &self,
        spec: BindSpec,
        image: Image<ImageBytes>,
        wanted: Vec<WantedBlob>,
        fingerprints: crate::fingerprint::Fingerprints,
        opts: &RegistryOptions,
    ) -> Result<Arc<BoundImage>, CoreError> {
        let mut st = self.state.lock().unwrap();
        if st.images.contains_key(&spec.fsid) {
            return Err(CoreError::Exists {
                domain: self.key.to_string(),
                fsid: spec.fsid.clone(),
            });
        }
        for w in &wanted {
            st.check_agrees(&spec.bootstrap, w)?;
        }
        let opened = self.open_new_blobs(&st, &wanted, opts)?;
        st.blobs.extend(opened);
        let blobs = wanted.into_iter().map(|w| st.take_ref(w)).collect();
        let (page_cache_share, fingerprints) =
            st.admit_fingerprints(&spec, &self.key, fingerprints);
        let bound = Arc::new(BoundImage {
            spec: spec.clone(),
            key: self.key.clone(),
            image,
            blobs,
            access: Mutex::new(AccessLog::default()),
            page_cache_share,
            fingerprints,
            unbound: false.into(),
        });
        st.images.insert(spec.fsid, bound.clone());
        Ok(bound)
    }

    /// Open the caches of the wanted blobs the domain does not hold yet.
    /// Nothing is added to the domain here, so a failure leaves it as it
    /// was.
    fn open_new_blobs(
        &self,
        st: &DomainState,
        wanted: &[WantedBlob],
        opts: &RegistryOptions,
    ) -> Result<HashMap<BlobId, DomainBlob>, CoreError> {
        let mut opened: HashMap<BlobId, DomainBlob> = HashMap::new();
        for w in wanted {
            if st.blobs.contains_key(&w.name) || opened.contains_key(&w.name) {
                continue;
            }
            let cache = BlobCache::open_with(&self.blob_dir, &w.name, w.blocks, &*opts.data_files)?;
            // The leader's budget, one attempt that may start at its
            // end, and a margin for the write and sync.
            cache.set_flight_wait(opts.http.deadline * 2 + Duration::from_secs(5));
            let blob = DomainBlob {
                blob: Arc::new(SharedBlob::new(cache)),
                refs: 0,
            };
            opened.insert(w.name, blob);
        }
        Ok(opened)
    }
}

impl DomainState {
    /// Refuse a blob that disagrees with what the domain's bound images
    /// say of it (its size, or a chunk's digest at the same address):
    /// one cache cannot serve both.
    fn check_agrees(&self, bootstrap: &Path, w: &WantedBlob) -> Result<(), CoreError> {
        let Some(b) = self.blobs.get(&w.name) else {
            return Ok(());
        };
        let unusable = |why| CoreError::Unusable {
            path: bootstrap.into(),
            why,
        };
        let (name, have) = (&w.name, b.blob.cache.blocks);
        if have != w.blocks {
            let why = format!(
                "blob {name}: {} blocks, but bound images say {have}",
                w.blocks
            );
            return Err(unusable(why));
        }
        let chunks = b.blob.chunks.read().unwrap();
        for e in &w.entries {
            if chunks.get(&e.blkaddr.get()).is_some_and(|c| c != e) {
                return Err(unusable(format!(
                    "blob {name}: chunk at block {} disagrees with bound images",
                    e.blkaddr.get()
                )));
            }
        }
        Ok(())
    }

    /// A new reference to a blob the domain holds: the image's chunks
    /// are pinned and its source added.
    fn take_ref(&mut self, w: WantedBlob) -> Arc<SharedBlob> {
        let b = self.blobs.get_mut(&w.name).expect("opened before");
        {
            let mut chunks = b.blob.chunks.write().unwrap();
            for e in w.entries {
                chunks.insert(e.blkaddr.get(), e);
            }
        }
        b.blob.add_source(w.source);
        b.refs += 1;
        b.blob.clone()
    }

    /// Whether an image may share page cache in this domain, and the
    /// fingerprints it then holds (released on unbind).
    fn admit_fingerprints(
        &mut self,
        spec: &BindSpec,
        key: &DomainKey,
        fingerprints: crate::fingerprint::Fingerprints,
    ) -> (Result<(), String>, HashMap<Vec<u8>, ContentProof>) {
        match fingerprints {
            Ok(fps) => match self.fingerprints.admit(&fps) {
                Ok(()) => (Ok(()), fps),
                Err(why) => {
                    tracing::warn!(fsid = %spec.fsid, domain = %key, %why, "page cache not shared");
                    (Err(why), HashMap::new())
                }
            },
            Err(why) => (Err(why), HashMap::new()),
        }
    }

    /// Drop one reference to a blob; the last one takes it out of the
    /// domain. Returns whether it was the last.
    fn drop_ref(&mut self, name: &BlobId) -> bool {
        let Some(b) = self.blobs.get_mut(name) else {
            return false;
        };
        b.refs -= 1;
        if b.refs > 0 {
            return false;
        }
        self.blobs.remove(name);
        true
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BlobStatus {
    pub name: BlobId,
    pub refs: usize,
    pub size: u64,
    pub cached_bytes: u64,
    pub chunks: usize,
    /// Bytes the bound images' chunk digests cover (what prefetch fetches).
    pub pinned_bytes: u64,
    pub stats: BlobStats,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImageStatus {
    pub fsid: String,
    pub bootstrap: PathBuf,
    pub remote: String,
    pub reference: Option<String>,
    pub blobs: Vec<BlobId>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DomainStatus {
    /// `None` for a private volume.
    pub domain_id: Option<String>,
    pub volume_key: String,
    pub images: Vec<ImageStatus>,
    pub blobs: Vec<BlobStatus>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub evicted: Vec<BlobId>,
    pub freed_bytes: u64,
    pub remaining_bytes: u64,
}

pub struct RegistryOptions {
    pub http: HttpOptions,
    pub retries: u32,
    pub retry_delay: Duration,
    /// Opens cache data files (see [`DataFiles`]).
    pub data_files: Arc<dyn DataFiles>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            http: HttpOptions::default(),
            retries: 4,
            retry_delay: Duration::from_millis(100),
            data_files: Arc::new(PlainFiles),
        }
    }
}

/// All domains of one daemon, rooted at its work directory.
pub struct Registry {
    pub work_dir: WorkDir,
    opts: RegistryOptions,
    domains: Mutex<BTreeMap<DomainKey, Arc<Domain>>>,
    /// Serializes saves of bindings.json (each writes the whole list).
    state_lock: Mutex<()>,
    /// The last save failed: the flush tick retries it.
    state_dirty: std::sync::atomic::AtomicBool,
}

fn open_image(path: &Path) -> Result<Image<ImageBytes>, CoreError> {
    let f = ImageBytes::open(path).map_err(|source| CoreError::Io {
        path: path.into(),
        what: "reading bootstrap".into(),
        source,
    })?;
    let img = Image::open(f).map_err(|source| CoreError::Image {
        path: path.into(),
        source,
    })?;
    // Chunk addresses, readiness bits and cache offsets all count 4 KiB
    // blocks: an image of another block size would be served wrong bytes.
    if img.sb.blkszbits != BLOCK_BITS {
        return Err(CoreError::Unusable {
            path: path.into(),
            why: format!(
                "block size {} bytes (blkszbits {}): only {BLOCK}-byte blocks can be served",
                img.block_size(),
                img.sb.blkszbits
            ),
        });
    }
    if img.chunk_table.is_none() {
        return Err(CoreError::Unusable {
            path: path.into(),
            why: "no chunk digest table: only images built by shoal can be served verified".into(),
        });
    }
    Ok(img)
}

impl Registry {
    pub fn new(work_dir: &Path, opts: RegistryOptions) -> Result<Self, CoreError> {
        std::fs::create_dir_all(work_dir).map_err(|source| CoreError::Io {
            path: work_dir.into(),
            what: "creating work directory".into(),
            source,
        })?;
        let work_dir = WorkDir::new(work_dir);
        crate::state::take_reserve(&work_dir);
        Ok(Registry {
            work_dir,
            opts,
            domains: Mutex::new(BTreeMap::new()),
            state_lock: Mutex::new(()),
            state_dirty: Default::default(),
        })
    }

    /// The network settings remotes and reference pulls use.
    pub fn http_options(&self) -> &HttpOptions {
        &self.opts.http
    }

    pub fn open_remote(&self, url: &str) -> Result<Arc<dyn Remote>, CoreError> {
        Ok(Arc::new(Retrying {
            inner: remote::open(url, &self.opts.http)?,
            attempts: self.opts.retries,
            base_delay: self.opts.retry_delay,
            budget: self.opts.http.deadline,
        }))
    }

    /// Bind an image into its domain. Every blob it references joins the
    /// domain (or gains a reference); an fsid bound twice is refused.
    pub fn bind(&self, spec: BindSpec) -> Result<Arc<BoundImage>, CoreError> {
        let key = DomainKey::new(spec.domain.as_deref(), &spec.fsid)?;
        let image = open_image(&spec.bootstrap)?;
        let remote = self.open_remote(&spec.remote)?;
        // Only a shared domain shares page cache; checked before the lock.
        let fingerprints = match &key {
            DomainKey::Shared(_) => crate::fingerprint::image_fingerprints(&image)?,
            DomainKey::Private(_) => Err("no domain: mounts without one never share".into()),
        };
        let wanted = wanted_blobs(&spec, &image, &remote)?;
        let domain = self.domain(&key);
        let bound = domain.attach(spec, image, wanted, fingerprints, &self.opts)?;
        self.persist_bind(&bound)?;
        Ok(bound)
    }

    /// The domain of `key`, created empty on its first image.
    fn domain(&self, key: &DomainKey) -> Arc<Domain> {
        let mut domains = self.domains.lock().unwrap();
        domains
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Domain {
                    blob_dir: self.work_dir.blob_dir(key),
                    key: key.clone(),
                    state: Mutex::new(DomainState::default()),
                })
            })
            .clone()
    }

    /// Save the bindings with a new one. A binding the disk does not hold
    /// would be lost by a restart under a live mount: if it cannot be
    /// saved, it is undone.
    fn persist_bind(&self, bound: &BoundImage) -> Result<(), CoreError> {
        let (key, spec) = (&bound.key, &bound.spec);
        if let Err(e) = self.save_state() {
            let _ = self.detach(key, &spec.fsid);
            tracing::error!(fsid = %spec.fsid, domain = %key, error = %e, "binding undone: state not saved");
            return Err(e);
        }
        tracing::info!(fsid = %spec.fsid, domain = %key, remote = %spec.remote, "image bound");
        Ok(())
    }

    /// Unbind an image; blobs whose last user it was leave the domain (their
    /// cache files stay for reuse until GC evicts them).
    pub fn unbind(&self, domain: Option<&str>, fsid: &str) -> Result<(), CoreError> {
        let key = DomainKey::new(domain, fsid)?;
        self.detach(&key, fsid)?;
        tracing::info!(fsid, domain = %key, "image unbound");
        // The image is gone from memory whatever the disk says: a state
        // that cannot be saved now (full disk, even past the reserve) is
        // saved by the next flush tick, and a restart before that is
        // reconciled by the mounts (see the daemon's mount records).
        if let Err(e) = self.save_state() {
            tracing::error!(fsid, domain = %key, error = %e, "saving bindings after unbind: retried");
            self.state_dirty
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Remove an image from memory: its blobs lose a reference.
    fn detach(&self, key: &DomainKey, fsid: &str) -> Result<Arc<BoundImage>, CoreError> {
        let not_bound = || CoreError::NotBound {
            domain: key.to_string(),
            fsid: fsid.to_string(),
        };
        let mut domains = self.domains.lock().unwrap();
        let d = domains.get(key).cloned().ok_or_else(not_bound)?;
        let mut st = d.state.lock().unwrap();
        let img = st.images.remove(fsid).ok_or_else(not_bound)?;
        img.unbound
            .store(true, std::sync::atomic::Ordering::Relaxed);
        st.fingerprints.release(&img.fingerprints);
        for b in &img.blobs {
            if let Err(e) = b.cache.flush() {
                tracing::warn!(blob = %b.cache.name, error = %e, "flushing readiness on unbind");
            }
            if st.drop_ref(&b.cache.name) {
                // Last use, for least-recently-used eviction.
                if let Ok(f) = File::options().write(true).open(b.cache.map_path()) {
                    let _ = f.set_modified(std::time::SystemTime::now());
                }
            }
        }
        if st.images.is_empty() {
            drop(st);
            domains.remove(key);
        } else {
            drop(st);
        }
        Ok(img)
    }

    /// What a kernel cookie names, fs/erofs/fscache.c style: in volume
    /// `erofs,<domain_id or fsid>`, the cookie `fsid` is an image's
    /// bootstrap and a device tag is a data blob.
    pub fn find_cookie(&self, volume_key: &str, cookie: &str) -> Option<Cookie> {
        let domain = {
            let domains = self.domains.lock().unwrap();
            domains
                .iter()
                .find(|(k, _)| k.volume_key() == volume_key)
                .map(|(_, d)| d.clone())?
        };
        let st = domain.state.lock().unwrap();
        if let Some(img) = st.images.get(cookie) {
            return Some(Cookie::Bootstrap(img.clone()));
        }
        let blob = BlobId::parse(cookie).ok()?;
        st.blobs.get(&blob).map(|b| Cookie::Blob(b.blob.clone()))
    }

    /// Every blob of every domain.
    /// Drop every cache file's clean pages: see [`BlobCache::trim_pages`].
    pub fn trim_page_cache(&self) {
        for b in self.all_blobs() {
            b.cache.trim_pages();
        }
    }

    pub fn all_blobs(&self) -> Vec<Arc<SharedBlob>> {
        let domains = self.domains.lock().unwrap();
        domains
            .values()
            .flat_map(|d| {
                d.state
                    .lock()
                    .unwrap()
                    .blobs
                    .values()
                    .map(|b| b.blob.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every bound image of every domain.
    fn all_images(&self) -> Vec<Arc<BoundImage>> {
        let domains = self.domains.lock().unwrap();
        domains
            .values()
            .flat_map(|d| {
                d.state
                    .lock()
                    .unwrap()
                    .images
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Make every cache's readiness durable (see [`BlobCache::flush`]).
    pub fn flush_all(&self) {
        if self
            .state_dirty
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            if let Err(e) = self.save_state() {
                tracing::debug!(error = %e, "saving bindings: still failing");
                self.state_dirty
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        for b in self.all_blobs() {
            if let Err(e) = b.cache.flush() {
                tracing::error!(blob = %b.cache.name, error = %e, "flushing readiness map");
            }
        }
    }

    pub fn get(&self, domain: Option<&str>, fsid: &str) -> Result<Arc<BoundImage>, CoreError> {
        let key = DomainKey::new(domain, fsid)?;
        let domains = self.domains.lock().unwrap();
        domains
            .get(&key)
            .and_then(|d| d.state.lock().unwrap().images.get(fsid).cloned())
            .ok_or_else(|| CoreError::NotBound {
                domain: key.to_string(),
                fsid: fsid.to_string(),
            })
    }

    pub fn status(&self) -> Vec<DomainStatus> {
        let domains = self.domains.lock().unwrap();
        domains
            .values()
            .filter(|d| !d.state.lock().unwrap().images.is_empty())
            .map(|d| {
                let st = d.state.lock().unwrap();
                let mut blobs: Vec<BlobStatus> = st
                    .blobs
                    .values()
                    .map(|DomainBlob { blob: b, refs }| BlobStatus {
                        name: b.cache.name,
                        refs: *refs,
                        size: u64::from(b.cache.blocks) * BLOCK,
                        cached_bytes: b.cache.ready_blocks() * BLOCK,
                        chunks: b.chunks.read().unwrap().len(),
                        pinned_bytes: b
                            .chunks
                            .read()
                            .unwrap()
                            .values()
                            .map(|e| u64::from(e.nblocks.get()) * BLOCK)
                            .sum(),
                        stats: b.cache.stats(),
                    })
                    .collect();
                blobs.sort_by_key(|b| b.name);
                DomainStatus {
                    domain_id: d.key.domain_id().map(str::to_string),
                    volume_key: d.key.volume_key(),
                    images: st
                        .images
                        .values()
                        .map(|i| ImageStatus {
                            fsid: i.spec.fsid.clone(),
                            bootstrap: i.spec.bootstrap.clone(),
                            remote: i.spec.remote.clone(),
                            reference: i.spec.reference.clone(),
                            blobs: i.blobs.iter().map(|b| b.cache.name).collect(),
                        })
                        .collect(),
                    blobs,
                }
            })
            .collect()
    }

    fn state_path(&self) -> PathBuf {
        self.work_dir.bindings()
    }

    /// Persist the bindings (atomically, into the reserve on a full disk)
    /// so a restarted daemon restores them.
    fn save_state(&self) -> Result<(), CoreError> {
        let _serial = self.state_lock.lock().unwrap();
        let specs: Vec<BindSpec> = self.all_images().iter().map(|i| i.spec.clone()).collect();
        let path = self.state_path();
        let bytes = serde_json::to_vec_pretty(&specs).expect("bind specs serialize");
        crate::state::write_atomic(&self.work_dir, &path, &bytes).map_err(|source| CoreError::Io {
            path: path.clone(),
            what: "saving bindings".into(),
            source,
        })
    }

    /// Rebind what the last run had bound. Returns the failures (the image
    /// may have been deleted meanwhile); the rest are bound.
    pub fn restore(&self) -> Result<Vec<(String, CoreError)>, CoreError> {
        let path = self.state_path();
        let specs: Vec<BindSpec> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| CoreError::State {
                path: path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CoreError::Io {
                    path,
                    what: "reading bindings".into(),
                    source,
                })
            }
        };
        let mut failed = Vec::new();
        for s in specs {
            let fsid = s.fsid.clone();
            if let Err(e) = self.bind(s) {
                tracing::error!(fsid, error = %e, "could not restore binding");
                failed.push((fsid, e));
            }
        }
        Ok(failed)
    }

    /// Evict cached blobs no bound image uses, least recently used first,
    /// until the cache holds at most `max_bytes` (allocated bytes).
    pub fn gc(&self, max_bytes: u64) -> Result<GcReport, CoreError> {
        use std::os::unix::fs::MetadataExt;
        let domains = self.domains.lock().unwrap();
        let mut in_use: HashSet<PathBuf> = HashSet::new();
        for d in domains.values() {
            for b in d.state.lock().unwrap().blobs.values() {
                in_use.insert(b.blob.cache.data_path().to_path_buf());
            }
        }
        let mut total = 0u64;
        let mut candidates = Vec::new();
        for files in self.work_dir.cached_blobs() {
            let Ok(md) = std::fs::metadata(&files.data) else {
                continue;
            };
            // A readiness map is touched when its blob's last user goes.
            let used = std::fs::metadata(&files.ready)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            let bytes = md.blocks() * 512;
            total += bytes;
            if !in_use.contains(&files.data) {
                candidates.push((used, files, bytes));
            }
        }
        candidates.sort_by(|a, b| (a.0, &a.1.data).cmp(&(b.0, &b.1.data)));
        let mut report = GcReport::default();
        for (_, files, bytes) in candidates {
            if total <= max_bytes {
                break;
            }
            // The readiness map goes first: a crash in between leaves an
            // orphan data file, never a map claiming bytes that are gone.
            let _ = std::fs::remove_file(&files.ready);
            let _ = std::fs::remove_file(&files.data);
            total -= bytes;
            report.freed_bytes += bytes;
            report.evicted.push(files.id);
        }
        report.remaining_bytes = total;
        tracing::info!(
            evicted = report.evicted.len(),
            freed = report.freed_bytes,
            "gc"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-file image built into `dir`: (bootstrap, blob directory).
    fn build(dir: &Path) -> (PathBuf, PathBuf) {
        let (src, blobs, boot) = (dir.join("src"), dir.join("blobs"), dir.join("i.boot"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), vec![7u8; 10_000]).unwrap();
        erofs::build(&[src], &blobs, &boot, &Default::default()).unwrap();
        (boot, blobs)
    }

    /// GC finds cache files through the work directory's layout: an
    /// unbound blob is evicted with its readiness map, a bound one stays.
    #[test]
    fn gc_evicts_unbound_blobs_and_their_maps() {
        let tmp = tempfile::tempdir().unwrap();
        let (boot, blobs) = build(tmp.path());
        let reg = Registry::new(&tmp.path().join("work"), RegistryOptions::default()).unwrap();
        let spec = |fsid: &str| BindSpec {
            domain: Some("d".into()),
            fsid: fsid.into(),
            bootstrap: boot.clone(),
            remote: format!("file://{}", blobs.display()),
            reference: None,
        };
        let img = reg.bind(spec("a")).unwrap();
        reg.bind(spec("b")).unwrap();
        let id = img.blobs[0].cache.name;
        let files = reg.work_dir.blob(&img.key, &id);
        assert_eq!(img.blobs[0].cache.data_path(), files.data);
        assert_eq!(reg.status()[0].blobs[0].refs, 2);
        // Cached bytes take room (a sparse file with none takes none).
        assert!(img.prefetch(&[], 1).unwrap() > 0);
        reg.unbind(Some("d"), "a").unwrap();
        // A prefetch of an unbound image stops before its first request.
        assert!(!img.is_bound());
        assert!(matches!(
            img.prefetch(&[], 1),
            Err(CoreError::NotBound { .. })
        ));
        drop(img);
        assert_eq!(reg.status()[0].blobs[0].refs, 1);
        assert!(reg.gc(0).unwrap().evicted.is_empty(), "in use");
        reg.unbind(Some("d"), "b").unwrap();
        assert!(reg.status().is_empty());
        let report = reg.gc(0).unwrap();
        assert_eq!(report.evicted, [id]);
        assert!(!files.data.exists() && !files.ready.exists());
    }

    /// Core counts chunks and readiness in 4 KiB blocks: an image of
    /// another block size is refused at bind, naming it and its size.
    #[test]
    fn binding_refuses_other_block_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let (boot, blobs) = build(tmp.path());
        let mut img = std::fs::read(&boot).unwrap();
        // blkszbits 11 (2 KiB), the superblock checksum resealed.
        img[1024 + 12] = 11;
        img[1028..1032].fill(0);
        // (over the superblock block, now 2048 bytes from offset 0)
        let c = erofs::ondisk::sb_checksum(&img[1024..2048]);
        img[1028..1032].copy_from_slice(&c.to_le_bytes());
        std::fs::write(&boot, &img).unwrap();
        let reg = Registry::new(&tmp.path().join("work"), RegistryOptions::default()).unwrap();
        let err = reg
            .bind(BindSpec {
                domain: Some("d".into()),
                fsid: "i".into(),
                bootstrap: boot.clone(),
                remote: format!("file://{}", blobs.display()),
                reference: None,
            })
            .err()
            .expect("a 2 KiB-block image is refused");
        let msg = err.to_string();
        assert!(matches!(err, CoreError::Unusable { .. }), "{msg}");
        assert!(msg.contains(&boot.display().to_string()), "{msg}");
        assert!(
            msg.contains("block size 2048 bytes (blkszbits 11)"),
            "{msg}"
        );
        assert!(reg.status().is_empty());
    }
}
