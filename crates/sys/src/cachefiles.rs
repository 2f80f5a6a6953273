//! `/dev/cachefiles` on-demand mode (Linux 5.19+, erofs over fscache 6.1 to
//! 7.1): the daemon reads OPEN/READ/CLOSE messages from the device, writes
//! `copen` answers to it, fills objects through their anonymous fds and
//! completes READs with this ioctl. From `include/uapi/linux/cachefiles.h`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
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
    let (msg_id, opcode, len, object_id) =
        match (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8), u32_at(b, 12)) {
            (Some(a), Some(o), Some(l), Some(i)) => (a, o, l as usize, i),
            _ => return Err(bad("short header")),
        };
    match opcode {
        CACHEFILES_OP_OPEN => {
            let raw_fd = u32_at(b, 24).ok_or_else(|| bad("short OPEN"))? as i32;
            // SAFETY: the kernel installed this fd for us with this message.
            let fd =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw_fd) };
            let (vks, cks) = (
                u32_at(b, 16).unwrap() as usize,
                u32_at(b, 20).ok_or_else(|| bad("short OPEN"))? as usize,
            );
            let data = b
                .get(32..len.min(b.len()))
                .ok_or_else(|| bad("OPEN payload"))?;
            if vks + cks > data.len() {
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
        CACHEFILES_OP_READ => Ok(Msg::Read {
            msg_id,
            object_id,
            off: u64_at(b, 16).ok_or_else(|| bad("short READ"))?,
            len: u64_at(b, 24).ok_or_else(|| bad("short READ"))?,
        }),
        op => Err(bad(&format!("opcode {op}"))),
    }
}
