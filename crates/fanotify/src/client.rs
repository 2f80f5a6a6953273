//! The daemon's end of the pump connection.

use crate::proto::{self, FromPump, ToPump, MAX_MSG};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connect to a pump's socket.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&sock, &SocketAddrUnix::new(path)?)?;
    Ok(sock)
}

/// An event forwarded by the pump; answer it with [`PumpConn::answer`].
#[derive(Debug)]
pub struct PumpEvent {
    pub id: u64,
    /// The accessed file, opened without notification.
    pub fd: OwnedFd,
    pub range: Option<(u64, u64)>,
    pub pid: i32,
}

/// A connection to the pump.
pub struct PumpConn {
    sock: OwnedFd,
    /// Pre-mark fds of watched files, by key, as handed back on connect.
    stored: Mutex<HashMap<String, OwnedFd>>,
    replies: Mutex<HashMap<u64, Sender<i32>>>,
    next_req: AtomicU64,
    lost: AtomicBool,
}

/// How long a watch request may wait for the pump.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl PumpConn {
    /// Connect and take the pump's stored fds; events then arrive on the
    /// returned channel, from a reader thread.
    pub fn open(socket: &Path) -> io::Result<(Arc<PumpConn>, Receiver<PumpEvent>)> {
        let sock = connect(socket)?;
        let mut stored = HashMap::new();
        let mut buf = vec![0u8; MAX_MSG];
        loop {
            let (n, fd) = proto::recv(sock.as_fd(), &mut buf)?
                .ok_or_else(|| io::Error::other("the pump closed the connection"))?;
            match FromPump::decode(&buf[..n]) {
                Some(FromPump::Stored { key }) => {
                    if let Some(fd) = fd {
                        stored.insert(key, fd);
                    }
                }
                Some(FromPump::Ready) => break,
                other => {
                    return Err(io::Error::other(format!(
                        "unexpected message from the pump before Ready: {other:?}"
                    )))
                }
            }
        }
        let conn = Arc::new(PumpConn {
            sock,
            stored: Mutex::new(stored),
            replies: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            lost: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let c = conn.clone();
        std::thread::Builder::new()
            .name("fanotify-pump-rx".into())
            .spawn(move || c.read_loop(buf, tx))?;
        Ok((conn, rx))
    }

    fn read_loop(&self, mut buf: Vec<u8>, events: Sender<PumpEvent>) {
        loop {
            let (n, fd) = match proto::recv(self.sock.as_fd(), &mut buf) {
                Ok(Some(x)) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => {
                    // The group's marks died with the pump (or will once
                    // it exits): unfilled ranges of live mounts are exposed.
                    tracing::error!(result = ?r.err(), "lost the fanotify pump");
                    self.lost.store(true, Ordering::SeqCst);
                    self.replies.lock().unwrap().clear();
                    return;
                }
            };
            match FromPump::decode(&buf[..n]) {
                Some(FromPump::Event { id, range, pid }) => {
                    let Some(fd) = fd else {
                        tracing::error!(id, "pump event without fd");
                        continue;
                    };
                    let _ = events.send(PumpEvent { id, fd, range, pid });
                }
                Some(FromPump::Reply { req, errno }) => {
                    if let Some(tx) = self.replies.lock().unwrap().remove(&req) {
                        let _ = tx.send(errno);
                    }
                }
                other => tracing::warn!(?other, "unexpected message from the pump"),
            }
        }
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    fn request(
        &self,
        make: impl FnOnce(u64) -> ToPump,
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        if self.is_lost() {
            return Err(io::Error::other("the fanotify pump is gone"));
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        self.replies.lock().unwrap().insert(req, tx);
        proto::send(self.sock.as_fd(), &make(req).encode(), fd)?;
        match rx.recv_timeout(REQUEST_TIMEOUT) {
            Ok(0) => Ok(()),
            Ok(errno) => Err(io::Error::from_raw_os_error(errno)),
            Err(_) => {
                self.replies.lock().unwrap().remove(&req);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the fanotify pump did not answer",
                ))
            }
        }
    }

    /// Have the pump keep `fd` (opened before any mark) and mark its inode;
    /// it answers reads that `ready_map` shows durably ready by itself.
    pub fn watch(&self, key: &str, ready_map: &Path, fd: BorrowedFd<'_>) -> io::Result<()> {
        let key = key.to_string();
        let k = key.clone();
        let ready_map = ready_map.to_string_lossy().into_owned();
        self.request(
            move |req| ToPump::Watch {
                req,
                key: k,
                ready_map,
            },
            Some(fd),
        )?;
        self.stored
            .lock()
            .unwrap()
            .insert(key, fd.try_clone_to_owned()?);
        Ok(())
    }

    /// Have the pump keep `fd` across daemon restarts, unmarked.
    pub fn keep(&self, key: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let k = key.to_string();
        self.request(move |req| ToPump::Keep { req, key: k }, Some(fd))?;
        self.stored
            .lock()
            .unwrap()
            .insert(key.to_string(), fd.try_clone_to_owned()?);
        Ok(())
    }

    pub fn unwatch(&self, key: &str) -> io::Result<()> {
        let k = key.to_string();
        self.request(move |req| ToPump::Unwatch { req, key: k }, None)?;
        self.stored.lock().unwrap().remove(key);
        Ok(())
    }

    pub fn answer(&self, id: u64, response: u32) -> io::Result<()> {
        proto::send(
            self.sock.as_fd(),
            &ToPump::Answer { id, response }.encode(),
            None,
        )
    }

    /// A duplicate of the stored pre-mark fd for `key`.
    pub fn stored_fd(&self, key: &str) -> Option<OwnedFd> {
        let s = self.stored.lock().unwrap();
        s.get(key).and_then(|f| f.try_clone().ok())
    }

    pub fn stored_keys(&self) -> Vec<String> {
        self.stored.lock().unwrap().keys().cloned().collect()
    }
}
