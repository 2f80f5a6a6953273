//! containerd runs containers lazily from shoal images through `shoal
//! snapshotter`: real containerd, runc, ctr-remote and docker-registry,
//! started by the test. Checksums printed inside the containers equal
//! those of the original image on containerd's overlayfs; a shared base is
//! fetched once per namespace's domain; restarts of the snapshotter and the
//! daemon never serve a wrong byte; ordinary images use the same
//! snapshotter; bad input fails clearly.

mod common;
use common::oci::*;
use common::servers::*;
use common::*;
use std::path::Path;
use std::process::Output;

const FILES: &[&str] = &[
    "/usr/bin/python3.11",
    "/usr/lib/python3.11/json/__init__.py",
    "/usr/lib/python3.11/email/parser.py",
    "/usr/lib/python3/dist-packages/yaml/__init__.py",
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/usr/bin/bash",
    "/etc/os-release",
];

/// Registry, daemon, snapshotter and containerd, and the corpus images:
/// `src/py:v1` and `src/web:v1` (gzip/zstd OCI) and their shoal
/// conversions `shoal/py:v1`, `shoal/web:v1`.
struct World {
    _tmp: tempfile::TempDir,
    reg: Registry,
    daemon: Daemon,
    sn: SnapshotterProc,
    ctd: Containerd,
}

fn world() -> Option<World> {
    world_with(&[])
}

/// [`world`] with further `shoal snapshotter` arguments.
fn world_with(snapshotter_args: &[&str]) -> Option<World> {
    let why = missing(&[
        "docker-registry",
        "skopeo",
        "containerd",
        "ctr",
        "ctr-remote",
        "runc",
    ]);
    if let Some(why) = why {
        skip(&why);
        return None;
    }
    if !rustix::process::geteuid().is_root() {
        skip("not root");
        return None;
    }
    if !Path::new("/dev/fuse").exists() {
        skip("no /dev/fuse (and so possibly no frontend)");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    let py = layout(tmp.path(), "py", &["base.tar.gz", "py-layer.tar.gz"], &[]);
    skopeo_push(&py, "py", &format!("{host}/src/py:v1"), &[]);
    let web = layout(
        tmp.path(),
        "web",
        &["base.tar.gz", "web-layer.tar.zst"],
        &[],
    );
    skopeo_push(&web, "web", &format!("{host}/src/web:v1"), &[]);
    for i in ["py", "web"] {
        convert_json(&[
            &format!("oci://{host}/src/{i}:v1"),
            &format!("oci://{host}/shoal/{i}:v1"),
        ]);
    }
    let daemon = Daemon::start(&tmp.path().join("daemon"));
    let sn = SnapshotterProc::start(&tmp.path().join("sn"), &daemon.socket, snapshotter_args);
    let ctd = Containerd::start(&tmp.path().join("containerd"), Some(&sn.socket));
    Some(World {
        _tmp: tmp,
        reg,
        daemon,
        sn,
        ctd,
    })
}

fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

impl World {
    fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.reg.host())
    }

    /// `ctr-remote images rpull --snapshotter shoal` in `ns`.
    fn rpull(&self, ns: &str, image: &str) -> Output {
        self.ctd.ctr_in(
            ns,
            "ctr-remote",
            &[
                "images",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "shoal",
                &self.image(image),
            ],
        )
    }

    fn pull(&self, ns: &str, image: &str, snapshotter: &str) -> Output {
        self.ctd.ctr_in(
            ns,
            "ctr",
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &self.image(image),
            ],
        )
    }

    /// Run `cmd` in a new container of `image` and return its output.
    fn run(&self, ns: &str, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--snapshotter", snapshotter, "--net-host"];
        let img = self.image(image);
        args.extend([img.as_str(), id]);
        args.extend(cmd);
        self.ctd.ctr_in(ns, "ctr", &args)
    }

    /// Bytes the registry sent for a blob.
    fn sent(&self, digest: &str) -> u64 {
        self.reg
            .served()
            .iter()
            .filter(|s| s.method == "GET" && s.uri.ends_with(digest))
            .map(|s| s.written)
            .sum()
    }

    fn layers(&self, image: &str) -> Vec<String> {
        skopeo_inspect(&self.image(image), &["--raw"])["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    }
}

fn checksum_cmd() -> Vec<&'static str> {
    let mut c = vec!["sha256sum"];
    c.extend(FILES);
    c
}

#[test]
fn containers_start_lazily_and_read_what_overlayfs_reads() {
    let Some(w) = world() else { return };
    // The original image on containerd's own overlayfs snapshotter.
    ok(
        w.pull("shoal-test", "src/py:v1", "overlayfs"),
        "ctr pull (overlayfs)",
    );
    let want = ok(
        w.run(
            "shoal-test",
            "overlayfs",
            "src/py:v1",
            "ref",
            &checksum_cmd(),
        ),
        "run on overlayfs",
    );
    assert_eq!(want.lines().count(), FILES.len(), "{want}");

    // The shoal image: the pull fetches the bootstrap and nothing else.
    let layers = w.layers("shoal/py:v1");
    ok(w.rpull("shoal-test", "shoal/py:v1"), "ctr-remote rpull");
    for blob in &layers[..layers.len() - 1] {
        assert_eq!(w.sent(blob), 0, "pulling fetched data blob {blob}");
    }
    assert!(
        w.sent(&layers[layers.len() - 1]) > 0,
        "the bootstrap was not fetched"
    );
    assert!(
        !w.sn.log_text().contains("shoal image mounted"),
        "mounted at pull without --mount-on-pull"
    );
    let got = ok(
        w.run(
            "shoal-test",
            "shoal",
            "shoal/py:v1",
            "lazy",
            &checksum_cmd(),
        ),
        "run on shoal",
    );
    assert_eq!(got, want);
    let py = ok(
        w.run(
            "shoal-test",
            "shoal",
            "shoal/py:v1",
            "py",
            &[
                "python3",
                "-c",
                "import json, email, http.client, yaml; print('imported')",
            ],
        ),
        "python in a shoal container",
    );
    assert_eq!(py.trim(), "imported");
    // Lazily: far fewer bytes than the image's blobs.
    let fetched: u64 = layers.iter().map(|b| w.sent(b)).sum();
    assert!(
        fetched < 80 << 20,
        "fetched {fetched} bytes of a 177 MB image"
    );
    // The containers are gone: the image's mount went with them.
    wait_for("the image mount to go", || {
        w.sn.log_text().contains("shoal image unmounted")
    });

    // An ordinary image through the same snapshotter: overlayfs snapshots.
    ok(
        w.pull("other", "src/py:v1", "shoal"),
        "ctr pull --snapshotter shoal (ordinary image)",
    );
    let plain = ok(
        w.run("other", "shoal", "src/py:v1", "plain", &checksum_cmd()),
        "ordinary image on shoal",
    );
    assert_eq!(plain, want);
}

#[test]
fn a_shared_base_is_fetched_once_per_namespace() {
    // Images mounted as soon as they are pulled share as those mounted by
    // their first container do.
    let Some(w) = world_with(&["--mount-on-pull"]) else {
        return;
    };
    let base = w.layers("shoal/py:v1")[0].clone();
    assert_eq!(
        base,
        w.layers("shoal/web:v1")[0],
        "py and web must share the base blob"
    );
    let read_base = [
        "sh",
        "-c",
        "cat /usr/bin/* /usr/lib/x86_64-linux-gnu/*.so* >/dev/null 2>&1; echo done",
    ];
    for image in ["shoal/py:v1", "shoal/web:v1"] {
        ok(w.rpull("ns-a", image), "rpull in ns-a");
    }
    // Both mounted at pull, before any container, having read no data.
    wait_for("both images to be mounted at pull", || {
        w.sn.log_text().matches("shoal image mounted").count() == 2
    });
    assert_eq!(w.sent(&base), 0, "mounting at pull fetched base bytes");
    ok(
        w.run("ns-a", "shoal", "shoal/py:v1", "a1", &read_base),
        "py in ns-a",
    );
    let one = w.sent(&base);
    assert!(one > 1 << 20, "the base was hardly read ({one} bytes)");
    ok(
        w.run("ns-a", "shoal", "shoal/web:v1", "a2", &read_base),
        "web in ns-a",
    );
    assert_eq!(
        w.sent(&base),
        one,
        "the second image of the domain fetched base bytes again"
    );
    // Another namespace is another domain: it fetches its own copy.
    ok(w.rpull("ns-b", "shoal/web:v1"), "rpull in ns-b");
    ok(
        w.run("ns-b", "shoal", "shoal/web:v1", "b1", &read_base),
        "web in ns-b",
    );
    let two = w.sent(&base);
    assert!(
        two >= 2 * one - (one / 10),
        "ns-b fetched {} base bytes, ns-a {one}",
        two - one
    );
    let log = w.sn.log_text();
    assert!(
        log.contains("containerd-ns-a/") && log.contains("containerd-ns-b/"),
        "one domain per namespace:\n{log}"
    );
    // A pulled image stays mounted without containers; removing it
    // (containerd's garbage collector removes its snapshots, which every
    // namespace shares, as remote snapshots are named by chain ID) unmounts
    // it.
    assert!(!log.contains("shoal image unmounted"), "{log}");
    for ns in ["ns-a", "ns-b"] {
        ok(
            w.ctd.ctr_in(
                ns,
                "ctr",
                &["images", "rm", "--sync", &w.image("shoal/web:v1")],
            ),
            "ctr images rm",
        );
    }
    wait_for("the removed image's mounts to go", || {
        w.sn.log_text().contains("shoal image unmounted")
    });
}

#[test]
fn restarts_of_snapshotter_and_daemon_serve_no_wrong_byte() {
    let Some(mut w) = world() else { return };
    ok(
        w.pull("shoal-test", "src/py:v1", "overlayfs"),
        "ctr pull (overlayfs)",
    );
    // Reads before, during and after the restarts (the sleep leaves time
    // to see the task running and kill both).
    let cmd = [
        "sh",
        "-c",
        "(sha256sum /usr/lib/python3.11/*.py; sleep 2; sha256sum /usr/lib/x86_64-linux-gnu/*.so* /usr/lib/python3.11/*/*.py) 2>&1 | sort",
    ];
    let want = ok(
        w.run("shoal-test", "overlayfs", "src/py:v1", "ref", &cmd),
        "run on overlayfs",
    );
    ok(w.rpull("shoal-test", "shoal/py:v1"), "rpull");
    // A reader in a container while the snapshotter and daemon die and
    // come back.
    let socket = w.ctd.socket.clone();
    let image = w.image("shoal/py:v1");
    let reader = std::thread::spawn(move || {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args([
                "--namespace",
                "shoal-test",
                "run",
                "--rm",
                "--snapshotter",
                "shoal",
                &image,
                "reader",
            ])
            .args(cmd)
            .output()
            .unwrap()
    });
    wait_for("the reader to run", || {
        String::from_utf8_lossy(&w.ctd.ctr_in("shoal-test", "ctr", &["task", "ls"]).stdout)
            .lines()
            .any(|l| l.starts_with("reader") && l.contains("RUNNING"))
    });
    w.sn.kill9();
    w.daemon.kill9();
    std::thread::sleep(std::time::Duration::from_millis(500));
    w.daemon.restart();
    w.sn.restart();
    let got = ok(reader.join().unwrap(), "the reader across restarts");
    assert_eq!(got, want, "bytes differ across restarts");
    // New containers start after the restarts.
    let again = ok(
        w.run("shoal-test", "shoal", "shoal/py:v1", "after", &cmd),
        "a new container",
    );
    assert_eq!(again, want);
}

#[test]
fn bad_input_fails_clearly() {
    let Some(mut w) = world() else { return };
    // An unreachable registry.
    let o = w.ctd.ctr_in(
        "bad",
        "ctr-remote",
        &[
            "images",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "shoal",
            "127.0.0.1:1/shoal/none:v1",
        ],
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("127.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A missing daemon: the pull says so.
    w.daemon.kill9();
    let o = w.rpull("bad", "shoal/py:v1");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success() && err.contains("shoal daemon"), "{err}");
    w.daemon.restart();
    // A corrupt bootstrap layer (the registry serves other bytes).
    let boot = w.layers("shoal/web:v1").pop().unwrap();
    let hexd = boot.trim_start_matches("sha256:");
    let data = w
        ._tmp
        .path()
        .join("reg/registry-data/docker/registry/v2/blobs/sha256")
        .join(&hexd[..2])
        .join(hexd)
        .join("data");
    let mut b = std::fs::read(&data).unwrap();
    b[2000] ^= 0xff;
    std::fs::write(&data, b).unwrap();
    let o = w.rpull("bad", "shoal/web:v1");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains("bootstrap") && err.contains(hexd),
        "{err}"
    );
    // Nothing was mounted or bound for it.
    let st = w.daemon.status();
    assert!(
        st.as_array()
            .unwrap()
            .iter()
            .all(|d| d["images"].as_array().is_none_or(|i| i.is_empty())),
        "{st}"
    );
}

#[test]
fn demo_shows_the_main_job() {
    let Some(_w) = world() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let o = shoal()
        .args(["demo", "--containers", "--work-dir"])
        .arg(tmp.path().join("demo"))
        .arg("--corpus")
        .arg(corpus_dir())
        .env_remove("SHOAL_CONFIG")
        .output()
        .unwrap();
    let out = ok(o, "shoal demo --containers");
    // Two images of one domain share the base blob, fetched once.
    assert!(
        out.contains("mounted demo,base") && out.contains("mounted demo,app"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.contains("refs=2")), "{out}");
    // A container started lazily and its image went with it.
    assert!(
        out.contains("only the bootstrap") && out.contains("Debian GNU/Linux 12"),
        "{out}"
    );
    assert!(out.contains("image unmounted"), "{out}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(tmp.path().to_str().unwrap()),
        "the demo left mounts behind"
    );
}
