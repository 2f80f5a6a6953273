//! cachefiles on-demand frontend: erofs mounted with `fsid=F[,domain_id=D]`
//! reads its bootstrap and blobs through fscache; cachefiles asks this
//! daemon for every range it lacks (`/dev/cachefiles` in on-demand mode).
//!
//! OPEN names a cookie (volume `erofs,<domain_id or fsid>`, key = fsid for
//! the bootstrap or a device tag for a blob); it is mapped to what the
//! control API bound, so the kernel's domain sharing (one cookie per blob
//! per domain) and ours coincide. READ is filled from the domain cache
//! (fetching and verifying on a miss) by whole, page-aligned `pwrite`s into
//! the object's anon fd (cachefiles writes it with O_DIRECT), then
//! `CACHEFILES_IOC_READ_COMPLETE`; a failed fill completes without data, so
//! the reader gets EIO and nothing waits forever. CLOSE drops the object.
#![forbid(unsafe_code)]

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fd::{AsFd, OwnedFd};
use shoal_core::cache::BLOCK;
use shoal_core::domain::{Cookie, SharedBlob};
use shoal_core::pool::WorkerPool;
use shoal_core::Registry;
use shoal_sys::cachefiles::{parse_msg, read_complete, Msg, CACHEFILES_MSG_MAX_SIZE};
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

#[derive(Debug, thiserror::Error)]
pub enum FscacheError {
    #[error("/dev/cachefiles is missing: load the cachefiles module (modprobe cachefiles)")]
    NoDevice,
    #[error("/dev/cachefiles is busy: another cache daemon (cachefilesd, or another shoal daemon) holds it")]
    Busy,
    #[error("the kernel refused on-demand mode ({0}): it lacks CONFIG_CACHEFILES_ONDEMAND, or the cache directory's filesystem cannot hold a cachefiles cache (tmpfs cannot)")]
    NoOndemand(io::Error),
    #[error("/dev/cachefiles: {what}: {source}")]
    Device { what: String, source: io::Error },
}

enum Kind {
    Bootstrap(File),
    Blob(Arc<SharedBlob>),
}

/// A cachefiles object: one open cookie and its anon fd.
struct Object {
    fd: OwnedFd,
    kind: Kind,
    size: u64,
    name: String,
}

#[derive(Default)]
pub struct Counters {
    pub opens: AtomicU64,
    pub reads: AtomicU64,
    pub closes: AtomicU64,
    pub failed_reads: AtomicU64,
}

pub struct Frontend {
    dev: OwnedFd,
    reg: Weak<Registry>,
    objects: Mutex<HashMap<u32, Arc<Object>>>,
    pub counters: Counters,
}

fn dev_write(dev: &OwnedFd, cmd: &str) -> io::Result<()> {
    rustix::io::write(dev, cmd.as_bytes())?;
    Ok(())
}

/// Open `/dev/cachefiles` and bind it in on-demand mode over `cache_dir`.
pub fn open_device(cache_dir: &Path, tag: &str) -> Result<OwnedFd, FscacheError> {
    use rustix::fs::{Mode, OFlags};
    let dev = rustix::fs::open(
        "/dev/cachefiles",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => FscacheError::NoDevice,
        rustix::io::Errno::BUSY => FscacheError::Busy,
        e => FscacheError::Device {
            what: "open".into(),
            source: e.into(),
        },
    })?;
    std::fs::create_dir_all(cache_dir).map_err(|source| FscacheError::Device {
        what: format!("creating {}", cache_dir.display()),
        source,
    })?;
    let cmd =
        |c: String| dev_write(&dev, &c).map_err(|source| FscacheError::Device { what: c, source });
    cmd(format!("dir {}", cache_dir.display()))?;
    cmd(format!("tag {tag}"))?;
    dev_write(&dev, "bind ondemand").map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
            FscacheError::Busy
        } else {
            FscacheError::NoOndemand(e)
        }
    })?;
    Ok(dev)
}

impl Frontend {
    /// Serve the bound device, its READs answered on the daemon's worker
    /// pool. With `restore`, the device was inherited from a previous
    /// daemon: the kernel re-sends the requests it had not seen answered
    /// (Linux 6.8+).
    pub fn start(
        dev: OwnedFd,
        reg: &Arc<Registry>,
        pool: Arc<WorkerPool>,
        restore: bool,
    ) -> io::Result<Arc<Frontend>> {
        let f = Arc::new(Frontend {
            dev,
            reg: Arc::downgrade(reg),
            objects: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        });
        if restore {
            dev_write(&f.dev, "restore")?;
        }
        let me = f.clone();
        std::thread::Builder::new()
            .name("cachefiles-rx".into())
            .spawn(move || me.read_loop(&pool))?;
        Ok(f)
    }

    /// The remote a READ of `object_id` fetches from, for the pool's
    /// fairness ("" for bootstraps, which are local).
    fn fairness_key(&self, object_id: u32) -> String {
        match self
            .objects
            .lock()
            .unwrap()
            .get(&object_id)
            .map(|o| &o.kind)
        {
            Some(Kind::Blob(b)) => b.remote_key(),
            _ => String::new(),
        }
    }

    fn read_loop(self: &Arc<Self>, pool: &WorkerPool) {
        let mut buf = vec![0u8; CACHEFILES_MSG_MAX_SIZE];
        loop {
            let mut fds = [PollFd::new(&self.dev, PollFlags::IN)];
            if let Err(e) = poll(&mut fds, None) {
                if e != rustix::io::Errno::INTR {
                    tracing::error!(error = %e, "polling /dev/cachefiles");
                    return;
                }
                continue;
            }
            let n = match rustix::io::read(&self.dev, &mut buf) {
                Ok(0) => continue,
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "reading /dev/cachefiles");
                    return;
                }
            };
            match parse_msg(&buf[..n]) {
                Ok(Msg::Open {
                    msg_id,
                    object_id,
                    volume_key,
                    cookie_key,
                    fd,
                }) => self.open(msg_id, object_id, &volume_key, &cookie_key, fd),
                Ok(Msg::Close { object_id, .. }) => {
                    if let Some(o) = self.objects.lock().unwrap().remove(&object_id) {
                        self.counters.closes.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(object_id, cookie = %o.name, "cachefiles CLOSE");
                    }
                }
                Ok(Msg::Read {
                    msg_id,
                    object_id,
                    off,
                    len,
                }) => {
                    let me = self.clone();
                    pool.submit(self.fairness_key(object_id), move || {
                        me.read(msg_id, object_id, off, len)
                    });
                }
                Err(e) => tracing::error!(error = %e, "bad cachefiles message"),
            }
        }
    }

    fn open(&self, msg_id: u32, object_id: u32, volume: &[u8], cookie: &[u8], fd: OwnedFd) {
        let (volume, cookie) = (
            String::from_utf8_lossy(volume).into_owned(),
            String::from_utf8_lossy(cookie).into_owned(),
        );
        let found = self
            .reg
            .upgrade()
            .and_then(|r| r.find_cookie(&volume, &cookie));
        let object = match found {
            Some(Cookie::Bootstrap(img)) => File::open(&img.spec.bootstrap).and_then(|f| {
                let size = f.metadata()?.len();
                Ok((Kind::Bootstrap(f), size))
            }),
            Some(Cookie::Blob(b)) => {
                let size = u64::from(b.cache.blocks) * BLOCK;
                Ok((Kind::Blob(b), size))
            }
            None => Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOENT.raw_os_error(),
            )),
        };
        let answer = match object {
            Ok((kind, size)) => {
                self.objects.lock().unwrap().insert(
                    object_id,
                    Arc::new(Object {
                        fd,
                        kind,
                        size,
                        name: cookie.clone(),
                    }),
                );
                self.counters.opens.fetch_add(1, Ordering::Relaxed);
                tracing::info!(object_id, %volume, %cookie, size, "cachefiles OPEN");
                format!("copen {msg_id},{size}")
            }
            Err(e) => {
                tracing::error!(%volume, %cookie, error = %e, "cachefiles OPEN of nothing bound");
                format!("copen {msg_id},-{}", e.raw_os_error().unwrap_or(2))
            }
        };
        if let Err(e) = dev_write(&self.dev, &answer) {
            tracing::error!(error = %e, %answer, "answering OPEN");
        }
    }

    /// Fill `[off, off + len)` of an object by whole pages, then complete.
    fn read(&self, msg_id: u32, object_id: u32, off: u64, len: u64) {
        let Some(o) = self.objects.lock().unwrap().get(&object_id).cloned() else {
            tracing::error!(object_id, "READ for an unknown object");
            return;
        };
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.fill(&o, off, len) {
            self.counters.failed_reads.fetch_add(1, Ordering::Relaxed);
            tracing::error!(cookie = %o.name, off, len, error = %e, "fill failed: the read gets EIO");
        }
        if let Err(e) = read_complete(o.fd.as_fd(), msg_id) {
            tracing::error!(cookie = %o.name, error = %e, "READ_COMPLETE");
        }
    }

    fn fill(&self, o: &Object, off: u64, len: u64) -> io::Result<()> {
        let start = off & !(BLOCK - 1);
        let end = (off + len)
            .min(o.size.div_ceil(BLOCK) * BLOCK)
            .div_ceil(BLOCK)
            * BLOCK;
        if start >= end {
            return Ok(());
        }
        // One page-aligned buffer (the anon fd writes with O_DIRECT).
        let n = (end - start) as usize;
        let mut raw = vec![0u8; n + BLOCK as usize];
        let pad = (BLOCK as usize - raw.as_ptr() as usize % BLOCK as usize) % BLOCK as usize;
        let buf = &mut raw[pad..pad + n];
        let data_end = end.min(o.size);
        let have = (data_end - start) as usize;
        match &o.kind {
            Kind::Bootstrap(f) => f.read_exact_at(&mut buf[..have], start)?,
            Kind::Blob(b) => {
                b.ensure_range_ahead(start, data_end - start)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                b.cache
                    .read_at(&mut buf[..have], start)
                    .map_err(|e| io::Error::other(e.to_string()))?;
            }
        }
        let mut done = 0;
        while done < n {
            done += rustix::io::pwrite(&o.fd, &buf[done..], start + done as u64)?;
        }
        Ok(())
    }

    /// Objects open right now.
    pub fn open_objects(&self) -> Vec<String> {
        self.objects
            .lock()
            .unwrap()
            .values()
            .map(|o| o.name.clone())
            .collect()
    }
}
