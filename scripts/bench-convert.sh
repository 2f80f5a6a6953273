#!/usr/bin/env bash
# Conversion benchmark: `shoal convert` of the corpus images (base,
# base+py, base+web), pushed as ordinary gzip/zstd OCI images to a local
# docker-registry, into shoal images in the same registry; beside
# `nydus build` of the same trees (zstd, the default, and uncompressed;
# from an unpacked directory, so without pull and push) and beside a full
# `skopeo copy` + `umoci unpack` (what a pull and unpack cost). Medians of
# RUNS (default 3) runs; peak RSS from /usr/bin/time. Prints one table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
corpus=${CORPUS:-$root/../shared/corpus}
nydus=${NYDUS:-$root/../shared/peers/bin/nydus}
runs=${RUNS:-3}
shoal=$root/target/release/shoal
cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

port=$(free_port)
cat >"$tmp/registry.yml" <<CONF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $tmp/registry}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
CONF
docker-registry serve "$tmp/registry.yml" >/dev/null 2>&1 & pids+=($!)
sleep 1
reg=127.0.0.1:$port
fixture=$root/crates/shoal/tests/fixtures/oci_image.py

declare -A layers=(
  [base]="$corpus/base.tar.gz"
  [py]="$corpus/base.tar.gz $corpus/py-layer.tar.gz"
  [web]="$corpus/base.tar.gz $corpus/web-layer.tar.zst"
)
images=(base py web)
for i in "${images[@]}"; do
  # shellcheck disable=SC2086
  python3 "$fixture" "$tmp/layout-$i" "$i" ${layers[$i]} >/dev/null
  skopeo copy -q --dest-tls-verify=false "oci:$tmp/layout-$i:$i" "docker://$reg/src/$i:v1"
  mkdir -p "$tmp/tree-$i"
  for l in ${layers[$i]}; do tar -xf "$l" -C "$tmp/tree-$i" --same-owner --xattrs 2>/dev/null || true; done
  # whiteouts as a plain unpack leaves them: remove them and their targets
  find "$tmp/tree-$i" -name '.wh.*' -print0 | while IFS= read -r -d '' w; do
    b=$(basename "$w"); t="$(dirname "$w")/${b#.wh.}"; rm -rf "$w" "$t"; done
done

du_bytes() { du -sb "$@" | awk '{s+=$1} END {print s}'; }
# run LABEL OUT_DIR_TO_MEASURE CMD...: appends "seconds rss_kib" per run to $tmp/r
timed() { /usr/bin/time -f "%e %M" -o "$tmp/t" "$@" >/dev/null 2>"$tmp/err" || { cat "$tmp/err"; exit 1; }; cat "$tmp/t"; }

printf '%-5s | %-28s | %8s | %9s | %12s\n' image tool seconds "RSS MiB" "bytes written"
printf -- '------|------------------------------|----------|-----------|--------------\n'
for i in "${images[@]}"; do
  for tool in "shoal convert" "nydus build (zstd)" "nydus build (none)" "skopeo copy + umoci unpack"; do
    : >"$tmp/r"; bytes=0
    for n in $(seq "$runs"); do
      out=$tmp/out-$n; rm -rf "$out"; mkdir -p "$out"
      case $tool in
        "shoal convert")
          # a fresh destination each run, so every blob is uploaded
          timed "$shoal" convert --output "$out" "oci://$reg/src/$i:v1" "oci://$reg/bench-$n-$RANDOM/$i:v1" >>"$tmp/r"
          bytes=$(du_bytes "$out") ;;
        "nydus build (zstd)")
          timed "$nydus" build --blob-dir "$out/blobs" --bootstrap "$out/boot" "$tmp/tree-$i" >>"$tmp/r"
          bytes=$(du_bytes "$out") ;;
        "nydus build (none)")
          timed "$nydus" build --compressor none --blob-dir "$out/blobs" --bootstrap "$out/boot" "$tmp/tree-$i" >>"$tmp/r"
          bytes=$(du_bytes "$out") ;;
        "skopeo copy + umoci unpack")
          t0=$(date +%s.%N)
          /usr/bin/time -f "%M" -o "$tmp/m1" skopeo copy -q --src-tls-verify=false "docker://$reg/src/$i:v1" "oci:$out/oci:$i" >/dev/null
          if ! /usr/bin/time -f "%M" -o "$tmp/m2" umoci unpack --image "$out/oci:$i" "$out/bundle" >/dev/null 2>"$tmp/err"; then
            printf '%-5s | %-28s | failed: %s\n' "$i" "$tool" "$(grep -v '^Command exited' "$tmp/err" | tail -1 | cut -c1-60)"
            rm -rf "$out"; continue 2
          fi
          t1=$(date +%s.%N)
          echo "$(echo "$t1 - $t0" | bc) $(cat "$tmp/m1" "$tmp/m2" | sort -n | tail -1)" >>"$tmp/r"
          bytes=$(du_bytes "$out") ;;
      esac
      rm -rf "$out"
    done
    s=$(awk '{print $1}' "$tmp/r" | median)
    m=$(awk '{print $2}' "$tmp/r" | median)
    printf '%-5s | %-28s | %8.2f | %9.1f | %12d\n' "$i" "$tool" "$s" "$(echo "$m / 1024" | bc -l)" "$bytes"
  done
done
echo
echo "shoal convert includes pulling every layer from and pushing every blob to the registry;"
echo "nydus build starts from an unpacked tree (no pull, no push); skopeo+umoci is a full pull and unpack."
