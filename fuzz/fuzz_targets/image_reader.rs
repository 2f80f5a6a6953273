//! The image reader on arbitrary bytes. Input: a little-endian u32 image
//! length, the image, then the bytes every data blob device reads from.
//! Each image is tried as it is and with its checksums recomputed.
#![no_main]

use erofs::Image;
use libfuzzer_sys::fuzz_target;
use shoal_erofs_fuzz::{reseal, walk, Budget, SliceBlobs};

fuzz_target!(|data: &[u8]| {
    let (image, blob) = match data.get(..4) {
        Some(len) => {
            let rest = &data[4..];
            let n = (u32::from_le_bytes(len.try_into().unwrap()) as usize).min(rest.len());
            rest.split_at(n)
        }
        None => (data, &[][..]),
    };
    if let Ok(img) = Image::open(image.to_vec()) {
        walk(&img, &SliceBlobs(blob), Budget::default());
        walk(&img, &erofs::NoBlobs, Budget::default());
    }
    let mut sealed = image.to_vec();
    reseal(&mut sealed);
    if sealed != image {
        if let Ok(img) = Image::open(sealed) {
            walk(&img, &SliceBlobs(blob), Budget::default());
        }
    }
});
