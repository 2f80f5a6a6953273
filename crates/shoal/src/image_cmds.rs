//! Image commands: build report, inspect, ls, cat, extract, verify, mount.

use crate::walk::walk;
use anyhow::{bail, Context, Result};
use erofs::ondisk::*;
use erofs::tree::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK};
use erofs::{BlobFiles, BuildReport, ChunkFormat, DataLayout, Extent, Image, Inode};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct BlobArgs {
    /// Directory holding the image's data blobs, named by their device tags.
    #[arg(long)]
    pub blob_dir: Option<PathBuf>,
    /// Blob file for each device slot in order (for untagged erofs-utils images).
    #[arg(long = "device")]
    pub devices: Vec<PathBuf>,
}

pub fn open_image(path: &Path) -> Result<Image<File>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Image::open(f).with_context(|| format!("reading image {}", path.display()))
}

/// The blob file of every device slot, in order.
pub fn blob_paths(img: &Image<File>, args: &BlobArgs) -> Result<Vec<PathBuf>> {
    let n = img.devices.len();
    if !args.devices.is_empty() {
        if args.devices.len() != n {
            bail!(
                "the image has {n} device slots but {} --device were given",
                args.devices.len()
            );
        }
        return Ok(args.devices.clone());
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let dir = args
        .blob_dir
        .as_ref()
        .context("the image references data blobs: pass --blob-dir (or --device)")?;
    (1..=n as u16)
        .map(|d| {
            let tag = img
                .device_tag(d)
                .with_context(|| format!("device slot {d} has no tag: pass --device"))?;
            Ok(dir.join(tag))
        })
        .collect()
}

pub fn open_blobs(img: &Image<File>, args: &BlobArgs) -> Result<BlobFiles> {
    let files = blob_paths(img, args)?
        .iter()
        .map(|p| File::open(p).with_context(|| format!("opening blob {}", p.display())))
        .collect::<Result<_>>()?;
    Ok(BlobFiles(files))
}

pub fn print_build_report(output: &Path, r: &BuildReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let s = &r.stats;
    println!(
        "{}: {} inodes, bootstrap {} bytes",
        output.display(),
        r.inodes,
        r.bootstrap_bytes
    );
    for b in &r.blobs {
        println!(
            "  blob {} {:>12} bytes {:>7} chunks {}",
            b.tag,
            b.bytes,
            b.chunks,
            if b.written { "written" } else { "reused" }
        );
    }
    for o in &r.objects {
        println!(
            "  object {} {:>12} bytes {:>7} frames ({:.2} of blob {}) {}",
            o.object,
            o.object_bytes,
            o.frames,
            o.object_bytes as f64 / o.raw_bytes.max(1) as f64,
            &o.tag[..12],
            if o.written { "written" } else { "reused" }
        );
    }
    println!(
        "  file data {} bytes in {} chunks: {} holes, {} deduplicated, {} reused, {} bytes written",
        s.bytes_in, s.chunks, s.holes, s.chunks_deduped, s.chunks_reused, s.bytes_written
    );
    Ok(())
}

fn feature_names(compat: u32, incompat: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (bit, name) in [
        (EROFS_FEATURE_COMPAT_SB_CHKSUM, "sb_csum"),
        (EROFS_FEATURE_COMPAT_MTIME, "mtime"),
        (EROFS_FEATURE_COMPAT_XATTR_FILTER, "xattr_filter"),
        (EROFS_FEATURE_COMPAT_PLAIN_XATTR_PFX, "plain_xattr_pfx"),
        (EROFS_FEATURE_COMPAT_ISHARE_XATTRS, "ishare_xattrs"),
    ] {
        if compat & bit != 0 {
            v.push(name);
        }
    }
    for (bit, name) in [
        (EROFS_FEATURE_INCOMPAT_ZERO_PADDING, "0padding"),
        (EROFS_FEATURE_INCOMPAT_COMPR_CFGS, "compr_cfgs"),
        (EROFS_FEATURE_INCOMPAT_CHUNKED_FILE, "chunked_file"),
        (EROFS_FEATURE_INCOMPAT_DEVICE_TABLE, "device_table"),
        (EROFS_FEATURE_INCOMPAT_ZTAILPACKING, "ztailpacking"),
        (EROFS_FEATURE_INCOMPAT_FRAGMENTS, "fragments"),
        (EROFS_FEATURE_INCOMPAT_XATTR_PREFIXES, "xattr_prefixes"),
    ] {
        if incompat & bit != 0 {
            v.push(name);
        }
    }
    v
}

/// What `inspect` counts over a tree: inodes by kind, and what files keep
/// in blobs, so that dedup is measured as files see it.
#[derive(Default)]
struct TreeStats {
    counts: BTreeMap<&'static str, u64>,
    chunk_size: Option<u64>,
    /// File bytes in blob chunks.
    logical: u64,
    /// Blob bytes files reference, each chunk padded to whole blocks.
    referenced: u64,
    /// Distinct chunks referenced, and their padded bytes.
    stored: HashSet<(u16, u32)>,
    stored_bytes: u64,
}

impl TreeStats {
    /// Count every inode once (hard links are not counted again).
    fn of(img: &Image<File>) -> Result<Self> {
        let mut stats = TreeStats::default();
        let root = img.inode(img.root_nid())?;
        walk(img, root, b"", |e| match e.first {
            true => stats.add(img, &e.inode),
            false => Ok(()),
        })?;
        Ok(stats)
    }

    fn add(&mut self, img: &Image<File>, ino: &Inode) -> erofs::Result<()> {
        let kind = match ino.file_type() {
            S_IFREG => "files",
            S_IFDIR => "directories",
            S_IFLNK => "symlinks",
            S_IFCHR | S_IFBLK => "devices",
            S_IFIFO => "fifos",
            _ => "sockets",
        };
        *self.counts.entry(kind).or_default() += 1;
        if !ino.is_reg() || ino.datalayout != DataLayout::ChunkBased {
            return Ok(());
        }
        let format = ChunkFormat::decode(ino.i_u, img.sb.blkszbits);
        self.chunk_size.get_or_insert(1u64 << format.chunkbits);
        let bs = img.block_size();
        for m in img.extents(ino) {
            let m = m?;
            if let Extent::Chunk { device_id, blkaddr } = m.extent {
                let padded = m.llen.div_ceil(bs) * bs;
                self.logical += m.llen;
                self.referenced += padded;
                if self.stored.insert((device_id, blkaddr)) {
                    self.stored_bytes += padded;
                }
            }
        }
        Ok(())
    }

    /// Referenced over stored blob bytes (1 without any).
    fn dedup_ratio(&self) -> f64 {
        if self.stored_bytes > 0 {
            self.referenced as f64 / self.stored_bytes as f64
        } else {
            1.0
        }
    }
}

/// Each device slot as `inspect` reports it: tag, size, how many chunk
/// digests pin it, if compressed, how it is stored on remotes, and its
/// recorded start if the image has one.
fn devices_json(img: &Image<File>) -> Vec<serde_json::Value> {
    (1..)
        .zip(&img.devices)
        .map(|(device_id, d): (u16, _)| {
            let tag = img.device_tag(device_id).unwrap_or_default();
            let table = img.chunk_table.as_ref();
            let entries = table
                .and_then(|t| t.entries(device_id))
                .map_or(0, |e| e.len());
            let remote = table.and_then(|t| t.frames(device_id)).map(|f| {
                json!({"compression": "zstd", "object": f.object_name(),
                        "object_bytes": f.object_size, "frames": f.frames.len()})
            });
            let start = table
                .and_then(|t| t.start(device_id))
                .map(|s| json!({"bytes": s.blocks() * img.block_size(), "ranges": s.ranges.len()}));
            json!({"device_id": device_id, "tag": tag, "blocks": d.blocks.get(),
                   "bytes": u64::from(d.blocks.get()) * img.block_size(), "chunk_digests": entries,
                   "remote_object": remote, "recorded_start": start})
        })
        .collect()
}

pub fn inspect(path: &Path, as_json: bool) -> Result<()> {
    let img = open_image(path)?;
    let sb = &img.sb;
    let stats = TreeStats::of(&img)?;
    let v = json!({
        "image": path,
        "image_bytes": img.image_size,
        "block_size": img.block_size(),
        "blocks": sb.blocks.get(),
        "root_nid": img.root_nid(),
        "inos": sb.inos.get(),
        "build_time": sb.build_time.get(),
        "uuid": hex::encode(sb.uuid),
        "volume_name": String::from_utf8_lossy(&sb.volume_name).trim_end_matches('\0'),
        "features": feature_names(sb.feature_compat.get(), sb.feature_incompat.get()),
        "chunk_size": stats.chunk_size,
        "devices": devices_json(&img),
        "chunk_table": img.chunk_table.as_ref().map(|t| t.total_entries()),
        "counts": stats.counts,
        "file_bytes_in_blobs": stats.logical,
        "unique_chunk_bytes": stats.stored_bytes,
        "dedup_ratio": (stats.dedup_ratio() * 1000.0).round() / 1000.0,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print_inspect(path, &img, &v, &stats);
    Ok(())
}

/// `inspect`'s text form of the report `v`.
fn print_inspect(path: &Path, img: &Image<File>, v: &serde_json::Value, stats: &TreeStats) {
    let sb = &img.sb;
    println!(
        "image:        {} ({} bytes)",
        path.display(),
        img.image_size
    );
    println!(
        "block size:   {}  blocks: {}  root nid: {}",
        img.block_size(),
        sb.blocks.get(),
        img.root_nid()
    );
    println!(
        "inodes:       {}  ({})",
        sb.inos.get(),
        stats
            .counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "features:     {}",
        v["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("uuid:         {}", v["uuid"].as_str().unwrap());
    if let Some(cs) = stats.chunk_size {
        println!("chunk size:   {cs}");
    }
    match &img.chunk_table {
        Some(t) => println!(
            "chunk table:  {} digests (every blob chunk verifiable)",
            t.total_entries()
        ),
        None => println!("chunk table:  none (not built by shoal; blobs checked whole only)"),
    }
    print_devices(v["devices"].as_array().unwrap());
    println!(
        "file data:    {} bytes in blobs, {} unique, dedup ratio {:.3}",
        stats.logical,
        stats.stored_bytes,
        stats.dedup_ratio()
    );
}

fn print_devices(devices: &[serde_json::Value]) {
    for d in devices {
        println!(
            "device {}:     {} {} bytes, {} chunk digests",
            d["device_id"],
            d["tag"].as_str().unwrap(),
            d["bytes"],
            d["chunk_digests"]
        );
        if let Some(o) = d["remote_object"].as_object() {
            println!(
                "  remote:     zstd object {} {} bytes in {} frames",
                o["object"].as_str().unwrap_or_default(),
                o["object_bytes"],
                o["frames"]
            );
        }
        if let Some(s) = d["recorded_start"].as_object() {
            println!(
                "  start:      {} bytes in {} ranges, fetched at bind",
                s["bytes"], s["ranges"]
            );
        }
    }
}

/// `ls -l` style mode: the type, then rwx for owner, group and others,
/// with setuid/setgid as `s` (`S` without execute) in the owner's and the
/// group's execute slot and sticky as `t` (`T`) in the others'.
fn mode_string(mode: u32) -> String {
    let t = match mode & S_IFMT {
        S_IFDIR => 'd',
        S_IFLNK => 'l',
        S_IFCHR => 'c',
        S_IFBLK => 'b',
        S_IFIFO => 'p',
        S_IFSOCK => 's',
        _ => '-',
    };
    let mut s = String::from(t);
    for (shift, special, mark) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
        let bits = mode >> shift;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (mode & special != 0, bits & 1 != 0) {
            (true, true) => mark,
            (true, false) => mark.to_ascii_uppercase(),
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// A time as signed decimal seconds, exact before 1970 too: the stored
/// (-5 s, +0.5 s) is -4.5 s, printed `-4.500000000` (not `-5.5...`).
fn time_string(sec: i64, nsec: u32) -> String {
    let nsec = nsec.min(999_999_999);
    if sec < 0 && nsec > 0 {
        format!("-{}.{:09}", sec.unsigned_abs() - 1, 1_000_000_000 - nsec)
    } else {
        format!("{sec}.{nsec:09}")
    }
}

pub fn ls(path: &Path, dir: &str, recursive: bool) -> Result<()> {
    let img = open_image(path)?;
    let start = img.lookup(dir)?;
    let prefix = dir.trim_matches('/').as_bytes();
    let entries = if recursive || !start.is_dir() {
        crate::walk::entries(&img, start, prefix)?
    } else {
        let mut v = Vec::new();
        for e in img.read_dir(&start)? {
            if e.name != b"." && e.name != b".." {
                let mut p = prefix.to_vec();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                v.push(crate::walk::Entry {
                    path: p,
                    inode: img.inode(e.nid)?,
                    first: true,
                });
            }
        }
        v
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for e in entries {
        let i = &e.inode;
        let extra = match i.file_type() {
            S_IFLNK => format!(" -> {}", String::from_utf8_lossy(&img.read_link(i)?)),
            _ => String::new(),
        };
        let size = match i.file_type() {
            S_IFCHR | S_IFBLK => format!("{},{}", i.rdev().0, i.rdev().1),
            _ => i.size.to_string(),
        };
        writeln!(
            out,
            "{} {:>3} {:>5} {:>5} {:>12} {} /{}{}",
            mode_string(i.mode),
            i.nlink,
            i.uid,
            i.gid,
            size,
            time_string(i.mtime, i.mtime_nsec),
            String::from_utf8_lossy(&e.path),
            extra
        )?;
    }
    Ok(())
}

pub fn cat(path: &Path, file: &str, args: &BlobArgs) -> Result<()> {
    let img = open_image(path)?;
    let ino = img.lookup(file)?;
    let blobs = open_blobs(&img, args)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let zeros = vec![0u8; 1 << 16];
    img.read_file(&ino, &blobs, &mut |bytes, mut len| match bytes {
        Some(b) => out.write_all(b),
        None => {
            while len > 0 {
                let n = len.min(zeros.len() as u64) as usize;
                out.write_all(&zeros[..n])?;
                len -= n as u64;
            }
            Ok(())
        }
    })
    .with_context(|| format!("reading {file}"))?;
    out.flush()?;
    Ok(())
}

pub fn extract(path: &Path, dest: &Path, args: &BlobArgs) -> Result<()> {
    let img = open_image(path)?;
    let blobs = open_blobs(&img, args)?;
    let n = crate::extract::extract(&img, &blobs, dest)?;
    println!("extracted {n} entries to {}", dest.display());
    Ok(())
}

/// Check an image against its blobs: each blob's size and digest, every
/// pinned chunk, and that every chunk a file maps is pinned. Problems are
/// collected so that one run reports them all.
pub fn verify(path: &Path, args: &BlobArgs) -> Result<()> {
    let img = open_image(path)?;
    let paths = blob_paths(&img, args)?;
    let mut problems = Vec::new();
    let mut chunks_ok = 0usize;
    let files: Vec<File> = paths.iter().filter_map(|p| File::open(p).ok()).collect();
    let blob_files = (files.len() == paths.len()).then_some(BlobFiles(files));
    for (device_id, p) in (1..).zip(&paths) {
        chunks_ok += verify_blob(&img, device_id, p, blob_files.as_ref(), &mut problems)?;
    }
    let files = verify_files(&img, &mut problems)?;
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("FAIL {p}");
        }
        bail!("{} problem(s) in {}", problems.len(), path.display());
    }
    println!(
        "ok: {} blobs, {chunks_ok} chunks verified, {files} files mapped",
        paths.len()
    );
    Ok(())
}

/// One blob: its size against the device slot, its digest against the
/// tag, and (when every blob opened) each chunk against the chunk table.
/// Returns how many chunks verified.
fn verify_blob(
    img: &Image<File>,
    device_id: u16,
    p: &Path,
    blob_files: Option<&BlobFiles>,
    problems: &mut Vec<String>,
) -> Result<usize> {
    let slot = &img.devices[usize::from(device_id) - 1];
    let want_size = u64::from(slot.blocks.get()) * img.block_size();
    let mut f = match File::open(p) {
        Ok(f) => f,
        Err(e) => {
            problems.push(format!("blob {}: {e}", p.display()));
            return Ok(0);
        }
    };
    let size = f.metadata()?.len();
    if size != want_size {
        problems.push(format!(
            "blob {}: {size} bytes, device slot says {want_size}",
            p.display()
        ));
    }
    if let Some(tag) = img.device_tag(device_id) {
        let got = sha256_hex(&mut f)?;
        if got != tag {
            problems.push(format!(
                "blob {}: sha256 {got} does not match its tag {tag}",
                p.display()
            ));
        }
    }
    let mut chunks_ok = 0;
    let entries = img.chunk_table.as_ref().and_then(|t| t.entries(device_id));
    if let (Some(entries), Some(blobs)) = (entries, blob_files) {
        for e in entries {
            let len = u64::from(e.nblocks.get()) * img.block_size();
            match img.read_chunk(device_id, e.blkaddr.get(), len, blobs) {
                Ok(_) => chunks_ok += 1,
                Err(err) => problems.push(err.to_string()),
            }
        }
    }
    Ok(chunks_ok)
}

fn sha256_hex(f: &mut File) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// Every chunk a file maps must be a pinned chunk of an existing device.
/// Returns how many regular files (per name) were mapped.
fn verify_files(img: &Image<File>, problems: &mut Vec<String>) -> Result<usize> {
    let root = img.inode(img.root_nid())?;
    let mut files = 0;
    walk(img, root, b"", |e| {
        if e.inode.file_type() != S_IFREG {
            return Ok(());
        }
        files += 1;
        let path = || String::from_utf8_lossy(&e.path);
        for m in img.extents(&e.inode) {
            let m = match m {
                Ok(m) => m,
                Err(err) => {
                    problems.push(format!("/{}: {err}", path()));
                    break;
                }
            };
            if let (Extent::Chunk { device_id, blkaddr }, Some(t)) = (m.extent, &img.chunk_table) {
                if t.find(device_id, blkaddr)
                    .is_none_or(|c| c.blkaddr.get() != blkaddr)
                {
                    problems.push(format!(
                        "/{}: chunk at device {device_id} block {blkaddr} has no digest",
                        path()
                    ));
                }
            }
        }
        Ok(())
    })?;
    Ok(files)
}

/// A blob must be exactly as long as its device slot says: the kernel
/// takes it as it is, and a short one fails only later, on reads. Slots
/// of 0 blocks (erofs-utils 1.5 `--blobdev`) have no size to check.
fn check_blob_size(img: &Image<File>, k: usize, p: &Path) -> Result<()> {
    let size = std::fs::metadata(p)
        .with_context(|| format!("blob {}", p.display()))?
        .len();
    let blocks = u64::from(img.devices[k].blocks.get());
    let want = blocks * img.block_size();
    if blocks != 0 && size != want {
        bail!(
            "blob {}: {size} bytes, but device slot {} is {want} bytes ({blocks} blocks of {})",
            p.display(),
            k + 1,
            img.block_size()
        );
    }
    Ok(())
}

pub fn mount(image: &Path, mountpoint: &Path, args: &BlobArgs) -> Result<()> {
    let img = open_image(image)?;
    let paths = blob_paths(&img, args)?;
    for (k, p) in paths.iter().enumerate() {
        check_blob_size(&img, k, p)?;
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    // Local blobs: direct I/O keeps one copy of each page in memory.
    let opts = shoal_sys::ErofsOptions {
        directio: shoal_sys::erofs_knows_flag("directio"),
        inode_share: None,
    };
    shoal_sys::mount_erofs(image, &refs, mountpoint, &opts)
        .with_context(|| format!("mounting {} at {}", image.display(), mountpoint.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_string_is_ls_l() {
        for (mode, want) in [
            (S_IFREG | 0o644, "-rw-r--r--"),
            (S_IFREG | 0o4755, "-rwsr-xr-x"),
            (S_IFREG | 0o4644, "-rwSr--r--"),
            (S_IFREG | 0o2755, "-rwxr-sr-x"),
            (S_IFREG | 0o2644, "-rw-r-Sr--"),
            (S_IFDIR | 0o1777, "drwxrwxrwt"),
            (S_IFDIR | 0o1770, "drwxrwx--T"),
            (S_IFREG | 0o7000, "---S--S--T"),
            (S_IFREG | 0o7777, "-rwsrwsrwt"),
            (S_IFLNK | 0o777, "lrwxrwxrwx"),
            (S_IFCHR | 0o620, "crw--w----"),
            (S_IFBLK | 0o660, "brw-rw----"),
            (S_IFIFO | 0o600, "prw-------"),
            (S_IFSOCK | 0o755, "srwxr-xr-x"),
        ] {
            assert_eq!(mode_string(mode), want, "{mode:o}");
        }
    }

    #[test]
    fn time_string_is_signed_and_exact() {
        assert_eq!(time_string(1_600_000_000, 5), "1600000000.000000005");
        assert_eq!(time_string(0, 0), "0.000000000");
        assert_eq!(time_string(-5, 0), "-5.000000000");
        assert_eq!(time_string(-5, 500_000_000), "-4.500000000");
        assert_eq!(time_string(-1, 1), "-0.999999999");
        assert_eq!(time_string(i64::MIN, 0), "-9223372036854775808.000000000");
    }
}
