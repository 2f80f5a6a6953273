//! `shoal bench build`: shoal build vs `mkfs.erofs --blobdev --chunksize` on
//! the corpus trees. Each builder runs under `/usr/bin/time` (wall time and
//! peak RSS of that process alone), best of N runs, warm page cache.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const COMBOS: &[(&str, &[&str])] = &[
    ("base", &["base.tar.gz"]),
    ("base+py", &["base.tar.gz", "py-layer.tar.gz"]),
    (
        "base+py+slim",
        &["base.tar.gz", "py-layer.tar.gz", "slim-layer.tar.gz"],
    ),
    ("base+web", &["base.tar.gz", "web-layer.tar.zst"]),
];

struct Run {
    wall: f64,
    rss_kb: u64,
}

/// Run a command `runs` times; best wall time, max peak RSS.
fn measure(cmd: &[&std::ffi::OsStr], runs: usize, work: &Path, before: &dyn Fn()) -> Result<Run> {
    let mut best = Run {
        wall: f64::MAX,
        rss_kb: 0,
    };
    let stats = work.join("time.out");
    for _ in 0..runs {
        before();
        let st = Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%e %M")
            .arg("-o")
            .arg(&stats)
            .args(cmd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running /usr/bin/time (Debian package `time`)")?;
        if !st.success() {
            bail!("{:?} failed", cmd);
        }
        let s = std::fs::read_to_string(&stats)?;
        let mut it = s.split_whitespace();
        let wall: f64 = it.next().context("time output")?.parse()?;
        let rss: u64 = it.next().context("time output")?.parse()?;
        best.wall = best.wall.min(wall);
        best.rss_kb = best.rss_kb.max(rss);
    }
    Ok(best)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        n += e?.metadata()?.len();
    }
    Ok(n)
}

fn reset(paths: &[&Path]) {
    for p in paths {
        let _ = std::fs::remove_dir_all(p);
        let _ = std::fs::remove_file(p);
    }
}

/// The builders shoal is compared with.
pub struct Peers {
    pub mkfs: PathBuf,
    pub nydus: Option<PathBuf>,
}

impl Peers {
    pub fn find(mkfs: Option<PathBuf>, nydus: Option<PathBuf>) -> Peers {
        let peers = Path::new("../shared/peers/bin");
        let mkfs = mkfs.unwrap_or_else(|| {
            let p = peers.join("mkfs.erofs");
            if p.exists() {
                p
            } else {
                "mkfs.erofs".into()
            }
        });
        let nydus = nydus.or_else(|| Some(peers.join("nydus")).filter(|p| p.exists()));
        Peers { mkfs, nydus }
    }
}

/// Version line of a builder, for the table.
fn version(cmd: &Path) -> String {
    Command::new(cmd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let t = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            t.split_whitespace()
                .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// One tree's measurements: where it builds, how many runs, what with.
struct Bench<'a> {
    me: PathBuf,
    work: &'a Path,
    name: &'a str,
    chunk_size: u64,
    runs: usize,
}

pub fn run(corpus: &Path, chunk_size: u64, runs: usize, peers: &Peers) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    println!(
        "| tree | builder (input) | wall s | peak RSS MiB | bootstrap bytes (EROFS + digest table) | blob bytes | total bytes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (name, layers) in COMBOS {
        let layers: Vec<PathBuf> = layers.iter().map(|l| corpus.join(l)).collect();
        if !layers.iter().all(|l| l.exists()) {
            println!(
                "| {name} | skipped: corpus layers missing under {} | | | | | |",
                corpus.display()
            );
            continue;
        }
        let b = Bench {
            me: std::env::current_exe()?,
            work: tmp.path(),
            name,
            chunk_size,
            runs,
        };
        b.shoal(&layers, "shoal (tar layers)", None)?;
        b.shoal(
            &layers,
            "shoal --compress zstd (tar layers; bytes: the objects)",
            Some("zstd"),
        )?;
        // The same tree as a directory, for every builder.
        let tree = b.extract()?;
        b.shoal(std::slice::from_ref(&tree), "shoal (directory)", None)?;
        b.shoal(
            std::slice::from_ref(&tree),
            "shoal --compress zstd (directory; bytes: the objects)",
            Some("zstd"),
        )?;
        b.mkfs(&peers.mkfs, &tree)?;
        if let Some(nydus) = &peers.nydus {
            for c in ["none", "zstd"] {
                b.nydus(nydus, c, &tree)?;
            }
        }
        reset(&[&tree, &b.img(), &b.blobs()]);
    }
    Ok(())
}

impl Bench<'_> {
    fn img(&self) -> PathBuf {
        self.work.join("s.img")
    }

    fn blobs(&self) -> PathBuf {
        self.work.join("blobs")
    }

    /// `shoal build` of `inputs`; with `compress`, the blob bytes are the
    /// remote objects'.
    fn shoal(&self, inputs: &[PathBuf], who: &str, compress: Option<&str>) -> Result<()> {
        let (img, blobs, cs) = (self.img(), self.blobs(), self.chunk_size.to_string());
        let mut cmd: Vec<&std::ffi::OsStr> = vec![
            self.me.as_os_str(),
            "build".as_ref(),
            "-o".as_ref(),
            img.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            "--chunk-size".as_ref(),
            cs.as_ref(),
        ];
        cmd.extend(inputs.iter().map(|l| l.as_os_str()));
        if let Some(c) = compress {
            cmd.extend([std::ffi::OsStr::new("--compress"), std::ffi::OsStr::new(c)]);
        }
        let r = measure(&cmd, self.runs, self.work, &|| reset(&[&img, &blobs]))?;
        let data = match compress {
            Some(_) => remote_objects(&img, &blobs)?,
            None => dir_bytes(&blobs)?,
        };
        let meta = std::fs::metadata(&img)?.len();
        row(self.name, who, &r, meta, erofs_part(&img)?, data);
        Ok(())
    }

    /// The last image built, extracted to a directory.
    fn extract(&self) -> Result<PathBuf> {
        let tree = self.work.join("tree");
        reset(&[&tree]);
        let st = Command::new(&self.me)
            .args([
                "extract".as_ref(),
                self.img().as_os_str(),
                tree.as_os_str(),
                "--blob-dir".as_ref(),
                self.blobs().as_os_str(),
            ])
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("extracting {}", self.name);
        }
        Ok(tree)
    }

    fn mkfs(&self, mkfs: &Path, tree: &Path) -> Result<()> {
        let (mimg, mblob) = (self.work.join("m.img"), self.work.join("m.blob"));
        let chunk_arg = format!("--chunksize={}", self.chunk_size);
        let blob_arg = format!("--blobdev={}", mblob.display());
        let cmd: Vec<&std::ffi::OsStr> = vec![
            mkfs.as_os_str(),
            chunk_arg.as_ref(),
            blob_arg.as_ref(),
            mimg.as_os_str(),
            tree.as_os_str(),
        ];
        let who = format!("mkfs.erofs {} (directory)", version(mkfs));
        match measure(&cmd, self.runs, self.work, &|| reset(&[&mimg, &mblob])) {
            Ok(r) => {
                let b = std::fs::metadata(&mimg)?.len();
                row(self.name, &who, &r, b, b, std::fs::metadata(&mblob)?.len());
            }
            Err(e) => println!("| {} | mkfs.erofs: {e:#} | | | | | |", self.name),
        }
        reset(&[&mimg, &mblob]);
        Ok(())
    }

    fn nydus(&self, nydus: &Path, compressor: &str, tree: &Path) -> Result<()> {
        let (nboot, nblobs) = (self.work.join("n.boot"), self.work.join("nblobs"));
        let cs = self.chunk_size.to_string();
        std::fs::create_dir_all(&nblobs)?;
        let cmd: Vec<&std::ffi::OsStr> = vec![
            nydus.as_os_str(),
            "build".as_ref(),
            "--compressor".as_ref(),
            compressor.as_ref(),
            "--chunk-size".as_ref(),
            cs.as_ref(),
            "--blob-dir".as_ref(),
            nblobs.as_os_str(),
            "--bootstrap".as_ref(),
            nboot.as_os_str(),
            tree.as_os_str(),
        ];
        let who = format!("nydus build --compressor {compressor} (directory)");
        let before = || {
            reset(&[&nboot, &nblobs]);
            let _ = std::fs::create_dir_all(&nblobs);
        };
        match measure(&cmd, self.runs, self.work, &before) {
            Ok(r) => {
                let b = std::fs::metadata(&nboot)?.len();
                row(self.name, &who, &r, b, b, dir_bytes(&nblobs)?);
            }
            Err(e) => println!("| {} | nydus build: {e:#} | | | | | |", self.name),
        }
        reset(&[&nboot, &nblobs]);
        Ok(())
    }
}

/// Bytes of the compressed remote objects an image names, in `blobs`.
fn remote_objects(img: &Path, blobs: &Path) -> Result<u64> {
    let i = crate::image_cmds::open_image(img)?;
    let mut n = 0;
    for f in i.chunk_table.iter().flat_map(|t| &t.frames) {
        n += std::fs::metadata(blobs.join(f.object_name()))?.len();
    }
    Ok(n)
}

/// Bytes of the EROFS filesystem proper (without shoal's digest table).
fn erofs_part(img: &Path) -> Result<u64> {
    let i = crate::image_cmds::open_image(img)?;
    Ok(u64::from(i.sb.blocks.get()) * i.block_size())
}

fn row(name: &str, who: &str, r: &Run, bootstrap: u64, erofs: u64, blob: u64) {
    let boot = if bootstrap == erofs {
        format!("{bootstrap}")
    } else {
        format!("{bootstrap} ({erofs} + {})", bootstrap - erofs)
    };
    println!(
        "| {name} | {who} | {:.2} | {:.1} | {boot} | {blob} | {} |",
        r.wall,
        r.rss_kb as f64 / 1024.0,
        bootstrap + blob
    );
}

/// `shoal bench fetch`: cold fetch of every chunk of an image into a fresh
/// domain cache with N concurrent readers, vs `curl` of the same blobs; and
/// the daemon's RSS with 10 bound images.
pub fn fetch(
    image: &Path,
    remote: &str,
    curl_prefix: Option<&str>,
    readers: &[usize],
) -> Result<()> {
    use shoal_core::{BindSpec, Registry, RegistryOptions};
    let img = crate::image_cmds::open_image(image)?;
    let tags: Vec<String> = (1..=img.devices.len() as u16)
        .filter_map(|d| img.device_tag(d))
        .collect();
    let total: u64 = img
        .devices
        .iter()
        .map(|d| u64::from(d.blocks.get()) * 4096)
        .sum();
    println!("| remote | readers | bytes | seconds | MB/s |");
    println!("|---|---:|---:|---:|---:|");
    for &n in readers {
        let work = tempfile::tempdir()?;
        let reg = Registry::new(work.path(), RegistryOptions::default())?;
        let bound = reg.bind(BindSpec {
            domain: Some("bench".into()),
            fsid: "bench".into(),
            bootstrap: image.to_path_buf(),
            remote: remote.to_string(),
            reference: None,
        })?;
        let t = std::time::Instant::now();
        let bytes = bound.prefetch(&[], n)?;
        reg.flush_all();
        let s = t.elapsed().as_secs_f64();
        println!(
            "| shoal {remote} | {n} | {bytes} | {s:.2} | {:.0} |",
            bytes as f64 / s / 1e6
        );
    }
    if let Some(prefix) = curl_prefix {
        let t = std::time::Instant::now();
        for tag in &tags {
            let st = Command::new("curl")
                .args(["-sf", "-o", "/dev/null"])
                .arg(format!("{prefix}{tag}"))
                .status()
                .context("running curl")?;
            if !st.success() {
                bail!("curl {prefix}{tag} failed");
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "| curl {prefix} | 1 | {total} | {s:.2} | {:.0} |",
            total as f64 / s / 1e6
        );
    }
    Ok(())
}

/// RSS of a daemon with `n` images bound (each in its own private volume).
pub fn daemon_rss(image: &Path, remote: &str, n: usize) -> Result<()> {
    let me = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let sock = tmp.path().join("s.sock");
    let mut child = Command::new(&me)
        .arg("daemon")
        .arg("--socket")
        .arg(&sock)
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if t.elapsed().as_secs() > 10 {
            let _ = child.kill();
            bail!("daemon did not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let idle = rss(child.id());
    let image = std::fs::canonicalize(image)?;
    for i in 0..n {
        crate::daemon_cmds::bind(
            &sock,
            None,
            Some(format!("img{i}")),
            image.to_str().unwrap(),
            Some(remote.into()),
        )?;
    }
    let bound = rss(child.id());
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    println!("| daemon RSS idle | {:.1} MiB |", idle as f64 / 1024.0);
    println!(
        "| daemon RSS with {n} bound images | {:.1} MiB |",
        bound as f64 / 1024.0
    );
    Ok(())
}
