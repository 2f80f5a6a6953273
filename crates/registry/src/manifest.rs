//! The manifests, indexes and image configs of OCI and Docker schema 2, as
//! far as shoal reads and writes them. Configs keep every field they came
//! with (Docker's `container_config`, labels, history …): converting an
//! image changes its layers, not what it runs.

use crate::reference::Digest;
use std::collections::BTreeMap;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What a manifest GET accepts, images and indexes of both families.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests and configs larger than this are refused (as containerd does).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// How a layer's bytes are stored, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

/// A tar layer's compression, or `None` for media types that are not tar
/// layers shoal can apply (foreign layers, artifacts, shoal's own layers).
pub fn tar_layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(LayerCompression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(LayerCompression::Zstd),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        rename = "os.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`, as `--platform` takes it.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(format!("platform {s:?}: want os/arch[/variant]"));
        }
        Ok(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
            os_version: None,
        })
    }

    /// The platform this binary runs on, in OCI's names.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
            os_version: None,
        }
    }

    /// Whether an index entry's platform is one this request accepts: the
    /// same os and architecture, and the variant if one was asked for.
    pub fn accepts(&self, p: &Platform) -> bool {
        self.os == p.os
            && self.architecture == p.architecture
            && (self.variant.is_none() || self.variant == p.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: None,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(
        rename = "artifactType",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Index {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest or an index, told apart by media type (from the reply's
/// Content-Type or the document) or, failing both, by shape.
#[derive(Clone, Debug)]
pub enum ManifestKind {
    Image(Box<Manifest>),
    Index(Index),
}

impl ManifestKind {
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestKind, String> {
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "schemaVersion")]
            schema_version: Option<u32>,
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let p: Probe = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        if p.schema_version != Some(2) {
            return Err(format!(
                "schemaVersion {:?} (only schema 2 manifests are supported)",
                p.schema_version
            ));
        }
        let ct = content_type.map(|c| c.split(';').next().unwrap_or(c).trim());
        let mt = p
            .media_type
            .as_deref()
            .or(ct.filter(|c| *c != "application/json"));
        let is_index = match mt {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            Some(other) => return Err(format!("unsupported manifest media type {other:?}")),
            None => p.manifests.is_some(),
        };
        if is_index {
            serde_json::from_slice(bytes)
                .map(ManifestKind::Index)
                .map_err(|e| format!("index: {e}"))
        } else {
            serde_json::from_slice(bytes)
                .map(|m| ManifestKind::Image(Box::new(m)))
                .map_err(|e| format!("manifest: {e}"))
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// An image config: the fields shoal touches, and every other field kept
/// as it came.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<serde_json::Map<String, serde_json::Value>>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl ImageConfig {
    /// A minimal config for `os/arch` with the given layers.
    pub fn minimal(platform: &Platform, diff_ids: Vec<Digest>) -> ImageConfig {
        let mut rest = serde_json::Map::new();
        rest.insert("config".into(), serde_json::json!({}));
        ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids,
            },
            history: Vec::new(),
            rest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_platforms() {
        let d = Digest::of(b"x");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{d}","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            ManifestKind::parse(m.as_bytes(), None),
            Ok(ManifestKind::Image(_))
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let ManifestKind::Index(i) = ManifestKind::parse(i.as_bytes(), Some(OCI_INDEX)).unwrap()
        else {
            panic!()
        };
        let p = i.manifests[0].platform.as_ref().unwrap();
        assert!(Platform::parse("linux/arm64").unwrap().accepts(p));
        assert!(Platform::parse("linux/arm64/v8").unwrap().accepts(p));
        assert!(!Platform::parse("linux/arm64/v7").unwrap().accepts(p));
        assert!(!Platform::parse("linux/amd64").unwrap().accepts(p));
        assert!(Platform::parse("linux").is_err());
        assert!(ManifestKind::parse(br#"{"schemaVersion":1}"#, None).is_err());
        assert!(ManifestKind::parse(b"<html>", None).is_err());
        let bad = r#"{"schemaVersion":2,"mediaType":"text/plain","layers":[]}"#;
        assert!(ManifestKind::parse(bad.as_bytes(), None).is_err());
    }

    #[test]
    fn configs_keep_unknown_fields() {
        let c = r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]},"container_config":{"X":1},
                    "rootfs":{"type":"layers","diff_ids":[]},"history":[{"created_by":"x"}]}"#;
        let cfg: ImageConfig = serde_json::from_str(c).unwrap();
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["container_config"]["X"], 1);
        assert_eq!(back["config"]["Cmd"][0], "sh");
        assert_eq!(back["history"][0]["created_by"], "x");
        assert_eq!(
            tar_layer_compression("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(LayerCompression::Zstd)
        );
        assert_eq!(
            tar_layer_compression("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
            None
        );
    }
}
