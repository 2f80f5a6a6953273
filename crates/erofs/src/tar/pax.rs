//! PAX extended-header records, read by their length prefix.
//!
//! Each record is `"%d %s=%s\n"`, the decimal length counting the whole
//! record. A value may hold any byte, newlines included (file
//! capabilities, POSIX ACLs and user xattrs often do), so a record ends
//! where its length says and nowhere else: a reader that splits on
//! newlines (the `tar` crate, tar-rs #428) can be made to see a `path` or
//! `linkpath` record hidden inside another record's value, a tree that
//! POSIX readers (GNU tar, Go, containerd) do not see.

use std::collections::BTreeMap;

/// The records of one extended header. Later records of the same key win,
/// as in Go's reader; GNU sparse 0.0 `offset`/`numbytes` pairs, which
/// repeat by design, are collected in order into `GNU.sparse.map`.
#[derive(Debug, Default)]
pub(super) struct Records(pub BTreeMap<Vec<u8>, Vec<u8>>);

pub(super) const SPARSE_MAP: &[u8] = b"GNU.sparse.map";

impl Records {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key.as_bytes()).map(|v| v.as_slice())
    }
}

/// Parse a whole extended header. Errors name the record's position and,
/// once it is known, its key.
pub(super) fn parse(data: &[u8]) -> Result<Records, String> {
    let mut out = BTreeMap::new();
    let mut sparse0: Vec<Vec<u8>> = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let at = data.len() - rest.len();
        let (key, value, tail) =
            record(rest).map_err(|why| format!("PAX record at byte {at}: {why}"))?;
        rest = tail;
        match key {
            b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                let want: &[u8] = if sparse0.len().is_multiple_of(2) {
                    b"GNU.sparse.offset"
                } else {
                    b"GNU.sparse.numbytes"
                };
                if key != want || value.contains(&b',') {
                    return Err(format!(
                        "PAX record at byte {at}: {} out of order in a GNU sparse 0.0 map",
                        String::from_utf8_lossy(key)
                    ));
                }
                sparse0.push(value.to_vec());
            }
            _ => {
                out.insert(key.to_vec(), value.to_vec());
            }
        }
    }
    if !sparse0.is_empty() {
        out.insert(SPARSE_MAP.to_vec(), sparse0.join(&b','));
    }
    Ok(Records(out))
}

/// One record's key and value, and the bytes after it.
type Record<'a> = (&'a [u8], &'a [u8], &'a [u8]);

fn record(s: &[u8]) -> Result<Record<'_>, String> {
    let sp = s.iter().position(|&c| c == b' ').ok_or("no length field")?;
    let len: usize = std::str::from_utf8(&s[..sp])
        .ok()
        .filter(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| format!("bad length {:?}", s[..sp].escape_ascii().to_string()))?;
    if len < 5 || len > s.len() || len <= sp + 1 {
        return Err(format!("length {len} does not fit the header"));
    }
    let (rec, tail) = s.split_at(len);
    let body = &rec[sp + 1..];
    let Some((&b'\n', body)) = body.split_last() else {
        return Err(format!("record of length {len} does not end in a newline"));
    };
    let eq = body
        .iter()
        .position(|&c| c == b'=')
        .ok_or("no '=' in record")?;
    let (key, value) = (&body[..eq], &body[eq + 1..]);
    let show = || String::from_utf8_lossy(key).into_owned();
    if key.is_empty() || key.contains(&0) {
        return Err(format!("invalid key {:?}", show()));
    }
    if matches!(key, b"path" | b"linkpath" | b"uname" | b"gname") && value.contains(&0) {
        return Err(format!("{} contains NUL", show()));
    }
    Ok((key, value, tail))
}

/// PAX time `[-]secs[.frac]` as (secs, nsec), nanoseconds truncated.
pub(super) fn time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let mut nsec = 0u32;
    for (i, c) in frac.bytes().take(9).enumerate() {
        nsec += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    // "-1.5" is one and a half seconds before the epoch.
    if s.starts_with('-') && nsec > 0 {
        Some((secs.checked_sub(1)?, 1_000_000_000 - nsec))
    } else {
        Some((secs, nsec))
    }
}

/// A decimal PAX integer (`size`, `uid`, sparse fields).
pub(super) fn int(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(k: &str, v: &[u8]) -> Vec<u8> {
        let body = [k.as_bytes(), b"=", v, b"\n"].concat();
        let mut n = body.len() + 2;
        while format!("{n} ").len() + body.len() != n {
            n += 1;
        }
        [format!("{n} ").as_bytes(), &body].concat()
    }

    #[test]
    fn values_with_newlines_and_embedded_records() {
        let hidden = rec("linkpath", b"/etc/shadow");
        let mut v = b"x\n".to_vec();
        v.extend_from_slice(&hidden);
        let data = [rec("SCHILY.xattr.user.k", &v), rec("path", b"ok")].concat();
        let r = parse(&data).unwrap();
        assert_eq!(r.get("SCHILY.xattr.user.k"), Some(&v[..]));
        assert_eq!(r.get("path"), Some(&b"ok"[..]));
        assert_eq!(r.get("linkpath"), None);
    }

    #[test]
    fn malformed() {
        assert!(parse(b"99 mtime=1\n").unwrap_err().contains("does not fit"));
        assert!(parse(b"11 mtime=1x").unwrap_err().contains("newline"));
        assert!(parse(b"9 mtime1\n").unwrap_err().contains("'='"));
        assert!(parse(b"x mtime=1\n").unwrap_err().contains("bad length"));
        assert!(parse(b"7 =abc\n").unwrap_err().contains("invalid key"));
        assert!(parse(&rec("path", b"a\0b")).unwrap_err().contains("NUL"));
        let sparse = [
            rec("GNU.sparse.offset", b"0"),
            rec("GNU.sparse.numbytes", b"5"),
            rec("GNU.sparse.offset", b"100"),
            rec("GNU.sparse.numbytes", b"1"),
        ]
        .concat();
        assert_eq!(
            parse(&sparse).unwrap().get("GNU.sparse.map"),
            Some(&b"0,5,100,1"[..])
        );
        let bad = [rec("GNU.sparse.numbytes", b"5")].concat();
        assert!(parse(&bad).unwrap_err().contains("out of order"));
    }

    #[test]
    fn times() {
        assert_eq!(time(b"1700000000.5"), Some((1700000000, 500_000_000)));
        assert_eq!(time(b"12"), Some((12, 0)));
        assert_eq!(time(b"1.123456789999"), Some((1, 123_456_789)));
        assert_eq!(time(b"-1.5"), Some((-2, 500_000_000)));
        assert_eq!(time(b"-0.5"), Some((-1, 500_000_000)));
        assert_eq!(time(b"1.5x"), None);
        assert_eq!(time(b"x"), None);
    }
}
