//! The live half of `shoal demo`: a daemon of its own and a local remote,
//! two images sharing a base mounted lazily in one domain (bound and read
//! through the control API where mounts are not possible), and with
//! `--containers` a container started lazily by containerd through `shoal
//! snapshotter`.

use crate::daemon_cmds;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGTERM, then waited for) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc> {
    let f = std::fs::File::create(log)?;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    Ok(Proc(child))
}

fn wait_socket(path: &Path, what: &str) -> Result<()> {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not come up at {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn daemon(work: &Path) -> Result<(Proc, PathBuf)> {
    let dir = work.join("daemon");
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("shoal.sock");
    let exe = std::env::current_exe()?;
    let p = spawn(
        Command::new(&exe)
            .args(["daemon", "--socket"])
            .arg(&sock)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .env("SHOAL_LOG", "warn")
            .env_remove("SHOAL_CONFIG"),
        &dir.join("daemon.log"),
    )?;
    wait_socket(&sock, "the shoal daemon")?;
    Ok((p, sock))
}

/// Two images that share a base, in one domain: mounted if the kernel
/// lets us, else bound; a file read through each; the status shows the
/// base blob referenced twice and fetched once.
pub fn domain(work: &Path, images: [(&str, &Path); 2], blobs: &Path) -> Result<()> {
    let (_daemon, sock) = daemon(work)?;
    let remote = format!("file://{}", std::fs::canonicalize(blobs)?.display());
    println!(
        "daemon on {}, blobs from the local remote {remote}",
        sock.display()
    );
    let mut mounted = Vec::new();
    for (fsid, img) in images {
        let mnt = work.join(format!("mnt-{fsid}"));
        std::fs::create_dir_all(&mnt)?;
        let img_s = img.display().to_string();
        let m = daemon_cmds::mount(
            &sock,
            crate::api::Frontend::Auto,
            Some("demo".into()),
            Some(fsid.into()),
            &img_s,
            Some(remote.clone()),
            &mnt,
        );
        match m {
            Ok(()) => {
                let text = std::fs::read_to_string(mnt.join("etc/os-release"))?;
                println!(
                    "{fsid}: /etc/os-release through the mount: {}",
                    text.lines().next().unwrap_or("")
                );
                mounted.push(mnt);
            }
            Err(e) => {
                println!("{fsid}: not mounted ({e:#}); bound and read through the daemon instead");
                daemon_cmds::bind(
                    &sock,
                    Some("demo".into()),
                    Some(fsid.into()),
                    &img_s,
                    Some(remote.clone()),
                )?;
                daemon_cmds::read(&sock, Some("demo".into()), fsid, "/etc/os-release")?;
            }
        }
    }
    println!("\nstatus: the base blob has refs=2 and was fetched once for both images");
    daemon_cmds::status(&sock, false)?;
    for m in mounted {
        daemon_cmds::umount(&sock, &m)?;
    }
    stop_pump(&work.join("daemon/work"));
    Ok(())
}

fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// Why `--containers` cannot run here, if it cannot.
fn containers_missing(corpus: &Path) -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root".into());
    }
    if let Some(t) = ["containerd", "ctr", "ctr-remote", "runc", "docker-registry"]
        .iter()
        .find(|t| !have(t))
    {
        return Some(format!("{t} is not installed"));
    }
    (!corpus.join("base.tar.gz").exists())
        .then(|| format!("no corpus at {} (--corpus DIR)", corpus.display()))
}

/// docker-registry on a free loopback port; returns it and `host:port`.
fn registry(dir: &Path) -> Result<(Proc, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = dir.join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.join("registry").display()
        ),
    )?;
    let reg = spawn(
        Command::new("docker-registry").arg("serve").arg(&cfg),
        &dir.join("registry.log"),
    )?;
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(20),
            "docker-registry did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((reg, format!("127.0.0.1:{port}")))
}

/// The corpus base layer as an ordinary OCI image, converted into the
/// registry at `host`; returns the shoal image's name.
fn convert_base(dir: &Path, corpus: &Path, host: &str) -> Result<String> {
    let layout = dir.join("base-oci");
    let cmd = ["cat", "/etc/os-release"];
    crate::oci_layout::write(&layout, "base", &[corpus.join("base.tar.gz")], &cmd)?;
    let dst = shoal_registry::Reference::parse(&format!("oci://{host}/demo/base:v1"))
        .map_err(anyhow::Error::msg)?;
    let opts = shoal_convert::ConvertOptions {
        platform: shoal_registry::Platform::host(),
        chunk_size: 1 << 20,
        chunk_dicts: vec![],
        fsid: None,
        output: None,
        max_size: None,
        fingerprints: true,
        compress: erofs::Compression::ZSTD,
        order: None,
        start_level: erofs::compress::START_LEVEL,
        progress: false,
    };
    let src = shoal_convert::SourceRef::parse(&format!("oci-layout:{}:base", layout.display()))?;
    let r = shoal_convert::convert(
        &shoal_registry::Client::new(Default::default()),
        &src,
        &dst,
        &opts,
    )?;
    println!(
        "converted the corpus base image: {} bytes of gzip layers -> {} blob, bootstrap {} bytes",
        r.source_bytes, r.blobs, r.bootstrap_bytes
    );
    Ok(format!("{host}/demo/base:v1"))
}

/// `shoal snapshotter` and a containerd using it; returns both and
/// containerd's socket.
fn snapshotter_and_containerd(dir: &Path, daemon: &Path) -> Result<(Proc, Proc, PathBuf)> {
    let sn_sock = dir.join("snapshotter.sock");
    let sn = spawn(
        Command::new(std::env::current_exe()?)
            .args(["snapshotter", "--socket"])
            .arg(&sn_sock)
            .arg("--root")
            .arg(dir.join("snapshotter"))
            .arg("--daemon-socket")
            .arg(daemon)
            .env("SHOAL_LOG", "warn"),
        &dir.join("snapshotter.log"),
    )?;
    wait_socket(&sn_sock, "the shoal snapshotter")?;
    let ctd = dir.join("containerd");
    std::fs::create_dir_all(&ctd)?;
    let sock = ctd.join("containerd.sock");
    std::fs::write(
        ctd.join("config.toml"),
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{s}\"\n[proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{sn}\"\n",
            d = ctd.display(),
            s = sock.display(),
            sn = sn_sock.display()
        ),
    )?;
    let c = spawn(
        Command::new("containerd")
            .arg("--config")
            .arg(ctd.join("config.toml")),
        &ctd.join("containerd.log"),
    )?;
    wait_socket(&sock, "containerd")?;
    Ok((sn, c, sock))
}

/// `tool` (ctr or ctr-remote) in the demo's namespace; its stdout.
fn ctr(sock: &Path, tool: &str, args: &[&str]) -> Result<String> {
    let o = Command::new(tool)
        .arg("--address")
        .arg(sock)
        .args(["-n", "shoal-demo"])
        .args(args)
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A Debian base image (the corpus layer) in a local registry, converted,
/// pulled lazily by containerd through `shoal snapshotter`, and run.
pub fn containers(work: &Path, corpus: &Path) -> Result<()> {
    if let Some(why) = containers_missing(corpus) {
        println!("containers skipped: {why}");
        return Ok(());
    }
    let dir = work.join("containers");
    std::fs::create_dir_all(&dir)?;
    let (_reg, host) = registry(&dir)?;
    let image = convert_base(&dir, corpus, &host)?;
    let (_daemon, sock) = daemon(&dir)?;
    let (_sn, _ctd, ctd) = snapshotter_and_containerd(&dir, &sock)?;
    let t = Instant::now();
    ctr(
        &ctd,
        "ctr-remote",
        &[
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "shoal",
            &image,
        ],
    )?;
    let pulled = t.elapsed();
    let out = ctr(
        &ctd,
        "ctr",
        &[
            "run",
            "--snapshotter",
            "shoal",
            &image,
            "demo",
            "cat",
            "/etc/os-release",
        ],
    )?;
    println!(
        "pulled in {:.2} s (only the bootstrap), ran in {:.2} s more:\n{}",
        pulled.as_secs_f64(),
        (t.elapsed() - pulled).as_secs_f64(),
        out.lines().take(2).collect::<Vec<_>>().join("\n")
    );
    println!("\nstatus: the image's blobs are fetched only as far as the container read them");
    daemon_cmds::status(&sock, false)?;
    // Removing the container removes its snapshot (when containerd's
    // garbage collector runs): the image is unmounted then.
    ctr(&ctd, "ctr", &["containers", "rm", "demo"])?;
    let t = Instant::now();
    while let Some(mp) = mounted_under(&dir.join("snapshotter/mounts")) {
        if t.elapsed() > Duration::from_secs(10) {
            daemon_cmds::umount(&sock, &mp)?;
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    println!("container removed, image unmounted");
    stop_pump(&dir.join("daemon/work"));
    Ok(())
}

/// A mount point below `dir`, if any.
fn mounted_under(dir: &Path) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .find(|p| p.starts_with(dir))
}

/// The fanotify pump outlives daemons by design; the demo's goes with it.
fn stop_pump(work: &Path) {
    let pattern = format!(
        "fanotify-pump --socket {}",
        shoal_core::WorkDir::new(work).pump_socket().display()
    );
    let _ = Command::new("pkill").arg("-f").arg(pattern).status();
}
