//! The frame table (how blobs are stored compressed on remotes) on
//! arbitrary bytes, and frame decompression against what a table declares.
//! Input: a u32 LE blob size in blocks, a u16 LE length L, L bytes taken as
//! the frame section of a chunk table (after a valid header with one empty
//! chunk list, so the fuzzer's time goes into the frame section, or into
//! the recorded-start section before it when they begin with its magic), then bytes
//! taken as compressed frames. Every parsed frame is decompressed from those
//! bytes with its declared digest replaced by theirs, so decompression runs
//! and must never yield more or fewer bytes than declared, nor panic.
#![no_main]

use erofs::chunktable::{BlobHeader, ChunkTable, TableHeader, TABLE_MAGIC};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use zerocopy::IntoBytes;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let blocks = u32::from_le_bytes(data[..4].try_into().unwrap()) % (1 << 16);
    let n = usize::from(u16::from_le_bytes(data[4..6].try_into().unwrap()));
    let rest = &data[6..];
    let (section, compressed) = rest.split_at(n.min(rest.len()));
    let mut table = TableHeader {
        magic: TABLE_MAGIC,
        nblobs: 1.into(),
        reserved: 0.into(),
    }
    .as_bytes()
    .to_vec();
    table.extend_from_slice(
        BlobHeader {
            device_id: 1.into(),
            reserved: 0.into(),
            nentries: 0.into(),
        }
        .as_bytes(),
    );
    table.extend_from_slice(section);
    let Ok(t) = ChunkTable::decode(&table, &[(1, blocks)]) else {
        return;
    };
    for f in &t.frames {
        for fr in f.frames.iter().take(8) {
            // Keep allocations small: a declared frame of up to 64 blocks.
            if fr.nblocks.get() > 64 {
                continue;
            }
            let c = &compressed[..compressed.len().min(fr.clen.get() as usize)];
            let mut honest = *fr;
            honest.clen = (c.len() as u32).into();
            honest.sha256 = Sha256::digest(c).into();
            if let Ok(raw) = f.decompress(&honest, c) {
                assert_eq!(raw.len() as u64, honest.raw_len());
            }
        }
    }
});
