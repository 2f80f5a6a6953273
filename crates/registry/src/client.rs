//! The distribution API client: one [`Client`] per process (connection
//! pools per host, tokens, credentials), one [`Repository`] per repository
//! it talks to.

use crate::auth::{fetch_token, parse_challenge, Challenge, Credentials};
use crate::error::RemoteError;
use crate::manifest::{
    Descriptor, Index, Manifest, ManifestKind, Platform, ACCEPT_MANIFESTS, MAX_MANIFEST_BYTES,
};
use crate::net::{
    agent, classify, read_range, stream_range, url_host, HttpOptions, MirrorCapability,
};
use crate::ranges::{range_header, ranges_of, stream_ranges, Piece, Remaining, Sink, Streamed};
use crate::reference::{Digest, Reference};
use sha2::Digest as _;
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// Opens a blob to upload: its bytes and their length. Called again when
/// a request has to be sent again.
pub type OpenBlob<'a> = &'a dyn Fn() -> std::io::Result<(Box<dyn Read>, u64)>;

/// Chunks of an upload the registry refused whole (unless it asks for
/// bigger ones): small enough to buffer, big enough to cost few requests.
const CHUNK_SIZE: u64 = 8 << 20;

/// How a request authenticates at one endpoint host.
#[derive(Clone)]
enum AuthState {
    Bearer(String),
    Basic(String),
}

struct Shared {
    opts: HttpOptions,
    agents: Mutex<HashMap<String, ureq::Agent>>,
    /// (endpoint host, repository) → how to authenticate there.
    auth: Mutex<HashMap<(String, String), AuthState>>,
    /// Credentials given on the command line, by registry host.
    creds: Mutex<HashMap<String, Credentials>>,
}

/// Connection pools, tokens and credentials shared by every repository a
/// process talks to.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// A request body, re-creatable so a request can be sent again after an
/// authentication challenge.
enum Body<'a> {
    Empty,
    Bytes(&'a [u8]),
    Stream(OpenBlob<'a>),
}

/// One place a repository is reached: a mirror or the origin.
struct Endpoint {
    host: String,
    base: String,
    mirror: bool,
}

impl Client {
    pub fn new(opts: HttpOptions) -> Client {
        Client {
            shared: Arc::new(Shared {
                opts,
                agents: Mutex::new(HashMap::new()),
                auth: Mutex::new(HashMap::new()),
                creds: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The process's client for `opts`, made on first use. A daemon binds
    /// many images of few registries: one pool means the connection that
    /// fetched a manifest carries the blob requests that follow instead of
    /// each remote paying a TCP (and TLS) handshake, and a bearer token
    /// fetched once serves every repository it covers instead of each
    /// remote repeating the 401-token-retry round trips.
    pub fn shared(opts: &HttpOptions) -> Client {
        static CLIENTS: Mutex<Vec<Client>> = Mutex::new(Vec::new());
        let mut all = CLIENTS.lock().unwrap();
        if let Some(c) = all.iter().find(|c| c.shared.opts == *opts) {
            return c.clone();
        }
        let c = Client::new(opts.clone());
        all.push(c.clone());
        c
    }

    /// Use `creds` for `host` (instead of the Docker config's).
    pub fn set_credentials(&self, host: &str, creds: Credentials) {
        self.shared.creds.lock().unwrap().insert(host.into(), creds);
    }

    pub fn repository(&self, r: &Reference) -> Repository {
        Repository {
            client: self.clone(),
            r: r.clone(),
        }
    }

    fn agent(&self, host: &str) -> ureq::Agent {
        let mut g = self.shared.agents.lock().unwrap();
        g.entry(host.to_string())
            .or_insert_with(|| agent(&self.shared.opts, host))
            .clone()
    }

    fn credentials(&self, host: &str) -> Option<Credentials> {
        if let Some(c) = self.shared.creds.lock().unwrap().get(host) {
            return Some(c.clone());
        }
        Credentials::from_docker_config(host)
    }
}

/// A repository of a registry, with the client that reaches it.
#[derive(Clone)]
pub struct Repository {
    client: Client,
    r: Reference,
}

/// What happened to a blob an upload was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Upload {
    /// The repository had it.
    Exists,
    /// Mounted from another repository of the registry.
    Mounted,
    /// Its bytes were sent.
    Uploaded,
}

impl Repository {
    pub fn reference(&self) -> &Reference {
        &self.r
    }

    fn origin_base(&self) -> String {
        let o = &self.client.shared.opts;
        let plain = self.r.is_loopback() || o.insecure.iter().any(|h| h == &self.r.host);
        let scheme = if plain { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", self.r.host, self.r.repo)
    }

    /// Mirrors with `cap`, in order, then the origin.
    fn endpoints(&self, cap: Option<MirrorCapability>) -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = match cap {
            None => Vec::new(),
            Some(cap) => self
                .client
                .shared
                .opts
                .mirrors
                .iter()
                .filter(|m| m.serves(&self.r.host, cap))
                .map(|m| Endpoint {
                    host: url_host(&m.url),
                    base: m.repo_base(&self.r.repo),
                    mirror: true,
                })
                .collect(),
        };
        v.push(Endpoint {
            host: self.r.host.clone(),
            base: self.origin_base(),
            mirror: false,
        });
        v
    }

    /// Send one request, answering one authentication challenge.
    fn send(
        &self,
        ep: &Endpoint,
        method: &str,
        url: &str,
        what: &str,
        headers: &[(&str, &str)],
        body: &Body,
    ) -> Result<ureq::Response, RemoteError> {
        let agent = self.client.agent(&ep.host);
        let key = (ep.host.clone(), self.r.repo.clone());
        for attempt in 0..2 {
            let mut req = agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            match self.client.shared.auth.lock().unwrap().get(&key) {
                Some(AuthState::Bearer(t)) => {
                    req = req.set("Authorization", &format!("Bearer {t}"))
                }
                Some(AuthState::Basic(b)) => req = req.set("Authorization", b),
                None => {}
            }
            let res = match body {
                Body::Empty => req.call(),
                Body::Bytes(b) => req.send_bytes(b),
                Body::Stream(open) => {
                    let (r, len) =
                        open().map_err(|e| RemoteError::permanent(url, format!("{what}: {e}")))?;
                    req.set("Content-Length", &len.to_string()).send(r)
                }
            };
            match res {
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
                    let state = self.authenticate(ep, url, &challenge)?;
                    self.client.shared.auth.lock().unwrap().insert(key.clone(), state);
                }
                Err(ureq::Error::Status(401 | 403, _)) => {
                    return Err(RemoteError::permanent(
                        url,
                        format!("{what}: authentication refused (credentials from --creds or the Docker config)"),
                    ))
                }
                r => return r.map_err(|e| classify(url, what, e)),
            }
        }
        unreachable!("the second attempt returns")
    }

    fn authenticate(
        &self,
        ep: &Endpoint,
        url: &str,
        challenge: &str,
    ) -> Result<AuthState, RemoteError> {
        let creds = self.client.credentials(&ep.host);
        match parse_challenge(challenge) {
            Some(Challenge::Bearer { realm, params }) => {
                let agent = self.client.agent(&url_host(&realm));
                fetch_token(&agent, &realm, &params, creds.as_ref()).map(AuthState::Bearer)
            }
            Some(Challenge::Basic) => match creds {
                Some(c) => Ok(AuthState::Basic(c.basic_header())),
                None => Err(RemoteError::permanent(
                    url,
                    format!("{} asks for credentials: none given (--creds user:pass or the Docker config)", ep.host),
                )),
            },
            None => Err(RemoteError::permanent(
                url,
                format!("unsupported authentication challenge {challenge:?}"),
            )),
        }
    }

    /// Try each endpoint in turn; a mirror's failure falls through to the
    /// next, the origin's is the answer.
    fn first_ok<T>(
        &self,
        cap: MirrorCapability,
        mut f: impl FnMut(&Endpoint) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let eps = self.endpoints(Some(cap));
        let mut last = None;
        for ep in &eps {
            match f(ep) {
                Ok(v) => return Ok(v),
                Err(e) if ep.mirror => {
                    tracing::debug!(mirror = ep.base, error = %e, "mirror failed, falling through");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("the origin is always an endpoint"))
    }

    /// The manifest or index `reference` (a tag or digest) names: its bytes,
    /// content type and digest, checked against the digest if it is one.
    pub fn get_manifest(
        &self,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>, Digest), RemoteError> {
        let by_digest = reference.starts_with("sha256:");
        let cap = if by_digest {
            MirrorCapability::Pull
        } else {
            MirrorCapability::Resolve
        };
        self.first_ok(cap, |ep| {
            let url = format!("{}/manifests/{reference}", ep.base);
            let resp = self.send(
                ep,
                "GET",
                &url,
                "manifest",
                &[("Accept", ACCEPT_MANIFESTS)],
                &Body::Empty,
            )?;
            let ct = resp.header("content-type").map(str::to_string);
            let body = read_capped(&url, resp, MAX_MANIFEST_BYTES, "manifest")?;
            let digest = Digest::of(&body);
            if by_digest && digest.as_str() != reference {
                return Err(RemoteError::permanent(
                    url,
                    format!("manifest digest is {digest}, not the {reference} asked for"),
                ));
            }
            Ok((body, ct, digest))
        })
        .map_err(|e| {
            e.context(&format!(
                "manifest {}{}",
                self.r.repository_url(),
                at(reference)
            ))
        })
    }

    /// Resolve the reference to an image manifest, choosing `platform`'s
    /// entry when it names an index. Returns the manifest and its digest.
    pub fn resolve(&self, platform: &Platform) -> Result<(Manifest, Digest), RemoteError> {
        let (body, ct, digest) = self.get_manifest(&self.r.manifest_ref())?;
        let perm = |why: String| RemoteError::permanent(self.r.to_string(), why);
        match ManifestKind::parse(&body, ct.as_deref()).map_err(perm)? {
            ManifestKind::Image(m) => Ok((*m, digest)),
            ManifestKind::Index(i) => {
                let d = choose_platform(&i, platform).map_err(perm)?;
                let (body, ct, digest) = self.get_manifest(d.digest.as_str())?;
                match ManifestKind::parse(&body, ct.as_deref()).map_err(perm)? {
                    ManifestKind::Image(m) => Ok((*m, digest)),
                    ManifestKind::Index(_) => Err(perm("an index inside an index".into())),
                }
            }
        }
    }

    /// A small blob (config, bootstrap) whole, checked against `desc`.
    pub fn get_blob(&self, desc: &Descriptor, max: u64) -> Result<Vec<u8>, RemoteError> {
        if desc.size > max {
            return Err(RemoteError::permanent(
                self.r.to_string(),
                format!(
                    "blob {} declares {} bytes, more than {max}",
                    desc.digest, desc.size
                ),
            ));
        }
        let mut r = self.blob_reader(desc)?;
        let mut v = Vec::with_capacity(desc.size as usize);
        r.read_to_end(&mut v)
            .map_err(|e| RemoteError::permanent(self.r.to_string(), e.to_string()))?;
        Ok(v)
    }

    /// A blob known only by its digest, whole: at most `max` bytes, checked
    /// against the digest.
    pub fn get_blob_by_digest(&self, digest: &Digest, max: u64) -> Result<Vec<u8>, RemoteError> {
        let resp = self.first_ok(MirrorCapability::Pull, |ep| {
            let url = format!("{}/blobs/{digest}", ep.base);
            self.send(
                ep,
                "GET",
                &url,
                &format!("blob {digest}"),
                &[],
                &Body::Empty,
            )
        })?;
        let place = self.r.repository_url();
        let body = read_capped(&place, resp, max, &format!("blob {digest}"))?;
        let got = Digest::of(&body);
        if &got != digest {
            return Err(RemoteError::permanent(
                place,
                format!("blob {digest} has digest {got}: its bytes do not match"),
            ));
        }
        Ok(body)
    }

    /// A stream of the blob `desc` names; it fails at its end unless the
    /// bytes were exactly `desc.size` long and hash to `desc.digest`.
    pub fn blob_reader(&self, desc: &Descriptor) -> Result<BlobReader, RemoteError> {
        let resp = self.first_ok(MirrorCapability::Pull, |ep| {
            let url = format!("{}/blobs/{}", ep.base, desc.digest);
            self.send(
                ep,
                "GET",
                &url,
                &format!("blob {}", desc.digest),
                &[],
                &Body::Empty,
            )
        })?;
        Ok(BlobReader::new(
            Box::new(resp.into_reader()),
            desc.clone(),
            self.r.repository_url(),
        ))
    }

    /// Exactly `len` bytes at `offset` of blob `digest` (a ranged GET).
    pub fn fetch_range(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RemoteError> {
        let range = format!("bytes={}-{}", offset, offset + len - 1);
        self.first_ok(MirrorCapability::Pull, |ep| {
            let url = format!("{}/blobs/{digest}", ep.base);
            let what = format!("bytes {offset}+{len}");
            let resp = self.send(ep, "GET", &url, &what, &[("Range", &range)], &Body::Empty)?;
            read_range(&url, resp, offset, len)
        })
    }

    /// The adjacent `pieces` of blob `digest` (one range) in one GET, each
    /// handed to `sink` as soon as it has arrived.
    pub fn stream_range(
        &self,
        digest: &Digest,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
    ) -> Result<(), RemoteError> {
        let mut left = Remaining::new(pieces);
        self.first_ok(MirrorCapability::Pull, |ep| {
            let todo = left.todo();
            if todo.is_empty() {
                return Ok(());
            }
            let ranges = ranges_of(&todo);
            let header = range_header(&ranges);
            let url = format!("{}/blobs/{digest}", ep.base);
            let what = format!("bytes {}+{}", ranges[0].0, ranges[0].1);
            let resp = self.send(ep, "GET", &url, &what, &[("Range", &header)], &Body::Empty)?;
            stream_range(&url, resp, &todo, &mut *left.sink(sink))
        })
    }

    /// The `pieces` of blob `digest` as several ranges in one GET (see
    /// [`crate::ranges`]); [`Streamed::Unsupported`] when the registry does
    /// not serve them so (the sink has what did arrive).
    pub fn stream_ranges(
        &self,
        digest: &Digest,
        pieces: &[Piece],
        sink: &mut Sink<'_>,
    ) -> Result<Streamed, RemoteError> {
        let mut left = Remaining::new(pieces);
        self.first_ok(MirrorCapability::Pull, |ep| {
            let todo = left.todo();
            if todo.is_empty() {
                return Ok(Streamed::All);
            }
            let ranges = ranges_of(&todo);
            let header = range_header(&ranges);
            let url = format!("{}/blobs/{digest}", ep.base);
            let what = format!("{} ranges", ranges.len());
            let resp = self.send(ep, "GET", &url, &what, &[("Range", &header)], &Body::Empty)?;
            stream_ranges(&url, resp, &todo, &mut *left.sink(sink))
        })
    }

    fn origin(&self) -> Endpoint {
        self.endpoints(None).pop().expect("the origin")
    }

    pub fn blob_exists(&self, digest: &Digest) -> Result<bool, RemoteError> {
        let ep = self.origin();
        let url = format!("{}/blobs/{digest}", ep.base);
        match self.send(&ep, "HEAD", &url, "blob exists", &[], &Body::Empty) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Make `digest` present in this repository: nothing if it is there, a
    /// cross-repository mount from one of `mount_from` (repositories of the
    /// same registry) if one has it, else an upload of `open()`'s bytes.
    pub fn upload_blob(
        &self,
        digest: &Digest,
        mount_from: &[String],
        open: OpenBlob<'_>,
    ) -> Result<Upload, RemoteError> {
        if self.blob_exists(digest)? {
            return Ok(Upload::Exists);
        }
        let ep = self.origin();
        for from in mount_from.iter().filter(|f| **f != self.r.repo) {
            let url = format!("{}/blobs/uploads/?mount={digest}&from={from}", ep.base);
            let resp = self.send(&ep, "POST", &url, "mount blob", &[], &Body::Bytes(&[]))?;
            if resp.status() == 201 {
                return Ok(Upload::Mounted);
            }
            // 202: the registry started an upload instead; it expires unused.
        }
        let (_, size) = open().map_err(|e| {
            RemoteError::permanent(
                digest.to_string(),
                format!(
                    "not in {} and its bytes cannot be read: {e}",
                    self.r.repository_url()
                ),
            )
        })?;
        // One streamed PUT: no buffering, one request. A registry (or a
        // proxy in front of it) that refuses so large a body gets chunks.
        let (loc, _) = self.start_upload(&ep)?;
        match self.put_whole(&ep, &loc, digest, open) {
            Err(e) if e.has_status(413) => {
                tracing::info!(%digest, size, "whole upload too large for the registry, sending chunks");
            }
            r => return r,
        }
        let (loc, min_chunk) = self.start_upload(&ep)?;
        let loc = self.patch_chunks(&ep, &loc, size, min_chunk, open)?;
        let url = with_query(&loc, &format!("digest={digest}"));
        let headers = [("Content-Length", "0")];
        self.send(
            &ep,
            "PUT",
            &url,
            "finish upload",
            &headers,
            &Body::Bytes(&[]),
        )?;
        Ok(Upload::Uploaded)
    }

    fn start_upload(&self, ep: &Endpoint) -> Result<(String, u64), RemoteError> {
        let url = format!("{}/blobs/uploads/", ep.base);
        let resp = self.send(ep, "POST", &url, "start upload", &[], &Body::Bytes(&[]))?;
        let min = resp
            .header("oci-chunk-min-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok((location(&url, &resp)?, min))
    }

    fn put_whole(
        &self,
        ep: &Endpoint,
        loc: &str,
        digest: &Digest,
        open: OpenBlob<'_>,
    ) -> Result<Upload, RemoteError> {
        let url = with_query(loc, &format!("digest={digest}"));
        let headers = [("Content-Type", "application/octet-stream")];
        self.send(
            ep,
            "PUT",
            &url,
            &format!("upload {digest}"),
            &headers,
            &Body::Stream(open),
        )?;
        Ok(Upload::Uploaded)
    }

    /// Send the blob in PATCH chunks; returns the location to finish at.
    fn patch_chunks(
        &self,
        ep: &Endpoint,
        loc: &str,
        size: u64,
        min_chunk: u64,
        open: OpenBlob<'_>,
    ) -> Result<String, RemoteError> {
        let chunk = CHUNK_SIZE.max(min_chunk);
        let (mut r, _) = open().map_err(|e| RemoteError::permanent(loc, e.to_string()))?;
        let mut loc = loc.to_string();
        let mut buf = Vec::new();
        let mut at = 0u64;
        while at < size {
            let n = chunk.min(size - at);
            buf.clear();
            (&mut r)
                .take(n)
                .read_to_end(&mut buf)
                .map_err(|e| RemoteError::permanent(&loc, format!("reading blob: {e}")))?;
            if buf.len() as u64 != n {
                return Err(RemoteError::permanent(&loc, "blob shorter than its size"));
            }
            let range = format!("{}-{}", at, at + n - 1);
            let headers = [
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", range.as_str()),
            ];
            let resp = self.send(
                ep,
                "PATCH",
                &loc,
                "upload chunk",
                &headers,
                &Body::Bytes(&buf),
            )?;
            loc = location(&loc, &resp)?;
            at += n;
        }
        Ok(loc)
    }

    /// Put a manifest under `reference` (a tag or its digest).
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<Digest, RemoteError> {
        let ep = self.origin();
        let url = format!("{}/manifests/{reference}", ep.base);
        self.send(
            &ep,
            "PUT",
            &url,
            "manifest",
            &[("Content-Type", media_type)],
            &Body::Bytes(body),
        )?;
        Ok(Digest::of(body))
    }
}

fn at(reference: &str) -> String {
    if reference.starts_with("sha256:") {
        format!("@{reference}")
    } else {
        format!(":{reference}")
    }
}

/// The entry of an index for `platform`.
fn choose_platform<'a>(i: &'a Index, platform: &Platform) -> Result<&'a Descriptor, String> {
    i.manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.accepts(p)))
        .ok_or_else(|| {
            let have: Vec<String> = i
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                .collect();
            format!(
                "no manifest for platform {platform} in the index (it has: {})",
                have.join(", ")
            )
        })
}

fn read_capped(
    url: &str,
    resp: ureq::Response,
    max: u64,
    what: &str,
) -> Result<Vec<u8>, RemoteError> {
    let mut body = Vec::new();
    resp.into_reader()
        .take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| RemoteError::transient(url, format!("{what}: {e}")))?;
    if body.len() as u64 > max {
        return Err(RemoteError::permanent(
            url,
            format!("{what} larger than {max} bytes"),
        ));
    }
    Ok(body)
}

/// The upload location a reply names, made absolute.
fn location(url: &str, resp: &ureq::Response) -> Result<String, RemoteError> {
    let loc = resp
        .header("location")
        .ok_or_else(|| RemoteError::permanent(url, "upload reply without a Location"))?;
    url::Url::parse(url)
        .and_then(|u| u.join(loc))
        .map(|u| u.to_string())
        .map_err(|e| RemoteError::permanent(url, format!("upload Location {loc:?}: {e}")))
}

fn with_query(url: &str, q: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{q}")
}

/// A blob's bytes as they arrive, checked at the end against the
/// descriptor's size and digest: a stream that fails no check is the blob.
pub struct BlobReader {
    inner: Box<dyn Read + Send>,
    hash: sha2::Sha256,
    seen: u64,
    want: Descriptor,
    place: String,
}

impl BlobReader {
    /// Check `inner` against `want`; `place` names where it comes from.
    pub fn new(inner: Box<dyn Read + Send>, want: Descriptor, place: String) -> BlobReader {
        BlobReader {
            inner: Box::new(inner.take(want.size + 1)),
            hash: sha2::Sha256::new(),
            seen: 0,
            want,
            place,
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        let n = self.inner.read(buf)?;
        self.seen += n as u64;
        if self.seen > self.want.size {
            return Err(bad(format!(
                "blob {} in {} is longer than the {} bytes its manifest says",
                self.want.digest, self.place, self.want.size
            )));
        }
        self.hash.update(&buf[..n]);
        if n == 0 && !buf.is_empty() {
            if self.seen != self.want.size {
                return Err(bad(format!(
                    "blob {} in {} ended after {} of its {} bytes",
                    self.want.digest, self.place, self.seen, self.want.size
                )));
            }
            let got = Digest::from_hasher(std::mem::take(&mut self.hash));
            if got != self.want.digest {
                return Err(bad(format!(
                    "blob {} in {} has digest {got}: its bytes do not match the manifest",
                    self.want.digest, self.place
                )));
            }
        }
        Ok(n)
    }
}
