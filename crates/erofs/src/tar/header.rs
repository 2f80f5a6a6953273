//! One 512-byte tar header block, parsed the way Go's `archive/tar` parses
//! it (containerd unpacks layers with that reader, so its reading is the
//! one an image must agree with): V7, USTAR, PAX, GNU and STAR layouts,
//! octal or base-256 numbers, either checksum convention.

pub(super) const BLOCK: usize = 512;
pub(super) type Block = [u8; BLOCK];

/// Which header layout the magic names; it decides where the name prefix
/// (and, for GNU, the old sparse map) lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    V7,
    /// USTAR and PAX: a 155-byte name prefix.
    Ustar,
    /// USTAR magic with a `tar\0` trailer: a 131-byte prefix.
    Star,
    /// `ustar  \0`: no prefix; the old sparse map after the device numbers.
    Gnu,
}

/// The fields of one header block, before PAX records or GNU long names
/// apply to it.
#[derive(Debug)]
pub(super) struct RawHeader {
    pub name: Vec<u8>,
    pub link: Vec<u8>,
    pub typeflag: u8,
    pub mode: i64,
    pub uid: i64,
    pub gid: i64,
    pub size: i64,
    pub mtime: i64,
    pub devmajor: i64,
    pub devminor: i64,
}

pub(super) fn is_zero(b: &Block) -> bool {
    b.iter().all(|&c| c == 0)
}

/// A NUL-terminated string field (everything before the first NUL).
pub(super) fn cstr(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |n| &b[..n])
}

/// A numeric field: base-256 when the high bit of its first byte is set
/// (GNU and star extension for large values), octal otherwise.
pub(super) fn numeric(b: &[u8]) -> Option<i64> {
    match b.first() {
        Some(&first) if first & 0x80 != 0 => base256(b, first),
        _ => octal(b),
    }
}

fn base256(b: &[u8], first: u8) -> Option<i64> {
    // Negative numbers are stored in two's complement: invert, then -x-1.
    let inv = if first & 0x40 != 0 { 0xff } else { 0 };
    let mut x: u64 = 0;
    for (i, &c) in b.iter().enumerate() {
        let mut c = c ^ inv;
        if i == 0 {
            c &= 0x7f;
        }
        if x >> 56 != 0 {
            return None;
        }
        x = x << 8 | u64::from(c);
    }
    if x >> 63 != 0 {
        return None;
    }
    Some(if inv == 0xff { !(x as i64) } else { x as i64 })
}

/// Octal, padded on either side with spaces or NULs; empty is zero.
pub(super) fn octal(b: &[u8]) -> Option<i64> {
    let pad = |c: &u8| *c == b' ' || *c == 0;
    let start = b.iter().position(|c| !pad(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !pad(c)).map_or(start, |e| e + 1);
    let digits = cstr(&b[start..end]);
    if digits.is_empty() {
        return Some(0);
    }
    let mut x: u64 = 0;
    for &c in digits {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        x = x.checked_mul(8)?.checked_add(u64::from(c - b'0'))?;
    }
    i64::try_from(x).ok()
}

/// The header checksum is the sum of all bytes with the checksum field
/// read as spaces; historic writers summed signed bytes, so both count.
fn checksum_ok(b: &Block) -> Result<(), String> {
    let stored = octal(&b[148..156]).ok_or_else(|| {
        format!(
            "checksum field {:?} is not a number",
            b[148..156].escape_ascii().to_string()
        )
    })?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &c) in b.iter().enumerate() {
        let c = if (148..156).contains(&i) { b' ' } else { c };
        unsigned += i64::from(c);
        signed += i64::from(c as i8);
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch: stored {stored}, computed {unsigned}"
        ))
    }
}

pub(super) fn format_of(b: &Block) -> Format {
    match (&b[257..263], &b[263..265]) {
        (b"ustar\0", b"00") if &b[508..512] == b"tar\0" => Format::Star,
        (b"ustar\0", b"00") => Format::Ustar,
        (b"ustar ", b" \0") => Format::Gnu,
        _ => Format::V7,
    }
}

/// Parse one (non-zero) header block. Errors say which field was wrong,
/// with its bytes escaped: a hostile header never reaches a terminal raw.
pub(super) fn parse(b: &Block) -> Result<RawHeader, String> {
    checksum_ok(b)?;
    let format = format_of(b);
    let num = |range: std::ops::Range<usize>, what: &str| {
        numeric(&b[range.clone()]).ok_or_else(|| {
            format!(
                "{what} field {:?} is not a number",
                b[range].escape_ascii().to_string()
            )
        })
    };
    let mut name = cstr(&b[0..100]).to_vec();
    let (mut devmajor, mut devminor) = (0, 0);
    if format != Format::V7 {
        devmajor = num(329..337, "device major")?;
        devminor = num(337..345, "device minor")?;
        let prefix = match format {
            Format::Ustar => cstr(&b[345..500]),
            Format::Star => cstr(&b[345..476]),
            _ => &[][..],
        };
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    Ok(RawHeader {
        name,
        link: cstr(&b[157..257]).to_vec(),
        typeflag: b[156],
        mode: num(100..108, "mode")?,
        uid: num(108..116, "uid")?,
        gid: num(116..124, "gid")?,
        size: num(124..136, "size")?,
        mtime: num(136..148, "mtime")?,
        devmajor,
        devminor,
    })
}

/// Old GNU sparse entries (offset, length) in `area`, 24 bytes each, up to
/// the first whose offset begins with NUL (GNU and BSD tar stop there too).
pub(super) fn gnu_sparse_entries(area: &[u8], out: &mut Vec<(i64, i64)>) -> Result<(), String> {
    for e in area.chunks_exact(24) {
        if e[0] == 0 {
            break;
        }
        match (numeric(&e[..12]), numeric(&e[12..])) {
            (Some(off), Some(len)) => out.push((off, len)),
            _ => return Err("old GNU sparse map entry is not a number".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(octal(b"0000644\0"), Some(0o644));
        assert_eq!(octal(b"  644 \0"), Some(0o644));
        assert_eq!(octal(b"\0\0\0\0"), Some(0));
        assert_eq!(octal(b"12 34\0"), None);
        assert_eq!(octal(b"9\0"), None);
        assert_eq!(octal(b"77777777777777777777777"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[4..].copy_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(numeric(&big), Some(1 << 40));
        // -5 in 12 bytes of two's complement with the marker bit.
        let mut neg = [0xffu8; 12];
        neg[11] = 0xfb;
        assert_eq!(numeric(&neg), Some(-5));
        let over = [0x80u8, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(numeric(&over), None);
    }
}
