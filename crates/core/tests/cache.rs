//! The blob cache against a real blob directory: single-flight fetches,
//! verification before anything is written, durable readiness.

use erofs::chunktable::ChunkEntry;
use shoal_core::cache::BlobCache;
use shoal_core::fetch::Source;
use shoal_core::names::BlobId;
use shoal_core::remote::{FileRemote, Remote, RemoteError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A real file remote that counts fetches and can corrupt what it returns.
struct Counting {
    inner: FileRemote,
    fetches: AtomicU64,
    corrupt: bool,
}

impl Remote for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn fetch(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = self.inner.fetch(name, offset, len)?;
        if self.corrupt {
            b[0] ^= 1;
        }
        Ok(b)
    }
}

/// Build an image with a few multi-block chunks; return (blob dir, blob
/// name, blocks, chunk entries).
fn fixture(dir: &Path) -> (PathBuf, String, u32, Vec<ChunkEntry>) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u8 {
        std::fs::write(src.join(format!("f{i}")), vec![i + 1; 100_000]).unwrap();
    }
    let blobs = dir.join("blobs");
    let img = dir.join("img");
    erofs::build(
        &[src],
        &blobs,
        &img,
        &erofs::BuildOptions {
            chunk_size: 65536,
            ..Default::default()
        },
    )
    .unwrap();
    let image = erofs::Image::open(std::fs::read(&img).unwrap()).unwrap();
    let name = image.device_tag(1).unwrap();
    let entries = image
        .chunk_table
        .as_ref()
        .unwrap()
        .entries(1)
        .unwrap()
        .to_vec();
    (blobs, name, image.devices[0].blocks.get(), entries)
}

fn id(name: &str) -> BlobId {
    name.parse().unwrap()
}

fn remote(blobs: &Path, corrupt: bool) -> Arc<Counting> {
    Arc::new(Counting {
        inner: FileRemote::new(blobs.to_path_buf()),
        fetches: AtomicU64::new(0),
        corrupt,
    })
}

#[test]
fn concurrent_readers_of_a_missing_chunk_fetch_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, name, blocks, entries) = fixture(tmp.path());
    let cache = BlobCache::open(&tmp.path().join("cache"), &id(&name), blocks).unwrap();
    let r = remote(&blobs, false);
    let remotes: Vec<Source> = vec![Source::raw(r.clone())];
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| cache.ensure(&entries[0], &remotes).unwrap());
        }
    });
    assert_eq!(r.fetches.load(Ordering::SeqCst), 1);
    assert!(cache.is_ready(entries[0].blkaddr.get(), entries[0].nblocks.get()));
    let st = cache.stats();
    assert_eq!(
        (st.fetches, st.fetched_bytes),
        (1, u64::from(entries[0].nblocks.get()) * 4096)
    );
}

#[test]
fn wrong_bytes_are_never_written_or_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, name, blocks, entries) = fixture(tmp.path());
    let dir = tmp.path().join("cache");
    let cache = BlobCache::open(&dir, &id(&name), blocks).unwrap();
    let r = remote(&blobs, true);
    let remotes: Vec<Source> = vec![Source::raw(r.clone())];
    let err = cache.ensure(&entries[1], &remotes).unwrap_err().to_string();
    assert!(
        err.contains(&name) && err.contains("sha256 mismatch"),
        "{err}"
    );
    assert_eq!(
        r.fetches.load(Ordering::SeqCst),
        3,
        "bounded re-fetches of wrong bytes"
    );
    assert_eq!(cache.ready_blocks(), 0);
    cache.flush().unwrap();
    let data = std::fs::read(dir.join(&name)).unwrap();
    assert!(
        data.iter().all(|&b| b == 0),
        "wrong bytes reached the cache file"
    );
}

#[test]
fn readiness_survives_reopen_only_once_flushed() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, name, blocks, entries) = fixture(tmp.path());
    let dir = tmp.path().join("cache");
    let remotes: Vec<Source> = vec![Source::raw(remote(&blobs, false))];
    {
        let cache = BlobCache::open(&dir, &id(&name), blocks).unwrap();
        cache.ensure(&entries[0], &remotes).unwrap();
        cache.flush().unwrap();
        cache.ensure(&entries[1], &remotes).unwrap();
        // no flush: as if the process died here
    }
    let (a, b) = (&entries[0], &entries[1]);
    // The process died, the kernel did not: the unflushed chunk's bytes
    // are in the page cache, so its volatile bit still counts.
    let cache = BlobCache::open(&dir, &id(&name), blocks).unwrap();
    assert!(cache.is_ready(a.blkaddr.get(), a.nblocks.get()));
    if shoal_core::readiness::boot_id() != [0; 16] {
        assert!(cache.is_ready(b.blkaddr.get(), b.nblocks.get()));
    }
    drop(cache);
    // The machine crashed (another boot id): only what was flushed counts.
    {
        use std::os::unix::fs::FileExt;
        let map = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(format!("{name}.ready")))
            .unwrap();
        let boot_at = 16 + u64::from(blocks).div_ceil(8);
        map.write_all_at(&[0x5a; 16], boot_at).unwrap();
    }
    let cache = BlobCache::open(&dir, &id(&name), blocks).unwrap();
    assert!(cache.is_ready(a.blkaddr.get(), a.nblocks.get()));
    assert!(!cache.is_ready(b.blkaddr.get(), b.nblocks.get()));
    // A map for a blob of another size is not trusted.
    drop(cache);
    let other = BlobCache::open(&dir, &id(&name), blocks + 1).unwrap();
    assert_eq!(other.ready_blocks(), 0);
}

#[test]
fn batches_fetch_adjacent_chunks_with_one_request_and_verify_each() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, name, blocks, entries) = fixture(tmp.path());
    let dir = tmp.path().join("cache");
    let cache = BlobCache::open(&dir, &id(&name), blocks).unwrap();
    let r = remote(&blobs, false);
    let remotes: Vec<Source> = vec![Source::raw(r.clone())];
    cache.ensure_batch(&entries, &remotes, 8 << 20).unwrap();
    assert_eq!(
        r.fetches.load(Ordering::SeqCst),
        1,
        "one request for the whole run"
    );
    cache.flush().unwrap();
    assert_eq!(
        std::fs::read(dir.join(&name)).unwrap(),
        std::fs::read(blobs.join(&name)).unwrap()
    );
    // The corrupting remote flips the first byte of each reply: in the run,
    // only the first chunk is wrong. Each chunk is checked on its own: the
    // first is refused (its own re-fetches are wrong too), the rest are kept.
    let other = tempfile::tempdir().unwrap();
    let cache = BlobCache::open(other.path(), &id(&name), blocks).unwrap();
    let bad: Vec<Source> = vec![Source::raw(remote(&blobs, true))];
    assert!(cache.ensure_batch(&entries, &bad, 8 << 20).is_err());
    let first = &entries[0];
    assert!(!cache.is_ready(first.blkaddr.get(), first.nblocks.get()));
    let total: u64 = entries.iter().map(|e| u64::from(e.nblocks.get())).sum();
    assert_eq!(cache.ready_blocks(), total - u64::from(first.nblocks.get()));
    cache.flush().unwrap();
    let (got, want) = (
        std::fs::read(other.path().join(&name)).unwrap(),
        std::fs::read(blobs.join(&name)).unwrap(),
    );
    let skip = first.nblocks.get() as usize * 4096;
    assert!(
        got[..skip].iter().all(|&b| b == 0),
        "wrong bytes reached the cache"
    );
    assert_eq!(got[skip..], want[skip..]);
}

/// Serve one ranged GET of `blob` from 127.0.0.1: the reply's first
/// `first` bytes at once, the rest only when `go` says so (or after 5 s).
/// Records "rest sent" in `log`. Returns the base URL.
fn stalling_server(
    blob: Vec<u8>,
    first: usize,
    go: std::sync::mpsc::Receiver<()>,
    log: Arc<std::sync::Mutex<Vec<&'static str>>>,
) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut range = None;
        let mut r = BufReader::new(conn.try_clone().unwrap());
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l.trim().is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap();
                range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
            }
        }
        let (a, b) = range.expect("a single-range request");
        let body = &blob[a..=b];
        write!(
            conn,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\n\r\n",
            blob.len(),
            body.len()
        )
        .unwrap();
        conn.write_all(&body[..first]).unwrap();
        conn.flush().unwrap();
        let _ = go.recv_timeout(std::time::Duration::from_secs(5));
        log.lock().unwrap().push("rest sent");
        conn.write_all(&body[first..]).unwrap();
    });
    url
}

/// A large request's chunks are ready, and their waiters woken, as their
/// bytes arrive: a reader of the first chunk of a run in flight is
/// answered while the server still holds back the rest.
#[test]
fn chunks_are_ready_as_a_request_streams_in() {
    let tmp = tempfile::tempdir().unwrap();
    let (blobs, name, blocks, entries) = fixture(tmp.path());
    let blob = std::fs::read(blobs.join(&name)).unwrap();
    let first = &entries[0];
    let (go, wait_go) = std::sync::mpsc::channel();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let url = stalling_server(
        blob.clone(),
        first.nblocks.get() as usize * 4096,
        wait_go,
        log.clone(),
    );
    let http = shoal_core::remote::HttpRemote::new(&url, Default::default()).unwrap();
    let sources = vec![Source::raw(Arc::new(http))];
    let cache = Arc::new(BlobCache::open(&tmp.path().join("cache"), &id(&name), blocks).unwrap());
    let leader = {
        let (cache, sources, entries) = (cache.clone(), sources.clone(), entries.clone());
        std::thread::spawn(move || cache.ensure_batch(&entries, &sources, 8 << 20))
    };
    // Wait for the leader's claim, then read the first chunk as any
    // reader does: it joins the flight (or finds it landed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while cache.stats().inflight == 0 && !cache.is_ready(first.blkaddr.get(), 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the leader never claimed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cache.ensure(first, &sources).unwrap();
    log.lock().unwrap().push("first read");
    let _ = go.send(()); // the server may have given up waiting
    leader.join().unwrap().unwrap();
    assert_eq!(*log.lock().unwrap(), ["first read", "rest sent"]);
    cache.flush().unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("cache").join(&name)).unwrap(),
        blob
    );
}
