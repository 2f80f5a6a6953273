//! Real servers for the daemon tests: the shoal daemon itself, nginx, a
//! fault-injecting Python HTTP server and Debian's docker-registry.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Daemon {
    pub socket: PathBuf,
    pub work: PathBuf,
    pub log: PathBuf,
    /// More daemon settings (TOML), after the test defaults.
    pub extra_config: String,
    /// Started from this directory with `--work-dir work`, relative (as
    /// from a shell), instead of with `work` absolute.
    relative_from: Option<PathBuf>,
    child: Option<Child>,
}

/// What a test mounts through the daemon.
pub struct MountArgs<'a> {
    pub frontend: &'a str,
    pub domain: Option<&'a str>,
    pub fsid: &'a str,
    pub img: &'a Path,
    pub remote: &'a str,
    pub mnt: &'a Path,
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, "")
    }

    /// A daemon with more settings (mirrors, a proxy) in its TOML.
    pub fn start_with(dir: &Path, extra_config: &str) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let mut d = Daemon {
            socket: dir.join("shoal.sock"),
            work: dir.join("work"),
            log: dir.join("daemon.log"),
            extra_config: extra_config.into(),
            relative_from: None,
            child: None,
        };
        d.restart();
        d
    }

    /// A daemon run from `dir` with the relative `--work-dir work`.
    pub fn start_relative(dir: &Path) -> Daemon {
        std::fs::create_dir_all(dir).unwrap();
        let mut d = Daemon {
            socket: dir.join("shoal.sock"),
            work: dir.join("work"),
            log: dir.join("daemon.log"),
            extra_config: String::new(),
            relative_from: Some(dir.to_path_buf()),
            child: None,
        };
        d.restart();
        d
    }

    /// Start (again) on the same socket and work directory.
    pub fn restart(&mut self) {
        let cfg = self.work.with_extension("toml");
        std::fs::write(
            &cfg,
            format!(
                "retries = 3\nconnect_timeout_secs = 2\nread_timeout_secs = 2\n{}",
                self.extra_config
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args(["daemon", "--socket"]).arg(&self.socket);
        match &self.relative_from {
            Some(dir) => cmd.current_dir(dir).args(["--work-dir", "work"]),
            None => cmd.arg("--work-dir").arg(&self.work),
        };
        let child = cmd
            .arg("--config")
            .arg(&cfg)
            .env("SHOAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let s = self.socket.clone();
        wait_for("the daemon socket", || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        });
    }

    /// SIGTERM, and wait for the clean stop.
    pub fn term(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run a shoal client command against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .env("SHOAL_SOCKET", &self.socket)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> Vec<u8> {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    /// `shoal mount --frontend F [--domain D] --fsid FSID IMG MNT --remote R`
    /// (the mount point created first), as the client ran it.
    pub fn mount_cli(&self, m: &MountArgs<'_>) -> std::process::Output {
        std::fs::create_dir_all(m.mnt).unwrap();
        let mut args = vec!["mount", "--frontend", m.frontend, "--fsid", m.fsid];
        if let Some(d) = m.domain {
            args.extend(["--domain", d]);
        }
        args.extend([
            m.img.to_str().unwrap(),
            m.mnt.to_str().unwrap(),
            "--remote",
            m.remote,
        ]);
        self.cli(&args)
    }

    /// [`Daemon::mount_cli`], which must succeed: its output.
    pub fn mount(&self, m: &MountArgs<'_>) -> Vec<u8> {
        let o = self.mount_cli(m);
        assert!(
            o.status.success(),
            "shoal mount {}: {}",
            m.img.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.ok(&["status", "--json"])).unwrap()
    }

    /// (cached, size) bytes of a blob in a volume ("erofs,<id>").
    pub fn blob_cache(&self, volume: &str, blob: &str) -> (u64, u64) {
        for d in self.status().as_array().unwrap() {
            if d["volume_key"] == volume {
                for b in d["blobs"].as_array().unwrap() {
                    if b["name"] == blob {
                        return (
                            b["cached_bytes"].as_u64().unwrap(),
                            b["size"].as_u64().unwrap(),
                        );
                    }
                }
            }
        }
        panic!("blob {blob} not in {volume}");
    }

    /// Prefetch an image and wait until all its blobs are cached.
    pub fn prefetch_all(&self, domain: Option<&str>, fsid: &str) {
        let mut args = vec!["prefetch", fsid];
        if let Some(d) = domain {
            args.extend(["--domain", d]);
        }
        self.ok(&args);
        let volume = format!("erofs,{}", domain.unwrap_or(fsid));
        wait_for("prefetch", || {
            self.status().as_array().unwrap().iter().any(|d| {
                d["volume_key"] == volume.as_str()
                    && d["images"].as_array().unwrap().iter().any(|i| {
                        i["fsid"] == fsid
                            && i["blobs"].as_array().unwrap().iter().all(|n| {
                                d["blobs"].as_array().unwrap().iter().any(|b| {
                                    &b["name"] == n
                                        && b["cached_bytes"].as_u64() >= Some(pinned_bytes(b))
                                })
                            })
                    })
            })
        });
        self.wait_flushed();
    }

    /// Readiness reaches the disk within the daemon's 100 ms flush period.
    pub fn wait_flushed(&self) {
        std::thread::sleep(Duration::from_millis(400));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

/// Bytes a blob's pinned chunks cover; prefetch makes exactly these ready.
fn pinned_bytes(b: &serde_json::Value) -> u64 {
    // Blobs are written contiguously, so pinned chunks cover the whole blob
    // unless a layer blob holds chunks no bound image references.
    b["size"]
        .as_u64()
        .unwrap()
        .min(b["pinned_bytes"].as_u64().unwrap_or(u64::MAX))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        // The fanotify pump outlives daemons by design; not tests.
        let pump = self.work.join("fanotify-pump.sock");
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!("fanotify-pump --socket {}", pump.display()))
            .status();
    }
}

/// A CONNECT proxy (tests/fixtures/connect_proxy.py) logging each target.
pub struct ConnectProxy {
    pub port: u16,
    log: PathBuf,
    child: Child,
}

impl ConnectProxy {
    pub fn start(dir: &Path) -> ConnectProxy {
        let log = dir.join("proxy.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/connect_proxy.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        ConnectProxy {
            port: line.trim().parse().unwrap(),
            log,
            child,
        }
    }

    /// The CONNECT targets so far, one per tunnel.
    pub fn targets(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fault-injecting Python blob server.
pub struct Faulty {
    pub port: u16,
    mode: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Faulty {
    pub fn start(blob_dir: &Path, dir: &Path) -> Faulty {
        let (mode, log) = (dir.join("mode"), dir.join("faulty.log"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faulty_http.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(blob_dir)
            .arg(&mode)
            .arg(&log)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Faulty {
            port: line.trim().parse().unwrap(),
            mode,
            log,
            child,
        }
    }

    pub fn set_mode(&self, m: &str) {
        std::fs::write(&self.mode, m).unwrap();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    /// Body bytes sent for a blob so far.
    pub fn bytes_for(&self, blob: &str) -> u64 {
        sum_log(&self.log, blob)
    }

    pub fn requests_for(&self, blob: &str) -> u64 {
        count_log(&self.log, blob)
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sum_log(path: &Path, blob: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (name, _status, bytes) = (f.next()?, f.next()?, f.next()?);
            name.trim_start_matches('/')
                .ends_with(blob)
                .then(|| bytes.parse::<u64>().ok())?
        })
        .sum()
}

/// Requests logged for a blob.
fn count_log(path: &Path, blob: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|n| n.trim_start_matches('/').ends_with(blob))
        })
        .count() as u64
}

/// nginx serving a blob directory, logging body bytes per request.
pub struct Nginx {
    pub port: u16,
    log: PathBuf,
    child: Child,
}

impl Nginx {
    pub fn start(blob_dir: &Path, dir: &Path) -> Option<Nginx> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let port = free_port();
        let log = dir.join("access.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
                 events {{}}\n\
                 http {{ log_format bytes '$uri $status $body_bytes_sent'; access_log {log} bytes;\n\
                   client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                   server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
                d = dir.display(),
                log = log.display(),
                root = blob_dir.display()
            ),
        )
        .unwrap();
        let child = Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        wait_for("nginx", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Nginx { port, log, child })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn bytes_for(&self, blob: &str) -> u64 {
        sum_log(&self.log, blob)
    }

    pub fn requests_for(&self, blob: &str) -> u64 {
        count_log(&self.log, blob)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Debian's docker-registry (distribution 2.8) on loopback, filesystem storage.
pub struct Registry {
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

/// One request a registry answered, from its log.
#[derive(Debug, Clone)]
pub struct Served {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub written: u64,
    pub agent: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Option<Registry> {
        Registry::start_with(dir, "")
    }

    /// A registry with extra configuration (YAML sections such as `auth:`
    /// or `proxy:`), its storage and log in `dir`.
    pub fn start_with(dir: &Path, extra: &str) -> Option<Registry> {
        std::fs::create_dir_all(dir).unwrap();
        let bin = "/usr/bin/docker-registry";
        if !Path::new(bin).exists() {
            return None;
        }
        let port = free_port();
        let conf = dir.join("registry.yml");
        std::fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new(bin)
            .arg("serve")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .ok()?;
        wait_for("docker-registry", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(Registry { port, log, child })
    }
}

impl Registry {
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every request answered so far.
    pub fn served(&self) -> Vec<Served> {
        let text = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.contains("msg=\"response completed\""))
            .map(|l| Served {
                method: field(l, "http.request.method"),
                uri: field(l, "http.request.uri"),
                status: field(l, "http.response.status").parse().unwrap_or(0),
                written: field(l, "http.response.written").parse().unwrap_or(0),
                agent: field(l, "http.request.useragent"),
            })
            .collect()
    }
}

/// A `key=value` or `key="value"` field of a logrus text line.
fn field(line: &str, key: &str) -> String {
    let Some(i) = line.find(&format!(" {key}=")) else {
        return String::new();
    };
    let rest = &line[i + key.len() + 2..];
    if let Some(q) = rest.strip_prefix('"') {
        q[..q.find('"').unwrap_or(q.len())].to_string()
    } else {
        rest.split(' ').next().unwrap_or("").to_string()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// containerd on its own root, state and socket, CRI off.
pub struct Containerd {
    child: std::process::Child,
    pub socket: PathBuf,
}

impl Containerd {
    /// With `snapshotter`, a proxy snapshotter plugin `shoal` at that socket.
    pub fn start(dir: &Path, snapshotter: Option<&Path>) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{s}\"\n{p}",
                d = dir.display(),
                s = socket.display(),
                p = snapshotter.map_or(String::new(), |p| format!(
                    "[proxy_plugins.shoal]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                    p.display()
                ))
            ),
        )
        .unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .unwrap();
        let s = socket.clone();
        wait_for("containerd", || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        });
        Containerd { child, socket }
    }

    /// `ctr` in namespace `shoal-test`.
    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        self.ctr_in("shoal-test", "ctr", args)
    }

    /// `tool` (ctr or ctr-remote) against this containerd in `namespace`.
    pub fn ctr_in(&self, namespace: &str, tool: &str, args: &[&str]) -> std::process::Output {
        Command::new(tool)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shoal snapshotter` on its own socket and root, mounting through a daemon.
pub struct SnapshotterProc {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    daemon_socket: PathBuf,
    /// Further `shoal snapshotter` arguments, kept across restarts.
    args: Vec<String>,
    child: Option<Child>,
}

impl SnapshotterProc {
    pub fn start(dir: &Path, daemon_socket: &Path, args: &[&str]) -> SnapshotterProc {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = SnapshotterProc {
            socket: dir.join("snapshotter.sock"),
            root: dir.join("root"),
            log: dir.join("snapshotter.log"),
            daemon_socket: daemon_socket.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.restart();
        s
    }

    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("snapshotter")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--root")
            .arg(&self.root)
            .arg("--daemon-socket")
            .arg(&self.daemon_socket)
            .args(&self.args)
            .env("SHOAL_LOG", "info")
            .env_remove("SHOAL_CONFIG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let s = self.socket.clone();
        wait_for("the snapshotter socket", || {
            std::os::unix::net::UnixStream::connect(&s).is_ok()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SnapshotterProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
        // Images stay mounted while containerd holds their snapshots
        // (and from the pull on, with --mount-on-pull): not past a test.
        umount_under(&self.root);
    }
}

/// Lazily unmount every mount below `dir`, deepest first.
pub fn umount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(p).status();
    }
}
