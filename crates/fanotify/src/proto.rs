//! The pump's wire protocol: one message per `SOCK_SEQPACKET` datagram,
//! little-endian, a descriptor passed alongside with `SCM_RIGHTS` where a
//! message names a file. Hand-written because it is five fixed-layout
//! messages; a serialization crate would not carry the fds.
//! The wire bytes of every version-0 message are unchanged, so a daemon
//! and a pump of different releases keep understanding each other.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use std::ffi::OsStr;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Largest message: a key is a cache path.
pub const MAX_MSG: usize = 8192;

/// The protocol this build speaks. The pump outlives daemons, so a daemon
/// upgrade meets the pump of an older release: each side says its version
/// first (`Hello`), and a daemon refuses a pump newer than itself rather
/// than misread it. Version 0 is the protocol before the handshake (no
/// `Hello`, otherwise the same messages): still served.
pub const PROTOCOL_VERSION: u32 = 1;

/// What the pump keeps a descriptor under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PumpKey {
    /// A blob's cache file, by path: marked `FAN_PRE_ACCESS` while the
    /// blob is incomplete.
    CacheFile(PathBuf),
    /// A descriptor that must outlive the daemon, never marked (e.g.
    /// `/dev/cachefiles`), by name.
    Kept(String),
}

/// On the wire a cache file is its absolute path and a kept fd `keep:NAME`
/// (as in version 0).
const KEPT_PREFIX: &str = "keep:";

impl PumpKey {
    fn encode(&self, b: &mut Vec<u8>) {
        match self {
            PumpKey::CacheFile(p) => b.extend_from_slice(p.as_os_str().as_bytes()),
            PumpKey::Kept(name) => {
                b.extend_from_slice(KEPT_PREFIX.as_bytes());
                b.extend_from_slice(name.as_bytes());
            }
        }
    }

    fn decode(b: &[u8]) -> Option<PumpKey> {
        if let Some(name) = b.strip_prefix(KEPT_PREFIX.as_bytes()) {
            return Some(PumpKey::Kept(String::from_utf8(name.to_vec()).ok()?));
        }
        (b.first() == Some(&b'/')).then(|| PumpKey::CacheFile(PathBuf::from(OsStr::from_bytes(b))))
    }
}

impl std::fmt::Display for PumpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PumpKey::CacheFile(p) => write!(f, "{}", p.display()),
            PumpKey::Kept(name) => write!(f, "{KEPT_PREFIX}{name}"),
        }
    }
}

/// Daemon → pump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToPump {
    /// The daemon's protocol version, sent first (to pumps of version 1+).
    Hello { version: u32 },
    /// Keep the attached fd of a cache file and mark its inode
    /// `FAN_PRE_ACCESS`. The fd must have been opened before any mark
    /// existed on the inode, so I/O through it raises no events; the pump
    /// hands it back to every daemon that connects later. `ready_map` is
    /// the file's readiness map: the pump answers reads of ready ranges
    /// itself.
    Watch {
        req: u64,
        cache_file: PathBuf,
        ready_map: PathBuf,
    },
    /// Keep the attached fd under `name` without marking anything: a
    /// descriptor that must outlive the daemon (`/dev/cachefiles`).
    Keep { req: u64, name: String },
    /// Remove the mark of `key` (if any) and forget its fd.
    Unwatch { req: u64, key: PumpKey },
    /// The answer to event `id` (`FAN_ALLOW` or `FAN_DENY_ERRNO(e)`).
    Answer { id: u64, response: u32 },
}

/// Pump → daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromPump {
    /// The pump's protocol version, sent first on connect (version 1+).
    Hello { version: u32 },
    /// A kept fd, sent on connect (attached).
    Stored { key: PumpKey },
    /// Every `Stored` has been sent; events follow.
    Ready,
    /// An access to a watched file (its event fd attached). Re-sent to a
    /// new daemon if the previous one left without answering.
    Event {
        id: u64,
        range: Option<(u64, u64)>,
        pid: i32,
    },
    /// The result of a `Watch`/`Keep`/`Unwatch`: 0 or an errno.
    Reply { req: u64, errno: i32 },
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn key_at(b: &[u8], at: usize) -> Option<PumpKey> {
    PumpKey::decode(b.get(at..)?)
}
fn path_of(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

impl ToPump {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            ToPump::Hello { version } => {
                b.push(b'V');
                b.extend_from_slice(&version.to_le_bytes());
            }
            ToPump::Watch {
                req,
                cache_file,
                ready_map,
            } => {
                b.push(b'W');
                b.extend_from_slice(&req.to_le_bytes());
                b.extend_from_slice(cache_file.as_os_str().as_bytes());
                b.push(0);
                b.extend_from_slice(ready_map.as_os_str().as_bytes());
            }
            ToPump::Keep { req, name } => {
                b.push(b'K');
                b.extend_from_slice(&req.to_le_bytes());
                PumpKey::Kept(name.clone()).encode(&mut b);
            }
            ToPump::Unwatch { req, key } => {
                b.push(b'U');
                b.extend_from_slice(&req.to_le_bytes());
                key.encode(&mut b);
            }
            ToPump::Answer { id, response } => {
                b.push(b'A');
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&response.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<ToPump> {
        Some(match *b.first()? {
            b'V' => ToPump::Hello {
                version: u32_at(b, 1)?,
            },
            b'W' => {
                let rest = b.get(9..)?;
                let nul = rest.iter().position(|&c| c == 0)?;
                let cache_file = path_of(&rest[..nul]);
                if !cache_file.is_absolute() {
                    return None;
                }
                ToPump::Watch {
                    req: u64_at(b, 1)?,
                    cache_file,
                    ready_map: path_of(&rest[nul + 1..]),
                }
            }
            b'K' => match key_at(b, 9)? {
                PumpKey::Kept(name) => ToPump::Keep {
                    req: u64_at(b, 1)?,
                    name,
                },
                PumpKey::CacheFile(_) => return None,
            },
            b'U' => ToPump::Unwatch {
                req: u64_at(b, 1)?,
                key: key_at(b, 9)?,
            },
            b'A' => ToPump::Answer {
                id: u64_at(b, 1)?,
                response: u32_at(b, 9)?,
            },
            _ => return None,
        })
    }
}

impl FromPump {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            FromPump::Hello { version } => {
                b.push(b'V');
                b.extend_from_slice(&version.to_le_bytes());
            }
            FromPump::Stored { key } => {
                b.push(b'S');
                key.encode(&mut b);
            }
            FromPump::Ready => b.push(b'Y'),
            FromPump::Event { id, range, pid } => {
                b.push(b'E');
                b.extend_from_slice(&id.to_le_bytes());
                let (has, (off, len)) = match range {
                    Some(r) => (1u8, *r),
                    None => (0u8, (0, 0)),
                };
                b.extend_from_slice(&off.to_le_bytes());
                b.extend_from_slice(&len.to_le_bytes());
                b.push(has);
                b.extend_from_slice(&pid.to_le_bytes());
            }
            FromPump::Reply { req, errno } => {
                b.push(b'R');
                b.extend_from_slice(&req.to_le_bytes());
                b.extend_from_slice(&errno.to_le_bytes());
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Option<FromPump> {
        Some(match *b.first()? {
            b'V' => FromPump::Hello {
                version: u32_at(b, 1)?,
            },
            b'S' => FromPump::Stored { key: key_at(b, 1)? },
            b'Y' => FromPump::Ready,
            b'E' => FromPump::Event {
                id: u64_at(b, 1)?,
                range: (*b.get(25)? == 1).then_some((u64_at(b, 9)?, u64_at(b, 17)?)),
                pid: u32_at(b, 26)? as i32,
            },
            b'R' => FromPump::Reply {
                req: u64_at(b, 1)?,
                errno: u32_at(b, 9)? as i32,
            },
            _ => return None,
        })
    }
}

/// A new `SOCK_SEQPACKET` Unix socket: the pump's connections keep
/// message boundaries and carry fds.
pub fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Send one datagram, with `fd` attached if given.
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        cmsg.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let n = sendmsg(sock, &[IoSlice::new(msg)], &mut cmsg, SendFlags::NOSIGNAL)?;
    if n != msg.len() {
        return Err(io::Error::other("short send on the pump socket"));
    }
    Ok(())
}

/// Receive one datagram and the fd attached to it, if any. `Ok(None)`:
/// the peer closed the connection.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<(usize, Option<OwnedFd>)>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                // More than one fd is a protocol error; extras are closed.
                fd.get_or_insert(f);
            }
        }
    }
    if r.bytes == 0 {
        return Ok(None);
    }
    Ok(Some((r.bytes, fd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            ToPump::Hello { version: 1 },
            ToPump::Watch {
                req: 7,
                cache_file: "/var/lib/shoal/d/blobs/ab".into(),
                ready_map: "/var/lib/shoal/d/blobs/ab.ready".into(),
            },
            ToPump::Unwatch {
                req: 8,
                key: PumpKey::CacheFile("/k".into()),
            },
            ToPump::Unwatch {
                req: 8,
                key: PumpKey::Kept("/dev/cachefiles".into()),
            },
            ToPump::Keep {
                req: 9,
                name: "/dev/cachefiles".into(),
            },
            ToPump::Answer {
                id: u64::MAX,
                response: 0x0500_0002,
            },
        ] {
            assert_eq!(ToPump::decode(&m.encode()), Some(m));
        }
        for m in [
            FromPump::Hello { version: 7 },
            FromPump::Stored {
                key: PumpKey::CacheFile("/x".into()),
            },
            FromPump::Stored {
                key: PumpKey::Kept("/dev/cachefiles".into()),
            },
            FromPump::Ready,
            FromPump::Event {
                id: 3,
                range: Some((4096, 65536)),
                pid: 1234,
            },
            FromPump::Event {
                id: 4,
                range: None,
                pid: -1,
            },
            FromPump::Reply { req: 9, errno: 2 },
        ] {
            assert_eq!(FromPump::decode(&m.encode()), Some(m));
        }
        assert_eq!(FromPump::decode(b"E\x01"), None);
        assert_eq!(ToPump::decode(b""), None);
    }

    /// Version 0's bytes (before typed keys and the handshake) still mean
    /// the same, both ways.
    #[test]
    fn version_0_bytes_are_unchanged() {
        let mut w = b"W\x07\0\0\0\0\0\0\0/c/blob\0/c/blob.ready".to_vec();
        assert_eq!(
            ToPump::decode(&w),
            Some(ToPump::Watch {
                req: 7,
                cache_file: "/c/blob".into(),
                ready_map: "/c/blob.ready".into(),
            })
        );
        assert_eq!(ToPump::decode(&w).unwrap().encode(), w);
        w = b"K\x09\0\0\0\0\0\0\0keep:/dev/cachefiles".to_vec();
        assert_eq!(ToPump::decode(&w).unwrap().encode(), w);
        assert_eq!(
            FromPump::decode(b"Skeep:/dev/cachefiles"),
            Some(FromPump::Stored {
                key: PumpKey::Kept("/dev/cachefiles".into())
            })
        );
        // Neither a relative cache file nor a cache file kept unmarked.
        assert_eq!(ToPump::decode(b"W\x07\0\0\0\0\0\0\0rel\0/m"), None);
        assert_eq!(ToPump::decode(b"K\x07\0\0\0\0\0\0\0/c/blob"), None);
        assert_eq!(FromPump::decode(b"Srelative"), None);
    }
}
