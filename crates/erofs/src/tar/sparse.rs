//! Sparse tar entries: the data segments of a file whose holes the archive
//! does not store. Four encodings exist (old GNU `S` headers, PAX 0.0, 0.1
//! and 1.0); all end up as one validated list of segments here, checked as
//! Go's `archive/tar` and BSD tar check them.

use super::pax::{self, Records};

/// A stored run of file data: `len` bytes at logical offset `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub off: u64,
    pub len: u64,
}

/// More entries than any real file needs; a hostile map must not grow
/// memory without bound.
pub(super) const MAX_SEGMENTS: usize = 1 << 20;

/// Check raw (offset, length) pairs against the file's logical size and
/// turn them into segments: non-negative, in order, not overlapping, all
/// within the file. Empty segments are dropped (GNU tar writes one at the
/// end of a file that ends in a hole).
pub(super) fn validate(raw: &[(i64, i64)], size: i64) -> Result<Vec<Segment>, String> {
    if size < 0 {
        return Err(format!("sparse file size {size}"));
    }
    if raw.len() > MAX_SEGMENTS {
        return Err(format!("sparse map of {} entries", raw.len()));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut end = 0i64;
    for &(off, len) in raw {
        let fits = off >= 0 && len >= 0 && off.checked_add(len).is_some_and(|e| e <= size);
        if !fits || off < end {
            return Err(format!(
                "sparse map entry {off}+{len} is out of order or outside the file ({size} bytes)"
            ));
        }
        end = off + len;
        if len > 0 {
            out.push(Segment {
                off: off as u64,
                len: len as u64,
            });
        }
    }
    Ok(out)
}

/// Which PAX sparse version an entry's records declare, if any.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PaxSparse {
    None,
    /// 0.0 and 0.1: the map is in `GNU.sparse.map`.
    InRecords,
    /// 1.0: the map is at the start of the entry's data.
    InData,
}

pub(super) fn pax_version(r: &Records) -> Result<PaxSparse, String> {
    match (r.get("GNU.sparse.major"), r.get("GNU.sparse.minor")) {
        (Some(b"0"), Some(b"0" | b"1")) => Ok(PaxSparse::InRecords),
        (Some(b"1"), Some(b"0")) => Ok(PaxSparse::InData),
        (None, None) if r.get("GNU.sparse.map").is_some() => Ok(PaxSparse::InRecords),
        (None, None) => Ok(PaxSparse::None),
        (major, minor) => Err(format!(
            "unknown GNU sparse version {}.{}",
            String::from_utf8_lossy(major.unwrap_or(b"?")),
            String::from_utf8_lossy(minor.unwrap_or(b"?"))
        )),
    }
}

/// The logical size PAX sparse records give (`GNU.sparse.size` for 0.x,
/// `GNU.sparse.realsize` for 1.0), if any.
pub(super) fn pax_real_size(r: &Records) -> Result<Option<i64>, String> {
    match r.get("GNU.sparse.size").or(r.get("GNU.sparse.realsize")) {
        None => Ok(None),
        Some(v) => pax::int(v)
            .map(Some)
            .ok_or_else(|| "bad GNU sparse size".into()),
    }
}

/// The 0.0/0.1 map: `GNU.sparse.numblocks` pairs in `GNU.sparse.map`.
pub(super) fn map_from_records(r: &Records) -> Result<Vec<(i64, i64)>, String> {
    let n = r
        .get("GNU.sparse.numblocks")
        .and_then(pax::int)
        .filter(|&n| n >= 0)
        .ok_or("missing or bad GNU.sparse.numblocks")?;
    let map = r.get("GNU.sparse.map").unwrap_or(b"");
    let nums: Vec<&[u8]> = if map.is_empty() {
        Vec::new()
    } else {
        map.split(|&c| c == b',').collect()
    };
    if nums.len() as u64 != 2 * n as u64 {
        return Err(format!(
            "GNU.sparse.map holds {} numbers, numblocks says {n} pairs",
            nums.len()
        ));
    }
    pairs(nums.into_iter())
}

fn pairs<'a>(mut nums: impl Iterator<Item = &'a [u8]>) -> Result<Vec<(i64, i64)>, String> {
    let mut out = Vec::new();
    while let Some(off) = nums.next() {
        let len = nums.next().ok_or("odd number of sparse map fields")?;
        match (pax::int(off), pax::int(len)) {
            (Some(o), Some(l)) => out.push((o, l)),
            _ => return Err("sparse map field is not a number".into()),
        }
    }
    Ok(out)
}

/// The 1.0 map at the head of the data: decimal numbers, one per line
/// (count, then offset/length pairs), padded to whole blocks. `next_block`
/// yields the entry's data blocks; at most 1 MiB of map is read, as in Go.
pub(super) fn map_from_data(
    mut next_block: impl FnMut() -> Result<[u8; 512], String>,
) -> Result<Vec<(i64, i64)>, String> {
    let mut buf: Vec<u8> = Vec::new();
    let mut lines: Vec<std::ops::Range<usize>> = Vec::new();
    let mut want = 1usize;
    loop {
        while lines.len() < want {
            if buf.len() >= 1 << 20 {
                return Err("GNU sparse 1.0 map longer than 1 MiB".into());
            }
            let start = buf.len();
            buf.extend_from_slice(&next_block()?);
            let mut from = lines.last().map_or(0, |l| l.end + 1);
            for (i, &c) in buf.iter().enumerate().skip(start) {
                if c == b'\n' {
                    lines.push(from..i);
                    from = i + 1;
                }
            }
        }
        if want > 1 {
            break;
        }
        let n = pax::int(&buf[lines[0].clone()])
            .filter(|&n| (0..=MAX_SEGMENTS as i64).contains(&n))
            .ok_or("bad GNU sparse 1.0 entry count")?;
        want = 1 + 2 * n as usize;
        if want == 1 {
            return Ok(Vec::new());
        }
    }
    pairs(lines[1..want].iter().map(|r| &buf[r.clone()]))
}

/// Where logical offset `pos` falls: in a segment (bytes left in it) or in
/// a hole (bytes until the next segment or the end of the file).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Span {
    Data(u64),
    Hole(u64),
}

/// A cursor over sorted segments for sequential reads.
#[derive(Debug)]
pub(super) struct Cursor {
    segs: Vec<Segment>,
    next: usize,
}

impl Cursor {
    pub fn new(segs: Vec<Segment>) -> Self {
        Cursor { segs, next: 0 }
    }

    pub fn stored_bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }

    /// The span at `pos` (positions only move forward).
    pub fn span(&mut self, pos: u64, size: u64) -> Span {
        while self.next < self.segs.len()
            && self.segs[self.next].off + self.segs[self.next].len <= pos
        {
            self.next += 1;
        }
        match self.segs.get(self.next) {
            Some(s) if s.off <= pos => Span::Data(s.off + s.len - pos),
            Some(s) => Span::Hole(s.off - pos),
            None => Span::Hole(size - pos),
        }
    }

    /// Whether [pos, pos+len) holds no stored byte.
    pub fn is_hole(&mut self, pos: u64, len: u64, size: u64) -> bool {
        matches!(self.span(pos, size), Span::Hole(n) if n >= len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(
            validate(&[(0, 5), (10, 0), (100, 4)], 104).unwrap(),
            vec![Segment { off: 0, len: 5 }, Segment { off: 100, len: 4 }]
        );
        assert!(validate(&[(0, 5), (3, 1)], 10).is_err(), "overlap");
        assert!(validate(&[(5, 1), (0, 1)], 10).is_err(), "order");
        assert!(validate(&[(0, 11)], 10).is_err(), "beyond the end");
        assert!(validate(&[(-1, 1)], 10).is_err());
        assert!(validate(&[(i64::MAX, 1)], i64::MAX).is_err(), "overflow");
    }

    #[test]
    fn map_1_0_across_blocks() {
        // Entry count 3 needs 7 lines; the last pair straddles a block.
        let mut text = b"3\n0\n5\n".to_vec();
        text.extend(std::iter::repeat_n(b'0', 505));
        text.extend_from_slice(b"600\n10\n700\n1\n");
        text.resize(1024, 0);
        let mut blocks = text.chunks(512).map(|c| <[u8; 512]>::try_from(c).unwrap());
        let map = map_from_data(|| blocks.next().ok_or("eof".into())).unwrap();
        assert_eq!(map, vec![(0, 5), (600, 10), (700, 1)]);
        assert!(blocks.next().is_none(), "both blocks read");
    }

    #[test]
    fn cursor() {
        let mut c = Cursor::new(vec![Segment { off: 10, len: 5 }]);
        assert_eq!(c.span(0, 20), Span::Hole(10));
        assert!(c.is_hole(0, 10, 20));
        assert!(!c.is_hole(0, 11, 20));
        assert_eq!(c.span(12, 20), Span::Data(3));
        assert_eq!(c.span(15, 20), Span::Hole(5));
    }
}
