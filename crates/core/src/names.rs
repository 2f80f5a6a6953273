//! Names that become paths: domain ids, fsids and blob ids are checked
//! before they touch the filesystem.

use crate::error::CoreError;

/// Domain ids and fsids: 1 to 128 of `[A-Za-z0-9._-]`, not starting with
/// `.` (so never `.` or `..`), no `/`.
pub fn check_id(what: &'static str, value: &str) -> Result<(), CoreError> {
    let bad = |why| {
        Err(CoreError::InvalidName {
            what,
            value: value.chars().take(200).collect(),
            why,
        })
    };
    if value.is_empty() || value.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if value.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A data blob's identity: the sha256 of its bytes. The same 64 lowercase
/// hex characters are its device tag in a bootstrap, its cookie in a
/// domain's volume, its cache file's name and its name on a remote; parsed
/// (and so checked) once where it comes in, a `BlobId` is always safe to
/// put in a path. Shown and serialized as that hex string, so JSON and
/// wire formats are those of the plain name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

impl BlobId {
    pub fn from_bytes(digest: [u8; 32]) -> Self {
        BlobId(digest)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parse a blob name: exactly 64 lowercase hex characters (uppercase
    /// is refused: two spellings would be two cache files).
    pub fn parse(value: &str) -> Result<Self, CoreError> {
        let lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        let mut id = [0u8; 32];
        if value.len() == 64
            && value.bytes().all(|b| lower_hex(&b))
            && hex::decode_to_slice(value, &mut id).is_ok()
        {
            return Ok(BlobId(id));
        }
        Err(CoreError::InvalidName {
            what: "blob name",
            value: value.chars().take(200).collect(),
            why: "must be 64 lowercase hex characters",
        })
    }
}

impl std::str::FromStr for BlobId {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self, CoreError> {
        BlobId::parse(s)
    }
}

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl serde::Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BlobId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["d", "web-1.prod_x", &"a".repeat(128)] {
            assert!(check_id("fsid", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "a b",
            "é",
            &"a".repeat(129),
            "a\0b",
        ] {
            assert!(check_id("fsid", bad).is_err(), "{bad:?}");
        }
        assert!(BlobId::parse(&"ab".repeat(32)).is_ok());
        assert!(BlobId::parse(&"AB".repeat(32)).is_err());
        assert!(BlobId::parse("../../etc/passwd").is_err());
    }

    #[test]
    fn blob_ids_read_and_write_as_their_hex() {
        let hex = "0123456789abcdef".repeat(4);
        let id: BlobId = hex.parse().unwrap();
        assert_eq!(id.to_string(), hex);
        assert_eq!(id.as_bytes()[..2], [0x01, 0x23]);
        let json = serde_json::to_string(&vec![id]).unwrap();
        assert_eq!(json, format!("[\"{hex}\"]"));
        assert_eq!(serde_json::from_str::<Vec<BlobId>>(&json).unwrap(), [id]);
        assert!(serde_json::from_str::<BlobId>("\"00\"").is_err());
        for bad in [
            "",
            &"a".repeat(63),
            &"a".repeat(65),
            &"g".repeat(64),
            &"é".repeat(32),
        ] {
            assert!(BlobId::parse(bad).is_err(), "{bad:?}");
        }
        // Ordered as their names are.
        let (lo, hi) = (
            BlobId::parse(&"09".repeat(32)).unwrap(),
            BlobId::parse(&"0a".repeat(32)).unwrap(),
        );
        assert!(lo < hi && lo.to_string() < hi.to_string());
    }
}
