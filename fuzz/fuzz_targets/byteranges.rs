//! A registry's `multipart/byteranges` reply to a multi-range request, on
//! arbitrary bytes. Input: a byte N (1–8 ranges), N pairs of u16 LE
//! (offset step, length) making sorted ranges apart, then the body. The
//! parser must never panic, and what it hands back must be exactly the
//! pieces asked, each exactly as long as asked, and it says
//! whether every piece was delivered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_registry::ranges::{parse_byteranges, Streamed};

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < 4 * n {
        return;
    }
    let (spec, body) = rest.split_at(4 * n);
    let mut ranges = Vec::with_capacity(n);
    let mut at = 0u64;
    for p in spec.chunks_exact(4) {
        let step = u64::from(u16::from_le_bytes([p[0], p[1]]));
        let len = u64::from(u16::from_le_bytes([p[2], p[3]])).max(1);
        at += step;
        ranges.push((at, len));
        at += len + 1;
    }
    if let Ok((parts, streamed)) = parse_byteranges(body, "B", &ranges) {
        assert_eq!(parts.len(), ranges.len());
        for (p, (_, len)) in parts.iter().zip(&ranges) {
            if let Some(p) = p {
                assert_eq!(p.len() as u64, *len);
            }
        }
        assert_eq!(streamed == Streamed::All, parts.iter().all(Option::is_some));
    }
});
