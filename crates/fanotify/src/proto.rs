//! The pump's wire protocol: one message per `SOCK_SEQPACKET` datagram,
//! little-endian, a descriptor passed alongside with `SCM_RIGHTS` where a
//! message names a file. Hand-written because it is five fixed-layout
//! messages; a serialization crate would not carry the fds.

use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;

/// Largest message: a key is a cache path.
pub const MAX_MSG: usize = 8192;

/// Daemon → pump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToPump {
    /// Keep the attached fd under `key` and mark its inode `FAN_PRE_ACCESS`.
    /// The fd must have been opened before any mark existed on the inode,
    /// so I/O through it raises no events; the pump hands it back to every
    /// daemon that connects later. `ready_map` is the file's readiness map:
    /// the pump answers reads of durably ready ranges itself.
    Watch {
        req: u64,
        key: String,
        ready_map: String,
    },
    /// Keep the attached fd under `key` without marking anything: a
    /// descriptor that must outlive the daemon (`/dev/cachefiles`).
    Keep { req: u64, key: String },
    /// Remove the mark of `key` (if any) and forget its fd.
    Unwatch { req: u64, key: String },
    /// The answer to event `id` (`FAN_ALLOW` or `FAN_DENY_ERRNO(e)`).
    Answer { id: u64, response: u32 },
}

/// Pump → daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromPump {
    /// A watched file's fd, sent on connect (attached).
    Stored { key: String },
    /// Every `Stored` has been sent; events follow.
    Ready,
    /// An access to a watched file (its event fd attached). Re-sent to a
    /// new daemon if the previous one left without answering.
    Event {
        id: u64,
        range: Option<(u64, u64)>,
        pid: i32,
    },
    /// The result of a `Watch`/`Unwatch`: 0 or an errno.
    Reply { req: u64, errno: i32 },
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn key_at(b: &[u8], at: usize) -> Option<String> {
    String::from_utf8(b.get(at..)?.to_vec()).ok()
}

impl ToPump {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            ToPump::Watch {
                req,
                key,
                ready_map,
            } => {
                b.push(b'W');
                b.extend_from_slice(&req.to_le_bytes());
                b.extend_from_slice(key.as_bytes());
                b.push(0);
                b.extend_from_slice(ready_map.as_bytes());
            }
            ToPump::Keep { req, key } => {
                b.push(b'K');
                b.extend_from_slice(&req.to_le_bytes());
                b.extend_from_slice(key.as_bytes());
            }
            ToPump::Unwatch { req, key } => {
                b.push(b'U');
                b.extend_from_slice(&req.to_le_bytes());
                b.extend_from_slice(key.as_bytes());
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
            b'W' => {
                let (key, map) = key_at(b, 9)?
                    .split_once('\0')
                    .map(|(k, m)| (k.to_string(), m.to_string()))?;
                ToPump::Watch {
                    req: u64_at(b, 1)?,
                    key,
                    ready_map: map,
                }
            }
            b'K' => ToPump::Keep {
                req: u64_at(b, 1)?,
                key: key_at(b, 9)?,
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
            FromPump::Stored { key } => {
                b.push(b'S');
                b.extend_from_slice(key.as_bytes());
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
            ToPump::Watch {
                req: 7,
                key: "/var/lib/shoal/d/blobs/ab".into(),
                ready_map: "/var/lib/shoal/d/blobs/ab.ready".into(),
            },
            ToPump::Unwatch {
                req: 8,
                key: "k".into(),
            },
            ToPump::Keep {
                req: 9,
                key: "cachefiles".into(),
            },
            ToPump::Answer {
                id: u64::MAX,
                response: 0x0500_0002,
            },
        ] {
            assert_eq!(ToPump::decode(&m.encode()), Some(m));
        }
        for m in [
            FromPump::Stored { key: "x".into() },
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
}
