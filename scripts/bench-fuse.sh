#!/usr/bin/env bash
# FUSE benchmark: the base+py corpus tree served by shoal's FUSE frontend vs
# squashfuse (uncompressed squashfs) and the native kernel erofs mount of the
# same bootstrap (file-backed, local blobs). Cold = page cache dropped (and,
# for shoal, an empty domain cache filled from a local file:// remote);
# warm = the same run again. Prints a table of seconds and ratios to native.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${CORPUS:-$root/../shared/corpus}
. "$root/scripts/lib.sh"
build_release
tmp=$(mktemp -d /var/tmp/shoal-bench-fuse.XXXXXX)
daemon=
cleanup() {
    for m in "$tmp"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
    stop_daemon
    rm -rf "$tmp"
}
trap cleanup EXIT

"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null
"$shoal" extract "$tmp/py.img" "$tmp/tree" --blob-dir "$tmp/blobs" >/dev/null
mksquashfs "$tmp/tree" "$tmp/py.sqfs" -noI -noD -noF -noX -no-progress -quiet >/dev/null
# 2000 random 4 KiB reads over the 50 largest files, fixed seed.
workloads_setup "$tmp/tree" 2000

mkdir -p "$tmp/mnt-native" "$tmp/mnt-squashfuse" "$tmp/mnt-erofsfuse" "$tmp/mnt-shoal"
"$shoal" mount --frontend local "$tmp/py.img" "$tmp/mnt-native" --blob-dir "$tmp/blobs"
squashfuse "$tmp/py.sqfs" "$tmp/mnt-squashfuse"
# erofsfuse (built from Debian's source package by scripts/build-erofsfuse.sh)
# reads the same bootstrap with the blob as its extra device.
erofsfuse=${EROFSFUSE:-$("$root/scripts/build-erofsfuse.sh" 2>/dev/null || true)}
peers=(native squashfuse)
if [ -x "$erofsfuse" ]; then
    "$erofsfuse" --device="$tmp/blobs/$(ls "$tmp/blobs")" "$tmp/py.img" "$tmp/mnt-erofsfuse" >/dev/null 2>&1
    peers+=(erofsfuse)
fi
export SHOAL_SOCKET=$tmp/shoal.sock

start_shoal() {
    [ -n "$daemon" ] && { umount -l "$tmp/mnt-shoal" 2>/dev/null || true; stop_daemon; }
    rm -rf "$tmp/work" "$SHOAL_SOCKET"
    start_daemon "$tmp/work"
    "$shoal" mount --frontend fuse --domain bench --fsid py "$tmp/py.img" "$tmp/mnt-shoal" --remote "file://$tmp/blobs" >/dev/null
}


# Caches: cold = page cache dropped (shoal: empty domain cache, every chunk
# fetched from the local file:// remote and verified); disk = page cache
# dropped, shoal's domain cache already on disk; warm = run again.
declare -A R
for fs in "${peers[@]}" shoal; do
    for w in seq rand walk tar; do
        [ "$fs" = shoal ] && start_shoal
        drop_caches
        R[$fs,$w,cold]=$(t "w_$w" "$tmp/mnt-$fs")
        R[$fs,$w,warm]=$(t "w_$w" "$tmp/mnt-$fs")
        drop_caches
        R[$fs,$w,disk]=$(t "w_$w" "$tmp/mnt-$fs")
    done
done

hdr="| workload | cache |"; sep="|---|---|"
for fs in "${peers[@]}" shoal; do hdr+=" $fs s |"; sep+="---:|"; done
echo "$hdr shoal / native | shoal / best FUSE peer |"; echo "$sep---:|---:|"
for w in seq rand walk tar; do
    for c in cold disk warm; do
        row="| $w | $c |"; best=
        for fs in "${peers[@]}" shoal; do
            row+=$(printf ' %.3f |' "${R[$fs,$w,$c]}")
            if [ "$fs" != native ] && [ "$fs" != shoal ]; then
                if [ -z "$best" ] || [ "$(echo "${R[$fs,$w,$c]} < $best" | bc -l)" = 1 ]; then best=${R[$fs,$w,$c]}; fi
            fi
        done
        s=${R[shoal,$w,$c]}
        row+=$(printf ' %.2f | %.2f |' "$(echo "$s / ${R[native,$w,$c]}" | bc -l)" "$(echo "$s / $best" | bc -l)")
        echo "$row"
    done
done
echo "(seq: $big; rand: 2000 x 4 KiB preads over the 50 largest files; walk: find -ls; tar: tar cf - . | cat)"
