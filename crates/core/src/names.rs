//! Names that become paths: domain ids, fsids and blob names are checked
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

/// Blob names are 64 lowercase hex characters (their sha256).
pub fn check_blob(value: &str) -> Result<(), CoreError> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(CoreError::InvalidName {
            what: "blob name",
            value: value.chars().take(200).collect(),
            why: "must be 64 lowercase hex characters",
        })
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
        assert!(check_blob(&"ab".repeat(32)).is_ok());
        assert!(check_blob(&"AB".repeat(32)).is_err());
        assert!(check_blob("../../etc/passwd").is_err());
    }
}
