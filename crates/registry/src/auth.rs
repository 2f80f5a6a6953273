//! Registry authentication: basic credentials (from `--creds`, the Docker
//! config or a Docker credential helper) and the bearer-token dance of the
//! distribution spec. Token replies are size-capped: a token endpoint that
//! never ends its reply must not grow memory.

use crate::error::RemoteError;
use base64::Engine;
use std::io::Read;
use std::path::PathBuf;

/// A token reply larger than this is refused.
const MAX_TOKEN_REPLY: u64 = 1 << 20;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.username)
    }
}

impl Credentials {
    /// `user:password` as given to `--creds`.
    pub fn parse(s: &str) -> Result<Credentials, String> {
        let (u, p) = s
            .split_once(':')
            .ok_or("credentials must be user:password")?;
        if u.is_empty() {
            return Err("credentials without a user name".into());
        }
        Ok(Credentials {
            username: u.into(),
            password: p.into(),
        })
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// Credentials for `host` from `$DOCKER_CONFIG/config.json` (or
    /// `~/.docker/config.json`): `auths` entries, then `credHelpers` and
    /// `credsStore` through `docker-credential-<helper> get`.
    pub fn from_docker_config(host: &str) -> Option<Credentials> {
        let path = docker_config_path()?;
        let text = std::fs::read_to_string(&path).ok()?;
        match lookup_docker_config(&text, host) {
            Ok(found) => found,
            Err(why) => {
                tracing::warn!(path = %path.display(), why, "ignoring the Docker config");
                None
            }
        }
    }
}

fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    Some(PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"))
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: std::collections::BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(serde::Deserialize, Default)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The key forms Docker writes for a host: `host`, `https://host`,
/// `http://host`, and `https://index.docker.io/v1/` for Docker Hub.
fn key_matches(key: &str, host: &str) -> bool {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    k == host || (host == "registry-1.docker.io" && k == "index.docker.io")
}

fn lookup_docker_config(text: &str, host: &str) -> Result<Option<Credentials>, String> {
    let cfg: DockerConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if let Some((_, a)) = cfg.auths.iter().find(|(k, _)| key_matches(k, host)) {
        if let (Some(u), Some(p)) = (&a.username, &a.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if let Some(enc) = &a.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(enc.trim())
                .map_err(|e| format!("auths[{host}].auth: {e}"))?;
            let s = String::from_utf8(raw).map_err(|_| format!("auths[{host}].auth: not UTF-8"))?;
            return Credentials::parse(&s).map(Some);
        }
    }
    let helper = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| key_matches(k, host))
        .map(|(_, v)| v.clone())
        .or(cfg.creds_store);
    Ok(helper.and_then(|h| credential_helper(&h, host)))
}

/// Ask `docker-credential-<helper> get` for `host`'s credentials.
fn credential_helper(helper: &str, host: &str) -> Option<Credentials> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if !helper
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return None;
    }
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(host.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let r: Reply = serde_json::from_slice(&out.stdout).ok()?;
    Some(Credentials {
        username: r.username,
        password: r.secret,
    })
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        params: Vec<(String, String)>,
    },
}

/// Parse `Scheme k="v", k2=v2`; quoted values may hold commas
/// (`scope="repository:a:pull,push"`).
pub(crate) fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let (v, after) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, a)| (v, a))
        };
        params.push((k.trim().to_ascii_lowercase(), v.to_string()));
        s = after.trim_start_matches([',', ' ']);
    }
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let i = params.iter().position(|(k, _)| k == "realm")?;
    let realm = params.remove(i).1;
    Some(Challenge::Bearer { realm, params })
}

/// Fetch a bearer token from `realm`, with basic credentials if any.
pub(crate) fn fetch_token(
    agent: &ureq::Agent,
    realm: &str,
    params: &[(String, String)],
    creds: Option<&Credentials>,
) -> Result<String, RemoteError> {
    let u = url::Url::parse(realm)
        .map_err(|e| RemoteError::permanent(realm, format!("token realm: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(RemoteError::permanent(realm, "token realm is not http(s)"));
    }
    let mut req = agent.get(realm);
    for (k, v) in params {
        req = req.query(k, v);
    }
    if let Some(c) = creds {
        req = req.set("Authorization", &c.basic_header());
    }
    let resp = req.call().map_err(|e| match e {
        ureq::Error::Status(401 | 403, _) => {
            RemoteError::permanent(realm, "token: credentials refused")
        }
        e => crate::net::classify(realm, "token", e),
    })?;
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_TOKEN_REPLY + 1)
        .read_to_end(&mut body)
        .map_err(|e| RemoteError::transient(realm, format!("token reply: {e}")))?;
    if body.len() as u64 > MAX_TOKEN_REPLY {
        return Err(RemoteError::permanent(
            realm,
            format!("token reply larger than {MAX_TOKEN_REPLY} bytes"),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        token: Option<String>,
        access_token: Option<String>,
    }
    let r: Reply = serde_json::from_slice(&body)
        .map_err(|e| RemoteError::permanent(realm, format!("token reply: {e}")))?;
    r.token
        .or(r.access_token)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| RemoteError::permanent(realm, "token reply without a usable token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let c = parse_challenge(
            r#"Bearer realm="http://a/token",service="reg",scope="repository:x:pull,push""#,
        )
        .unwrap();
        let Challenge::Bearer { realm, params } = c else {
            panic!()
        };
        assert_eq!(realm, "http://a/token");
        assert_eq!(
            params,
            vec![
                ("service".to_string(), "reg".to_string()),
                ("scope".to_string(), "repository:x:pull,push".to_string())
            ]
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn docker_config() {
        let cfg = r#"{"auths":{"https://reg.example:5000":{"auth":"dXNlcjpwYTpzcw=="},
                      "other":{"username":"u","password":"p"}}}"#;
        let c = lookup_docker_config(cfg, "reg.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        let c = lookup_docker_config(cfg, "other").unwrap().unwrap();
        assert_eq!(c.username, "u");
        assert_eq!(lookup_docker_config(cfg, "none").unwrap(), None);
        assert!(lookup_docker_config("{", "x").is_err());
        assert!(format!("{c:?}").contains("hidden"));
        assert!(Credentials::parse("nouser").is_err());
    }
}
