//! Several byte ranges of a blob in one request: `Range: bytes=a-b,c-d`
//! answered with `206 multipart/byteranges` (RFC 9110 §14.6), as
//! docker-registry (Go's `http.ServeContent`) and nginx do. A lazy start
//! wants many small runs of one blob; each request costs a round trip, so
//! asking for them together is the cheapest way to fetch them.
//!
//! Servers may answer otherwise, and that is not an error: a single range
//! covering everything asked (coalesced), or the whole blob (ranges
//! ignored), or only some ranges. [`read_ranges`] takes what covers the
//! request and otherwise says [`Ranges::Unsupported`] without reading the
//! body, so the caller asks range by range. A body that claims ranges that
//! were not asked, or more bytes than asked, is refused: memory stays
//! bounded by the request.
//!
//! Hand-written because ureq has no multipart reader and the `multipart`
//! crates parse form uploads (server side), not byteranges replies.

use crate::error::RemoteError;
use std::io::{BufRead, BufReader, Read};

/// At most this many ranges in one request: the header stays under 2 KiB,
/// well within what servers and proxies accept.
pub const MAX_RANGES: usize = 64;

/// What a multi-range request got.
pub enum Ranges {
    /// One buffer per range asked, in the order asked.
    Parts(Vec<Vec<u8>>),
    /// The server does not serve these ranges together: ask one by one.
    Unsupported(String),
}

/// The `Range` header value for `ranges` ((offset, len), len > 0).
pub fn range_header(ranges: &[(u64, u64)]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("{}-{}", o, o + l - 1))
        .collect();
    format!("bytes={}", parts.join(","))
}

/// Read the reply to a request for `ranges` (sorted, not overlapping).
pub fn read_ranges(
    url: &str,
    resp: ureq::Response,
    ranges: &[(u64, u64)],
) -> Result<Ranges, RemoteError> {
    let what = format!("{} ranges from byte {}", ranges.len(), ranges[0].0);
    let bad = |why: String| RemoteError::permanent(url, format!("{what}: {why}"));
    match resp.status() {
        206 => {}
        200 => return Ok(Ranges::Unsupported("the whole blob came back".into())),
        s => return Err(bad(format!("status {s} to a Range request"))),
    }
    let ctype = resp.header("content-type").unwrap_or("").to_string();
    if let Some(cr) = resp.header("content-range") {
        // One range for all: the server coalesced them, or served the first.
        let (lo, hi) = parse_content_range(cr).map_err(&bad)?;
        let covers = ranges.iter().all(|&(o, l)| o >= lo && o + l - 1 <= hi);
        if !covers || hi - lo + 1 > span(ranges) {
            return Ok(Ranges::Unsupported(format!(
                "one range {lo}-{hi} answered {} asked",
                ranges.len()
            )));
        }
        let mut body = Vec::new();
        resp.into_reader()
            .take(hi - lo + 1)
            .read_to_end(&mut body)
            .map_err(|e| RemoteError::transient(url, format!("{what}: body: {e}")))?;
        if body.len() as u64 != hi - lo + 1 {
            return Err(RemoteError::transient(url, format!("{what}: short body")));
        }
        let parts = ranges
            .iter()
            .map(|&(o, l)| body[(o - lo) as usize..(o - lo + l) as usize].to_vec())
            .collect();
        return Ok(Ranges::Parts(parts));
    }
    let boundary = boundary_of(&ctype)
        .ok_or_else(|| bad(format!("206 without Content-Range, Content-Type {ctype:?}")))?;
    let mut r = BufReader::new(
        resp.into_reader()
            .take(span(ranges) + 4096 * ranges.len() as u64),
    );
    parse_parts(&mut r, &boundary, ranges).map_err(|e| match e {
        PartError::Io(e) => RemoteError::transient(url, format!("{what}: body: {e}")),
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

/// [`parse_parts`] for the fuzzer: a whole `multipart/byteranges` body.
pub fn parse_byteranges(
    body: &[u8],
    boundary: &str,
    ranges: &[(u64, u64)],
) -> Result<Ranges, String> {
    parse_parts(&mut std::io::Cursor::new(body), boundary, ranges).map_err(|e| match e {
        PartError::Io(e) => e.to_string(),
        PartError::Bad(why) => why,
    })
}

/// The parts of a `multipart/byteranges` body: every range asked must lie
/// within one part; parts no range asked for are refused.
fn parse_parts(
    r: &mut impl BufRead,
    boundary: &str,
    ranges: &[(u64, u64)],
) -> Result<Ranges, PartError> {
    let (delim, close) = (format!("--{boundary}"), format!("--{boundary}--"));
    let mut parts: Vec<Option<Vec<u8>>> = vec![None; ranges.len()];
    let mut blank_lines = 0;
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
        let last = ranges[ranges.len() - 1];
        if lo < ranges[0].0 || hi >= last.0 + last.1 {
            return Err(PartError::Bad(format!(
                "a part of bytes {lo}-{hi} outside the ranges asked"
            )));
        }
        let mut data = Vec::new();
        r.by_ref().take(hi - lo + 1).read_to_end(&mut data)?;
        if data.len() as u64 != hi - lo + 1 {
            return Err(PartError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut used = false;
        for (k, &(o, len)) in ranges.iter().enumerate() {
            if o >= lo && o + len - 1 <= hi && parts[k].is_none() {
                parts[k] = Some(data[(o - lo) as usize..(o - lo + len) as usize].to_vec());
                used = true;
            }
        }
        if !used {
            return Err(PartError::Bad(format!(
                "a part of bytes {lo}-{hi} that no range asked for"
            )));
        }
    }
    match parts.into_iter().collect::<Option<Vec<_>>>() {
        Some(p) => Ok(Ranges::Parts(p)),
        None => Ok(Ranges::Unsupported(
            "some ranges came back without a part".into(),
        )),
    }
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

    fn parse(b: &[u8], ranges: &[(u64, u64)]) -> Result<Ranges, PartError> {
        parse_parts(&mut std::io::Cursor::new(b), "XYZ", ranges)
    }

    #[test]
    fn parts_in_order_and_coalesced() {
        let ranges = [(0, 4), (10, 2), (12, 3)];
        let b = body(&[(0, 3, b"abcd"), (10, 14, b"KLMNO")], "XYZ");
        let Ok(Ranges::Parts(p)) = parse(&b, &ranges) else {
            panic!("parts")
        };
        assert_eq!(p, vec![b"abcd".to_vec(), b"KL".to_vec(), b"MNO".to_vec()]);
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
        assert!(matches!(parse(&b, &ranges), Ok(Ranges::Unsupported(_))));
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
