#!/usr/bin/env bash
# FUSE benchmark: the base+py corpus tree served by shoal's FUSE frontend vs
# squashfuse (uncompressed squashfs) and the native kernel erofs mount of the
# same bootstrap (file-backed, local blobs). Cold = page cache dropped (and,
# for shoal, an empty domain cache filled from a local file:// remote);
# warm = the same run again. Prints a table of seconds and ratios to native.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${CORPUS:-$root/../shared/corpus}
shoal=$root/target/release/shoal
cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d /var/tmp/shoal-bench-fuse.XXXXXX)
daemon=
cleanup() {
    for m in "$tmp"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null
"$shoal" extract "$tmp/py.img" "$tmp/tree" --blob-dir "$tmp/blobs" >/dev/null
mksquashfs "$tmp/tree" "$tmp/py.sqfs" -noI -noD -noF -noX -no-progress -quiet >/dev/null
big=$(cd "$tmp/tree" && find . -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
# 2000 random 4 KiB reads over the 50 largest files, fixed seed.
(cd "$tmp/tree" && find . -type f -size +64k -printf '%s %p\n' | sort -n | tail -50 | cut -d' ' -f2-) >"$tmp/files"
cat >"$tmp/rand.py" <<'PY'
import os, random, sys
random.seed(7)
files = [l.rstrip("\n") for l in open(sys.argv[1])]
fds = [(os.open(f, os.O_RDONLY), os.path.getsize(f)) for f in files]
for _ in range(2000):
    fd, size = random.choice(fds)
    os.pread(fd, 4096, random.randrange(0, max(1, size - 4096)) & ~4095)
PY

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
    [ -n "$daemon" ] && { umount -l "$tmp/mnt-shoal" 2>/dev/null || true; kill "$daemon"; wait "$daemon" 2>/dev/null || true; }
    rm -rf "$tmp/work" "$SHOAL_SOCKET"
    "$shoal" daemon --work-dir "$tmp/work" >/dev/null 2>&1 & daemon=$!
    until "$shoal" status >/dev/null 2>&1; do sleep 0.05; done
    "$shoal" mount --frontend fuse --domain bench --fsid py "$tmp/py.img" "$tmp/mnt-shoal" --remote "file://$tmp/blobs" >/dev/null
}

t() { # seconds to run "$@"
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
w_seq() { dd if="$1/$big" of=/dev/null bs=1M status=none; }
w_rand() { (cd "$1" && python3 "$tmp/rand.py" "$tmp/files"); }
w_walk() { (cd "$1" && find . -ls >/dev/null); }
w_tar() { (cd "$1" && tar cf - . | cat >/dev/null); }

# Caches: cold = page cache dropped (shoal: empty domain cache, every chunk
# fetched from the local file:// remote and verified); disk = page cache
# dropped, shoal's domain cache already on disk; warm = run again.
declare -A R
for fs in "${peers[@]}" shoal; do
    for w in seq rand walk tar; do
        [ "$fs" = shoal ] && start_shoal
        sync; echo 3 >/proc/sys/vm/drop_caches
        R[$fs,$w,cold]=$(t "w_$w" "$tmp/mnt-$fs")
        R[$fs,$w,warm]=$(t "w_$w" "$tmp/mnt-$fs")
        sync; echo 3 >/proc/sys/vm/drop_caches
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
