//! fanotify pre-content events (Linux 6.14+): a group of class
//! `FAN_CLASS_PRE_CONTENT` marks files with `FAN_PRE_ACCESS`; every read of a
//! marked file then blocks until the group answers, and the event names the
//! byte range about to be read. Debian 12's headers predate these, so the
//! constants come from the kernel's `include/uapi/linux/fanotify.h`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use zerocopy::native_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const FAN_CLOEXEC: u32 = 0x0000_0001;
pub const FAN_NONBLOCK: u32 = 0x0000_0002;
pub const FAN_CLASS_PRE_CONTENT: u32 = 0x0000_0008;
pub const FAN_MARK_ADD: u32 = 0x0000_0001;
pub const FAN_MARK_REMOVE: u32 = 0x0000_0002;
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
pub const FAN_ALLOW: u32 = 0x01;
pub const FAN_DENY: u32 = 0x02;
pub const FAN_ERRNO_SHIFT: u32 = 24;
pub const FAN_EVENT_INFO_TYPE_RANGE: u8 = 6;
pub const FANOTIFY_METADATA_VERSION: u8 = 3;
/// `struct fanotify_event_metadata`.
pub const METADATA_LEN: usize = 24;

/// `struct fanotify_event_metadata` (uapi `linux/fanotify.h`), native
/// endian, read unaligned from the event buffer.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FanotifyEventMetadata {
    pub event_len: U32,
    pub vers: u8,
    pub reserved: u8,
    pub metadata_len: U16,
    pub mask: U64,
    pub fd: I32,
    pub pid: I32,
}
const _: () = assert!(core::mem::size_of::<FanotifyEventMetadata>() == METADATA_LEN);

/// `struct fanotify_event_info_header`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FanotifyEventInfoHeader {
    pub info_type: u8,
    pub pad: u8,
    pub len: U16,
}

/// `struct fanotify_event_info_range` (6.14+): the bytes about to be read.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FanotifyEventInfoRange {
    pub hdr: FanotifyEventInfoHeader,
    pub pad: U32,
    pub offset: U64,
    pub count: U64,
}
const _: () = assert!(core::mem::size_of::<FanotifyEventInfoRange>() == 24);

/// `struct fanotify_response`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FanotifyResponse {
    pub fd: I32,
    pub response: U32,
}

/// `FAN_DENY_ERRNO(e)`: deny and make the reader's syscall fail with `e`
/// (6.14+, pre-content events only); older kernels give EPERM instead.
pub fn fan_deny_errno(errno: i32) -> u32 {
    FAN_DENY | ((errno as u32 & 0xff) << FAN_ERRNO_SHIFT)
}

/// One event as read from the group.
#[derive(Debug)]
pub struct Event {
    pub mask: u64,
    /// The accessed file, opened by the kernel for the listener without
    /// notification (I/O through it raises no events). Kept open until the
    /// event is answered: the kernel matches answers by this fd number.
    pub fd: Option<OwnedFd>,
    pub pid: i32,
    /// `FAN_EVENT_INFO_TYPE_RANGE`: the bytes about to be accessed.
    pub range: Option<(u64, u64)>,
}

/// A fanotify group.
#[derive(Debug)]
pub struct Group(OwnedFd);

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Group {
    /// A pre-content group whose event fds are opened read-write, so the
    /// listener can fill the file through them.
    pub fn pre_content(nonblock: bool) -> io::Result<Group> {
        let flags = FAN_CLASS_PRE_CONTENT | FAN_CLOEXEC | if nonblock { FAN_NONBLOCK } else { 0 };
        let event_flags = (libc::O_RDWR | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // SAFETY: plain syscall with integer arguments; on success the
        // returned fd is new and owned by nobody else.
        let fd = unsafe { libc::fanotify_init(flags, event_flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is ours alone.
        Ok(Group(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Add (or remove) `mask` on the inode behind `file`.
    pub fn mark(&self, add: bool, mask: u64, file: BorrowedFd<'_>) -> io::Result<()> {
        let flags = if add { FAN_MARK_ADD } else { FAN_MARK_REMOVE };
        // SAFETY: both fds are valid for the call (borrowed); a null
        // pathname makes the kernel mark the object `file` refers to.
        let r = unsafe {
            libc::fanotify_mark(
                self.0.as_raw_fd(),
                flags,
                mask,
                file.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read whatever events are queued (blocks unless the group is
    /// non-blocking; then an empty queue is `WouldBlock`).
    pub fn read_events(&self, buf: &mut [u8]) -> io::Result<Vec<Event>> {
        let n = rustix::io::read(&self.0, &mut *buf)?;
        parse_events(&buf[..n])
    }

    /// Answer the event whose fd number is `fd`.
    pub fn respond(&self, fd: RawFd, response: u32) -> io::Result<()> {
        let r = FanotifyResponse {
            fd: fd.into(),
            response: response.into(),
        };
        let n = rustix::io::write(&self.0, r.as_bytes())?;
        if n != r.as_bytes().len() {
            return Err(io::Error::other("short fanotify response write"));
        }
        Ok(())
    }
}

/// Split a read buffer into events. Every fd found is taken into an
/// `OwnedFd` before anything can fail, so none leaks.
fn parse_events(mut b: &[u8]) -> io::Result<Vec<Event>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("fanotify: {why}"));
    let mut out = Vec::new();
    while !b.is_empty() {
        let (m, _) = FanotifyEventMetadata::read_from_prefix(b).map_err(|_| bad("short event"))?;
        let fd = m.fd.get();
        let owned = (fd >= 0).then(|| {
            // SAFETY: the kernel installed this fd in our table for this
            // event; nothing else refers to it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        if m.vers != FANOTIFY_METADATA_VERSION {
            return Err(bad(&format!("metadata version {}", m.vers)));
        }
        let (event_len, metadata_len) = (m.event_len.get() as usize, m.metadata_len.get() as usize);
        if event_len < METADATA_LEN || event_len > b.len() || metadata_len < METADATA_LEN {
            return Err(bad("event length"));
        }
        let mut range = None;
        let mut info = &b[metadata_len.min(event_len)..event_len];
        while let Ok((h, _)) = FanotifyEventInfoHeader::read_from_prefix(info) {
            let len = h.len.get() as usize;
            if len < 4 || len > info.len() {
                break;
            }
            if h.info_type == FAN_EVENT_INFO_TYPE_RANGE {
                if let Ok((r, _)) = FanotifyEventInfoRange::read_from_prefix(&info[..len]) {
                    range = Some((r.offset.get(), r.count.get()));
                }
            }
            info = &info[len..];
        }
        out.push(Event {
            mask: m.mask.get(),
            fd: owned,
            pid: m.pid.get(),
            range,
        });
        b = &b[event_len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_metadata_and_range() {
        let mut b = FanotifyEventMetadata {
            event_len: 48.into(),
            vers: FANOTIFY_METADATA_VERSION,
            reserved: 0,
            metadata_len: 24.into(),
            mask: FAN_PRE_ACCESS.into(),
            fd: (-1).into(),
            pid: 42.into(),
        }
        .as_bytes()
        .to_vec();
        b.extend_from_slice(
            FanotifyEventInfoRange {
                hdr: FanotifyEventInfoHeader {
                    info_type: FAN_EVENT_INFO_TYPE_RANGE,
                    pad: 0,
                    len: 24.into(),
                },
                pad: 0.into(),
                offset: 65536.into(),
                count: 131072.into(),
            }
            .as_bytes(),
        );
        let ev = parse_events(&b).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].pid, 42);
        assert_eq!(ev[0].mask, FAN_PRE_ACCESS);
        assert_eq!(ev[0].range, Some((65536, 131072)));
        assert!(ev[0].fd.is_none());
        assert!(parse_events(&b[..30]).is_err());
        assert_eq!(fan_deny_errno(5), 0x0500_0002);
    }
}
