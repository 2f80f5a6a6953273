#!/usr/bin/env bash
# fscache benchmark, inside ../shared/vm (Linux 6.12 with cachefiles
# on-demand; TCG-emulated, so absolute numbers are slow, ratios matter):
# the base+py corpus image through a cachefiles on-demand mount (blobs
# from a file:// remote into the domain cache) vs the same bootstrap mounted
# directly, file-backed with local blobs.
#   cold: page cache dropped; fscache also starts from empty caches;
#   warm: the same workload again.
# Prints seconds and ratios (direct / fscache: 1.0 = direct speed).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
corpus=${CORPUS:-$root/../shared/corpus}
vm=${VM:-$root/../shared/vm/run-in-vm.sh}
. "$root/scripts/lib.sh"
build_release
tmp=$(mktemp -d /var/tmp/shoal-bench-fscache.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
"$shoal" build -o "$tmp/py.img" --blob-dir "$tmp/blobs" "$corpus/base.tar.gz" "$corpus/py-layer.tar.gz" >/dev/null
"$shoal" extract "$tmp/py.img" "$tmp/tree" --blob-dir "$tmp/blobs" >/dev/null
workloads_setup "$tmp/tree" 1000
cat >"$tmp/in-vm.sh" <<EOF
#!/bin/bash
set -euo pipefail
shoal=$shoal tmp=$tmp big='$big' root=$root
. "\$root/scripts/lib.sh"
EOF
cat >>"$tmp/in-vm.sh" <<'EOF'
export SHOAL_SOCKET=/tmp/shoal.sock
mkdir -p /tmp/direct /tmp/fscache /scratch/direct
# File-backed mounts need a local file system (the host root is shared in).
cp -r "$tmp/py.img" "$tmp/blobs" /scratch/direct/
"$shoal" mount --frontend local /scratch/direct/py.img /tmp/direct --blob-dir /scratch/direct/blobs
daemon=
fresh() {
    if [ -n "$daemon" ]; then
        "$shoal" umount /tmp/fscache >/dev/null; stop_daemon
        pkill -f fanotify-pump || true; sleep 0.5
    fi
    rm -rf /scratch/work
    start_daemon /scratch/work
    "$shoal" mount --frontend fscache --domain bench --fsid py "$tmp/py.img" /tmp/fscache --remote "file://$tmp/blobs" >/dev/null
}
PYTHON=/usr/bin/python3
declare -A R
for fs in direct fscache; do
    for w in seq rand tar; do
        [ "$fs" = fscache ] && fresh
        drop_caches
        R[$fs,$w,cold]=$(t "w_$w" "/tmp/$fs")
        R[$fs,$w,warm]=$(t "w_$w" "/tmp/$fs")
    done
done
echo "| workload | cache | direct s | fscache s | direct / fscache |"
echo "|---|---|---:|---:|---:|"
for w in seq rand tar; do
    for c in cold warm; do
        printf '| %s | %s | %.3f | %.3f | %.2f |\n' "$w" "$c" "${R[direct,$w,$c]}" "${R[fscache,$w,$c]}" \
            "$(echo "${R[direct,$w,$c]} / ${R[fscache,$w,$c]}" | bc -l)"
    done
done
echo "(in the 6.12 VM under TCG; seq: $big; rand: 1000 x 4 KiB preads over the 50 largest files; tar: tar cf - . | cat)"
EOF
chmod +x "$tmp/in-vm.sh"
"$vm" --timeout 1800 --mem 2G --smp 2 --disk 4G -- "$tmp/in-vm.sh"
