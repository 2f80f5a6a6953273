//! The `shoal` command: wires the format library (and later the domain core
//! and frontends) into a CLI.
#![forbid(unsafe_code)]

mod api;
mod bench;
mod client;
mod daemon;
mod daemon_cmds;
mod demo;
mod demo_live;
mod extract;
mod features;
mod image_cmds;
mod mounts;
mod netem;
mod oci_layout;
mod order_cmd;
mod registry_cmds;
mod snapshotter_cmd;
mod walk;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "EROFS images with shared, lazily fetched blob domains"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// How `shoal mount` mounts: a daemon frontend, or `local` (the kernel
/// mounts the bootstrap with local blobs, no daemon).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum MountWith {
    /// The first frontend this kernel supports (see `shoal doctor`).
    Auto,
    /// File-backed erofs, filled on fanotify pre-content events (6.14+).
    Fanotify,
    /// erofs over cachefiles on-demand (Linux 6.1–7.1).
    Fscache,
    /// Served by the daemon over FUSE.
    Fuse,
    /// The kernel mounts the bootstrap with local blobs.
    Local,
}

impl MountWith {
    fn daemon_frontend(self) -> Option<api::Frontend> {
        match self {
            MountWith::Auto => Some(api::Frontend::Auto),
            MountWith::Fanotify => Some(api::Frontend::Fanotify),
            MountWith::Fscache => Some(api::Frontend::Fscache),
            MountWith::Fuse => Some(api::Frontend::Fuse),
            MountWith::Local => None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a bootstrap and content-addressed data blobs from directories or tar layers.
    Build(BuildArgs),
    /// Show superblock, features, blobs, counts and dedup ratio.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Write the files an image's recorded access order touched (the
    /// daemon keeps it at WORK/access/DOMAIN/FSID.order when the image is
    /// unbound), first touch first: the list `shoal build --order` takes.
    Order {
        image: PathBuf,
        recording: PathBuf,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// List a directory (or the whole tree with -R).
    Ls {
        image: PathBuf,
        #[arg(default_value = "/")]
        path: String,
        #[arg(short = 'R', long)]
        recursive: bool,
    },
    /// Write a file's contents to stdout.
    Cat {
        image: PathBuf,
        path: String,
        #[command(flatten)]
        blobs: image_cmds::BlobArgs,
    },
    /// Extract the whole tree with metadata (owners, modes, times, xattrs, links).
    /// Existing directories under DEST are merged into; any other existing
    /// entry is an error, and no symlink is ever followed.
    Extract {
        image: PathBuf,
        dest: PathBuf,
        #[command(flatten)]
        blobs: image_cmds::BlobArgs,
    },
    /// Check every chunk of every blob against the image's digests.
    Verify {
        image: PathBuf,
        #[command(flatten)]
        blobs: image_cmds::BlobArgs,
    },
    /// Mount an image.
    ///
    /// `--frontend local`: the kernel mounts the bootstrap file-backed with
    /// local blobs (`--blob-dir`/`--device`). Otherwise the daemon binds the
    /// image into its domain, blobs fetched on demand from `--remote`, and
    /// mounts it with `fanotify` (file-backed erofs over the domain's cache
    /// files, filled on first access; Linux 6.14+), `fscache` (cachefiles
    /// on-demand; Linux 6.1–7.1) or `fuse`; `auto` (the default) picks what
    /// the kernel supports (see `shoal doctor`).
    Mount(MountArgs),
    /// Unmount a shoal mount (daemon-hosted mounts are also unbound).
    Umount {
        mountpoint: PathBuf,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Which kernel features each frontend needs, which are here, and
    /// which frontend `--frontend auto` picks; live mounts if a daemon runs.
    Doctor {
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The fanotify event pump (started by the daemon; not for direct use).
    #[command(hide = true)]
    FanotifyPump {
        #[arg(long)]
        socket: PathBuf,
        /// Seconds an event waits for a daemon before its read gets EIO.
        #[arg(long, default_value_t = 60)]
        orphan_timeout: u64,
    },
    /// A TCP proxy that adds round-trip delay and a shared bandwidth cap,
    /// for benchmarks on kernels without netem (not for production use).
    #[command(hide = true)]
    NetProxy(netem::NetProxyArgs),
    /// Run the daemon: domains, blob caches and the control API.
    Daemon(DaemonArgs),
    /// Bind an image into a domain (or its own private volume) in the daemon.
    Bind {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        fsid: Option<String>,
        /// A bootstrap path, or oci://host/repo:tag as pushed by `shoal push`.
        image: String,
        /// Where the blobs come from: file:///dir, http(s)://host/prefix/, oci://host/repo.
        #[arg(long)]
        remote: Option<String>,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Unbind an image; blobs it alone used leave the domain.
    Unbind {
        #[arg(long)]
        domain: Option<String>,
        fsid: String,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Domains, images and blobs with refcounts, cache and fetch counters.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Read a file of a bound image through the domain cache (to stdout).
    Read {
        #[arg(long)]
        domain: Option<String>,
        fsid: String,
        path: String,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Evict cached blobs no bound image uses, least recently used first.
    Gc {
        /// Shrink the cache to at most this many bytes (0: evict every unused blob).
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Fetch a bound image's blobs in the background.
    Prefetch {
        #[arg(long)]
        domain: Option<String>,
        fsid: String,
        /// First in the order recorded when the image was last unbound.
        #[arg(long)]
        recorded: bool,
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Publish a bootstrap and its blobs to an OCI registry as an image
    /// containerd pulls (blobs, then the bootstrap, as layers).
    Push(registry_cmds::PushArgs),
    /// Convert an OCI image (registry or OCI layout) into a shoal image in
    /// a registry: layers streamed into one blob each, never unpacked.
    Convert(registry_cmds::ConvertArgs),
    /// containerd's proxy snapshotter: shoal images mount lazily through
    /// the daemon; other images get overlayfs snapshots.
    Snapshotter(snapshotter_cmd::SnapshotterArgs),
    /// Benchmarks that print a table.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Build two images from the bundled example that share a base layer,
    /// then inspect, verify and (where the kernel allows) mount them.
    Demo {
        /// Where to put the demo's images and blobs.
        #[arg(long, default_value = "target/demo")]
        work_dir: PathBuf,
        /// Also start a container lazily with containerd and `shoal
        /// snapshotter` (needs root, containerd, ctr-remote, runc,
        /// docker-registry and the corpus).
        #[arg(long)]
        containers: bool,
        /// The corpus of tar layers, for --containers.
        #[arg(long, default_value = "../shared/corpus")]
        corpus: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// shoal build vs mkfs.erofs --blobdev --chunksize on the corpus trees.
    Build {
        /// Directory with the corpus tar layers.
        #[arg(long, default_value = "../shared/corpus")]
        corpus: PathBuf,
        #[arg(long, default_value_t = 1 << 20)]
        chunk_size: u64,
        /// Runs per measurement (best wall time is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The mkfs.erofs to compare with (default: erofs-utils 1.9.3 of
        /// ../shared/peers if present, else the one on PATH).
        #[arg(long)]
        mkfs: Option<PathBuf>,
        /// nydus v3, for `nydus build` uncompressed and zstd (default:
        /// ../shared/peers/bin/nydus if present).
        #[arg(long)]
        nydus: Option<PathBuf>,
    },
    /// Cold fetch of an image's blobs into a fresh domain cache (1 and 8
    /// readers) vs curl of the same blobs; daemon RSS with 10 bound images.
    Fetch {
        image: PathBuf,
        #[arg(long)]
        remote: String,
        /// URL prefix curl fetches each blob from (blob name appended).
        #[arg(long)]
        curl_prefix: Option<String>,
        #[arg(long, default_values_t = vec![1, 8])]
        readers: Vec<usize>,
        /// Also measure daemon RSS with this many bound images.
        #[arg(long)]
        rss_images: Option<usize>,
    },
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Bootstrap to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Directory the data blobs are written to (named by their sha256).
    #[arg(long)]
    blob_dir: PathBuf,
    /// Chunk size in bytes (power of two, 4096 to 1 GiB).
    #[arg(long, default_value_t = 1 << 20)]
    chunk_size: u64,
    /// Stored in the superblock's volume name (at most 16 bytes).
    #[arg(long)]
    fsid: Option<String>,
    /// One blob per source layer, so images sharing base layers share blobs.
    #[arg(long)]
    layer_blobs: bool,
    /// Reference chunks already in the blobs of this bootstrap (or of every
    /// bootstrap in this directory) instead of writing them again.
    #[arg(long)]
    reuse_blobs: Vec<PathBuf>,
    /// Refuse images holding more file data than this (bytes, or with a
    /// K/M/G/T suffix; 0 for no limit): a small compressed layer can
    /// otherwise expand without bound.
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    max_size: u64,
    /// Write no inode fingerprints (`erofs.fingerprint.v1`, the sha256 of
    /// each file as mkfs.erofs --xattr-inode-digest writes it), which let
    /// mounts of one domain share page cache on Linux 7.0+.
    #[arg(long)]
    no_fingerprints: bool,
    /// Also store each blob compressed for remotes: `zstd[:LEVEL]` writes
    /// an object of independent frames beside each blob (named by its
    /// own sha256) and the frame table into the bootstrap; `none` (the
    /// default) writes only the blobs. `shoal push` compresses too.
    #[arg(long, default_value = "none", value_parser = registry_cmds::parse_compression)]
    compress: erofs::Compression,
    /// Lay the top layer's blob out with these files first (absolute
    /// paths, one per line, most wanted first; `shoal order` writes one
    /// from a run's recorded accesses), so a lazy start's reads are
    /// neighbours and arrive in few requests. Other files follow in
    /// directory order; lower layers are never reordered.
    #[arg(long, value_name = "FILE")]
    order: Option<PathBuf>,
    /// The zstd level of the frames a recorded start (`--order`) fetches
    /// first at every cold start: worth more compressor time than the rest.
    #[arg(long, default_value_t = erofs::compress::START_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    start_level: i32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Directories or tar layers (plain, gzip, zstd), lowest layer first.
    #[arg(required = true)]
    sources: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct MountArgs {
    /// A bootstrap path, or oci://host/repo:tag.
    image: String,
    mountpoint: PathBuf,
    /// Default: local with --blob-dir/--device, else auto.
    #[arg(long, value_enum)]
    frontend: Option<MountWith>,
    #[arg(long)]
    domain: Option<String>,
    #[arg(long)]
    fsid: Option<String>,
    #[arg(long)]
    remote: Option<String>,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    blobs: image_cmds::BlobArgs,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Control socket (default /run/shoal/shoal.sock, or $SHOAL_SOCKET).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Where caches and state live (default /var/lib/shoal).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// TOML settings (socket, work_dir, gc_interval_secs, gc_max_bytes,
    /// retries, connect_timeout_secs, read_timeout_secs); flags win.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// One arm per subcommand: a dispatch table, longer than a screen only
/// because the CLI is wide; each arm calls one function.
fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(
        cli.cmd,
        Cmd::Daemon(_) | Cmd::Snapshotter(_) | Cmd::FanotifyPump { .. } | Cmd::NetProxy(_)
    ) {
        shoal_sys::default_sigpipe();
    }
    match cli.cmd {
        Cmd::Build(a) => build(a),
        Cmd::Inspect { image, json } => image_cmds::inspect(&image, json),
        Cmd::Ls {
            image,
            path,
            recursive,
        } => image_cmds::ls(&image, &path, recursive),
        Cmd::Order {
            image,
            recording,
            output,
        } => order_cmd::order(&image, &recording, output.as_deref()),
        Cmd::Cat { image, path, blobs } => image_cmds::cat(&image, &path, &blobs),
        Cmd::Extract { image, dest, blobs } => image_cmds::extract(&image, &dest, &blobs),
        Cmd::Verify { image, blobs } => image_cmds::verify(&image, &blobs),
        Cmd::Mount(a) => mount(a),
        Cmd::Umount { mountpoint, socket } => {
            daemon_cmds::umount(&daemon_cmds::socket_arg(socket), &mountpoint)
        }
        Cmd::Demo {
            work_dir,
            containers,
            corpus,
        } => demo::run(&work_dir, containers.then_some(corpus.as_path())),
        Cmd::Doctor { socket, json } => daemon_cmds::doctor(&daemon_cmds::socket_arg(socket), json),
        Cmd::FanotifyPump {
            socket,
            orphan_timeout,
        } => Ok(shoal_fanotify::pump::run(
            &socket,
            &shoal_fanotify::pump::PumpOptions {
                orphan_timeout: std::time::Duration::from_secs(orphan_timeout),
            },
        )
        .with_context(|| format!("fanotify pump on {}", socket.display()))?),
        Cmd::NetProxy(a) => netem::run(&a),
        Cmd::Daemon(a) => run_daemon(a),
        Cmd::Bind {
            domain,
            fsid,
            image,
            remote,
            socket,
        } => {
            let v = daemon_cmds::bind(
                &daemon_cmds::socket_arg(socket),
                domain,
                fsid,
                &image,
                remote,
            )?;
            println!("bound {},{}", v.domain.as_deref().unwrap_or("-"), v.fsid);
            Ok(())
        }
        Cmd::Unbind {
            domain,
            fsid,
            socket,
        } => daemon_cmds::unbind(&daemon_cmds::socket_arg(socket), domain, &fsid),
        Cmd::Status { json, socket } => daemon_cmds::status(&daemon_cmds::socket_arg(socket), json),
        Cmd::Read {
            domain,
            fsid,
            path,
            socket,
        } => daemon_cmds::read(&daemon_cmds::socket_arg(socket), domain, &fsid, &path),
        Cmd::Gc { max_bytes, socket } => {
            daemon_cmds::gc(&daemon_cmds::socket_arg(socket), max_bytes)
        }
        Cmd::Prefetch {
            domain,
            fsid,
            recorded,
            socket,
        } => daemon_cmds::prefetch(&daemon_cmds::socket_arg(socket), domain, &fsid, recorded),
        Cmd::Push(a) => registry_cmds::push(a),
        Cmd::Convert(a) => registry_cmds::convert(a),
        Cmd::Snapshotter(a) => snapshotter_cmd::run(a),
        Cmd::Bench { what } => run_bench(what),
    }
}

fn build(a: BuildArgs) -> Result<()> {
    let sde = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => Some(v.parse().context("SOURCE_DATE_EPOCH is not a number")?),
        Err(_) => None,
    };
    let opts = erofs::BuildOptions {
        chunk_size: a.chunk_size,
        layer_blobs: a.layer_blobs,
        reuse: a.reuse_blobs,
        fsid: a.fsid,
        source_date_epoch: sde,
        max_size: (a.max_size > 0).then_some(a.max_size),
        fingerprints: !a.no_fingerprints,
        compress: a.compress,
        order: a.order,
        start_level: a.start_level,
        ..erofs::BuildOptions::default()
    };
    let report = erofs::build(&a.sources, &a.blob_dir, &a.output, &opts)
        .with_context(|| format!("building {}", a.output.display()))?;
    image_cmds::print_build_report(&a.output, &report, a.json)
}

fn mount(a: MountArgs) -> Result<()> {
    let local = !a.blobs.devices.is_empty() || a.blobs.blob_dir.is_some();
    let with = a.frontend.unwrap_or(if local {
        MountWith::Local
    } else {
        MountWith::Auto
    });
    match with.daemon_frontend() {
        None => image_cmds::mount(std::path::Path::new(&a.image), &a.mountpoint, &a.blobs),
        Some(f) => daemon_cmds::mount(
            &daemon_cmds::socket_arg(a.socket),
            f,
            a.domain,
            a.fsid,
            &a.image,
            a.remote,
            &a.mountpoint,
        ),
    }
}

/// Settings file first, then flags win.
fn run_daemon(a: DaemonArgs) -> Result<()> {
    let cfg = daemon::Config::load(daemon::Config::path(a.config).as_deref())?;
    let socket = a
        .socket
        .or(cfg.socket.clone())
        .unwrap_or_else(|| client::socket_path(None));
    let work = a
        .work_dir
        .or(cfg.work_dir.clone())
        .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_WORK_DIR));
    daemon::run(&socket, &work, &cfg)
}

fn run_bench(what: BenchCmd) -> Result<()> {
    match what {
        BenchCmd::Build {
            corpus,
            chunk_size,
            runs,
            mkfs,
            nydus,
        } => bench::run(&corpus, chunk_size, runs, &bench::Peers::find(mkfs, nydus)),
        BenchCmd::Fetch {
            image,
            remote,
            curl_prefix,
            readers,
            rss_images,
        } => {
            bench::fetch(&image, &remote, curl_prefix.as_deref(), &readers)?;
            if let Some(n) = rss_images {
                bench::daemon_rss(&image, &remote, n)?;
            }
            Ok(())
        }
    }
}

/// A byte count with an optional binary suffix: `4096`, `512M`, `64G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix {c:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert_eq!(super::parse_size("64G"), Ok(64 << 30));
        assert_eq!(super::parse_size("2k"), Ok(2048));
        assert!(super::parse_size("1X").is_err());
        assert!(super::parse_size("G").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
