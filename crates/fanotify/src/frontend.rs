//! The frontend: mounts a bound image file-backed over its domain's cache
//! files and fills them on the kernel's first access.
//!
//! Every mount of a domain passes the *same* cache files as `device=`, so a
//! blob is fetched and stored once per domain. Incomplete blobs are marked
//! (through the pump) before the mount opens them; events are answered from
//! the readiness map when the range is present, else after fetch + verify +
//! write; failures deny with EIO. A blob that becomes complete loses its
//! mark, and reads of it run at native speed.

use crate::client::{PumpConn, PumpEvent};
use crate::proto::PumpKey;
use rustix::fd::{BorrowedFd, OwnedFd};
use shoal_core::cache::{DataFiles, PlainFiles, BLOCK};
use shoal_core::domain::SharedBlob;
use shoal_core::pool::WorkerPool;
use shoal_core::{BoundImage, Registry};
use shoal_sys::fanotify::{fan_deny_errno, FAN_ALLOW};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, Weak};

#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    #[error("fanotify pump at {socket}: {source}")]
    Pump { socket: PathBuf, source: io::Error },
    #[error("watching cache file {path}: {source}")]
    Watch { path: PathBuf, source: io::Error },
    #[error("mounting {bootstrap} at {mountpoint}: {source}")]
    Mount {
        bootstrap: PathBuf,
        mountpoint: PathBuf,
        source: io::Error,
    },
    #[error("unmounting {mountpoint}: {source}")]
    Umount {
        mountpoint: PathBuf,
        source: io::Error,
    },
}

/// How the pump process is started when none is running.
pub struct PumpLauncher {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
}

pub struct Frontend {
    socket: PathBuf,
    launcher: Option<PumpLauncher>,
    conn: Mutex<Option<Arc<PumpConn>>>,
    reg: Mutex<Weak<Registry>>,
    /// Set once bindings are restored: events re-sent by the pump right
    /// after a restart must not be answered before their blobs are known.
    serving: (Mutex<bool>, std::sync::Condvar),
    /// The daemon's workers, shared with the other frontends.
    pool: Arc<WorkerPool>,
    /// Cache file (dev, ino) → blob, for events.
    index: Mutex<HashMap<(u64, u64), Weak<SharedBlob>>>,
    /// Fanotify mounts per cache file, and whether it is marked.
    users: Mutex<HashMap<PumpKey, usize>>,
}

fn key_of(blob: &SharedBlob) -> PumpKey {
    PumpKey::CacheFile(blob.cache.data_path().to_path_buf())
}

impl Frontend {
    /// A frontend whose pump listens on `socket`. Connects now if a pump is
    /// already running there (a daemon restart), so its stored fds are
    /// used when bindings are restored; otherwise the pump is launched on
    /// the first mount.
    pub fn new(
        socket: &Path,
        launcher: Option<PumpLauncher>,
        pool: Arc<WorkerPool>,
    ) -> Arc<Frontend> {
        let f = Arc::new(Frontend {
            socket: socket.to_path_buf(),
            launcher,
            conn: Mutex::new(None),
            reg: Mutex::new(Weak::new()),
            serving: (Mutex::new(false), std::sync::Condvar::new()),
            pool,
            index: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
        });
        if socket.exists() {
            match f.connect() {
                Ok(_) => {
                    tracing::info!(socket = %socket.display(), "reconnected to the fanotify pump")
                }
                Err(e) => tracing::warn!(error = %e, "no fanotify pump to reconnect to"),
            }
        }
        f
    }

    /// Answer events from `reg`; call once its bindings are restored.
    /// Until then events wait (readers block; they never get EIO for a
    /// blob that is merely not restored yet).
    pub fn serve(&self, reg: &Arc<Registry>) {
        *self.reg.lock().unwrap() = Arc::downgrade(reg);
        *self.serving.0.lock().unwrap() = true;
        self.serving.1.notify_all();
    }

    fn wait_serving(&self) {
        let mut on = self.serving.0.lock().unwrap();
        while !*on {
            on = self.serving.1.wait(on).unwrap();
        }
    }

    fn connect(self: &Arc<Self>) -> Result<Arc<PumpConn>, FanotifyError> {
        let mut guard = self.conn.lock().unwrap();
        if let Some(c) = guard.as_ref().filter(|c| !c.is_lost()) {
            return Ok(c.clone());
        }
        let err = |source| FanotifyError::Pump {
            socket: self.socket.clone(),
            source,
        };
        let (conn, events) = match PumpConn::open(&self.socket) {
            Ok(x) => x,
            Err(e) => {
                let Some(l) = &self.launcher else {
                    return Err(err(e));
                };
                self.launch(l).map_err(err)?;
                PumpConn::open(&self.socket).map_err(err)?
            }
        };
        // Marks the daemon no longer knows about stay until the blob is
        // complete or its last mount is gone.
        {
            let mut users = self.users.lock().unwrap();
            for k in conn.stored_keys() {
                if matches!(k, PumpKey::CacheFile(_)) {
                    users.entry(k).or_insert(0);
                }
            }
        }
        self.spawn_workers(events, conn.clone());
        *guard = Some(conn.clone());
        Ok(conn)
    }

    fn launch(&self, l: &PumpLauncher) -> io::Result<()> {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let log = File::options().create(true).append(true).open(&l.log)?;
        let mut child = Command::new(&l.program)
            .args(&l.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: signals meant for the daemon (a
            // terminal's ^C, `kill -- -PGID`) must not reach it.
            .process_group(0)
            .spawn()?;
        // It prints "ready" once it listens.
        let mut line = String::new();
        let out = child.stdout.take().unwrap();
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let st = child.wait()?;
            return Err(io::Error::other(format!(
                "the fanotify pump exited at start ({st}); see {}",
                l.log.display()
            )));
        }
        // Reap it whenever it exits.
        std::thread::spawn(move || child.wait());
        Ok(())
    }

    /// A dispatcher hands events to the worker pool, keyed by remote (see
    /// [`WorkerPool`]: one remote may hold all workers but two).
    fn spawn_workers(self: &Arc<Self>, events: Receiver<PumpEvent>, conn: Arc<PumpConn>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("fanotify-dispatch".into())
            .spawn(move || {
                for ev in events {
                    me.wait_serving();
                    let (f, conn) = (me.clone(), conn.clone());
                    me.pool.submit(me.fairness_key(&ev), move || {
                        let response = f.handle(&ev);
                        if let Err(e) = conn.answer(ev.id, response) {
                            tracing::error!(error = %e, "answering the pump");
                        }
                    });
                }
            });
    }

    /// The remote an event's blob is fetched from ("" if unknown).
    fn fairness_key(&self, ev: &PumpEvent) -> String {
        rustix::fs::fstat(&ev.fd)
            .ok()
            .and_then(|st| self.lookup((st.st_dev, st.st_ino)))
            .map(|b| b.remote_key())
            .unwrap_or_default()
    }

    fn lookup(&self, dev_ino: (u64, u64)) -> Option<Arc<SharedBlob>> {
        if let Some(b) = self
            .index
            .lock()
            .unwrap()
            .get(&dev_ino)
            .and_then(Weak::upgrade)
        {
            return Some(b);
        }
        let reg = self.reg.lock().unwrap().upgrade()?;
        let mut index = self.index.lock().unwrap();
        index.clear();
        for b in reg.all_blobs() {
            if let Ok(st) = rustix::fs::fstat(b.cache.data_file()) {
                index.insert((st.st_dev, st.st_ino), Arc::downgrade(&b));
            }
        }
        index.get(&dev_ino).and_then(Weak::upgrade)
    }

    /// Answer one event: allow once the range is ready, else deny with EIO.
    fn handle(&self, ev: &PumpEvent) -> u32 {
        let deny = fan_deny_errno(rustix::io::Errno::IO.raw_os_error());
        let blob = match rustix::fs::fstat(&ev.fd) {
            Ok(st) => self.lookup((st.st_dev, st.st_ino)),
            Err(_) => None,
        };
        let Some(blob) = blob else {
            tracing::error!(pid = ev.pid, "access to a watched file no bound blob owns");
            return deny;
        };
        let size = u64::from(blob.cache.blocks) * BLOCK;
        let (off, len) = ev.range.unwrap_or((0, size));
        if off >= size || len == 0 {
            return FAN_ALLOW;
        }
        let len = len.min(size - off);
        if blob.cache.is_range_ready(off, len) {
            return FAN_ALLOW;
        }
        match blob.ensure_range_ahead(off, len) {
            Ok(_) => {
                if blob.cache.is_complete() {
                    self.drop_mark(&blob);
                }
                FAN_ALLOW
            }
            Err(e) => {
                tracing::error!(blob = %blob.cache.name, offset = off, len, pid = ev.pid, error = %e,
                    "fill failed: the read gets EIO");
                deny
            }
        }
    }

    fn drop_mark(&self, blob: &SharedBlob) {
        let key = key_of(blob);
        let Some(conn) = self.conn.lock().unwrap().clone() else {
            return;
        };
        if !conn.stored_keys().contains(&key) {
            return;
        }
        match conn.unwatch(&key) {
            Ok(()) => tracing::info!(blob = %blob.cache.name, "blob complete: mark dropped"),
            Err(e) => tracing::warn!(blob = %blob.cache.name, error = %e, "dropping mark"),
        }
    }

    /// Mount `img` at `mountpoint`: mark its incomplete blobs, then mount
    /// the bootstrap file-backed with the domain's cache files as devices.
    pub fn mount(
        self: &Arc<Self>,
        img: &BoundImage,
        mountpoint: &Path,
        opts: &shoal_sys::ErofsOptions<'_>,
    ) -> Result<(), FanotifyError> {
        let conn = self.connect()?;
        let mut watched = Vec::new();
        for blob in &img.blobs {
            let key = key_of(blob);
            *self.users.lock().unwrap().entry(key.clone()).or_insert(0) += 1;
            watched.push(blob.clone());
            if !blob.cache.is_complete() && conn.stored_fd(&key).is_none() {
                // Durable bits first: the pump answers from the map on disk.
                let _ = blob.cache.flush();
                let data = rustix::fd::AsFd::as_fd(blob.cache.data_file());
                let path = blob.cache.data_path();
                if let Err(source) = conn.watch(path, blob.cache.map_path(), data) {
                    self.release(&watched);
                    return Err(FanotifyError::Watch {
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        let devices: Vec<&Path> = img.blobs.iter().map(|b| b.cache.data_path()).collect();
        if let Err(source) = shoal_sys::mount_erofs(&img.spec.bootstrap, &devices, mountpoint, opts)
        {
            self.release(&watched);
            return Err(FanotifyError::Mount {
                bootstrap: img.spec.bootstrap.clone(),
                mountpoint: mountpoint.into(),
                source,
            });
        }
        Ok(())
    }

    /// Count a mount that survived a daemon restart.
    pub fn adopt(self: &Arc<Self>, img: &BoundImage) {
        let mut users = self.users.lock().unwrap();
        for blob in &img.blobs {
            *users.entry(key_of(blob)).or_insert(0) += 1;
        }
    }

    /// Unmount, then drop the marks no other mount needs.
    pub fn umount(
        self: &Arc<Self>,
        img: &BoundImage,
        mountpoint: &Path,
    ) -> Result<(), FanotifyError> {
        shoal_sys::umount(mountpoint).map_err(|source| FanotifyError::Umount {
            mountpoint: mountpoint.into(),
            source,
        })?;
        self.release(&img.blobs);
        Ok(())
    }

    fn release(&self, blobs: &[Arc<SharedBlob>]) {
        let conn = self.conn.lock().unwrap().clone();
        for blob in blobs {
            let key = key_of(blob);
            let last = {
                let mut users = self.users.lock().unwrap();
                let n = users.entry(key.clone()).or_insert(1);
                *n = n.saturating_sub(1);
                *n == 0
            };
            if last {
                self.users.lock().unwrap().remove(&key);
                if let Some(c) = &conn {
                    if c.stored_fd(&key).is_some() {
                        if let Err(e) = c.unwatch(&key) {
                            tracing::warn!(blob = %blob.cache.name, error = %e, "dropping mark");
                        }
                    }
                }
            }
        }
    }

    /// Have the pump keep `fd` across daemon restarts under `name`,
    /// launching the pump if needed.
    pub fn keep(self: &Arc<Self>, name: &str, fd: BorrowedFd<'_>) -> Result<(), FanotifyError> {
        let conn = self.connect()?;
        conn.keep(name, fd).map_err(|source| FanotifyError::Pump {
            socket: self.socket.clone(),
            source,
        })
    }

    /// A descriptor the pump kept under `name` for an earlier daemon.
    pub fn kept(&self, name: &str) -> Option<OwnedFd> {
        let conn = self.conn.lock().unwrap().clone()?;
        conn.stored_fd(&PumpKey::Kept(name.to_string()))
    }

    /// Blobs currently marked (for status).
    pub fn marked(&self) -> Vec<String> {
        self.conn
            .lock()
            .unwrap()
            .as_ref()
            .map(|c| c.stored_keys())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|k| match k {
                PumpKey::CacheFile(p) => Some(p.display().to_string()),
                PumpKey::Kept(_) => None,
            })
            .collect()
    }

    /// The connected pump's protocol version.
    pub fn pump_protocol(&self) -> Option<u32> {
        let conn = self.conn.lock().unwrap();
        conn.as_ref().filter(|c| !c.is_lost()).map(|c| c.version())
    }

    pub fn pump_connected(&self) -> bool {
        self.conn
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|c| !c.is_lost())
    }
}

/// Cache files come from the pump's stored pre-mark fds when it has them
/// (after a daemon restart); otherwise they are opened normally, which is
/// safe because a file is only ever marked after the daemon opened it.
impl DataFiles for Frontend {
    fn open(&self, path: &Path) -> io::Result<File> {
        let conn = self.conn.lock().unwrap().clone();
        if let Some(fd) = conn.and_then(|c| c.stored_fd(&PumpKey::CacheFile(path.to_path_buf()))) {
            return Ok(File::from(fd));
        }
        PlainFiles.open(path)
    }
}
