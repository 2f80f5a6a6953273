//! `oci://host[:port]/repo[:tag|@digest]`: the OCI distribution API. Blobs
//! are fetched with ranged GETs; anonymous and bearer-token auth; plain
//! http only for loopback hosts. Also the push and manifest pull used to
//! publish an image and later bind it by reference.

use super::http::{agent, classify, read_range};
use super::{HttpOptions, Remote, RemoteError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::sync::Mutex;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.shoal.image.v1";
pub const BOOTSTRAP_MEDIA_TYPE: &str = "application/vnd.shoal.bootstrap.v1";
pub const BLOB_MEDIA_TYPE: &str = "application/vnd.shoal.blob.v1";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    /// `http` for loopback registries, else `https`.
    pub scheme: &'static str,
    pub host: String,
    pub repo: String,
    /// A tag, or a `sha256:` digest; `None` when only a repository is named.
    pub reference: Option<String>,
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

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

impl OciRef {
    pub fn parse(url: &str) -> Result<OciRef, String> {
        let rest = url
            .strip_prefix("oci://")
            .ok_or("not an oci:// reference")?;
        let (host, path) = rest
            .split_once('/')
            .ok_or("oci:// reference without a repository")?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(format!("invalid registry host {host:?}"));
        }
        let (repo, reference) = if let Some((r, d)) = path.split_once('@') {
            if !valid_digest(d) {
                return Err(format!("invalid digest {d:?}"));
            }
            (r, Some(d.to_string()))
        } else if let Some((r, t)) = path.rsplit_once(':') {
            if !valid_tag(t) {
                return Err(format!("invalid tag {t:?}"));
            }
            (r, Some(t.to_string()))
        } else {
            (path, None)
        };
        if !valid_repo(repo) {
            return Err(format!("invalid repository {repo:?}"));
        }
        let hostname = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let loopback =
            matches!(hostname, "localhost" | "127.0.0.1" | "[::1]") || hostname.starts_with("127.");
        Ok(OciRef {
            scheme: if loopback { "http" } else { "https" },
            host: host.to_string(),
            repo: repo.to_string(),
            reference,
        })
    }

    fn base(&self) -> String {
        format!("{}://{}/v2/{}", self.scheme, self.host, self.repo)
    }
}

/// One (digest, size, media type) a manifest lists.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

pub struct OciRemote {
    r: OciRef,
    agent: ureq::Agent,
    token: Mutex<Option<String>>,
}

fn parse_challenge(h: &str) -> Option<(String, Vec<(String, String)>)> {
    let rest = h.strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut params = Vec::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        let v = v.trim_matches('"').to_string();
        if k == "realm" {
            realm = Some(v);
        } else {
            params.push((k.to_string(), v));
        }
    }
    Some((realm?, params))
}

impl OciRemote {
    pub fn new(r: OciRef, opts: HttpOptions) -> Result<Self, RemoteError> {
        Ok(OciRemote {
            r,
            agent: agent(&opts),
            token: Mutex::new(None),
        })
    }

    pub fn reference(&self) -> &OciRef {
        &self.r
    }

    /// Send a request, answering one bearer-token challenge if the registry
    /// asks for it.
    fn call(
        &self,
        method: &str,
        url: &str,
        what: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<ureq::Response, RemoteError> {
        for attempt in 0..2 {
            let mut req = self.agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(t) = self.token.lock().unwrap().as_ref() {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let res = match body {
                Some(b) => req.send_bytes(b),
                None => req.call(),
            };
            match res {
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
                    self.fetch_token(url, &challenge)?;
                }
                r => return r.map_err(|e| classify(url, what, e)),
            }
        }
        Err(RemoteError::Permanent {
            url: url.into(),
            why: format!("{what}: authentication refused"),
        })
    }

    fn fetch_token(&self, url: &str, challenge: &str) -> Result<(), RemoteError> {
        let perm = |why: String| RemoteError::Permanent {
            url: url.into(),
            why,
        };
        let (realm, params) = parse_challenge(challenge)
            .ok_or_else(|| perm(format!("unsupported auth challenge {challenge:?}")))?;
        let mut req = self.agent.get(&realm);
        for (k, v) in &params {
            req = req.query(k, v);
        }
        let resp = req.call().map_err(|e| classify(&realm, "token", e))?;
        let v: serde_json::Value = resp
            .into_json()
            .map_err(|e| perm(format!("token reply: {e}")))?;
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| perm("token reply without a token".into()))?;
        *self.token.lock().unwrap() = Some(token.to_string());
        Ok(())
    }

    /// Fetch and parse the manifest the reference names.
    pub fn manifest(&self) -> Result<(Manifest, String), RemoteError> {
        let reference = self.r.reference.as_deref().unwrap_or("latest");
        let url = format!("{}/manifests/{reference}", self.r.base());
        let resp = self.call(
            "GET",
            &url,
            "manifest",
            &[("Accept", MANIFEST_MEDIA_TYPE)],
            None,
        )?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(4 << 20)
            .read_to_end(&mut body)
            .map_err(|e| RemoteError::Transient {
                url: url.clone(),
                why: format!("manifest: {e}"),
            })?;
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if reference.starts_with("sha256:") && reference != digest {
            return Err(RemoteError::Permanent {
                url,
                why: format!("manifest digest {digest} != {reference}"),
            });
        }
        let m: Manifest = serde_json::from_slice(&body).map_err(|e| RemoteError::Permanent {
            url: url.clone(),
            why: format!("manifest: {e}"),
        })?;
        Ok((m, digest))
    }

    /// Fetch a whole blob and check its digest.
    pub fn get_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}/blobs/{digest}", self.r.base());
        let resp = self.call("GET", &url, "blob", &[], None)?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(max + 1)
            .read_to_end(&mut body)
            .map_err(|e| RemoteError::Transient {
                url: url.clone(),
                why: format!("blob: {e}"),
            })?;
        if body.len() as u64 > max {
            return Err(RemoteError::Permanent {
                url,
                why: format!("blob larger than {max} bytes"),
            });
        }
        let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        if got != digest {
            return Err(RemoteError::Permanent {
                url,
                why: format!("blob digest {got} != {digest}"),
            });
        }
        Ok(body)
    }

    fn blob_exists(&self, digest: &str) -> Result<bool, RemoteError> {
        let url = format!("{}/blobs/{digest}", self.r.base());
        match self.call("HEAD", &url, "blob exists", &[], None) {
            Ok(_) => Ok(true),
            Err(RemoteError::Permanent { why, .. }) if why.contains("404") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Upload a blob (monolithic upload) unless the registry has it.
    /// Returns whether bytes were sent.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<bool, RemoteError> {
        if self.blob_exists(digest)? {
            return Ok(false);
        }
        let url = format!("{}/blobs/uploads/", self.r.base());
        let resp = self.call("POST", &url, "start upload", &[], Some(&[]))?;
        let loc = resp
            .header("location")
            .ok_or_else(|| RemoteError::Permanent {
                url: url.clone(),
                why: "upload without Location".into(),
            })?
            .to_string();
        let loc = if loc.starts_with('/') {
            format!("{}://{}{}", self.r.scheme, self.r.host, loc)
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        self.call(
            "PUT",
            &put,
            "upload",
            &[("Content-Type", "application/octet-stream")],
            Some(bytes),
        )?;
        Ok(true)
    }

    pub fn put_manifest(&self, tag: &str, m: &Manifest) -> Result<String, RemoteError> {
        let body = serde_json::to_vec(m).expect("manifest serializes");
        let url = format!("{}/manifests/{tag}", self.r.base());
        self.call(
            "PUT",
            &url,
            "manifest",
            &[("Content-Type", MANIFEST_MEDIA_TYPE)],
            Some(&body),
        )?;
        Ok(format!("sha256:{}", hex::encode(Sha256::digest(&body))))
    }

    /// The empty config descriptor OCI artifacts use.
    pub fn empty_config() -> (Descriptor, &'static [u8]) {
        let data: &[u8] = b"{}";
        (
            Descriptor {
                media_type: EMPTY_MEDIA_TYPE.into(),
                digest: format!("sha256:{}", hex::encode(Sha256::digest(data))),
                size: 2,
                data: None,
            },
            data,
        )
    }
}

impl Remote for OciRemote {
    fn describe(&self) -> String {
        format!("oci://{}/{}", self.r.host, self.r.repo)
    }

    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let url = format!("{}/blobs/sha256:{name}", self.r.base());
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        let resp = self.call(
            "GET",
            &url,
            &format!("bytes {offset}+{len}"),
            &[("Range", &range)],
            None,
        )?;
        read_range(&url, resp, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = OciRef::parse("oci://127.0.0.1:5000/shoal/base:v1").unwrap();
        assert_eq!(
            (r.scheme, r.host.as_str(), r.repo.as_str()),
            ("http", "127.0.0.1:5000", "shoal/base")
        );
        assert_eq!(r.reference.as_deref(), Some("v1"));
        let r = OciRef::parse("oci://registry.example.com/a/b").unwrap();
        assert_eq!((r.scheme, r.reference), ("https", None));
        let d = format!("oci://localhost:5000/x@sha256:{}", "a".repeat(64));
        assert!(OciRef::parse(&d)
            .unwrap()
            .reference
            .unwrap()
            .starts_with("sha256:"));
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
            assert!(OciRef::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn challenges() {
        let (realm, p) = parse_challenge(
            r#"Bearer realm="http://a/token",service="reg",scope="repository:x:pull""#,
        )
        .unwrap();
        assert_eq!(realm, "http://a/token");
        assert_eq!(p.len(), 2);
        assert!(parse_challenge("Basic realm=x").is_none());
    }
}
