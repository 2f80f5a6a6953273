//! `shoal convert` and `shoal push` against real registries (Debian's
//! docker-registry, started by the test): an ordinary OCI image made from
//! the corpus layers and pushed with skopeo converts, its shoal image mounts
//! to the tree umoci unpacks from the original, skopeo and containerd read
//! it; a second image on the same base uploads only its new blobs; a
//! pull-through mirror serves a fleet of daemons; a proxy carries every
//! request; bad sources fail with the reference named and push nothing.

mod common;
use common::oci::*;
use common::servers::*;
use common::*;
use std::path::Path;
use std::process::Command;

/// The HTTP status of a manifest GET.
fn manifest_status(host: &str, repo_tag: &str) -> String {
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap();
    let o = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
        .arg(format!("http://{host}/v2/{repo}/manifests/{tag}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Uploads of a blob the registry accepted (the final PUT of each).
fn uploads_of(reg: &Registry, digest: &str) -> usize {
    reg.served()
        .iter()
        .filter(|s| {
            s.method == "PUT" && s.status == 201 && s.uri.contains(&format!("digest={digest}"))
        })
        .count()
}

#[test]
fn corpus_image_converts_and_mounts_as_umoci_unpacks_it() {
    if let Some(why) = missing(&["docker-registry", "skopeo", "umoci"]) {
        return skip(&why);
    }
    if !rustix::process::geteuid().is_root() {
        return skip("not root (mounts)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    let src = layout(
        tmp.path(),
        "py",
        &["base.tar.gz", "py-layer.tar.gz"],
        &["--cmd", r#"["python3","-c","print(1)"]"#],
    );
    skopeo_push(&src, "py", &format!("{host}/src/py:v1"), &[]);

    let r = convert_json(&[
        &format!("oci://{host}/src/py:v1"),
        &format!("oci://{host}/shoal/py:v1"),
        "--fsid",
        "py",
    ]);
    assert_eq!(
        (r["layers"].as_u64(), r["blobs"].as_u64()),
        (Some(2), Some(2)),
        "{r}"
    );
    assert_eq!(r["blobs_uploaded"], 4, "2 blobs, bootstrap, config: {r}");
    assert!(r["blob_bytes"].as_u64().unwrap() > r["source_bytes"].as_u64().unwrap());

    // skopeo reads the manifest and config; the config is the source's.
    let raw = skopeo_inspect(&format!("{host}/shoal/py:v1"), &["--raw"]);
    let layers = raw["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    for l in layers {
        assert!(
            l["mediaType"]
                .as_str()
                .unwrap()
                .starts_with("application/vnd.oci.image.layer."),
            "{l}"
        );
    }
    assert_eq!(
        layers[2]["annotations"]["containerd.io/snapshot/shoal.layer"],
        "bootstrap"
    );
    assert_eq!(
        layers[2]["annotations"]["containerd.io/snapshot/shoal.fsid"],
        "py"
    );
    assert_eq!(
        layers[0]["annotations"]["containerd.io/snapshot/shoal.layer"],
        "blob"
    );
    let cfg = skopeo_inspect(&format!("{host}/shoal/py:v1"), &["--config"]);
    assert_eq!(
        cfg["config"]["Cmd"],
        serde_json::json!(["python3", "-c", "print(1)"])
    );
    assert_eq!(cfg["config"]["Labels"]["org.example.test"], "corpus");
    assert!(cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "SHOAL_TEST=1"));
    let diff_ids: Vec<_> = cfg["rootfs"]["diff_ids"].as_array().unwrap().clone();
    let digests: Vec<_> = layers.iter().map(|l| l["digest"].clone()).collect();
    let n = layers.len();
    assert_eq!(diff_ids.len(), n);
    // Blob layers are their own diff IDs; the bootstrap travels zstd, its
    // diff ID the bootstrap's own digest.
    assert_eq!(diff_ids[..n - 1], digests[..n - 1]);
    assert_eq!(
        layers[n - 1]["mediaType"],
        "application/vnd.oci.image.layer.shoal.bootstrap.v1+zstd"
    );
    assert_ne!(diff_ids[n - 1], digests[n - 1]);
    let history = cfg["history"].as_array().unwrap();
    let non_empty = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(
        non_empty, 3,
        "history entries with layers must match the layers"
    );

    // containerd stores the image in its content store.
    if have("containerd") && have("ctr") {
        let ctd = Containerd::start(&tmp.path().join("containerd"), None);
        let o = ctd.ctr(&[
            "content",
            "fetch",
            "--plain-http",
            &format!("{host}/shoal/py:v1"),
        ]);
        assert!(
            o.status.success(),
            "ctr content fetch: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let ls = ctd.ctr(&["content", "ls", "-q"]);
        let listed = String::from_utf8_lossy(&ls.stdout);
        for d in &digests {
            assert!(
                listed.contains(d.as_str().unwrap()),
                "{d} not in containerd's content store"
            );
        }
    } else {
        eprintln!("skipped part: containerd/ctr not installed");
    }

    // The mounted shoal image is the tree umoci unpacks from the source.
    let bundle = tmp.path().join("bundle");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:py", src.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    d.ok(&[
        "mount",
        "--domain",
        "conv",
        "--fsid",
        "py",
        &format!("oci://{host}/shoal/py:v1"),
        mnt.to_str().unwrap(),
    ]);
    let diffs = compare_trees(&mnt, &bundle.join("rootfs"));
    d.ok(&["umount", mnt.to_str().unwrap()]);
    assert!(
        diffs.is_empty(),
        "shoal mount vs umoci unpack:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn second_image_on_the_same_base_uploads_only_its_new_blobs() {
    if let Some(why) = missing(&["docker-registry", "skopeo"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    // An index (with an arm64 entry too) for py; Docker schema 2 for web.
    let py = layout(
        tmp.path(),
        "py",
        &["base.tar.gz", "py-layer.tar.gz"],
        &["--index"],
    );
    skopeo_push(&py, "py", &format!("{host}/src/py:v1"), &[]);
    let web = layout(
        tmp.path(),
        "web",
        &["base.tar.gz", "web-layer.tar.zst"],
        &[],
    );
    skopeo_push(&web, "web", &format!("{host}/src/web:v1"), &[]);
    let base = layout(tmp.path(), "base", &["base.tar.gz"], &[]);
    skopeo_push(
        &base,
        "base",
        &format!("{host}/src/base:docker"),
        &["--format", "v2s2"],
    );
    let raw = skopeo_inspect(&format!("{host}/src/base:docker"), &["--raw"]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );

    let py1 = convert_json(&[
        &format!("oci://{host}/src/py:v1"),
        &format!("oci://{host}/shoal/py:v1"),
    ]);
    let base_blob = skopeo_inspect(&format!("{host}/shoal/py:v1"), &["--raw"])["layers"][0]
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(py1["blobs_uploaded"], 4);
    // web in another repository, with py as chunk dictionary: the base blob
    // is mounted from shoal/py, never uploaded again.
    let web1 = convert_json(&[
        &format!("oci://{host}/src/web:v1"),
        &format!("oci://{host}/shoal/web:v1"),
        "--chunk-dict",
        &format!("oci://{host}/shoal/py:v1"),
    ]);
    // Every dictionary blob it uses (base, and py's for chunks both layers
    // hold) is mounted; only web's new blob is sent.
    assert_eq!(
        web1["blobs_mounted"].as_u64().unwrap() + 1,
        web1["blobs"].as_u64().unwrap(),
        "{web1}"
    );
    assert_eq!(
        web1["blobs_uploaded"], 3,
        "web blob, bootstrap, config: {web1}"
    );
    assert!(web1["chunks_reused"].as_u64().unwrap() > 1000, "{web1}");
    // Without a dictionary, in the same repository: the base blob (the same
    // bytes, as one blob per layer makes it) is already there.
    let web2 = convert_json(&[
        &format!("oci://{host}/src/web:v1"),
        &format!("oci://{host}/shoal/py:web"),
    ]);
    assert_eq!(web2["blobs_existing"], 1, "{web2}");
    let base1 = convert_json(&[
        &format!("oci://{host}/src/base:docker"),
        &format!("oci://{host}/shoal/py:base"),
    ]);
    assert_eq!(base1["blobs_existing"], 1, "{base1}");
    assert_eq!(base1["blobs_uploaded"], 2, "{base1}");
    // Counted at the registry: the base blob's bytes were uploaded once.
    assert_eq!(uploads_of(&reg, &base_blob), 1);
    let web_blob = skopeo_inspect(&format!("{host}/shoal/web:v1"), &["--raw"])["layers"][1]
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(uploads_of(&reg, &web_blob), 1);

    // The arm64 entry of the index is chosen on request.
    let arm = convert_json(&[
        &format!("oci://{host}/src/py:v1"),
        &format!("oci://{host}/shoal/py:arm"),
        "--platform",
        "linux/arm64",
    ]);
    // Both entries name the same image, and conversion is deterministic:
    // every blob, the bootstrap and the config are already there.
    assert_eq!(
        (
            arm["blobs_existing"].as_u64(),
            arm["uploaded_bytes"].as_u64()
        ),
        (Some(4), Some(0)),
        "{arm}"
    );
    let o = convert(
        &[
            &format!("oci://{host}/src/py:v1"),
            &format!("oci://{host}/shoal/py:s390x"),
            "--platform",
            "linux/s390x",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no manifest for platform linux/s390x"),
        "{err}"
    );

    // A read order reorders the top layer's blob only: the base blob stays
    // the one already in the repository.
    let order = tmp.path().join("py.order");
    std::fs::write(&order, "/var/log/dpkg.log\n/var/log/apt/term.log\n").unwrap();
    let ordered = convert_json(&[
        &format!("oci://{host}/src/py:v1"),
        &format!("oci://{host}/shoal/py:ordered"),
        "--order",
        order.to_str().unwrap(),
    ]);
    let layers = |tag: &str| {
        skopeo_inspect(&format!("{host}/shoal/py:{tag}"), &["--raw"])["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let (plain, reordered) = (layers("v1"), layers("ordered"));
    assert_eq!(plain[0], reordered[0], "the base blob is unchanged");
    assert_ne!(plain[1], reordered[1], "the top layer's blob is reordered");
    assert!(
        ordered["blobs_existing"].as_u64().unwrap() >= 1,
        "{ordered}"
    );
}

/// Run a failing conversion: non-zero exit, stderr naming `names`, and no
/// manifest at the destination.
fn fails(
    args: &[&str],
    env: &[(&str, &Path)],
    names: &[&str],
    absent: Option<(&str, &str)>,
) -> String {
    let o = convert(args, env);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "shoal convert {args:?} succeeded");
    for n in names {
        assert!(
            err.contains(n),
            "{args:?}: error does not name {n:?}:\n{err}"
        );
    }
    assert!(!err.contains("panicked"), "{err}");
    if let Some((host, dst)) = absent {
        assert_eq!(
            manifest_status(host, dst),
            "404",
            "{dst} exists after a failed conversion"
        );
    }
    err
}

/// Corrupt the file of blob `digest` in a layout: flip a byte, or cut it.
fn damage(layout: &Path, digest: &str, cut: bool) {
    let p = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    let mut b = std::fs::read(&p).unwrap();
    if cut {
        b.truncate(b.len() - 1000);
    } else {
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
    }
    std::fs::write(&p, b).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    assert!(Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success());
}

#[test]
fn bad_sources_fail_clearly_and_push_nothing() {
    if let Some(why) = missing(&["docker-registry", "skopeo", "curl"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    let good = layout(tmp.path(), "py", &["base.tar.gz", "py-layer.tar.gz"], &[]);
    skopeo_push(&good, "py", &format!("{host}/src/py:v1"), &[]);
    let dst = format!("oci://{host}/shoal/bad:v1");
    let nowhere = "shoal/bad:v1";

    // An unreachable registry, a missing tag, a missing digest.
    fails(
        &["oci://127.0.0.1:1/src/py:v1", &dst],
        &[],
        &["127.0.0.1:1", "src/py"],
        Some((&host, nowhere)),
    );
    fails(
        &[&format!("oci://{host}/src/py:nope"), &dst],
        &[],
        &["src/py:nope", "404"],
        Some((&host, nowhere)),
    );
    let zero = format!("sha256:{}", "0".repeat(64));
    fails(
        &[&format!("oci://{host}/src/py@{zero}"), &dst],
        &[],
        &[&zero, "404"],
        Some((&host, nowhere)),
    );

    // Local layouts with a flipped byte, a cut layer, a tampered manifest.
    let py_layer = {
        let idx: serde_json::Value =
            serde_json::from_slice(&std::fs::read(good.join("index.json")).unwrap()).unwrap();
        let m = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
        let man: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                good.join("blobs/sha256")
                    .join(m.trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
        .unwrap();
        (m, man["layers"][1]["digest"].as_str().unwrap().to_string())
    };
    for (what, cut, digest, expect) in [
        ("flipped", false, &py_layer.1, "do not match"),
        ("cut", true, &py_layer.1, "ended after"),
        ("manifest", false, &py_layer.0, "do not match"),
    ] {
        let bad = tmp.path().join(format!("layout-{what}"));
        copy_dir(&good, &bad);
        damage(&bad, digest, cut);
        let src = format!("oci-layout:{}:py", bad.display());
        fails(
            &[&src, &dst],
            &[],
            &[digest.as_str(), expect],
            Some((&host, nowhere)),
        );
    }

    // A layer media type shoal cannot read.
    let odd = layout(
        tmp.path(),
        "odd",
        &["base.tar.gz"],
        &["--media-type", "application/vnd.example.thing.v1"],
    );
    let src = format!("oci-layout:{}:odd", odd.display());
    fails(
        &[&src, &dst],
        &[],
        &["application/vnd.example.thing.v1", "cannot read"],
        Some((&host, nowhere)),
    );

    // A failed upload leaves no manifest: a chunk dictionary whose blobs
    // are gone, converting to a registry that does not have them either.
    let kept = tmp.path().join("kept");
    convert_json(&[
        &format!("oci://{host}/src/py:v1"),
        &format!("oci://{host}/shoal/py:v1"),
        "--output",
        kept.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(kept.join("blobs")).unwrap();
    let other = Registry::start(&tmp.path().join("other")).unwrap();
    let boot = kept.join("image.boot");
    fails(
        &[
            &format!("oci://{host}/src/py:v1"),
            &format!("oci://{}/shoal/py:v1", other.host()),
            "--chunk-dict",
            boot.to_str().unwrap(),
        ],
        &[],
        &["kept/blobs", "cannot be read"],
        Some((&other.host(), "shoal/py:v1")),
    );

    // A registry serving a layer whose bytes do not match their digest.
    let data = tmp
        .path()
        .join("reg/registry-data/docker/registry/v2/blobs/sha256");
    let hexd = py_layer.1.trim_start_matches("sha256:");
    let f = data.join(&hexd[..2]).join(hexd).join("data");
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&f, b).unwrap();
    fails(
        &[&format!("oci://{host}/src/py:v1"), &dst],
        &[],
        &[&py_layer.1, "do not match", "src/py"],
        Some((&host, nowhere)),
    );
}

#[test]
fn registry_credentials_basic_auth() {
    if let Some(why) = missing(&["docker-registry", "skopeo", "curl", "htpasswd"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    let base = layout(tmp.path(), "base", &["base.tar.gz"], &[]);
    skopeo_push(&base, "base", &format!("{host}/src/base:v1"), &[]);
    let pw = tmp.path().join("htpasswd");
    let o = Command::new("htpasswd")
        .args(["-Bbn", "alice", "s3cret"])
        .output()
        .unwrap();
    std::fs::write(&pw, &o.stdout).unwrap();
    let auth = Registry::start_with(
        &tmp.path().join("auth"),
        &format!(
            "auth:\n  htpasswd:\n    realm: shoal-test\n    path: {}\n",
            pw.display()
        ),
    )
    .unwrap();
    let ah = auth.host();
    let src = format!("oci://{host}/src/base:v1");
    let dst = format!("oci://{ah}/shoal/base:v1");
    let no_home = tmp.path().join("no-docker-config");
    let env = [("DOCKER_CONFIG", no_home.as_path())];
    fails(&[&src, &dst], &env, &[&ah, "credentials"], None);
    fails(
        &[&src, &dst, "--creds", "alice:wrong"],
        &env,
        &[&ah, "refused"],
        None,
    );
    // The Docker config's credentials.
    let cfg_dir = tmp.path().join("docker");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::write(
        cfg_dir.join("config.json"),
        format!(r#"{{"auths":{{"{ah}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#),
    )
    .unwrap();
    let o = convert(
        &[&src, &dst, "--json"],
        &[("DOCKER_CONFIG", cfg_dir.as_path())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --creds, and the image is there for a reader with credentials.
    let o = convert(
        &[
            &src,
            &format!("oci://{ah}/shoal/base:v2"),
            "--creds",
            "alice:s3cret",
        ],
        &env,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:s3cret",
            "--raw",
        ])
        .arg(format!("docker://{ah}/shoal/base:v2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Blob GETs the origin answered, as (user agent, digest).
fn blob_gets(reg: &Registry) -> Vec<(String, String)> {
    reg.served()
        .into_iter()
        .filter(|s| s.method == "GET" && s.uri.contains("/blobs/sha256:"))
        .map(|s| (s.agent, s.uri.rsplit('/').next().unwrap().to_string()))
        .collect()
}

#[test]
fn a_pull_through_mirror_serves_a_fleet() {
    if let Some(why) = missing(&["docker-registry", "skopeo"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let origin = Registry::start(&tmp.path().join("origin")).unwrap();
    let oh = origin.host();
    let src = layout(tmp.path(), "py", &["base.tar.gz", "py-layer.tar.gz"], &[]);
    skopeo_push(&src, "py", &format!("{oh}/src/py:v1"), &[]);
    convert_json(&[
        &format!("oci://{oh}/src/py:v1"),
        &format!("oci://{oh}/shoal/py:v1"),
    ]);
    let raw = skopeo_inspect(&format!("{oh}/shoal/py:v1"), &["--raw"]);
    let blobs: Vec<String> = raw["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let mirror = Registry::start_with(
        &tmp.path().join("mirror"),
        &format!("proxy:\n  remoteurl: http://{oh}\n"),
    )
    .unwrap();
    // A dead mirror first: it fails, and requests fall through to the next.
    let settings = format!(
        "[[mirror]]\nregistry = \"{oh}\"\nurl = \"http://127.0.0.1:1\"\n\n[[mirror]]\nregistry = \"{oh}\"\nurl = \"http://{}\"\n",
        mirror.host()
    );
    let reference = format!("oci://{oh}/shoal/py:v1");
    let stored = |d: &str| {
        let h = d.trim_start_matches("sha256:");
        tmp.path()
            .join("mirror/registry-data/docker/registry/v2/blobs/sha256")
            .join(&h[..2])
            .join(h)
            .join("data")
            .exists()
    };
    let before = blob_gets(&origin).len();
    let mut after_first = 0;
    for (i, name) in ["a", "b"].iter().enumerate() {
        let d = Daemon::start_with(&tmp.path().join(name), &settings);
        d.ok(&["bind", "--domain", "fleet", "--fsid", "py", &reference]);
        d.prefetch_all(Some("fleet"), "py");
        let sum = d.ok(&["read", "--domain", "fleet", "py", "/usr/bin/python3.11"]);
        assert!(sum.len() > 1 << 20);
        if i == 0 {
            // The mirror stores what it relays in the background.
            wait_for("the mirror to store every blob", || {
                blobs.iter().all(|b| stored(b))
            });
            after_first = blob_gets(&origin).len();
        }
    }
    let gets = blob_gets(&origin).split_off(before);
    // Every blob byte the daemons read came through the mirror ...
    assert!(
        gets.iter().all(|(agent, _)| !agent.starts_with("shoal/")),
        "a daemon fetched from the origin: {gets:?}"
    );
    assert!(mirror
        .served()
        .iter()
        .any(|s| s.agent.starts_with("shoal/") && s.status == 206));
    // ... and the second daemon cost the origin nothing.
    assert_eq!(
        gets.len() + before,
        after_first,
        "the second daemon reached the origin"
    );
    for b in &blobs {
        assert!(
            gets.iter().any(|(_, d)| d == b),
            "{b} never left the origin"
        );
    }
}

#[test]
fn a_proxy_carries_conversions_and_daemon_reads() {
    if let Some(why) = missing(&["docker-registry", "skopeo"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let host = reg.host();
    let base = layout(tmp.path(), "base", &["base.tar.gz"], &[]);
    skopeo_push(&base, "base", &format!("{host}/src/base:v1"), &[]);
    let proxy = ConnectProxy::start(tmp.path());
    let settings = format!("proxy = \"http://127.0.0.1:{}\"\n", proxy.port);
    let file = tmp.path().join("shoal.toml");
    std::fs::write(&file, &settings).unwrap();
    let o = convert(
        &[
            &format!("oci://{host}/src/base:v1"),
            &format!("oci://{host}/shoal/base:v1"),
            "--settings",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tunnels = proxy.targets().len();
    assert!(
        tunnels > 0 && proxy.targets().iter().all(|t| *t == host),
        "{:?}",
        proxy.targets()
    );
    assert!(
        reg.served()
            .iter()
            .filter(|s| s.agent.starts_with("shoal/"))
            .count()
            > 0
    );

    let d = Daemon::start_with(&tmp.path().join("d"), &settings);
    d.ok(&[
        "bind",
        "--fsid",
        "base",
        &format!("oci://{host}/shoal/base:v1"),
    ]);
    let os = d.ok(&["read", "base", "/usr/lib/os-release"]);
    assert!(String::from_utf8_lossy(&os).contains("Debian"));
    assert!(
        proxy.targets().len() > tunnels,
        "the daemon did not use the proxy"
    );
    // A dead proxy: the conversion fails and says where it could not go.
    std::fs::write(&file, "proxy = \"http://127.0.0.1:1\"\n").unwrap();
    fails(
        &[
            &format!("oci://{host}/src/base:v1"),
            &format!("oci://{host}/shoal/base:v2"),
            "--settings",
            file.to_str().unwrap(),
        ],
        &[],
        &["src/base"],
        Some((&host, "shoal/base:v2")),
    );
}

#[test]
fn uploads_go_in_chunks_when_the_registry_refuses_a_whole_blob() {
    if let Some(why) = missing(&["docker-registry", "skopeo", "nginx"]) {
        return skip(&why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(&tmp.path().join("reg")).unwrap();
    let base = layout(tmp.path(), "base", &["base.tar.gz"], &[]);
    skopeo_push(&base, "base", &format!("{}/src/base:v1", reg.host()), &[]);
    // nginx in front of the registry, refusing bodies over 20 MiB.
    let front = tmp.path().join("front");
    std::fs::create_dir_all(&front).unwrap();
    let port = free_port();
    let conf = front.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{}}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{port}; client_max_body_size 20m;\n\
                 location / {{ proxy_pass http://{up}; proxy_set_header Host $http_host; proxy_request_buffering off; proxy_http_version 1.1; }} }} }}\n",
            d = front.display(),
            up = reg.host()
        ),
    )
    .unwrap();
    let mut nginx = Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&front)
        .spawn()
        .unwrap();
    wait_for("nginx", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let dst = format!("127.0.0.1:{port}/shoal/base:v1");
    let o = convert(
        &[
            &format!("oci://{}/src/base:v1", reg.host()),
            &format!("oci://{dst}"),
        ],
        &[],
    );
    let _ = Command::new("kill").arg(nginx.id().to_string()).status();
    let ok = o.status.success();
    let raw = if ok {
        Some(skopeo_inspect(
            &format!("{}/shoal/base:v1", reg.host()),
            &["--raw"],
        ))
    } else {
        None
    };
    let _ = nginx.wait();
    assert!(ok, "{}", String::from_utf8_lossy(&o.stderr));
    let blob = raw.unwrap()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let served = reg.served();
    let patches = served
        .iter()
        .filter(|s| s.method == "PATCH" && s.agent.starts_with("shoal/"))
        .count();
    assert!(
        patches >= 6,
        "a 122 MiB blob in 8 MiB chunks took {patches} PATCHes"
    );
    assert_eq!(uploads_of(&reg, &blob), 1);
}
