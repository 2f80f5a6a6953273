#!/usr/bin/env bash
# Page cache for N mounts of one domain (issue 15): N = 1, 4, 8 images built
# on one base (the corpus base + py layers, plus a small layer of each
# image's own, one blob per layer), mounted through fanotify in one domain,
# each read whole (every regular file, cold: page cache dropped, cache
# files already filled). Run with and without erofs page-cache sharing
# (`inode_share`), inside ../shared/vm's Linux 7.2 (TCG: times are slow in
# absolute terms, compare them only with each other). Then, on this host,
# read time of one mount with and without `directio`: lazy (empty cache,
# blobs fetched from a file:// remote), cold (cache files full, page cache
# dropped) and warm.
#   "cache MB"  page cache growth (Cached, /proc/meminfo) for the N reads,
#               1.5 s after them (the daemon trims cache files every second)
#   "files MB"  of that, what reading the files' data adds once every
#               mount's metadata (its own bootstrap, directories) is read
#   "files per page"  files MB divided by one copy of one tree's pages
#               (each file's size rounded up to 4 KiB): 1.0 is one copy
#   "time s"    wall time of the N reads
# MB = 10^6 bytes. NS="1 4 8" sets the mount counts. Run it alone: other
# work on the machine shows up in Cached.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${CORPUS:-$root/../shared/corpus}
vm=$root/../shared/vm
shoal=$root/target/release/shoal
ns=${NS:-1 4 8}

if [ "${1:-}" = --in-vm ]; then
  in=$2
  work=${VM_SCRATCH:-/scratch}/bench
  mkdir -p "$work/img"
  cp "$in"/*.img "$work/img/"
  cached() { awk '/^Cached:/ {print $2 * 1024}' /proc/meminfo; }
  drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
  readall() { for m in "$@"; do find "$m" -type f -print0 | xargs -0 cat >/dev/null; done; }
  tree=
  printf '| sharing | N | cache MB | files MB | files per page | time s |\n| --- | --- | --- | --- | --- | --- |\n'
  for share in true false; do
    d=$work/d-$share
    mkdir -p "$d"
    printf 'page_cache_share = %s\n' "$share" >"$d/cfg.toml"
    "$shoal" daemon --socket "$d/s.sock" --work-dir "$d/work" --config "$d/cfg.toml" >"$d/log" 2>&1 &
    pid=$!
    for _ in $(seq 400); do SHOAL_SOCKET=$d/s.sock "$shoal" status >/dev/null 2>&1 && break; sleep 0.1; done
    export SHOAL_SOCKET=$d/s.sock
    mounts=()
    for k in $(seq 8); do
      mkdir -p "$d/m$k"
      "$shoal" mount --frontend fanotify --domain bench --fsid "v$k" "$work/img/v$k.img" "$d/m$k" \
        --remote "file://$in/blobs" >/dev/null
      mounts+=("$d/m$k")
    done
    # Fill the caches once (the same blobs for every image but their own layer).
    readall "${mounts[@]}"
    sleep 0.5
    if [ -z "$tree" ]; then
      # What one copy of the tree's pages takes: each file rounded up to pages.
      tree=$(find "$d/m1" -type f -printf '%s\n' | awk '{ t += int(($1 + 4095) / 4096) * 4096 } END { print t }')
    fi
    for n in $ns; do
      drop
      c0=$(cached); t0=$(date +%s.%N)
      # Metadata first (each image's own bootstrap and directories), then
      # the files' data: "files" is what the data alone adds.
      for m in "${mounts[@]:0:$n}"; do find "$m" -type f >/dev/null; done
      cm=$(cached)
      readall "${mounts[@]:0:$n}"
      t1=$(date +%s.%N); sleep 1.5; c1=$(cached)   # after the daemon's trim
      awk -v s="$share" -v n="$n" -v g="$((c1 - c0))" -v f="$((c1 - cm))" -v t="$tree" -v a="$t0" -v b="$t1" \
        'BEGIN { printf "| %s | %d | %.1f | %.1f | %.2f | %.2f |\n", (s == "true" ? "inode_share" : "none"), n, g / 1e6, f / 1e6, f / t, b - a }'
    done
    for m in "${mounts[@]}"; do "$shoal" umount "$m" >/dev/null; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    pkill -f "fanotify-pump --socket $d/" || true
  done
  echo "tree: $((tree / 1000000)) MB of pages of regular files per image"
  exit 0
fi

cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d /var/tmp/bench-pagecache.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
for k in $(seq 8); do
  mkdir -p "$tmp/v$k/etc"
  head -c 65536 /dev/urandom >"$tmp/v$k/etc/variant"
  tar -C "$tmp/v$k" -cf "$tmp/v$k.tar" etc
  "$shoal" build --layer-blobs -o "$tmp/v$k.img" --blob-dir "$tmp/blobs" \
    "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" "$tmp/v$k.tar" >/dev/null
done
if [ -z "${SKIP_VM:-}" ]; then   # SKIP_VM=1: only the host table
  echo "## Page cache for N mounts of one domain (Linux 7.2 VM, fanotify)"
  echo
  "$vm/run-in-vm.sh" --kernel "$vm/bzImage-7.2" --mem 4G --smp 2 --disk 4G --timeout 1800 \
    ${KLOG:+--klog "$KLOG"} -- \
    "$0" --in-vm "$tmp" | grep -E '^(\||tree:)'
fi

echo
echo "## One mount on this host ($(uname -r)): directio on and off"
echo
printf '| directio | lazy s | cold s | warm s | cache MB after cold | per page |\n| --- | --- | --- | --- | --- | --- |\n'
readall() { find "$1" -type f -print0 | xargs -0 cat >/dev/null; }
for dio in true false; do
  d=$tmp/host-$dio
  mkdir -p "$d/m"
  printf 'directio = %s\n' "$dio" >"$d/cfg.toml"
  "$shoal" daemon --socket "$d/s.sock" --work-dir "$d/work" --config "$d/cfg.toml" >"$d/log" 2>&1 &
  pid=$!
  for _ in $(seq 400); do SHOAL_SOCKET=$d/s.sock "$shoal" status >/dev/null 2>&1 && break; sleep 0.05; done
  export SHOAL_SOCKET=$d/s.sock
  "$shoal" mount --frontend fanotify --fsid v1 "$tmp/v1.img" "$d/m" --remote "file://$tmp/blobs" >/dev/null
  sync; echo 3 >/proc/sys/vm/drop_caches
  l0=$(date +%s.%N); readall "$d/m"; l1=$(date +%s.%N)   # lazy: fills the cache files
  sleep 0.5; sync; echo 3 >/proc/sys/vm/drop_caches
  c0=$(awk '/^Cached:/ {print $2 * 1024}' /proc/meminfo)
  t0=$(date +%s.%N); readall "$d/m"; t1=$(date +%s.%N)
  sleep 1.5   # the daemon trims cache-file pages every second
  c1=$(awk '/^Cached:/ {print $2 * 1024}' /proc/meminfo)
  t2=$(date +%s.%N); readall "$d/m"; t3=$(date +%s.%N)
  tree=$(find "$d/m" -type f -printf '%s\n' | awk '{ t += int(($1 + 4095) / 4096) * 4096 } END { print t }')
  awk -v s="$dio" -v l="$l0" -v m="$l1" -v a="$t0" -v b="$t1" -v c="$t2" -v e="$t3" -v g="$((c1 - c0))" -v t="$tree" \
    'BEGIN { printf "| %s | %.2f | %.2f | %.2f | %.1f | %.2f |\n", s, m - l, b - a, e - c, g / 1e6, g / t }'
  "$shoal" umount "$d/m" >/dev/null
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pkill -f "fanotify-pump --socket $d/" || true
done
