//! Tar layer ingestion on arbitrary bytes (plain, gzip or zstd by magic),
//! applied twice as two layers. Whatever a layer is, ingestion must return
//! (an error naming layer and entry is fine); whatever tree it accepts must
//! write an image that opens and walks cleanly.
#![no_main]

use erofs::blob::ChunkStore;
use erofs::ingest::apply_tar;
use erofs::tree::Tree;
use erofs::writer::{write_image, WriteOptions};
use erofs::{BlobFiles, Image};
use libfuzzer_sys::fuzz_target;
use shoal_erofs_fuzz::{walk, Budget};
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap()).path();
    let layer = dir.join("layer");
    let blob_dir = dir.join("blobs");
    std::fs::write(&layer, data).unwrap();
    let mut tree = Tree::new();
    let mut store = ChunkStore::new(&blob_dir, 4096).unwrap();
    let ok = (0..2).all(|_| apply_tar(&mut tree, &mut store, &layer).is_ok());
    if ok {
        // Entries are checked as they are applied, so an accepted tree
        // must write: a late writer error could not name the entry.
        let (blobs, placement) = store.finish(&tree, false).expect("blobs finish");
        let opts = WriteOptions {
            chunk_size: 4096,
            build_time: None,
            volume_name: Vec::new(),
            fingerprints: true,
            starts: Vec::new(),
        };
        let bytes = write_image(&tree, &blobs, &placement, &opts).expect("an accepted tree writes");
        let img = Image::open(bytes).expect("a written image opens");
        let files = blobs
            .iter()
            .map(|b| std::fs::File::open(blob_dir.join(&b.tag)).unwrap())
            .collect();
        let (n, clean) = walk(&img, &BlobFiles(files), Budget::default());
        assert!(n > 0 && clean, "a written image walks cleanly");
    }
    let _ = std::fs::remove_dir_all(&blob_dir);
});
