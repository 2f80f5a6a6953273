//! `oci://host[:port]/repo[:tag|@sha256:…]` and content digests, validated
//! once where they enter: both end up in URLs and file names.

use std::fmt;

/// A `sha256:<64 lowercase hex>` content digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, String> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Digest(s.to_string()))
        } else {
            Err(format!(
                "invalid digest {:?} (want sha256:<64 hex>)",
                trunc(s)
            ))
        }
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// From a finished hasher.
    pub fn from_hasher(h: sha2::Sha256) -> Digest {
        use sha2::Digest as _;
        Digest(format!("sha256:{}", hex::encode(h.finalize())))
    }

    /// From 64 hex characters (a shoal blob's name).
    pub fn from_hex(hex: &str) -> Result<Digest, String> {
        Digest::parse(&format!("sha256:{hex}"))
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(100).collect()
}

/// A repository in a registry, optionally with a tag or digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `host` or `host:port`, as it appears in URLs and the Docker config.
    pub host: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

fn valid_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 128
        && tag.as_bytes()[0] != b'.'
        && tag.as_bytes()[0] != b'-'
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

impl Reference {
    /// Parse `oci://host[:port]/repo[:tag][@sha256:…]`.
    pub fn parse(url: &str) -> Result<Reference, String> {
        let rest = url
            .strip_prefix("oci://")
            .ok_or_else(|| format!("{:?} is not an oci:// reference", trunc(url)))?;
        let (host, path) = rest
            .split_once('/')
            .ok_or("oci:// reference without a repository")?;
        if !valid_host(host) {
            return Err(format!("invalid registry host {:?}", trunc(host)));
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => (p, Some(Digest::parse(d)?)),
            None => (path, None),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => {
                if !valid_tag(t) {
                    return Err(format!("invalid tag {:?}", trunc(t)));
                }
                (r, Some(t.to_string()))
            }
            _ => (path, None),
        };
        if !valid_repo(repo) {
            return Err(format!("invalid repository {:?}", trunc(repo)));
        }
        Ok(Reference {
            host: host.to_string(),
            repo: repo.to_string(),
            tag,
            digest,
        })
    }

    /// Whether the host is loopback, where plain http is allowed.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }

    /// The tag or digest a manifest GET asks for (`latest` when neither).
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// `oci://host/repo` without tag or digest: a blob remote.
    pub fn repository_url(&self) -> String {
        format!("oci://{}/{}", self.host, self.repo)
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.is_empty() => h,
        _ => host,
    };
    matches!(name, "localhost" | "[::1]") || name.starts_with("127.")
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.host, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("oci://127.0.0.1:5000/shoal/base:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repo.as_str()),
            ("127.0.0.1:5000", "shoal/base")
        );
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "oci://127.0.0.1:5000/shoal/base:v1");
        let r = Reference::parse("oci://registry.example.com/a/b").unwrap();
        assert_eq!((r.tag.clone(), r.is_loopback()), (None, false));
        assert_eq!(r.manifest_ref(), "latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("oci://localhost:5000/x:t@{d}")).unwrap();
        assert_eq!((r.tag.as_deref(), r.manifest_ref()), (Some("t"), d.clone()));
        let r = Reference::parse(&format!("oci://localhost/x@{d}")).unwrap();
        assert_eq!(r.tag, None);
        for bad in [
            "oci://h/Upper:t",
            "oci://h/a/../b:t",
            "oci://h/repo:../../etc",
            "oci://h/repo:-x",
            "oci://h/repo@sha256:xyz",
            "oci:///repo",
            "oci://h/",
            "oci://h a/repo",
            "http://h/repo",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "127example.com"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn digests() {
        let d = Digest::of(b"{}");
        assert_eq!(
            d.as_str(),
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(d.hex().len(), 64);
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_err());
    }
}
