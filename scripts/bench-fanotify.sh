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
shoal=$root/target/release/shoal
cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d /var/tmp/shoal-bench-fan.XXXXXX)
daemon= registry=
cleanup() {
    for m in "$tmp"/mnt-*; do umount -l "$m" 2>/dev/null || true; done
    [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
    [ -n "$registry" ] && kill "$registry" 2>/dev/null || true
    pkill -f "fanotify-pump --socket $tmp/" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null
"$shoal" extract "$tmp/py.img" "$tmp/tree" --blob-dir "$tmp/blobs" >/dev/null
big=$(cd "$tmp/tree" && find . -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
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

remote="file://$tmp/blobs" ref="$tmp/py.img" via="file:// remote"
if [ -x /usr/bin/docker-registry ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$tmp/registry" "$port" >"$tmp/registry.yml"
    /usr/bin/docker-registry serve "$tmp/registry.yml" >/dev/null 2>&1 & registry=$!
    until (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; do sleep 0.05; done
    "$shoal" push "$tmp/py.img" --blob-dir "$tmp/blobs" "oci://127.0.0.1:$port/bench/py:v1" >/dev/null
    ref="oci://127.0.0.1:$port/bench/py:v1" remote= via="docker-registry"
fi

mkdir -p "$tmp/mnt-native" "$tmp/mnt-shoal"
"$shoal" mount --frontend local "$tmp/py.img" "$tmp/mnt-native" --blob-dir "$tmp/blobs"
export SHOAL_SOCKET=$tmp/shoal.sock

start_shoal() {
    if [ -n "$daemon" ]; then
        "$shoal" umount "$tmp/mnt-shoal" >/dev/null
        kill "$daemon"; wait "$daemon" 2>/dev/null || true
    fi
    rm -rf "$tmp/work" "$SHOAL_SOCKET"
    "$shoal" daemon --work-dir "$tmp/work" >/dev/null 2>&1 & daemon=$!
    until "$shoal" status >/dev/null 2>&1; do sleep 0.05; done
    "$shoal" mount --frontend fanotify --domain bench --fsid py "$ref" "$tmp/mnt-shoal" ${remote:+--remote "$remote"} >/dev/null
}

t() { # seconds to run "$@"
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}
w_seq() { dd if="$1/$big" of=/dev/null bs=1M status=none; }
w_rand() { (cd "$1" && python3 "$tmp/rand.py" "$tmp/files"); }
w_tar() { (cd "$1" && tar cf - . | cat >/dev/null); }

# Three rounds; the table shows medians (this machine's disk is noisy).
declare -A R
for round in 1 2 3; do
    for fs in native shoal; do
        for w in seq rand tar; do
            [ "$fs" = shoal ] && start_shoal
            sync; echo 3 >/proc/sys/vm/drop_caches
            R[$fs,$w,cold]+=" $(t "w_$w" "$tmp/mnt-$fs")"
            R[$fs,$w,warm]+=" $(t "w_$w" "$tmp/mnt-$fs")"
            sync; echo 3 >/proc/sys/vm/drop_caches
            R[$fs,$w,disk]+=" $(t "w_$w" "$tmp/mnt-$fs")"
        done
    done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | sed -n 2p; }

echo "| workload | cache | native s | shoal fanotify s | native / shoal |"
echo "|---|---|---:|---:|---:|"
for w in seq rand tar; do
    for c in cold disk warm; do
        n=$(median "${R[native,$w,$c]}") s=$(median "${R[shoal,$w,$c]}")
        printf '| %s | %s | %.3f | %.3f | %.2f |\n' "$w" "$c" "$n" "$s" "$(echo "$n / $s" | bc -l)"
    done
done
echo "(medians of 3; cold: blobs from $via; seq: $big; rand: 2000 x 4 KiB preads over the 50 largest files; tar: tar cf - . | cat)"
