//! The block: the unit of chunk addresses and readiness bits. A leaf
//! module, so that the cache and the fetch path can both use it without
//! importing each other.

/// log2 of [`BLOCK`]: the `blkszbits` every image core binds must have
/// (chunk addresses and readiness bits are counted in these blocks).
pub const BLOCK_BITS: u8 = 12;
/// 4 KiB.
pub const BLOCK: u64 = 1 << BLOCK_BITS;

/// The blocks `(first, count)` that bytes `[offset, offset + len)` touch:
/// the one conversion from a byte range (a kernel read, a file extent) to
/// the readiness map's unit.
pub fn block_span(offset: u64, len: u64) -> (u32, u32) {
    let first = offset / BLOCK;
    let last = offset.saturating_add(len).div_ceil(BLOCK);
    let clamp = |x: u64| x.min(u64::from(u32::MAX)) as u32;
    (clamp(first), clamp(last - first))
}
