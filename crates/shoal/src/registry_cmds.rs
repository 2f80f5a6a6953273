//! `shoal convert` and `shoal push`: the registry side of images, wired
//! from the command line to `shoal-convert`. Network settings (proxy,
//! mirrors, insecure registries) come from the same TOML as the daemon's.

use anyhow::{Context, Result};
use shoal_convert::{ConvertOptions, Progress, PushRequest};
use shoal_registry::{Client, Credentials, ImageConfig, Platform, Reference};
use std::path::PathBuf;

/// Network flags shared by the registry commands.
#[derive(clap::Args, Clone, Debug)]
pub struct NetArgs {
    /// Basic credentials for the registries named (else the Docker config's).
    #[arg(long, value_name = "USER:PASS")]
    creds: Option<String>,
    /// Allow plain http to the registries named although not loopback.
    #[arg(long)]
    insecure: bool,
    /// Settings (proxy, mirrors, timeouts): the daemon's TOML. Default:
    /// $SHOAL_CONFIG, else /etc/shoal/shoal.toml if it exists.
    #[arg(long, value_name = "FILE")]
    settings: Option<PathBuf>,
}

impl NetArgs {
    /// A client for talking to `hosts`.
    fn client(&self, hosts: &[&str]) -> Result<Client> {
        let cfg = crate::daemon::Config::load(
            crate::daemon::Config::path(self.settings.clone()).as_deref(),
        )?;
        let mut http = cfg.http_options()?;
        // Whole layers stream through one request: the daemon's per-read
        // deadline does not apply (silence is still bounded by
        // read_timeout_secs).
        http.deadline = std::time::Duration::from_secs(6 * 3600);
        if self.insecure {
            http.insecure.extend(hosts.iter().map(|h| h.to_string()));
        }
        let client = Client::new(http);
        if let Some(c) = &self.creds {
            let c = Credentials::parse(c).map_err(anyhow::Error::msg)?;
            for h in hosts {
                client.set_credentials(h, c.clone());
            }
        }
        Ok(client)
    }
}

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// oci://host[:port]/repo:tag (or @sha256:…), or oci-layout:DIR[:tag].
    source: String,
    /// oci://host[:port]/repo:tag
    destination: String,
    /// os/arch[/variant] chosen from an index (default: this machine's).
    #[arg(long)]
    platform: Option<String>,
    #[arg(long, default_value_t = 1 << 20)]
    chunk_size: u64,
    /// Reference chunks of an earlier shoal image (oci://… or a bootstrap
    /// path) instead of storing them again; repeatable.
    #[arg(long, value_name = "REF|BOOTSTRAP")]
    chunk_dict: Vec<String>,
    /// Stored in the superblock's volume name and the bootstrap's annotation.
    #[arg(long)]
    fsid: Option<String>,
    /// Keep the bootstrap (DIR/image.boot) and blobs (DIR/blobs/) here.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    #[arg(long, default_value = "64G", value_parser = crate::parse_size)]
    max_size: u64,
    /// Write no inode fingerprints (`erofs.fingerprint.v1`), which let
    /// mounts of one domain share page cache on Linux 7.0+.
    #[arg(long)]
    no_fingerprints: bool,
    /// How blobs are stored in the registry: `zstd[:LEVEL]` (independent
    /// frames a lazy reader fetches and verifies by range) or `none`.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compress: erofs::Compression,
    /// Lay the top layer's blob out with these files first (absolute
    /// paths, one per line; `shoal order` writes one from a recorded run),
    /// as `shoal build --order` does; lower layers are never reordered.
    #[arg(long, value_name = "FILE")]
    order: Option<PathBuf>,
    /// The zstd level of the frames a recorded start (`--order`) fetches
    /// first at every cold start: worth more compressor time than the rest.
    #[arg(long, default_value_t = erofs::compress::START_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    start_level: i32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
}

pub fn parse_compression(s: &str) -> Result<erofs::Compression, String> {
    s.parse()
}

fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let src = shoal_convert::SourceRef::parse(&a.source)?;
    let dst = Reference::parse(&a.destination)
        .map_err(|e| anyhow::anyhow!("destination {}: {e}", a.destination))?;
    let mut hosts = vec![dst.host.as_str()];
    if let shoal_convert::SourceRef::Registry(r) = &src {
        hosts.push(r.host.as_str());
    }
    let client = a.net.client(&hosts)?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p).map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let opts = ConvertOptions {
        platform,
        chunk_size: a.chunk_size,
        chunk_dicts: a.chunk_dict.clone(),
        fsid: a.fsid.clone(),
        output: a.output.clone(),
        max_size: (a.max_size > 0).then_some(a.max_size),
        fingerprints: !a.no_fingerprints,
        compress: a.compress,
        order: a.order.clone(),
        start_level: a.start_level,
        progress: !a.json,
    };
    let r = shoal_convert::convert(&client, &src, &dst, &opts)
        .with_context(|| format!("converting {} to {}", a.source, a.destination))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("converted {} ({})", r.source, r.source_manifest);
    println!("       to {} ({})", r.reference, r.manifest_digest);
    println!(
        "  {} layers, {} → {} blobs, {} ({} in the registry); bootstrap {}",
        r.layers,
        mb(r.source_bytes),
        r.blobs,
        mb(r.blob_bytes),
        mb(r.remote_bytes),
        mb(r.bootstrap_bytes)
    );
    println!(
        "  {} chunks: {} reused from chunk dictionaries, {} deduplicated",
        r.chunks, r.chunks_reused, r.chunks_deduped
    );
    println!(
        "  uploaded {} ({} blobs; {} already there, {} mounted) in {:.2} s",
        mb(r.uploaded_bytes),
        r.blobs_uploaded,
        r.blobs_existing,
        r.blobs_mounted,
        r.seconds
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    image: PathBuf,
    #[arg(long)]
    blob_dir: PathBuf,
    /// oci://host[:port]/repo:tag
    reference: String,
    /// The image config (JSON: entry point, env, …); default: a minimal one
    /// for this machine's platform.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How blobs are stored in the registry. An image built without a
    /// frame table is compressed on the way (objects written to the blob
    /// directory); the bootstrap pushed then carries the table, so its
    /// digest differs from the local file's. `none` pushes raw blobs of an
    /// uncompressed image; a compressed image is pushed as built.
    #[arg(long, default_value = "zstd", value_parser = parse_compression)]
    compress: erofs::Compression,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
}

pub fn push(a: PushArgs) -> Result<()> {
    let dst =
        Reference::parse(&a.reference).map_err(|e| anyhow::anyhow!("{}: {e}", a.reference))?;
    let client = a.net.client(&[dst.host.as_str()])?;
    let config = match &a.config {
        Some(p) => {
            let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_slice::<ImageConfig>(&text)
                .with_context(|| format!("{}: not an image config", p.display()))?
        }
        None => ImageConfig::minimal(&Platform::host(), Vec::new()),
    };
    // The compressed bootstrap lives in a temporary file for the push.
    let mut _compressed = None;
    let image = match compressed_bootstrap(&a.image, &a.blob_dir, a.compress)? {
        Some(tmp) => _compressed.insert(tmp).path().to_path_buf(),
        None => a.image.clone(),
    };
    let req = PushRequest::for_image(&image, &a.blob_dir, config)?;
    let r = shoal_convert::push_image(&client.repository(&dst), req, &Progress::new(!a.json))
        .with_context(|| format!("pushing {} to {}", a.image.display(), a.reference))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "pushed {} ({}): {} bytes uploaded, {} blobs already there, {} mounted",
            r.reference, r.manifest_digest, r.uploaded_bytes, r.blobs_existing, r.blobs_mounted
        );
    }
    Ok(())
}

/// With zstd and an image without a frame table: the image with one, its
/// blobs' objects written to `blob_dir`.
fn compressed_bootstrap(
    image: &std::path::Path,
    blob_dir: &std::path::Path,
    compress: erofs::Compression,
) -> Result<Option<tempfile::NamedTempFile>> {
    let erofs::Compression::Zstd { level } = compress else {
        return Ok(None);
    };
    let bytes = std::fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let img = erofs::Image::open(bytes.as_slice())
        .with_context(|| format!("reading {}", image.display()))?;
    if img
        .chunk_table
        .as_ref()
        .is_some_and(|t| !t.frames.is_empty())
    {
        return Ok(None);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (out, objects) = erofs::compress::compress_image(
        &bytes,
        blob_dir,
        &Default::default(),
        &erofs::compress::Levels::uniform(level),
        threads,
    )
    .with_context(|| format!("compressing the blobs of {}", image.display()))?;
    if objects.is_empty() {
        return Ok(None);
    }
    let mut tmp = tempfile::NamedTempFile::new().context("creating a temporary bootstrap")?;
    std::io::Write::write_all(&mut tmp, &out).context("writing a temporary bootstrap")?;
    Ok(Some(tmp))
}
