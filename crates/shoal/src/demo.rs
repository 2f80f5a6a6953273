//! `shoal demo`: the bundled example end to end. Two images share a base
//! layer; the second adds only its own bytes, both ways shoal offers
//! (a chunk dictionary, and one blob per layer).

use crate::image_cmds::{self, BlobArgs};
use anyhow::{Context, Result};
use erofs::{BuildOptions, BuildReport};
use std::path::{Path, PathBuf};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo")
}

fn build(
    sources: &[PathBuf],
    blobs: &Path,
    out: &Path,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    erofs::build(sources, blobs, out, opts).with_context(|| format!("building {}", out.display()))
}

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

/// The images the demo makes: A (base) and B (base + app) in one blob
/// directory, C and D the same with one blob per layer.
struct Images {
    blobs: PathBuf,
    a: PathBuf,
    b: PathBuf,
    layer_blobs: PathBuf,
    c: PathBuf,
    d: PathBuf,
}

pub fn run(work: &Path, containers: Option<&Path>) -> Result<()> {
    let ex = example_dir();
    anyhow::ensure!(
        ex.join("base").is_dir(),
        "bundled example not found at {}",
        ex.display()
    );
    if work.exists() {
        std::fs::remove_dir_all(work).with_context(|| format!("cleaning {}", work.display()))?;
    }
    let im = build_images(work, &ex)?;
    toolkit(work, &im)?;
    step(
        8,
        "a daemon and a domain: C and D mounted lazily, sharing the base blob",
    );
    crate::demo_live::domain(work, [("base", &im.c), ("app", &im.d)], &im.layer_blobs)?;
    if let Some(corpus) = containers {
        step(
            9,
            "containerd starts a container lazily through shoal snapshotter",
        );
        crate::demo_live::containers(work, corpus)?;
    }
    println!("\ndemo done: images and blobs are in {}", work.display());
    Ok(())
}

/// Steps 1–3: building, with a chunk dictionary and with layer blobs.
fn build_images(work: &Path, ex: &Path) -> Result<Images> {
    let (base, app) = (ex.join("base"), ex.join("app"));
    let blobs = work.join("blobs");
    let opts = BuildOptions {
        chunk_size: 4096,
        ..Default::default()
    };
    step(1, "build image A from the base layer");
    let a = work.join("a.img");
    let ra = build(std::slice::from_ref(&base), &blobs, &a, &opts)?;
    image_cmds::print_build_report(&a, &ra, false)?;

    step(
        2,
        "build image B = base + app, reusing A's blobs as a chunk dictionary",
    );
    let b = work.join("b.img");
    let reuse = BuildOptions {
        reuse: vec![a.clone()],
        ..opts.clone()
    };
    let rb = build(&[base.clone(), app.clone()], &blobs, &b, &reuse)?;
    image_cmds::print_build_report(&b, &rb, false)?;
    println!(
        "-> B wrote {} new bytes ({} chunks reused from A's blob); A's blob holds {} bytes",
        rb.stats.bytes_written, rb.stats.chunks_reused, ra.stats.bytes_written
    );

    step(
        3,
        "the same with one blob per layer: both images name the same base blob",
    );
    let (c, d) = (work.join("c.img"), work.join("d.img"));
    let lb = BuildOptions {
        layer_blobs: true,
        ..opts
    };
    let layer_blobs = work.join("layer-blobs");
    let rc = build(std::slice::from_ref(&base), &layer_blobs, &c, &lb)?;
    let rd = build(&[base, app], &layer_blobs, &d, &lb)?;
    image_cmds::print_build_report(&d, &rd, false)?;
    let shared = rc.blobs.first().map(|x| &x.tag) == rd.blobs.first().map(|x| &x.tag);
    println!(
        "-> base blob shared by C and D: {}; the blob directory holds {} blobs for 2 images",
        if shared { "yes" } else { "NO" },
        std::fs::read_dir(&layer_blobs)?.count()
    );
    Ok(Images {
        blobs,
        a,
        b,
        layer_blobs,
        c,
        d,
    })
}

/// Steps 4–7: inspect, verify, list, read and mount with local blobs.
fn toolkit(work: &Path, im: &Images) -> Result<()> {
    step(4, "inspect B");
    image_cmds::inspect(&im.b, false)?;

    step(5, "verify every chunk of every blob");
    let args = BlobArgs {
        blob_dir: Some(im.blobs.clone()),
        devices: vec![],
    };
    for img in [&im.a, &im.b] {
        print!("{}: ", img.display());
        image_cmds::verify(img, &args)?;
    }

    step(6, "list B and read a file through the reader");
    image_cmds::ls(&im.b, "/", true)?;
    image_cmds::cat(&im.b, "/app/main.py", &args)?;

    step(
        7,
        "mount B with the kernel (file-backed erofs, blobs as devices)",
    );
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    match image_cmds::mount(&im.b, &mnt, &args) {
        Ok(()) => {
            let hello = std::fs::read_to_string(mnt.join("usr/bin/hello"))?;
            let app = std::fs::read_to_string(mnt.join("app/main.py"))?;
            println!("mounted at {}:\n{hello}{app}", mnt.display());
            shoal_sys::umount(&mnt)?;
            println!("unmounted");
        }
        Err(e) => {
            println!("mount skipped: {e:#} (needs root and a kernel with erofs file-backed mounts)")
        }
    }
    Ok(())
}
