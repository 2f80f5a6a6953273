//! `/metrics`: Prometheus text exposition of the domains' blob counters.

use super::Shared;
use axum::extract::State;
use axum::response::IntoResponse;
use shoal_core::domain::BlobStatus;

/// Per-blob Prometheus series: (name, help, type, value).
type BlobMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BlobStatus) -> u64,
);

const BLOB_METRICS: &[BlobMetric] = &[
    (
        "shoal_blob_fetched_bytes_total",
        "Bytes fetched from remotes and verified.",
        "counter",
        |b| b.stats.fetched_bytes,
    ),
    (
        "shoal_blob_requests_total",
        "Ranged requests made to remotes (round trips).",
        "counter",
        |b| b.stats.requests,
    ),
    (
        "shoal_blob_wire_bytes_total",
        "Bytes received from remotes (compressed, when the remote stores the blob so).",
        "counter",
        |b| b.stats.wire_bytes,
    ),
    (
        "shoal_blob_fetches_total",
        "Chunks fetched.",
        "counter",
        |b| b.stats.fetches,
    ),
    (
        "shoal_blob_hits_total",
        "Chunk reads served from the cache.",
        "counter",
        |b| b.stats.hits,
    ),
    (
        "shoal_blob_misses_total",
        "Chunk reads that needed a fetch.",
        "counter",
        |b| b.stats.misses,
    ),
    (
        "shoal_blob_fetch_failures_total",
        "Fetches that failed after retries.",
        "counter",
        |b| b.stats.failures,
    ),
    (
        "shoal_blob_inflight_fetches",
        "Fetches in progress.",
        "gauge",
        |b| b.stats.inflight,
    ),
    (
        "shoal_blob_cached_bytes",
        "Verified bytes in the cache.",
        "gauge",
        |b| b.cached_bytes,
    ),
    (
        "shoal_blob_refs",
        "Images of the volume using the blob.",
        "gauge",
        |b| b.refs as u64,
    ),
];

pub(super) async fn metrics(State(reg): State<Shared>) -> impl IntoResponse {
    use std::fmt::Write;
    let st = reg.status();
    let mut out = String::new();
    for (name, help, kind, value) in BLOB_METRICS {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in &st {
            for b in &d.blobs {
                let _ = writeln!(
                    out,
                    "{name}{{volume=\"{}\",blob=\"{}\"}} {}",
                    d.volume_key,
                    b.name,
                    value(b)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP shoal_volume_images Images bound per volume.\n# TYPE shoal_volume_images gauge"
    );
    for d in &st {
        let _ = writeln!(
            out,
            "shoal_volume_images{{volume=\"{}\"}} {}",
            d.volume_key,
            d.images.len()
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], out)
}
