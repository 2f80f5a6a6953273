//! `/dev/cachefiles` on-demand mode (Linux 5.19+, erofs over fscache 6.1 to
//! 7.1): the daemon reads OPEN/READ/CLOSE messages from the device, writes
//! `copen` answers to it, fills objects through their anonymous fds and
//! completes READs with this ioctl. From `include/uapi/linux/cachefiles.h`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use zerocopy::native_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct cachefiles_msg`: the header of every message.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CachefilesMsg {
    pub msg_id: U32,
    pub opcode: U32,
    /// The whole message's length, header included.
    pub len: U32,
    pub object_id: U32,
}

/// `struct cachefiles_open`, after the header; followed by the volume key
/// and the cookie key.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CachefilesOpen {
    pub volume_key_size: U32,
    pub cookie_key_size: U32,
    pub fd: U32,
    pub flags: U32,
}

/// `struct cachefiles_read`, after the header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CachefilesRead {
    pub off: U64,
    pub len: U64,
}

pub const CACHEFILES_MSG_MAX_SIZE: usize = 1024;
pub const CACHEFILES_OP_OPEN: u32 = 0;
pub const CACHEFILES_OP_CLOSE: u32 = 1;
pub const CACHEFILES_OP_READ: u32 = 2;
/// `_IOW(0x98, 1, int)`; its argument is the READ's msg_id, by value.
pub const CACHEFILES_IOC_READ_COMPLETE: u32 = 0x4004_9801;

/// Complete READ `msg_id` on the object behind `anon_fd`. The kernel then
/// re-checks the cache file: a range still missing fails the read (EIO).
pub fn read_complete(anon_fd: BorrowedFd<'_>, msg_id: u32) -> io::Result<()> {
    // SAFETY: an integer-argument ioctl on a valid (borrowed) fd; the
    // kernel reads nothing from our memory.
    let r = unsafe {
        libc::ioctl(
            anon_fd.as_raw_fd(),
            CACHEFILES_IOC_READ_COMPLETE as libc::Ioctl,
            msg_id as libc::c_ulong,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One message from `/dev/cachefiles`.
#[derive(Debug)]
pub enum Msg {
    Open {
        msg_id: u32,
        object_id: u32,
        /// NUL trimmed: `erofs,<domain_id or fsid>`.
        volume_key: Vec<u8>,
        /// The fsid (bootstrap) or a device tag (blob).
        cookie_key: Vec<u8>,
        /// The object's anonymous fd: fill the cache file through it.
        fd: std::os::fd::OwnedFd,
    },
    Close {
        msg_id: u32,
        object_id: u32,
    },
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
}

/// Parse one message as read from the device. For OPEN the kernel has
/// installed the anon fd in our table: it is owned before anything else
/// is checked, so a malformed message cannot leak it.
pub fn parse_msg(b: &[u8]) -> io::Result<Msg> {
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cachefiles message: {why}"),
        )
    };
    let (h, body) = CachefilesMsg::read_from_prefix(b).map_err(|_| bad("short header"))?;
    let (msg_id, object_id) = (h.msg_id.get(), h.object_id.get());
    match h.opcode.get() {
        CACHEFILES_OP_OPEN => {
            let (o, keys) =
                CachefilesOpen::read_from_prefix(body).map_err(|_| bad("short OPEN"))?;
            // SAFETY: the kernel installed this fd for us with this message.
            let fd = unsafe {
                <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(o.fd.get() as i32)
            };
            let (vks, cks) = (
                o.volume_key_size.get() as usize,
                o.cookie_key_size.get() as usize,
            );
            // The keys end where the message does (`len` counts the header).
            let payload = (h.len.get() as usize).saturating_sub(32).min(keys.len());
            let data = &keys[..payload];
            if vks.checked_add(cks).is_none_or(|n| n > data.len()) {
                return Err(bad("OPEN key sizes"));
            }
            let mut volume_key = data[..vks].to_vec();
            while volume_key.last() == Some(&0) {
                volume_key.pop();
            }
            Ok(Msg::Open {
                msg_id,
                object_id,
                volume_key,
                cookie_key: data[vks..vks + cks].to_vec(),
                fd,
            })
        }
        CACHEFILES_OP_CLOSE => Ok(Msg::Close { msg_id, object_id }),
        CACHEFILES_OP_READ => {
            let (r, _) = CachefilesRead::read_from_prefix(body).map_err(|_| bad("short READ"))?;
            Ok(Msg::Read {
                msg_id,
                object_id,
                off: r.off.get(),
                len: r.len.get(),
            })
        }
        op => Err(bad(&format!("opcode {op}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(opcode: u32, body: &[u8]) -> Vec<u8> {
        let mut b = CachefilesMsg {
            msg_id: 7.into(),
            opcode: opcode.into(),
            len: ((16 + body.len()) as u32).into(),
            object_id: 3.into(),
        }
        .as_bytes()
        .to_vec();
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn parses_read_and_close_and_refuses_short_ones() {
        let read = CachefilesRead {
            off: 4096.into(),
            len: 8192.into(),
        };
        match parse_msg(&msg(CACHEFILES_OP_READ, read.as_bytes())).unwrap() {
            Msg::Read {
                msg_id,
                object_id,
                off,
                len,
            } => assert_eq!((msg_id, object_id, off, len), (7, 3, 4096, 8192)),
            m => panic!("{m:?}"),
        }
        assert!(matches!(
            parse_msg(&msg(CACHEFILES_OP_CLOSE, &[])).unwrap(),
            Msg::Close {
                msg_id: 7,
                object_id: 3
            }
        ));
        assert!(parse_msg(&msg(CACHEFILES_OP_READ, &[0; 8])).is_err());
        assert!(parse_msg(&[0; 10]).is_err());
        assert!(parse_msg(&msg(9, &[])).is_err());
    }
}
