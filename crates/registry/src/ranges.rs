//! Byte ranges of a blob, delivered piece by piece as they arrive.
//!
//! A caller asks for *pieces* (a chunk, a compressed frame): adjacent
//! pieces travel as one range, several ranges as one request
//! (`Range: bytes=a-b,c-d`, answered with `206 multipart/byteranges`,
//! RFC 9110 §14.6, as docker-registry (Go's `http.ServeContent`) and nginx
//! do). Each piece is handed to the caller's sink the moment its last byte
//! has arrived, not when the whole reply has: a lazy start is a few large
//! requests, and the reader waiting on their first bytes should not wait
//! for the last. Memory stays one piece, whatever the reply's size.
//!
//! Servers may answer a multi-range request otherwise, and that is not an
//! error: a single range covering everything asked (coalesced), or the
//! whole blob (ranges ignored), or only some ranges. [`stream_ranges`]
//! takes what covers the request and otherwise says
//! [`Streamed::Unsupported`], so the caller asks for the pieces it did not
//! get range by range. A body that claims ranges that were not asked, or
//! more bytes than asked, is refused.
//!
//! Hand-written because ureq has no multipart reader and the `multipart`
//! crates parse form uploads (server side), not byteranges replies.

use crate::error::RemoteError;
use std::io::{BufRead, BufReader, Read};

/// At most this many ranges in one request: the header stays under 2 KiB,
/// well within what servers and proxies accept.
pub const MAX_RANGES: usize = 64;

/// A piece of a blob: (offset, len), len > 0. Pieces asked together are
/// sorted and do not overlap.
pub type Piece = (u64, u64);

/// Takes each piece, by its index among the pieces asked, once all of its
/// bytes have arrived.
pub type Sink<'a> = dyn FnMut(usize, &[u8]) + 'a;

/// What a multi-range request delivered.
#[derive(Debug, PartialEq, Eq)]
pub enum Streamed {
    /// Every piece went to the sink.
    All,
    /// The server does not serve these ranges together: the pieces the
    /// sink has not had are to be asked for range by range.
    Unsupported(String),
}

/// Pieces still to be delivered, for asking again (another mirror, a
/// retry, range by range) without asking twice for what arrived.
pub struct Remaining {
    pieces: Vec<Piece>,
    done: Vec<bool>,
    /// Indexes (into `pieces`) of the last [`Remaining::todo`].
    asked: Vec<usize>,
}

impl Remaining {
    pub fn new(pieces: &[Piece]) -> Self {
        Remaining {
            pieces: pieces.to_vec(),
            done: vec![false; pieces.len()],
            asked: Vec::new(),
        }
    }

    /// The pieces not yet delivered; [`Remaining::sink`] then takes
    /// indexes into this list.
    pub fn todo(&mut self) -> Vec<Piece> {
        self.asked = (0..self.pieces.len()).filter(|&i| !self.done[i]).collect();
        self.asked.iter().map(|&i| self.pieces[i]).collect()
    }

    /// A sink for a request of the last [`Remaining::todo`]: records what
    /// arrives and hands it to `inner` by its index among all the pieces.
    pub fn sink<'s, 'k: 's>(&'s mut self, inner: &'s mut Sink<'k>) -> Box<Sink<'s>> {
        Box::new(move |i, bytes| {
            let at = self.asked[i];
            if !std::mem::replace(&mut self.done[at], true) {
                inner(at, bytes);
            }
        })
    }

    pub fn is_done(&self) -> bool {
        self.done.iter().all(|&d| d)
    }
}

/// The ranges a request for `pieces` asks: adjacent pieces merged.
pub fn ranges_of(pieces: &[Piece]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in pieces {
        match out.last_mut() {
            Some(r) if r.0 + r.1 == o => r.1 += l,
            _ => out.push((o, l)),
        }
    }
    out
}

/// The `Range` header value for `ranges` ((offset, len), len > 0).
pub fn range_header(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("{}-{}", o, o + l - 1))
        .collect();
    format!("bytes={}", parts.join(","))
}

/// Hand the pieces lying within `[lo, hi]` to `sink` as `r` (a body
/// carrying exactly those bytes) delivers them, reading all of it. Returns
/// how many pieces it delivered.
fn feed(
    r: &mut impl Read,
    (lo, hi): (u64, u64),
    pieces: &[Piece],
    done: &mut [bool],
    sink: &mut Sink<'_>,
) -> std::io::Result<usize> {
    let mut pos = lo;
    let mut buf = Vec::new();
    let mut delivered = 0;
    let skip = |r: &mut dyn Read, n: u64| -> std::io::Result<()> {
        if std::io::copy(&mut r.take(n), &mut std::io::sink())? != n {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    };
    for (i, &(o, len)) in pieces.iter().enumerate() {
        if done[i] || o < pos || o + len - 1 > hi {
            continue;
        }
        skip(r, o - pos)?;
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf)?;
        pos = o + len;
        done[i] = true;
        delivered += 1;
        sink(i, &buf);
    }
    if pos <= hi {
        skip(r, hi - pos + 1)?;
    }
    Ok(delivered)
}

/// Stream the body of a single-range reply (see [`crate::net::range_body`])
/// carrying bytes `[lo, hi]` into the pieces within them.
pub fn stream_body(
    url: &str,
    what: &str,
    body: &mut impl Read,
    (lo, hi): (u64, u64),
    pieces: &[Piece],
    sink: &mut Sink<'_>,
) -> Result<(), RemoteError> {
    let mut done = vec![false; pieces.len()];
    feed(body, (lo, hi), pieces, &mut done, sink)
        .map_err(|e| RemoteError::transient(url, format!("{what}: body: {e}")))?;
    Ok(())
}

/// Read the reply to a request for the ranges of `pieces` (sorted, not
/// overlapping), handing each piece to `sink` as it arrives.
pub fn stream_ranges(
    url: &str,
    resp: ureq::Response,
    pieces: &[Piece],
    sink: &mut Sink<'_>,
) -> Result<Streamed, RemoteError> {
    let ranges = ranges_of(pieces);
    let what = format!("{} ranges from byte {}", ranges.len(), ranges[0].0);
    let bad = |why: String| RemoteError::permanent(url, format!("{what}: {why}"));
    let io = |e: std::io::Error| RemoteError::transient(url, format!("{what}: body: {e}"));
    match resp.status() {
        206 => {}
        200 => return Ok(Streamed::Unsupported("the whole blob came back".into())),
        s => return Err(bad(format!("status {s} to a Range request"))),
    }
    let ctype = resp.header("content-type").unwrap_or("").to_string();
    if let Some(cr) = resp.header("content-range") {
        // One range for all: the server coalesced them, or served the first.
        let (lo, hi) = parse_content_range(cr).map_err(&bad)?;
        let covers = ranges.iter().all(|&(o, l)| o >= lo && o + l - 1 <= hi);
        if !covers || hi - lo + 1 > span(&ranges) {
            return Ok(Streamed::Unsupported(format!(
                "one range {lo}-{hi} answered {} asked",
                ranges.len()
            )));
        }
        let mut done = vec![false; pieces.len()];
        feed(&mut resp.into_reader(), (lo, hi), pieces, &mut done, sink).map_err(io)?;
        return Ok(Streamed::All);
    }
    let boundary = boundary_of(&ctype)
        .ok_or_else(|| bad(format!("206 without Content-Range, Content-Type {ctype:?}")))?;
    let mut r = BufReader::new(
        resp.into_reader()
            .take(span(&ranges) + 4096 * ranges.len() as u64),
    );
    parse_parts(&mut r, &boundary, pieces, sink).map_err(|e| match e {
        PartError::Io(e) => io(e),
        PartError::Bad(why) => bad(why),
    })
}

/// Bytes from the first range's start to the last one's end: the most a
/// compliant reply can carry.
fn span(ranges: &[(u64, u64)]) -> u64 {
    let (first, last) = (ranges[0], ranges[ranges.len() - 1]);
    last.0 + last.1 - first.0
}

fn boundary_of(ctype: &str) -> Option<String> {
    let (mime, params) = ctype.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/byteranges") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        let v = v.trim().trim_matches('"');
        (k.trim().eq_ignore_ascii_case("boundary") && !v.is_empty() && v.len() <= 200)
            .then(|| v.to_string())
    })
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`).
fn parse_content_range(v: &str) -> Result<(u64, u64), String> {
    let bad = || format!("Content-Range {v:?}");
    let rest = v.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, _total) = rest.split_once('/').ok_or_else(bad)?;
    let (a, b) = range.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if b < a {
        return Err(bad());
    }
    Ok((a, b))
}

enum PartError {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for PartError {
    fn from(e: std::io::Error) -> Self {
        PartError::Io(e)
    }
}

/// Longest header line taken.
const MAX_LINE: u64 = 1024;

/// A CRLF- or LF-terminated line, without its end; refused past
/// [`MAX_LINE`], `None` at the end of the body.
fn line(r: &mut impl BufRead) -> Result<Option<String>, PartError> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(PartError::Bad("a multipart line too long or cut".into()));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// What each piece received (`None`: not delivered), and whether all were.
pub type Parsed = (Vec<Option<Vec<u8>>>, Streamed);

/// [`parse_parts`] for the fuzzer: a whole `multipart/byteranges` body
/// for `pieces`; what each piece received (`None`: not delivered) and
/// whether every piece was.
pub fn parse_byteranges(body: &[u8], boundary: &str, pieces: &[Piece]) -> Result<Parsed, String> {
    let mut got = vec![None; pieces.len()];
    let mut sink = |i: usize, b: &[u8]| got[i] = Some(b.to_vec());
    let streamed = parse_parts(&mut std::io::Cursor::new(body), boundary, pieces, &mut sink)
        .map_err(|e| match e {
            PartError::Io(e) => e.to_string(),
            PartError::Bad(why) => why,
        })?;
    Ok((got, streamed))
}

/// The parts of a `multipart/byteranges` body, each piece handed on as it
/// arrives: a part must lie within the ranges asked and hold at least one
/// piece not yet delivered.
fn parse_parts(
    r: &mut impl BufRead,
    boundary: &str,
    pieces: &[Piece],
    sink: &mut Sink<'_>,
) -> Result<Streamed, PartError> {
    let (delim, close) = (format!("--{boundary}"), format!("--{boundary}--"));
    let mut done = vec![false; pieces.len()];
    let mut blank_lines = 0;
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    loop {
        let Some(l) = line(r)? else {
            return Err(PartError::Bad("the multipart body ended early".into()));
        };
        if l == close {
            break;
        }
        if l.is_empty() {
            blank_lines += 1;
            if blank_lines > 2 * MAX_RANGES {
                return Err(PartError::Bad("blank lines instead of parts".into()));
            }
            continue;
        }
        if l != delim {
            return Err(PartError::Bad(format!("{l:?} where a part should start")));
        }
        let (lo, hi) = part_headers(r)?;
        if lo < first.0 || hi >= last.0 + last.1 {
            return Err(PartError::Bad(format!(
                "a part of bytes {lo}-{hi} outside the ranges asked"
            )));
        }
        if feed(r, (lo, hi), pieces, &mut done, sink)? == 0 {
            return Err(PartError::Bad(format!(
                "a part of bytes {lo}-{hi} that no range asked for"
            )));
        }
    }
    Ok(if done.iter().all(|&d| d) {
        Streamed::All
    } else {
        Streamed::Unsupported("some ranges came back without a part".into())
    })
}

/// A part's headers up to the blank line: its Content-Range.
fn part_headers(r: &mut impl BufRead) -> Result<(u64, u64), PartError> {
    let mut range = None;
    for _ in 0..16 {
        let Some(l) = line(r)? else {
            return Err(PartError::Bad("a part's headers ended early".into()));
        };
        if l.is_empty() {
            return range.ok_or_else(|| PartError::Bad("a part without Content-Range".into()));
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-range") {
                range = Some(parse_content_range(v).map_err(PartError::Bad)?);
            }
        }
    }
    Err(PartError::Bad("a part with too many headers".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(u64, u64, &[u8])], b: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (lo, hi, data)) in parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(
                format!(
                    "--{b}\r\nContent-Range: bytes {lo}-{hi}/1000\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            );
            out.extend_from_slice(data);
        }
        out.extend_from_slice(format!("\r\n--{b}--\r\n").as_bytes());
        out
    }

    fn parse(b: &[u8], pieces: &[Piece]) -> Result<Parsed, PartError> {
        let mut got = vec![None; pieces.len()];
        let mut sink = |i: usize, b: &[u8]| got[i] = Some(b.to_vec());
        let s = parse_parts(&mut std::io::Cursor::new(b), "XYZ", pieces, &mut sink)?;
        Ok((got, s))
    }

    #[test]
    fn parts_in_order_and_coalesced() {
        let ranges = [(0, 4), (10, 2), (12, 3)];
        let b = body(&[(0, 3, b"abcd"), (10, 14, b"KLMNO")], "XYZ");
        let Ok((p, Streamed::All)) = parse(&b, &ranges) else {
            panic!("parts")
        };
        let want = [&b"abcd"[..], b"KL", b"MNO"];
        assert_eq!(p, want.map(|w| Some(w.to_vec())));
    }

    #[test]
    fn pieces_within_parts_arrive_one_by_one() {
        // Four pieces, two ranges (adjacent pieces merge), one part each.
        let pieces = [(0, 2), (2, 2), (10, 2), (12, 3)];
        assert_eq!(ranges_of(&pieces), [(0, 4), (10, 5)]);
        let b = body(&[(0, 3, b"abcd"), (10, 14, b"KLMNO")], "XYZ");
        let Ok((p, Streamed::All)) = parse(&b, &pieces) else {
            panic!("pieces")
        };
        let want = [&b"ab"[..], b"cd", b"KL", b"MNO"];
        assert_eq!(p, want.map(|w| Some(w.to_vec())));
        // A body cut inside the second part still hands over what came.
        let mut order = Vec::new();
        let mut sink = |i: usize, _: &[u8]| order.push(i);
        let cut = &b[..b.len() - 13]; // "NO" and the closing delimiter gone
        assert!(parse_parts(&mut std::io::Cursor::new(cut), "XYZ", &pieces, &mut sink).is_err());
        assert_eq!(order, [0, 1, 2]);
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let ranges = [(0, 4), (10, 2)];
        // A part nobody asked for.
        let b = body(&[(0, 3, b"abcd"), (500, 501, b"zz")], "XYZ");
        assert!(matches!(parse(&b, &ranges), Err(PartError::Bad(_))));
        // Cut short inside a part.
        let mut b = body(&[(0, 3, b"abcd"), (10, 11, b"kl")], "XYZ");
        b.truncate(b.len() - 12);
        assert!(parse(&b, &ranges).is_err());
        // A missing range is for the caller to ask again.
        let b = body(&[(0, 3, b"abcd")], "XYZ");
        let Ok((p, Streamed::Unsupported(_))) = parse(&b, &ranges) else {
            panic!("a missing range")
        };
        assert_eq!(p, [Some(b"abcd".to_vec()), None]);
        // Garbage where a part should start, and an endless header line.
        assert!(matches!(
            parse(b"hello\r\n", &ranges),
            Err(PartError::Bad(_))
        ));
        let long = vec![b'x'; 5000];
        assert!(matches!(parse(&long, &ranges), Err(PartError::Bad(_))));
        // A reversed Content-Range.
        let b = body(&[(3, 0, b"abcd")], "XYZ");
        assert!(parse(&b, &ranges).is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(range_header(&[(0, 10), (100, 1)]), "bytes=0-9,100-100");
        assert_eq!(
            boundary_of("multipart/byteranges; boundary=\"a b\"").as_deref(),
            Some("a b")
        );
        assert_eq!(boundary_of("application/octet-stream"), None);
        assert_eq!(parse_content_range("bytes 5-9/*").unwrap(), (5, 9));
    }
}
