//! The event pump: a tiny process that owns the fanotify group and must
//! outlive daemon restarts.
//!
//! Why it exists: closing the group's last fd answers every queued event
//! with ALLOW, so readers of unfilled ranges would see zeros; and an event
//! read by a daemon that dies is lost for good. The pump therefore owns the
//! group, reads every event, forwards it (its fd attached) to the connected
//! daemon, writes the daemon's answer, and re-sends unanswered events to the
//! next daemon. While no daemon is connected, readers wait; after
//! `orphan_timeout` they get EIO, never zeros. It also keeps each watched
//! cache file's pre-mark fd (I/O through it raises no events) and hands
//! those back to a restarted daemon.
//!
//! It holds no domain logic, so it never needs restarting with the daemon.

use crate::proto::{self, FromPump, PumpKey, ToPump, MAX_MSG, PROTOCOL_VERSION};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fd::{AsFd, AsRawFd, OwnedFd};
use rustix::net::{SocketAddrUnix, SocketFlags};
use shoal_core::cache::map_range_ready;
use shoal_sys::fanotify::{fan_deny_errno, Group, FAN_ALLOW, FAN_PRE_ACCESS};
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the pump lingers with nothing to protect and no daemon.
const IDLE_EXIT: Duration = Duration::from_secs(5);

pub struct PumpOptions {
    /// How long an event waits for a daemon before it fails with EIO.
    pub orphan_timeout: Duration,
}

impl Default for PumpOptions {
    fn default() -> Self {
        PumpOptions {
            orphan_timeout: Duration::from_secs(60),
        }
    }
}

struct Pending {
    fd: OwnedFd,
    range: Option<(u64, u64)>,
    pid: i32,
    /// When it was last without a daemon to answer it.
    orphaned: Option<Instant>,
}

/// A watched file as the pump knows it.
struct Watched {
    fd: OwnedFd,
    /// Marked `FAN_PRE_ACCESS` (else only kept, e.g. `/dev/cachefiles`).
    marked: bool,
    /// Its readiness map, for answering ready ranges without the daemon.
    ready_map: Option<std::fs::File>,
    dev_ino: (u64, u64),
}

struct Pump {
    /// None where pre-content events are unavailable: the pump then only
    /// keeps fds (the cachefiles device) across daemon restarts.
    group: Option<Group>,
    stored: BTreeMap<PumpKey, Watched>,
    pending: BTreeMap<u64, Pending>,
    client: Option<OwnedFd>,
    next_id: u64,
    served: bool,
}

/// Listen on a new `SOCK_SEQPACKET` socket at `path` (mode 0600).
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let sock = proto::seqpacket()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    rustix::net::bind(&sock, &SocketAddrUnix::new(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    rustix::net::listen(&sock, 4)?;
    Ok(sock)
}

/// Run the pump on `socket` until nothing is left to protect: no daemon
/// connected, no watched file, no pending event.
pub fn run(socket: &Path, opts: &PumpOptions) -> io::Result<()> {
    if crate::client::connect(socket).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("a pump already listens on {}", socket.display()),
        ));
    }
    let group = match Group::pre_content(true) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::info!(error = %e, "no fanotify pre-content group: keeping fds only");
            None
        }
    };
    let listener = listen(socket)?;
    tracing::info!(socket = %socket.display(), "fanotify pump started");
    // The launcher waits for this line (and nothing else is ever written
    // to stdout, whose reader may be gone later).
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready").and_then(|_| out.flush());
    }
    let mut idle_since: Option<Instant> = None;
    let mut p = Pump {
        group,
        stored: BTreeMap::new(),
        pending: BTreeMap::new(),
        client: None,
        next_id: 1,
        served: false,
    };
    let mut evbuf = vec![0u8; 64 * 1024];
    let mut msg = vec![0u8; MAX_MSG];
    loop {
        let mut fds = vec![PollFd::from_borrowed_fd(listener.as_fd(), PollFlags::IN)];
        let gi = p.group.as_ref().map(|g| {
            fds.push(PollFd::from_borrowed_fd(g.as_fd(), PollFlags::IN));
            fds.len() - 1
        });
        let ci = p.client.as_ref().map(|c| {
            fds.push(PollFd::from_borrowed_fd(c.as_fd(), PollFlags::IN));
            fds.len() - 1
        });
        let timeout = Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if gi.is_some_and(|i| ready[i]) {
            p.read_events(&mut evbuf)?;
        }
        if ready[0] {
            let conn = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC)?;
            p.connect(conn);
        }
        if ci.is_some_and(|i| ready[i]) {
            p.serve_client(&mut msg);
        }
        p.expire_orphans(opts.orphan_timeout);
        if p.served && p.client.is_none() && p.stored.is_empty() && p.pending.is_empty() {
            if idle_since.get_or_insert_with(Instant::now).elapsed() >= IDLE_EXIT {
                tracing::info!("fanotify pump: nothing left to protect, exiting");
                let _ = std::fs::remove_file(socket);
                return Ok(());
            }
        } else {
            idle_since = None;
        }
    }
}

impl Pump {
    fn read_events(&mut self, buf: &mut [u8]) -> io::Result<()> {
        loop {
            let Some(group) = &self.group else {
                return Ok(());
            };
            let events = match group.read_events(buf) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in events {
                let Some(fd) = ev.fd else {
                    // Queue overflow carries no fd and needs no answer.
                    tracing::warn!(mask = ev.mask, "fanotify event without fd");
                    continue;
                };
                if self.ready_by_map(&fd, ev.range) {
                    // Fast path: no daemon round trip for bytes on disk.
                    if let Err(e) = self.group()?.respond(fd.as_raw_fd(), FAN_ALLOW) {
                        tracing::warn!(error = %e, "answering a fanotify event");
                    }
                    continue;
                }
                let id = self.next_id;
                self.next_id += 1;
                let pending = Pending {
                    fd,
                    range: ev.range,
                    pid: ev.pid,
                    orphaned: self.client.is_none().then(Instant::now),
                };
                self.forward(id, &pending);
                self.pending.insert(id, pending);
            }
        }
    }

    /// Whether the whole range of this event is ready by its readiness map
    /// (durable bits, or volatile ones of this boot: bytes the daemon wrote
    /// and verified, see `shoal_core::readiness`).
    fn ready_by_map(&self, fd: &OwnedFd, range: Option<(u64, u64)>) -> bool {
        let (Some((off, len)), Ok(st)) = (range, rustix::fs::fstat(fd)) else {
            return false;
        };
        let Some(w) = self
            .stored
            .values()
            .find(|w| w.dev_ino == (st.st_dev, st.st_ino))
        else {
            return false;
        };
        let Some(map) = &w.ready_map else {
            return false;
        };
        let end = off.saturating_add(len).min(st.st_size as u64);
        if off >= end {
            return false;
        }
        map_range_ready(map, off, end - off)
    }

    fn forward(&mut self, id: u64, p: &Pending) {
        let Some(c) = &self.client else { return };
        let m = FromPump::Event {
            id,
            range: p.range,
            pid: p.pid,
        };
        if let Err(e) = proto::send(c.as_fd(), &m.encode(), Some(p.fd.as_fd())) {
            tracing::warn!(error = %e, "daemon connection lost");
            self.drop_client();
        }
    }

    fn drop_client(&mut self) {
        self.client = None;
        let now = Instant::now();
        for p in self.pending.values_mut() {
            p.orphaned.get_or_insert(now);
        }
    }

    /// A (new) daemon: it replaces any earlier connection, receives the
    /// stored fds, then every unanswered event.
    fn connect(&mut self, conn: OwnedFd) {
        tracing::info!("daemon connected");
        self.client = Some(conn);
        self.served = true;
        let stored: Vec<(PumpKey, OwnedFd)> = self
            .stored
            .iter()
            .filter_map(|(k, w)| Some((k.clone(), w.fd.try_clone().ok()?)))
            .collect();
        let c = self.client.as_ref().unwrap().as_fd();
        let hello = FromPump::Hello {
            version: PROTOCOL_VERSION,
        };
        let mut ok = proto::send(c, &hello.encode(), None).is_ok();
        ok = ok
            && stored.iter().all(|(key, fd)| {
                let m = FromPump::Stored { key: key.clone() };
                proto::send(c, &m.encode(), Some(fd.as_fd())).is_ok()
            });
        ok = ok && proto::send(c, &FromPump::Ready.encode(), None).is_ok();
        if !ok {
            self.drop_client();
            return;
        }
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in ids {
            let p = self.pending.remove(&id).unwrap();
            self.forward(id, &p);
            let mut p = p;
            if self.client.is_some() {
                p.orphaned = None;
            }
            self.pending.insert(id, p);
        }
    }

    fn serve_client(&mut self, buf: &mut [u8]) {
        let Some(c) = &self.client else { return };
        let (n, fd) = match proto::recv(c.as_fd(), buf) {
            Ok(Some(x)) => x,
            Ok(None) => {
                tracing::info!("daemon disconnected");
                return self.drop_client();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return,
            Err(e) => {
                tracing::warn!(error = %e, "daemon connection failed");
                return self.drop_client();
            }
        };
        let Some(m) = ToPump::decode(&buf[..n]) else {
            tracing::warn!("malformed message from the daemon");
            return;
        };
        match m {
            ToPump::Hello { version } => {
                tracing::info!(daemon = version, pump = PROTOCOL_VERSION, "daemon protocol");
            }
            ToPump::Answer { id, response } => {
                if let Some(p) = self.pending.remove(&id) {
                    self.answer(p, response);
                }
            }
            ToPump::Watch {
                req,
                cache_file,
                ready_map,
            } => {
                let errno = match fd {
                    None => libc_einval(),
                    Some(fd) => errno_of(self.watch(cache_file, fd, &ready_map)),
                };
                self.reply(req, errno);
            }
            ToPump::Keep { req, name } => {
                let errno = match fd {
                    None => libc_einval(),
                    Some(fd) => {
                        self.keep(name, fd);
                        0
                    }
                };
                self.reply(req, errno);
            }
            ToPump::Unwatch { req, key } => {
                let errno = errno_of(self.unwatch(&key));
                self.reply(req, errno);
            }
        }
    }

    fn keep(&mut self, name: String, fd: OwnedFd) {
        let w = Watched {
            fd,
            marked: false,
            ready_map: None,
            dev_ino: (0, 0),
        };
        self.stored.insert(PumpKey::Kept(name), w);
    }

    /// Forget `key`'s fd, removing its mark if it has one; a mark already
    /// gone (e.g. the file was deleted) is fine.
    fn unwatch(&mut self, key: &PumpKey) -> io::Result<()> {
        let Some(w) = self.stored.remove(key) else {
            return Ok(());
        };
        if !w.marked {
            return Ok(());
        }
        match self
            .group()
            .and_then(|g| g.mark(false, FAN_PRE_ACCESS, w.fd.as_fd()))
        {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => Ok(()),
            r => r,
        }
    }

    fn watch(&mut self, cache_file: PathBuf, fd: OwnedFd, ready_map: &Path) -> io::Result<()> {
        let st = rustix::fs::fstat(&fd)?;
        self.group()?.mark(true, FAN_PRE_ACCESS, fd.as_fd())?;
        let ready_map = std::fs::File::open(ready_map)
            .map_err(|e| tracing::warn!(path = %ready_map.display(), error = %e, "readiness map"))
            .ok();
        self.stored.insert(
            PumpKey::CacheFile(cache_file),
            Watched {
                fd,
                marked: true,
                ready_map,
                dev_ino: (st.st_dev, st.st_ino),
            },
        );
        Ok(())
    }

    fn group(&self) -> io::Result<&Group> {
        self.group.as_ref().ok_or_else(|| {
            io::Error::from_raw_os_error(rustix::io::Errno::OPNOTSUPP.raw_os_error())
        })
    }

    fn reply(&mut self, req: u64, errno: i32) {
        if let Some(c) = &self.client {
            let m = FromPump::Reply { req, errno };
            if proto::send(c.as_fd(), &m.encode(), None).is_err() {
                self.drop_client();
            }
        }
    }

    /// Write the answer, then close the event fd (in that order: the kernel
    /// matches the answer by fd number).
    fn answer(&self, p: Pending, response: u32) {
        let Some(group) = &self.group else { return };
        if let Err(e) = group.respond(p.fd.as_raw_fd(), response) {
            tracing::warn!(error = %e, pid = p.pid, "answering a fanotify event");
        }
        drop(p.fd);
    }

    fn expire_orphans(&mut self, timeout: Duration) {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.orphaned.is_some_and(|t| t.elapsed() >= timeout))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let p = self.pending.remove(&id).unwrap();
            tracing::error!(
                pid = p.pid,
                "no daemon answered in time: the read fails with EIO"
            );
            self.answer(p, fan_deny_errno(EIO));
        }
    }
}

const EIO: i32 = rustix::io::Errno::IO.raw_os_error();

/// 0, or the errno a reply carries.
fn errno_of(r: io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(libc_einval()),
    }
}

fn libc_einval() -> i32 {
    rustix::io::Errno::INVAL.raw_os_error()
}
