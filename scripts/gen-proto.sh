#!/usr/bin/env bash
# Regenerate crates/snapshotter/src/proto/*.rs from crates/snapshotter/proto
# (containerd's snapshots.proto and mount.proto, gogoproto options removed).
# The output is checked in so that building needs no protoc; run this only
# when the protos change. Needs protoc (apt-get install protobuf-compiler).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
mkdir -p "$gen/src"
cat >"$gen/Cargo.toml" <<'TOML'
[package]
name = "gen-proto"
version = "0.0.0"
edition = "2021"
[dependencies]
tonic-build = "0.13"
TOML
cat >"$gen/src/main.rs" <<'RS'
fn main() {
    let mut a = std::env::args().skip(1);
    let (dir, out) = (a.next().unwrap(), a.next().unwrap());
    tonic_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&out)
        .compile_protos(&[format!("{dir}/snapshots.proto")], &[dir.clone()])
        .unwrap();
}
RS
cargo run -q --manifest-path "$gen/Cargo.toml" -- \
  "$root/crates/snapshotter/proto" "$root/crates/snapshotter/src/proto"
echo "regenerated $root/crates/snapshotter/src/proto"
