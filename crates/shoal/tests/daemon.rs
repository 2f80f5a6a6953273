//! The domain core through the daemon, against real servers: sharing
//! counted at the remote, faults, kill -9, OCI push/bind, auth, GC.

mod common;
use common::servers::*;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Two images sharing the base layer blob (`--layer-blobs`), from the corpus
/// when present, else from the bundled demo trees.
struct Images {
    py: PathBuf,
    web: PathBuf,
    blobs: PathBuf,
    base_blob: String,
}

fn build_images(dir: &Path) -> Images {
    let corpus = corpus_dir();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    let (base, py, web): (PathBuf, PathBuf, PathBuf) = if corpus.join("base.tar.gz").exists() {
        (
            corpus.join("base.tar.gz"),
            corpus.join("py-layer.tar.gz"),
            corpus.join("web-layer.tar.zst"),
        )
    } else {
        (ex.join("base"), ex.join("app"), ex.join("app"))
    };
    let blobs = dir.join("blobs");
    let mut out = Vec::new();
    for (name, upper) in [("py", &py), ("web", &web)] {
        let img = dir.join(format!("{name}.img"));
        let json = run_shoal(&[
            "build".as_ref(),
            "-o".as_ref(),
            img.as_os_str(),
            "--blob-dir".as_ref(),
            blobs.as_os_str(),
            "--layer-blobs".as_ref(),
            "--json".as_ref(),
            base.as_os_str(),
            upper.as_os_str(),
        ]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        out.push((img, v["blobs"][0]["tag"].as_str().unwrap().to_string()));
    }
    assert_eq!(out[0].1, out[1].1, "both images share the base blob");
    Images {
        py: out[0].0.clone(),
        web: out[1].0.clone(),
        blobs,
        base_blob: out[0].1.clone(),
    }
}

/// The bundled demo base layer as an image: (example dir, image, blob dir).
fn build_demo(dir: &Path, chunk_size: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    let (img, blobs) = (dir.join("demo.img"), dir.join("blobs"));
    run_shoal(&[
        "build".as_ref(),
        "-o".as_ref(),
        img.as_os_str(),
        "--blob-dir".as_ref(),
        blobs.as_os_str(),
        "--chunk-size".as_ref(),
        chunk_size.as_ref(),
        ex.join("base").as_os_str(),
    ]);
    (ex, img, blobs)
}

fn blob_names(img: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&run_shoal(&[
        "inspect".as_ref(),
        img.as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["tag"].as_str().unwrap().to_string())
        .collect()
}

/// Every cache file of a volume equals the real blob where its readiness
/// map says it is ready: the cache never holds an unverified byte.
fn assert_cache_correct(work: &Path, volume_dir: &str, blob_dir: &Path) -> u64 {
    let dir = work.join(volume_dir).join("blobs");
    let mut ready_blocks = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".ready") {
            continue;
        }
        let map = std::fs::read(p.with_file_name(format!("{name}.ready"))).unwrap();
        let (cache, real) = (
            std::fs::File::open(&p).unwrap(),
            std::fs::File::open(blob_dir.join(&name)).unwrap(),
        );
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        // The durable bitmap, then (after a 16-byte boot id) the volatile
        // one: a bit in either claims verified bytes.
        let blocks = u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize;
        let n = blocks.div_ceil(8);
        let (durable, volatile) = (&map[16..16 + n], &map[16 + n + 16..16 + 2 * n + 16]);
        let either: Vec<u8> = durable.iter().zip(volatile).map(|(d, v)| d | v).collect();
        for (i, byte) in either.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    let off = ((i * 8 + bit) * 4096) as u64;
                    cache.read_exact_at(&mut a, off).unwrap();
                    real.read_exact_at(&mut b, off).unwrap();
                    assert!(
                        a == b,
                        "{name}: block at {off} marked ready but differs from the blob"
                    );
                    ready_blocks += 1;
                }
            }
        }
    }
    ready_blocks
}

#[test]
fn domain_sharing_is_counted_at_the_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = build_images(tmp.path());
    let Some(nginx) = Nginx::start(&imgs.blobs, tmp.path()) else {
        return skip("nginx not installed");
    };
    let d = Daemon::start(tmp.path());
    let (py, web) = (imgs.py.to_str().unwrap(), imgs.web.to_str().unwrap());
    let url = nginx.url();
    d.ok(&[
        "bind", "--domain", "one", "--fsid", "py", py, "--remote", &url,
    ]);
    d.ok(&[
        "bind", "--domain", "one", "--fsid", "web", web, "--remote", &url,
    ]);
    d.ok(&[
        "bind", "--domain", "two", "--fsid", "web", web, "--remote", &url,
    ]);
    d.ok(&["bind", "--fsid", "lonely", web, "--remote", &url]);
    // Same fsid twice in one domain: refused.
    let o = d.cli(&[
        "bind", "--domain", "one", "--fsid", "py", py, "--remote", &url,
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("fsid py is already bound in domain one"));

    for (dom, fsid) in [
        (Some("one"), "py"),
        (Some("one"), "web"),
        (Some("two"), "web"),
        (None, "lonely"),
    ] {
        d.prefetch_all(dom, fsid);
    }
    let base_size = std::fs::metadata(imgs.blobs.join(&imgs.base_blob))
        .unwrap()
        .len();
    // Domain one fetched the shared base blob once for two images; domain
    // two and the private volume fetched their own copies.
    assert_eq!(nginx.bytes_for(&imgs.base_blob), 3 * base_size);
    let web_blob = &blob_names(&imgs.web)[1];
    let web_size = std::fs::metadata(imgs.blobs.join(web_blob)).unwrap().len();
    assert_eq!(nginx.bytes_for(web_blob), 3 * web_size);
    let st = d.status();
    let one = st
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["domain_id"] == "one")
        .unwrap();
    let base = one["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == imgs.base_blob.as_str())
        .unwrap();
    assert_eq!(base["refs"], 2);
    for vol in ["domains/one", "domains/two", "private/lonely"] {
        assert!(assert_cache_correct(&d.work, vol, &imgs.blobs) > 0);
    }
    // Reads through the domain return the right bytes.
    let out = tmp.path().join("ref");
    extract(&imgs.web, &imgs.blobs, &out);
    for f in [
        "usr/bin/bash",
        "etc/os-release",
        "app/main.py",
        "usr/bin/hello",
    ] {
        let p = out.join(f);
        if p.is_file() && !p.is_symlink() {
            assert_eq!(
                d.ok(&["read", "--domain", "two", "web", f]),
                std::fs::read(&p).unwrap(),
                "{f}"
            );
        }
    }
    // A restart reuses the cache: nothing is fetched again.
    let before = nginx.bytes_for(&imgs.base_blob);
    drop(d);
    let d = Daemon::start(tmp.path());
    d.prefetch_all(Some("one"), "py");
    assert_eq!(nginx.bytes_for(&imgs.base_blob), before);

    // GC: unbinding domain two leaves its blobs unused; they go, others stay.
    d.ok(&["unbind", "--domain", "two", "web"]);
    d.ok(&["gc", "--max-bytes", "0"]);
    assert!(!d
        .work
        .join("domains/two/blobs")
        .join(&imgs.base_blob)
        .exists());
    assert!(d
        .work
        .join("domains/one/blobs")
        .join(&imgs.base_blob)
        .exists());
    assert!(d
        .work
        .join("private/lonely/blobs")
        .join(&imgs.base_blob)
        .exists());
    let text = d.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("one,py"));
    // It says which frontend `auto` picks on this kernel, and why.
    assert!(text.contains("frontend auto: "), "{text}");
    assert!(text.contains("not fscache: "), "{text}");
    // The control socket is private; metrics are Prometheus text.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let m = std::process::Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(&d.socket)
        .arg("http://shoal/metrics")
        .output();
    if let Ok(m) = m {
        let m = String::from_utf8_lossy(&m.stdout);
        let line = format!(
            "shoal_blob_refs{{volume=\"erofs,one\",blob=\"{}\"}} 2",
            imgs.base_blob
        );
        assert!(m.contains(&line), "{m}");
        assert!(m.contains("# TYPE shoal_blob_fetched_bytes_total counter"));
    }
}

#[test]
fn remote_faults_give_eio_then_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = build_demo(tmp.path(), "4096");
    let srv = Faulty::start(&blobs, tmp.path());
    let d = Daemon::start(tmp.path());
    d.ok(&[
        "bind",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        "--remote",
        &srv.url(),
    ]);
    let blob = &blob_names(&img)[0];
    let want = std::fs::read(ex.join("base/usr/share/doc/shoal-demo/glossary.txt")).unwrap();
    let file = "usr/share/doc/shoal-demo/glossary.txt";
    for mode in ["down", "slow", "reset", "short", "wrong", "s500", "s404"] {
        srv.set_mode(mode);
        let before = d.blob_cache("erofs,demo", blob).0;
        let o = d.cli(&["read", "demo", file]);
        assert!(!o.status.success(), "{mode}: read succeeded");
        assert!(o.stdout.len() < want.len(), "{mode}: got the whole file");
        let cached = d.blob_cache("erofs,demo", blob).0;
        // A reply cut short (reset, short) leaves the chunks that arrived
        // whole before the cut: verified, so kept. Nothing else is cached,
        // and every cached byte is right.
        if !matches!(mode, "reset" | "short") {
            assert_eq!(cached, before, "{mode}: something was cached");
        }
        assert!(cached < want.len() as u64, "{mode}: the file was cached");
        assert_eq!(
            assert_cache_correct(&d.work, "private/demo", &blobs) * 4096,
            cached,
            "{mode}"
        );
    }
    let log = d.log_text();
    assert!(
        log.contains(blob.as_str()) && log.contains("offset") && log.contains("sha256 mismatch"),
        "{log}"
    );
    srv.set_mode("ok");
    assert_eq!(d.ok(&["read", "demo", file]), want);
    d.wait_flushed();
    assert!(assert_cache_correct(&d.work, "private/demo", &blobs) > 0);

    // Recorded prefetch: the access order is kept at unbind; after GC and a
    // rebind, prefetch --recorded fetches those chunks first, then the rest.
    d.ok(&["read", "demo", "usr/bin/hello"]);
    d.ok(&["unbind", "demo"]);
    let order = d.work.join("access/-/demo.order");
    let recorded = std::fs::read_to_string(&order).unwrap();
    assert!(recorded.lines().count() >= 2, "{recorded}");
    d.ok(&["gc"]);
    d.ok(&[
        "bind",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        "--remote",
        &srv.url(),
    ]);
    let out = String::from_utf8(d.ok(&["prefetch", "demo", "--recorded"])).unwrap();
    assert!(
        out.contains(&format!("({} chunks", recorded.lines().count())),
        "{out}"
    );
    d.prefetch_all(None, "demo");
    assert!(assert_cache_correct(&d.work, "private/demo", &blobs) > 0);

    // The recording as files, first touch first; a build laid out by it
    // puts the first file touched at the blob's first block.
    let paths = tmp.path().join("paths");
    run_shoal(&[
        "order".as_ref(),
        img.as_os_str(),
        order.as_os_str(),
        "-o".as_ref(),
        paths.as_os_str(),
    ]);
    let listed = std::fs::read_to_string(&paths).unwrap();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(
        lines[..2],
        ["/usr/share/doc/shoal-demo/glossary.txt", "/usr/bin/hello"],
        "{listed}"
    );
    let ordered = tmp.path().join("ordered.img");
    run_shoal(&[
        "build".as_ref(),
        "-o".as_ref(),
        ordered.as_os_str(),
        "--blob-dir".as_ref(),
        tmp.path().join("ordered-blobs").as_os_str(),
        "--order".as_ref(),
        paths.as_os_str(),
        ex.join("base").as_os_str(),
    ]);
    let first = tmp.path().join("first-block");
    std::fs::write(&first, "1 0\n").unwrap();
    let at_zero = run_shoal(&["order".as_ref(), ordered.as_os_str(), first.as_os_str()]);
    assert_eq!(at_zero.trim(), "/usr/share/doc/shoal-demo/glossary.txt");

    // Such a build records its start (inspect shows it); binding it
    // fetches that start (and not the rest) before anything is read.
    let shown = run_shoal(&["inspect".as_ref(), ordered.as_os_str()]);
    assert!(
        shown.contains("start:") && shown.contains("fetched at bind"),
        "{shown}"
    );
    d.ok(&["unbind", "demo"]);
    d.ok(&[
        "bind",
        "--fsid",
        "ordered",
        ordered.to_str().unwrap(),
        "--remote",
        &format!("file://{}", tmp.path().join("ordered-blobs").display()),
    ]);
    let ordered_blob = &blob_names(&ordered)[0];
    wait_for("recorded start", || {
        d.blob_cache("erofs,ordered", ordered_blob).0 >= want.len() as u64
    });
    let (cached, size) = d.blob_cache("erofs,ordered", ordered_blob);
    assert!(
        cached < size,
        "the whole blob was fetched: {cached} of {size}"
    );
    assert!(d.log_text().contains("recorded start fetched"));
}

/// A recorded start scattered over a lower layer's blob is fetched in
/// multi-range requests where the server serves them (nginx), and range by
/// range where it does not (the fixture answers the first range only);
/// every byte verifies either way.
#[test]
fn scattered_starts_take_few_requests() {
    let base = corpus_dir().join("base.tar.gz");
    if !base.exists() {
        return skip("no corpus");
    }
    let tmp = tempfile::tempdir().unwrap();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo");
    let order = tmp.path().join("order");
    // Small files far apart in the base layer's blob (laid out in directory
    // order): a dozen pieces that fit one request.
    let files = [
        "/usr/bin/clear",
        "/usr/bin/zgrep",
        "/usr/lib/x86_64-linux-gnu/gconv/CP771.so",
        "/usr/lib/x86_64-linux-gnu/gconv/IBM863.so",
        "/usr/lib/x86_64-linux-gnu/libthread_db.so.1",
        "/usr/lib/x86_64-linux-gnu/perl-base/unicore/To/_PerlLB.pl",
        "/usr/lib/x86_64-linux-gnu/security/pam_time.so",
        "/usr/sbin/installkernel",
        "/usr/share/doc/grep/AUTHORS",
        "/usr/share/doc/util-linux/releases/v2.22-ReleaseNotes.gz",
        "/usr/share/locale/cs/LC_MESSAGES/sed.mo",
        "/usr/share/locale/fr/LC_MESSAGES/grep.mo",
    ];
    std::fs::write(&order, files.join("\n")).unwrap();
    let (img, blobs) = (tmp.path().join("img"), tmp.path().join("blobs"));
    run_shoal(&[
        "build".as_ref(),
        "--layer-blobs".as_ref(),
        "--order".as_ref(),
        order.as_os_str(),
        "-o".as_ref(),
        img.as_os_str(),
        "--blob-dir".as_ref(),
        blobs.as_os_str(),
        base.as_os_str(),
        ex.join("base").as_os_str(),
    ]);
    let Some(nginx) = Nginx::start(&blobs, &mkdir(tmp.path(), "nginx")) else {
        return skip("no nginx");
    };
    let faulty = Faulty::start(&blobs, &mkdir(tmp.path(), "faulty"));
    let d = Daemon::start(&mkdir(tmp.path(), "daemon"));
    for (domain, url) in [("multi", nginx.url()), ("single", faulty.url())] {
        d.ok(&[
            "bind",
            "--domain",
            domain,
            "--fsid",
            "app",
            img.to_str().unwrap(),
            "--remote",
            &url,
        ]);
    }
    wait_for("both recorded starts", || {
        d.log_text().matches("recorded start fetched").count() == 2
    });
    let blob = &blob_names(&img)[0];
    let (multi, single) = (nginx.requests_for(blob), faulty.requests_for(blob));
    eprintln!("the start took {multi} multi-range requests, {single} single-range ones");
    assert!(
        multi >= 1 && multi * 3 <= single,
        "{multi} multi-range requests against {single} single ones"
    );
    let log = d.log_text();
    assert!(!log.contains("fail verification"), "{log}");
    let cached: Vec<u64> = d
        .status()
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["blobs"].as_array().unwrap().clone())
        .filter(|b| b["name"] == blob.as_str())
        .map(|b| b["cached_bytes"].as_u64().unwrap())
        .collect();
    assert!(
        cached.len() == 2 && cached[0] == cached[1] && cached[0] > 0,
        "{cached:?}"
    );
}

fn mkdir(parent: &Path, name: &str) -> PathBuf {
    let p = parent.join(name);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn bearer_token_auth_on_oci_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = build_demo(tmp.path(), "1048576");
    let srv = Faulty::start(&blobs, tmp.path());
    srv.set_mode("auth");
    let d = Daemon::start(tmp.path());
    let remote = format!("oci://127.0.0.1:{}/shoal/demo", srv.port);
    d.ok(&[
        "bind",
        "--domain",
        "d",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        "--remote",
        &remote,
    ]);
    let want = std::fs::read(ex.join("base/usr/bin/hello")).unwrap();
    assert_eq!(
        d.ok(&["read", "--domain", "d", "demo", "usr/bin/hello"]),
        want
    );
    assert_eq!(srv.requests_for("token"), 1);
    // Another domain's image on the same registry fetches its own copy but
    // no new token: the daemon's remotes share one client (its connection
    // pools and its tokens), not one each.
    d.ok(&[
        "bind",
        "--domain",
        "e",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        "--remote",
        &remote,
    ]);
    assert_eq!(
        d.ok(&["read", "--domain", "e", "demo", "usr/bin/hello"]),
        want
    );
    assert_eq!(srv.requests_for("token"), 1, "the token is fetched once");
}

#[test]
fn kill9_during_fetching_never_serves_unverified_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = build_images(tmp.path());
    // nginx keeps up with heavy fetching; the Python server is the fallback.
    let nginx = Nginx::start(&imgs.blobs, tmp.path());
    let faulty = nginx
        .is_none()
        .then(|| Faulty::start(&imgs.blobs, tmp.path()));
    let url = nginx
        .as_ref()
        .map(|n| n.url())
        .or(faulty.as_ref().map(|f| f.url()))
        .unwrap();
    let mut d = Daemon::start(tmp.path());
    d.ok(&[
        "bind",
        "--domain",
        "k",
        "--fsid",
        "py",
        imgs.py.to_str().unwrap(),
        "--remote",
        &url,
    ]);
    let total_blocks: u64 = blob_names(&imgs.py)
        .iter()
        .map(|n| std::fs::metadata(imgs.blobs.join(n)).unwrap().len() / 4096)
        .sum();
    let mut mid_fetch_kills = 0;
    for round in 0..8u64 {
        d.ok(&["prefetch", "--domain", "k", "py"]);
        std::thread::sleep(std::time::Duration::from_millis(40 + round * 37 % 200));
        d.kill9();
        let ready = assert_cache_correct(&d.work, "domains/k", &imgs.blobs);
        if ready > 0 && ready < total_blocks {
            mid_fetch_kills += 1;
        }
        d.restart(); // bindings come back from the work directory
    }
    assert!(
        mid_fetch_kills > 0,
        "no kill landed in the middle of fetching"
    );
    d.prefetch_all(Some("k"), "py");
    let ready = assert_cache_correct(&d.work, "domains/k", &imgs.blobs);
    assert!(ready > 0);
    for name in blob_names(&imgs.py) {
        let (cached, size) = d.blob_cache("erofs,k", &name);
        assert!(cached > 0 && cached <= size);
    }
}

#[test]
fn push_to_registry_and_bind_by_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(reg) = Registry::start(tmp.path()) else {
        return skip("docker-registry not installed");
    };
    let imgs = build_images(tmp.path());
    let reference = format!("oci://127.0.0.1:{}/shoal/py:v1", reg.port);
    run_shoal(&[
        "push".as_ref(),
        imgs.py.as_os_str(),
        "--blob-dir".as_ref(),
        imgs.blobs.as_os_str(),
        reference.as_ref(),
    ]);
    // Pushing an image sharing the base layer uploads only what is new.
    let web_ref = format!("oci://127.0.0.1:{}/shoal/py:web", reg.port);
    let out = run_shoal(&[
        "push".as_ref(),
        imgs.web.as_os_str(),
        "--blob-dir".as_ref(),
        imgs.blobs.as_os_str(),
        web_ref.as_ref(),
    ]);
    assert!(out.contains("1 blobs already there"), "{out}");
    let d = Daemon::start(tmp.path());
    d.ok(&["bind", "--domain", "r", "--fsid", "py", &reference]);
    d.ok(&["bind", "--domain", "r", "--fsid", "web", &web_ref]);
    d.prefetch_all(Some("r"), "py");
    d.prefetch_all(Some("r"), "web");
    assert!(assert_cache_correct(&d.work, "domains/r", &imgs.blobs) > 0);
    let out = tmp.path().join("ref");
    extract(&imgs.py, &imgs.blobs, &out);
    for f in ["usr/bin/bash", "usr/bin/hello", "app/main.py"] {
        let p = out.join(f);
        if p.is_file() && !p.is_symlink() {
            assert_eq!(
                d.ok(&["read", "--domain", "r", "py", f]),
                std::fs::read(&p).unwrap(),
                "{f}"
            );
        }
    }
    // Hostile references are refused before any request.
    for bad in [
        "oci://127.0.0.1:1/Bad/Repo:x",
        "oci://127.0.0.1:1/a:../../etc",
    ] {
        assert!(!d
            .cli(&["bind", "--domain", "r", "--fsid", "x", bad])
            .status
            .success());
    }
}

#[test]
fn invalid_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, img, blobs) = build_demo(tmp.path(), "1048576");
    let d = Daemon::start(tmp.path());
    let remote = format!("file://{}", blobs.display());
    for (dom, fsid) in [("../up", "x"), ("ok", ".."), ("ok", "a/b"), ("", "x")] {
        let o = d.cli(&[
            "bind",
            "--domain",
            dom,
            "--fsid",
            fsid,
            img.to_str().unwrap(),
            "--remote",
            &remote,
        ]);
        assert!(!o.status.success(), "{dom:?} {fsid:?} accepted");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("invalid"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(!d.work.join("up").exists());
}

/// A busy FUSE mount: `shoal umount` says EBUSY and keeps it (mounted,
/// bound, in status); unbinding a mounted image is refused, so GC cannot
/// evict its cache; once the files are closed, umount works.
#[test]
fn busy_mounts_stay_and_mounted_images_stay_bound() {
    if !rustix::process::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        return skip("needs root and /dev/fuse");
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_, img, blobs) = build_demo(tmp.path(), "4096");
    let d = Daemon::start(tmp.path());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let remote = format!("file://{}", blobs.display());
    let mnt_s = mnt.to_str().unwrap();
    d.ok(&[
        "mount",
        "--frontend",
        "fuse",
        "--domain",
        "busy",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        mnt_s,
        "--remote",
        &remote,
    ]);
    let open = std::fs::File::open(mnt.join("etc/os-release")).unwrap();
    let o = d.cli(&["umount", mnt_s]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("busy"),
        "umount of a busy mount: {err}"
    );
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(mnt_s)
    };
    assert!(mounted(), "the busy mount went away");
    let o = d.cli(&["unbind", "--domain", "busy", "demo"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is mounted at"),
        "unbind of a mounted image: {err}"
    );
    d.ok(&["gc", "--max-bytes", "0"]);
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut &open, &mut buf).unwrap();
    assert!(buf.contains("Shoal Demo"), "{buf}");
    assert_eq!(
        d.status().as_array().unwrap().len(),
        1,
        "the binding must stay"
    );
    drop(open);
    d.ok(&["umount", mnt_s]);
    assert!(!mounted());
    assert_eq!(d.status().as_array().unwrap().len(), 0, "umount unbinds");
}

/// Small things the CLI and API must get right.
#[test]
fn client_errors_and_private_work_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, img, _) = build_demo(tmp.path(), "4096");
    let d = Daemon::start(tmp.path());
    // A relative file:// remote is the caller's mistake, said as such.
    let o = d.cli(&[
        "bind",
        "--fsid",
        "x",
        img.to_str().unwrap(),
        "--remote",
        "file://relative/dir",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("absolute path"),
        "{err}"
    );
    // Unmounting what is not mounted says so (as root: others get EPERM).
    if rustix::process::geteuid().is_root() {
        let o = d.cli(&["umount", tmp.path().to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("not a mount point"),
            "{err}"
        );
    }
    // The work dir is private whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.work).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // `shoal status | head` ends quietly, however early the reader goes.
    let blobs = img.parent().unwrap().join("blobs");
    d.ok(&[
        "bind",
        "--fsid",
        "x",
        img.to_str().unwrap(),
        "--remote",
        &format!("file://{}", blobs.display()),
    ]);
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} status | head -c 0",
            env!("CARGO_BIN_EXE_shoal")
        ))
        .env("SHOAL_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A remote that trickles a byte a second defeats read timeouts, not the
/// fetch deadline: the read fails within it (so does a second reader
/// waiting on the same flight), nothing is cached, and once the remote is
/// fixed the same read succeeds. A token endpoint that never ends its reply
/// costs a bounded amount of memory and a clear error.
#[test]
fn trickling_and_flooding_remotes_fail_within_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let (ex, img, blobs) = build_demo(tmp.path(), "4096");
    let srv = Faulty::start(&blobs, tmp.path());
    let d = Daemon::start_with(tmp.path(), "fetch_deadline_secs = 3\n");
    d.ok(&[
        "bind",
        "--fsid",
        "demo",
        img.to_str().unwrap(),
        "--remote",
        &srv.url(),
    ]);
    let file = "usr/share/doc/shoal-demo/glossary.txt";
    let want = std::fs::read(ex.join("base").join(file)).unwrap();
    srv.set_mode("trickle");
    let t = std::time::Instant::now();
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (sock, file) = (d.socket.clone(), file.to_string());
            std::thread::spawn(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
                    .args(["read", "demo", &file])
                    .env("SHOAL_SOCKET", sock)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for r in readers {
        let o = r.join().unwrap();
        assert!(
            !o.status.success(),
            "a read from a trickling remote succeeded"
        );
    }
    let took = t.elapsed();
    assert!(
        took < std::time::Duration::from_secs(15),
        "reads took {took:?} with a 3 s deadline"
    );
    assert_eq!(assert_cache_correct(&d.work, "private/demo", &blobs), 0);
    srv.set_mode("ok");
    assert_eq!(d.ok(&["read", "demo", file]), want);

    // An OCI remote whose token endpoint floods.
    d.ok(&["unbind", "demo"]);
    srv.set_mode("tokenflood");
    let remote = format!("oci://127.0.0.1:{}/shoal/demo", srv.port);
    d.ok(&[
        "bind",
        "--fsid",
        "flood",
        img.to_str().unwrap(),
        "--remote",
        &remote,
    ]);
    let o = d.cli(&["read", "flood", file]);
    assert!(!o.status.success());
    assert!(
        d.log_text().contains("token reply larger than"),
        "{}",
        d.log_text()
    );
    assert!(d.rss_kib() < 256 * 1024, "daemon RSS {} KiB", d.rss_kib());
}
