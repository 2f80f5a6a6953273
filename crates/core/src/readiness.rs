//! The readiness map's on-disk layout (`BLOB.ready` beside each cache
//! file), owned here and read by the fanotify pump, which answers reads of
//! ready ranges without the daemon.
//!
//! ```text
//! header    { magic "SHOALRDY" [8], blocks u32, version u32 (2) }     16 bytes
//! durable   one bit per block, set only after the data is fdatasync'ed
//! volatile  { boot_id [16] } then one bit per block, set as soon as
//!           verified bytes are written (page cache), never synced
//! ```
//!
//! A durable bit means verified bytes on disk, whatever happened since. A
//! volatile bit means verified bytes in the cache file *as long as the
//! kernel that saw them written is up*: it counts only while its section's
//! boot id is the running kernel's, so a machine crash (which can lose
//! unsynced data) voids it, and a daemon crash (which cannot) does not.
//! That lets the pump answer a read the moment its bytes land instead of
//! asking the daemon until the next flush. Version 1 maps (no version, no
//! volatile section) are read as durable bits and upgraded in place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

const MAGIC: &[u8; 8] = b"SHOALRDY";
pub const HEADER: u64 = 16;
const VERSION: u32 = 2;
const BOOT_ID: u64 = 16;

/// Where the parts of a map for `blocks` blocks are.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub blocks: u32,
    /// Bytes of one bitmap.
    pub nbytes: u64,
}

impl Layout {
    pub fn new(blocks: u32) -> Self {
        Layout {
            blocks,
            nbytes: u64::from(blocks).div_ceil(8),
        }
    }
    pub fn durable(&self) -> u64 {
        HEADER
    }
    fn boot_id(&self) -> u64 {
        HEADER + self.nbytes
    }
    pub fn volatile(&self) -> u64 {
        self.boot_id() + BOOT_ID
    }
    fn header(&self) -> [u8; HEADER as usize] {
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&self.blocks.to_le_bytes());
        h[12..16].copy_from_slice(&VERSION.to_le_bytes());
        h
    }
}

/// The running kernel's boot id (`/proc/sys/kernel/random/boot_id`), or
/// zeros if unknown (then no volatile bit is ever trusted).
pub fn boot_id() -> [u8; 16] {
    static ID: OnceLock<[u8; 16]> = OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
        let mut id = [0u8; 16];
        match hex::decode(&hex) {
            Ok(b) if b.len() == 16 => id.copy_from_slice(&b),
            _ => {}
        }
        id
    })
}

/// Open the map of a blob of `blocks` blocks: its bits (durable, plus the
/// volatile ones of this boot), and whether any came only from the
/// volatile section (they must still be made durable). A map that is not
/// ours, or of another size, starts empty: a stale map never claims
/// readiness.
pub fn load(map: &File, blocks: u32) -> std::io::Result<(Vec<u8>, bool)> {
    let l = Layout::new(blocks);
    let mut head = [0u8; HEADER as usize];
    let ours = map.read_exact_at(&mut head, 0).is_ok()
        && head[..8] == *MAGIC
        && head[8..12] == blocks.to_le_bytes();
    let mut bits = vec![0u8; l.nbytes as usize];
    if !ours || map.read_exact_at(&mut bits, l.durable()).is_err() {
        map.set_len(0)?;
        map.write_all_at(&l.header(), 0)?;
        map.write_all_at(&bits, l.durable())?;
        reset_volatile(map, &l)?;
        map.sync_data()?;
        return Ok((bits, false));
    }
    let mut id = [0u8; BOOT_ID as usize];
    let mut vol = vec![0u8; l.nbytes as usize];
    let same_boot = map.read_exact_at(&mut id, l.boot_id()).is_ok()
        && id == boot_id()
        && id != [0; 16]
        && map.read_exact_at(&mut vol, l.volatile()).is_ok();
    let mut extra = false;
    if same_boot {
        for (b, v) in bits.iter_mut().zip(&vol) {
            extra |= *v & !*b != 0;
            *b |= v;
        }
    } else {
        // Another boot's (or a version 1 map): only durable bits count.
        map.write_all_at(&l.header(), 0)?;
        reset_volatile(map, &l)?;
    }
    Ok((bits, extra))
}

fn reset_volatile(map: &File, l: &Layout) -> std::io::Result<()> {
    map.write_all_at(&boot_id(), l.boot_id())?;
    map.write_all_at(&vec![0u8; l.nbytes as usize], l.volatile())
}

/// Whether blocks `[first, first + n)` are ready by the map file alone
/// (durable bits, or this boot's volatile ones): what a process without
/// the cache (the fanotify pump) may answer reads from. Unknown or
/// malformed maps read as not ready, which is only ever conservative.
pub fn map_ready(map: &File, first: u32, n: u32) -> bool {
    let mut head = [0u8; HEADER as usize];
    if map.read_exact_at(&mut head, 0).is_err() || head[..8] != *MAGIC {
        return false;
    }
    let l = Layout::new(u32::from_le_bytes(head[8..12].try_into().unwrap()));
    let Some(end) = first.checked_add(n).filter(|e| *e <= l.blocks && n > 0) else {
        return false;
    };
    let (lo, hi) = (first as usize / 8, (end as usize).div_ceil(8));
    let read = |at: u64| {
        let mut b = vec![0u8; hi - lo];
        map.read_exact_at(&mut b, at + lo as u64).ok().map(|_| b)
    };
    let all = |bits: &[u8]| (first..end).all(|b| bits[b as usize / 8 - lo] & (1 << (b % 8)) != 0);
    let Some(durable) = read(l.durable()) else {
        return false;
    };
    if all(&durable) {
        return true;
    }
    let mut id = [0u8; BOOT_ID as usize];
    map.read_exact_at(&mut id, l.boot_id()).is_ok()
        && id == boot_id()
        && id != [0; 16]
        && read(l.volatile()).is_some_and(|v| {
            // Ready if every block is set in either bitmap.
            let either: Vec<u8> = v.iter().zip(&durable).map(|(a, b)| a | b).collect();
            all(&either)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_bits_count_only_in_their_boot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.ready");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let map = open();
        let (bits, extra) = load(&map, 20).unwrap();
        assert!(bits.iter().all(|&b| b == 0) && !extra);
        let l = Layout::new(20);
        // Block 3 durable, block 4 only volatile.
        map.write_all_at(&[0b1000], l.durable()).unwrap();
        map.write_all_at(&[0b1_0000], l.volatile()).unwrap();
        assert!(map_ready(&map, 3, 1));
        if boot_id() != [0; 16] {
            assert!(map_ready(&map, 3, 2));
            let (bits, extra) = load(&open(), 20).unwrap();
            assert_eq!((bits[0], extra), (0b1_1000, true));
        }
        // Another boot's volatile section: void.
        map.write_all_at(&[0xee; 16], l.boot_id()).unwrap();
        assert!(!map_ready(&map, 4, 1));
        let (bits, extra) = load(&open(), 20).unwrap();
        assert_eq!((bits[0], extra), (0b1000, false));
        // Another size: not ours.
        assert!(load(&open(), 21).unwrap().0.iter().all(|&b| b == 0));
        assert!(!map_ready(&map, 0, 1) && !map_ready(&map, 20, 1));
    }

    #[test]
    fn version_1_maps_keep_their_durable_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.ready");
        let mut v1 = b"SHOALRDY".to_vec();
        v1.extend_from_slice(&9u32.to_le_bytes());
        v1.extend_from_slice(&[0; 4]);
        v1.extend_from_slice(&[0b11, 0b1]);
        std::fs::write(&path, &v1).unwrap();
        let map = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(map_ready(&map, 0, 2) && map_ready(&map, 8, 1) && !map_ready(&map, 2, 1));
        let (bits, _) = load(&map, 9).unwrap();
        assert_eq!(bits, vec![0b11, 0b1]);
        assert!(map_ready(&map, 0, 2));
    }
}
