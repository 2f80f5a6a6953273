//! The daemon's end of the pump connection.

use crate::proto::{self, FromPump, PumpKey, ToPump, MAX_MSG, PROTOCOL_VERSION};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::net::SocketAddrUnix;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Connect to a pump's socket.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = proto::seqpacket()?;
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
    stored: Mutex<HashMap<PumpKey, OwnedFd>>,
    /// The pump's protocol version (0: before the handshake existed).
    version: u32,
    replies: Mutex<HashMap<u64, Sender<i32>>>,
    next_req: AtomicU64,
    lost: AtomicBool,
}

/// The start of a connection: the pump's version (a pump of version 0
/// says none and starts with its stored fds), ours back to it, then the
/// fds it kept for earlier daemons up to `Ready`.
fn handshake(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(u32, HashMap<PumpKey, OwnedFd>)> {
    let mut version = 0;
    let mut stored = HashMap::new();
    let mut first = true;
    loop {
        let (n, fd) = proto::recv(sock.as_fd(), buf)?
            .ok_or_else(|| io::Error::other("the pump closed the connection"))?;
        match FromPump::decode(&buf[..n]) {
            Some(FromPump::Hello { version: v }) if first => {
                if v > PROTOCOL_VERSION {
                    return Err(io::Error::other(format!(
                        "the fanotify pump speaks protocol version {v}, newer than this \
                         daemon's {PROTOCOL_VERSION}: run the daemon of the release that \
                         started the pump (the pump exits by itself once no mount needs it)"
                    )));
                }
                version = v;
                let hello = ToPump::Hello {
                    version: PROTOCOL_VERSION,
                };
                proto::send(sock.as_fd(), &hello.encode(), None)?;
            }
            Some(FromPump::Stored { key }) => {
                if let Some(fd) = fd {
                    stored.insert(key, fd);
                }
            }
            Some(FromPump::Ready) => return Ok((version, stored)),
            other => {
                return Err(io::Error::other(format!(
                    "unexpected message from the pump before Ready: {other:?}"
                )))
            }
        }
        first = false;
    }
}

/// How long a watch request may wait for the pump.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl PumpConn {
    /// Connect and take the pump's stored fds; events then arrive on the
    /// returned channel, from a reader thread.
    pub fn open(socket: &Path) -> io::Result<(Arc<PumpConn>, Receiver<PumpEvent>)> {
        let sock = connect(socket)?;
        let mut buf = vec![0u8; MAX_MSG];
        let (version, stored) = handshake(&sock, &mut buf)?;
        let conn = Arc::new(PumpConn {
            sock,
            stored: Mutex::new(stored),
            version,
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

    /// The pump's protocol version.
    pub fn version(&self) -> u32 {
        self.version
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

    /// Have the pump keep `fd` (opened before any mark) of `cache_file`
    /// and mark its inode; it answers reads that `ready_map` shows ready
    /// by itself.
    pub fn watch(&self, cache_file: &Path, ready_map: &Path, fd: BorrowedFd<'_>) -> io::Result<()> {
        let (c, m) = (cache_file.to_path_buf(), ready_map.to_path_buf());
        self.request(
            move |req| ToPump::Watch {
                req,
                cache_file: c,
                ready_map: m,
            },
            Some(fd),
        )?;
        self.stored.lock().unwrap().insert(
            PumpKey::CacheFile(cache_file.to_path_buf()),
            fd.try_clone_to_owned()?,
        );
        Ok(())
    }

    /// Have the pump keep `fd` across daemon restarts under `name`, unmarked.
    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let n = name.to_string();
        self.request(move |req| ToPump::Keep { req, name: n }, Some(fd))?;
        self.stored
            .lock()
            .unwrap()
            .insert(PumpKey::Kept(name.to_string()), fd.try_clone_to_owned()?);
        Ok(())
    }

    pub fn unwatch(&self, key: &PumpKey) -> io::Result<()> {
        let k = key.clone();
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
    pub fn stored_fd(&self, key: &PumpKey) -> Option<OwnedFd> {
        let s = self.stored.lock().unwrap();
        s.get(key).and_then(|f| f.try_clone().ok())
    }

    pub fn stored_keys(&self) -> Vec<PumpKey> {
        self.stored.lock().unwrap().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    fn send(sock: &OwnedFd, m: FromPump, fd: Option<BorrowedFd<'_>>) {
        proto::send(sock.as_fd(), &m.encode(), fd).unwrap();
    }

    #[test]
    fn handshake_with_a_pump_of_this_version() {
        let (daemon, pump) = pair();
        let dev = std::fs::File::open("/dev/null").unwrap();
        send(&pump, FromPump::Hello { version: 1 }, None);
        let key = PumpKey::Kept("/dev/cachefiles".into());
        send(
            &pump,
            FromPump::Stored { key: key.clone() },
            Some(dev.as_fd()),
        );
        send(&pump, FromPump::Ready, None);
        let mut buf = vec![0u8; MAX_MSG];
        let (version, stored) = handshake(&daemon, &mut buf).unwrap();
        assert_eq!(version, 1);
        assert!(stored.contains_key(&key));
        let (n, _) = proto::recv(pump.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(
            ToPump::decode(&buf[..n]),
            Some(ToPump::Hello {
                version: PROTOCOL_VERSION
            })
        );
    }

    /// A pump started by an older release says no version: it is served,
    /// and sent no `Hello` it would not understand.
    #[test]
    fn handshake_with_a_version_0_pump() {
        let (daemon, pump) = pair();
        send(&pump, FromPump::Ready, None);
        let mut buf = vec![0u8; MAX_MSG];
        let (version, stored) = handshake(&daemon, &mut buf).unwrap();
        assert_eq!((version, stored.len()), (0, 0));
        rustix::net::shutdown(&daemon, rustix::net::Shutdown::Write).unwrap();
        assert!(proto::recv(pump.as_fd(), &mut buf).unwrap().is_none());
    }

    #[test]
    fn a_newer_pump_is_refused_by_name() {
        let (daemon, pump) = pair();
        send(&pump, FromPump::Hello { version: 9 }, None);
        let mut buf = vec![0u8; MAX_MSG];
        let e = handshake(&daemon, &mut buf).unwrap_err().to_string();
        assert!(e.contains("protocol version 9"), "{e}");
        assert!(e.contains(&format!("daemon's {PROTOCOL_VERSION}")), "{e}");
    }
}
