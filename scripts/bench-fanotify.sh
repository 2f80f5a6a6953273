#!/usr/bin/env bash
# fanotify benchmark: the base+py corpus image mounted by shoal's fanotify
# frontend (file-backed erofs over the domain's cache files, blobs pulled
# from a local docker-registry) vs the same bootstrap mounted file-backed
# with fully local blobs (the physical limit here).
#   cold: empty domain cache, page cache dropped: every chunk fetched from
#         the registry and verified on first access;
#   warm: the same workload again (fully cached);
#   disk: page cache dropped, domain cache on disk.
# Prints a table of seconds and ratios (native / shoal: 1.0 = native speed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${CORPUS:-$root/../shared/corpus}
. "$root/scripts/lib.sh"
build_release
tmp=$(mktemp -d /var/tmp/shoal-bench-fan.XXXXXX)
daemon= registry=
cleanup() {
    for m in "$tmp"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
    stop_daemon
    [ -n "$registry" ] && kill "$registry" 2>/dev/null || true
    pkill -f "fanotify-pump --socket $tmp/" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null
"$shoal" extract "$tmp/py.img" "$tmp/tree" --blob-dir "$tmp/blobs" >/dev/null
workloads_setup "$tmp/tree" 2000

remote="file://$tmp/blobs" ref="$tmp/py.img" via="file:// remote"
if [ -x /usr/bin/docker-registry ]; then
    port=$(free_port)
    registry=$(start_registry "$tmp/registry" "$port")
    "$shoal" push "$tmp/py.img" --blob-dir "$tmp/blobs" "oci://127.0.0.1:$port/bench/py:v1" >/dev/null
    ref="oci://127.0.0.1:$port/bench/py:v1" remote= via="docker-registry"
fi

mkdir -p "$tmp/mnt-native" "$tmp/mnt-shoal"
"$shoal" mount --frontend local "$tmp/py.img" "$tmp/mnt-native" --blob-dir "$tmp/blobs"
export SHOAL_SOCKET=$tmp/shoal.sock

start_shoal() {
    if [ -n "$daemon" ]; then
        "$shoal" umount "$tmp/mnt-shoal" >/dev/null
        stop_daemon
    fi
    rm -rf "$tmp/work" "$SHOAL_SOCKET"
    start_daemon "$tmp/work"
    "$shoal" mount --frontend fanotify --domain bench --fsid py "$ref" "$tmp/mnt-shoal" ${remote:+--remote "$remote"} >/dev/null
}


# Three rounds; the table shows medians (this machine's disk is noisy).
declare -A R
for round in 1 2 3; do
    for fs in native shoal; do
        for w in seq rand tar; do
            [ "$fs" = shoal ] && start_shoal
            drop_caches
            R[$fs,$w,cold]+=" $(t "w_$w" "$tmp/mnt-$fs")"
            R[$fs,$w,warm]+=" $(t "w_$w" "$tmp/mnt-$fs")"
            drop_caches
            R[$fs,$w,disk]+=" $(t "w_$w" "$tmp/mnt-$fs")"
        done
    done
done

echo "| workload | cache | native s | shoal fanotify s | native / shoal |"
echo "|---|---|---:|---:|---:|"
for w in seq rand tar; do
    for c in cold disk warm; do
        n=$(median "${R[native,$w,$c]}") s=$(median "${R[shoal,$w,$c]}")
        printf '| %s | %s | %.3f | %.3f | %.2f |\n' "$w" "$c" "$n" "$s" "$(echo "$n / $s" | bc -l)"
    done
done
echo "(medians of 3; cold: blobs from $via; seq: $big; rand: 2000 x 4 KiB preads over the 50 largest files; tar: tar cf - . | cat)"
