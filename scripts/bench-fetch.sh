#!/usr/bin/env bash
# Fetch benchmark: cold fetch of the base+py image's blobs into a domain
# cache from nginx and from a local docker-registry, 1 and 8 readers, vs
# curl of the same blobs; daemon RSS with 10 bound images. Prints tables.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
corpus=${CORPUS:-$root/../shared/corpus}
shoal=$root/target/release/shoal
cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" --layer-blobs \
    "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null

port=$(free_port)
cat >"$tmp/nginx.conf" <<CONF
worker_processes 2; daemon off; pid $tmp/nginx.pid; error_log $tmp/error.log;
events {}
http { access_log off; client_body_temp_path $tmp; proxy_temp_path $tmp; fastcgi_temp_path $tmp;
       uwsgi_temp_path $tmp; scgi_temp_path $tmp;
       server { listen 127.0.0.1:$port; root $tmp/blobs; } }
CONF
/usr/sbin/nginx -c "$tmp/nginx.conf" -p "$tmp" & pids+=($!)

rport=$(free_port)
cat >"$tmp/registry.yml" <<CONF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $tmp/registry}}
http: {addr: 127.0.0.1:$rport}
CONF
docker-registry serve "$tmp/registry.yml" >/dev/null 2>&1 & pids+=($!)
sleep 1
"$shoal" push "$tmp/py.img" --blob-dir "$tmp/blobs" "oci://127.0.0.1:$rport/bench/py:v1" >/dev/null

echo "## HTTP (nginx)"
"$shoal" bench fetch "$tmp/py.img" --remote "http://127.0.0.1:$port/" \
    --curl-prefix "http://127.0.0.1:$port/" --rss-images 10
echo
echo "## OCI registry (docker-registry 2.8)"
"$shoal" bench fetch "$tmp/py.img" --remote "oci://127.0.0.1:$rport/bench/py" \
    --curl-prefix "http://127.0.0.1:$rport/v2/bench/py/blobs/sha256:"
