#!/usr/bin/env bash
# Wire benchmark: bytes and round trips of lazy starts, shoal against nydus
# v3 (../shared/peers) and a full pull of the OCI image, through a dialable
# network (`shoal net-proxy`: round-trip delay and bandwidth cap in user
# space, since this kernel has no netem) in front of a local docker-registry.
#
#   sudo scripts/bench-wire.sh        # NETS="0 10" ROUNDS=3 TOOLS="..." KEEP_LOG=FILE knobs
#
# Images (corpus layers): base; py = base + py-layer; web = base + web-layer.
# Workloads: base `cat /etc/os-release`, py `python3 -c 'import json, email,
# http.client, yaml'`, web `nginx -t`, tree = whole-tree read of base
# (`tar cf - . | cat`). cold = new mount, empty cache, page cache dropped;
# warm = the same workload again. Bytes and requests are what the registry
# answered for the cold run; "opened" is what the workload's files add up to.
# Tools: shoal-{fan,fuse}-{none,zstd} (the daemon runs before and after,
# as a service does; each round mounts into a new domain, so its cache is
# empty), shoal-fan-zord (zstd, the top layer built with `--order` from a
# recorded run of the same workload, `shoal order`), nydus-{fan,fuse}-*
# (`nydus fanotify|fuse`, one process per mount), oci-pull (every layer
# through the proxy, unpacked, then the workload), kernel-local (the
# uncompressed image mounted file-backed with every blob local: the
# physical limit, no network; add it to TOOLS).
# Prints two tables: stored bytes, then one row per (net, tool, workload).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
corpus=${CORPUS:-$root/../shared/corpus}
nydus=${NYDUS:-$root/../shared/peers/bin/nydus}
NETS=${NETS:-"0 10"} ROUNDS=${ROUNDS:-3} MBIT=${MBIT:-200}
TOOLS=${TOOLS:-"shoal-fan-none shoal-fan-zstd shoal-fan-zord shoal-fuse-none shoal-fuse-zstd nydus-fan-none nydus-fan-zstd nydus-fuse-none nydus-fuse-zstd oci-pull"}
WORKLOADS=${WORKLOADS:-"base py web tree"}
cargo build --release -q --manifest-path "$root/Cargo.toml"
tmp=$(mktemp -d /var/tmp/shoal-bench-wire.XXXXXX)
# A copy: rebuilding the workspace during the run must not swap the binary.
shoal=$tmp/shoal
cp "$root/target/release/shoal" "$shoal"
pids=() mounted=()
cleanup() {
    # KEEP_LOG=FILE keeps the registry's log (every request, its range and size).
    [ -n "${KEEP_LOG:-}" ] && cp "$tmp/registry.log" "$KEEP_LOG" 2>/dev/null
    for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    pkill -f "fanotify-pump --socket $tmp/" 2>/dev/null || true
    # Proxies start inside $(proxy_for …), a subshell: their pids are not in pids.
    pkill -f "$shoal net-proxy" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

declare -A LAYERS=([base]="base.tar.gz" [py]="base.tar.gz py-layer.tar.gz" [web]="base.tar.gz web-layer.tar.zst")
image_of() { case $1 in tree) echo base ;; *) echo "$1" ;; esac; }
cmd_of() {
    case $1 in
    base) echo "cat /etc/os-release" ;;
    py) echo "python3 -c 'import json, email, http.client, yaml'" ;;
    web) echo "nginx -t" ;;
    esac
}

reg=$(free_port)
pids+=("$(start_registry "$tmp/registry" "$reg")")
rlog=$tmp/registry.log

echo "== building images" >&2
declare -A STORED
for i in base py web; do
    layers=()
    for l in ${LAYERS[$i]}; do layers+=("$corpus/$l"); done
    for c in none zstd; do
        "$shoal" build --layer-blobs --compress "$c" -o "$tmp/$c-$i.img" --blob-dir "$tmp/blobs-$c" \
            "${layers[@]}" >/dev/null
        "$shoal" push --compress "$c" "$tmp/$c-$i.img" --blob-dir "$tmp/blobs-$c" \
            "oci://127.0.0.1:$reg/shoal-$c/$i:v1" >/dev/null
    done
    mkdir -p "$tmp/tree-$i"
    "$shoal" extract "$tmp/none-$i.img" "$tmp/tree-$i" --blob-dir "$tmp/blobs-none" >/dev/null
    for c in none zstd; do
        mkdir -p "$tmp/nydus-$c-$i"
        "$nydus" build --compressor "$c" --blob-dir "$tmp/nydus-$c-$i" \
            --bootstrap "$tmp/nydus-$c-$i.boot" "$tmp/tree-$i" >/dev/null 2>&1
        for b in "$tmp/nydus-$c-$i"/*; do upload_blob "127.0.0.1:$reg" "nydus-$c/$i" "$b" >/dev/null; done
    done
    for l in ${LAYERS[$i]}; do upload_blob "127.0.0.1:$reg" "oci/$i" "$corpus/$l" >/dev/null; done
done
# Recorded starts: each workload once through a FUSE mount of the zstd
# image (local blobs), its access order turned into a file list, and the
# image rebuilt with the top layer in that order.
echo "== recording start orders" >&2
export SHOAL_SOCKET=$tmp/shoal.sock
"$shoal" daemon --work-dir "$tmp/rec" >"$tmp/rec.log" 2>&1 & recd=$!
until "$shoal" status >/dev/null 2>&1; do sleep 0.05; done
for i in base py web; do
    mkdir -p "$tmp/rec-$i"
    "$shoal" mount --frontend fuse --domain rec --fsid "$i" "$tmp/zstd-$i.img" "$tmp/rec-$i" \
        --remote "file://$tmp/blobs-zstd" >/dev/null
    mkdir -p "$tmp/rec-$i/proc" 2>/dev/null || true
    mount --bind /proc "$tmp/rec-$i/proc"; mount --bind /dev "$tmp/rec-$i/dev"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$tmp/rec-$i" sh -c "$(cmd_of "$i")" >/dev/null 2>&1 || true
    umount "$tmp/rec-$i/proc" "$tmp/rec-$i/dev"
    "$shoal" umount "$tmp/rec-$i" >/dev/null
    "$shoal" order "$tmp/zstd-$i.img" "$tmp/rec/access/rec/$i.order" -o "$tmp/$i.order" 2>/dev/null
    layers=()
    for l in ${LAYERS[$i]}; do layers+=("$corpus/$l"); done
    "$shoal" build --layer-blobs --compress zstd --order "$tmp/$i.order" -o "$tmp/zord-$i.img" \
        --blob-dir "$tmp/blobs-zord" "${layers[@]}" >/dev/null
    "$shoal" push "$tmp/zord-$i.img" --blob-dir "$tmp/blobs-zord" \
        "oci://127.0.0.1:$reg/shoal-zord/$i:v1" >/dev/null
done
kill "$recd"; wait "$recd" 2>/dev/null || true

sum_sizes() { stat -c %s "$@" | paste -sd+ | bc; }
objects() { "$shoal" inspect --json "$1" | python3 -c '
import json, sys
for d in json.load(sys.stdin)["devices"]:
    print((d.get("remote_object") or {}).get("object") or d["tag"])'; }
uniq_size() { # the distinct files named on stdin, in dir $1
    sort -u | while read -r n; do echo "$1/$n"; done | xargs stat -c %s | paste -sd+ | bc
}

echo "| image | uncompressed | shoal zstd | nydus zstd | OCI layers (gzip/zstd) |"
echo "|---|---:|---:|---:|---:|"
for i in base py web; do
    u=$(objects "$tmp/none-$i.img" | uniq_size "$tmp/blobs-none")
    z=$(objects "$tmp/zstd-$i.img" | uniq_size "$tmp/blobs-zstd")
    n=$(sum_sizes "$tmp/nydus-zstd-$i"/*)
    o=0; for l in ${LAYERS[$i]}; do o=$((o + $(stat -c %s "$corpus/$l"))); done
    printf '| %s | %.1f MB | %.1f MB (%.2f) | %.1f MB (%.2f) | %.1f MB (%.2f) |\n' "$i" \
        "$(bc -l <<<"$u/1000000")" "$(bc -l <<<"$z/1000000")" "$(bc -l <<<"$z/$u")" \
        "$(bc -l <<<"$n/1000000")" "$(bc -l <<<"$n/$u")" "$(bc -l <<<"$o/1000000")" "$(bc -l <<<"$o/$u")"
done
echo

echo "== opened bytes" >&2
declare -A OPENED
for w in base py web; do
    t=$tmp/tree-$w
    mkdir -p "$t/proc" "$t/dev"; mount --bind /proc "$t/proc"; mount --bind /dev "$t/dev"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root strace -f -y -qq \
        -e trace=open,openat,execve,chroot -o "$tmp/strace-$w" chroot "$t" sh -c "$(cmd_of "$w")" \
        >/dev/null 2>&1 || true
    umount "$t/proc" "$t/dev"
    OPENED[$w]=$(python3 "$root/scripts/opened-bytes.py" "$t" "$tmp/strace-$w")
done
OPENED[tree]=$(du -sb --apparent-size "$tmp/tree-base" | cut -f1)

# --- one network setting --------------------------------------------------
proxy_for() { # RTT: a proxy in front of the registry; prints its port
    local p
    p=$(free_port)
    if [ "$1" = 0 ]; then echo "$reg"; return; fi
    "$shoal" net-proxy --listen "127.0.0.1:$p" --upstream "127.0.0.1:$reg" --rtt-ms "$1" --mbit "$MBIT" \
        >"$tmp/proxy-$1.log" 2>&1 &
    pids+=($!)
    wait_port "$p"
    echo "$p"
}

run_in() { # MNT WORKLOAD
    if [ "$2" = tree ]; then (cd "$1" && tar cf - . | cat >/dev/null); return; fi
    mount --bind /proc "$1/proc" 2>/dev/null || true
    mount --bind /dev "$1/dev" 2>/dev/null || true
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$1" sh -c "$(cmd_of "$2")" || true
    umount "$1/proc" "$1/dev" 2>/dev/null || true
}

# The shoal daemon, started per (net, tool) outside the timings, as a
# service runs; mounts go into a new domain each round (an empty cache).
start_service() {
    export SHOAL_SOCKET=$tmp/shoal.sock
    rm -rf "$tmp/work"
    "$shoal" daemon --work-dir "$tmp/work" >"$tmp/daemon.log" 2>&1 & sdaemon=$!
    until "$shoal" status >/dev/null 2>&1; do sleep 0.05; done
}
stop_service() {
    kill "$sdaemon"; wait "$sdaemon" 2>/dev/null || true
    pkill -f "fanotify-pump --socket $tmp/" 2>/dev/null || true
}

# Mount "$tool" for image $1 at $2 through port $3, round $4 (cold).
daemon=
mount_tool() {
    local tool=$1 img=$2 mnt=$3 port=$4 c=${1##*-}
    mkdir -p "$mnt"
    case $tool in
    shoal-*)
        local fe=fanotify; [[ $tool == shoal-fuse-* ]] && fe=fuse
        "$shoal" mount --frontend "$fe" --domain "r$5-$img" --fsid "$img" \
            "oci://127.0.0.1:$port/shoal-$c/$img:v1" "$mnt" >/dev/null
        ;;
    kernel-local)
        "$shoal" mount --frontend local "$tmp/none-$img.img" "$mnt" --blob-dir "$tmp/blobs-none" >/dev/null
        ;;
    nydus-*)
        rm -rf "$tmp/ncache"; mkdir -p "$tmp/ncache"
        cat >"$tmp/nydus.yaml" <<YAML
backend:
  type: registry
  config: {host: "127.0.0.1:$port", repo: "nydus-$c/$img", insecure: true, timeout: 60}
cache:
  type: local
  config: {dir: "$tmp/ncache"}
prefetch: {enable: false}
YAML
        local how=fanotify; [[ $tool == nydus-fuse-* ]] && how=fuse
        "$nydus" "$how" --bootstrap "$tmp/nydus-$c-$img.boot" --config "$tmp/nydus.yaml" \
            --mountpoint "$mnt" --log-dir "$tmp" >"$tmp/nydus.log" 2>&1 & daemon=$!
        until mountpoint -q "$mnt"; do sleep 0.05; done
        ;;
    esac
    mounted+=("$mnt")
}

umount_tool() {
    case $1 in
    shoal-*) "$shoal" umount "$2" >/dev/null 2>&1 || umount -l "$2" ;;
    nydus-*) kill -TERM "$daemon"; wait "$daemon" 2>/dev/null || true; umount -l "$2" 2>/dev/null || true ;;
    kernel-local) umount "$2" ;;
    esac
}

# A full pull: fetch every layer through the proxy, unpack, run.
oci_pull() { # IMAGE PORT DIR
    rm -rf "$3"; mkdir -p "$3"
    for l in ${LAYERS[$1]}; do
        d=$(sha256sum "$corpus/$l" | cut -d' ' -f1)
        curl -fsS "http://127.0.0.1:$2/v2/oci/$1/blobs/sha256:$d" | tar -xf - -C "$3" \
            --zstd 2>/dev/null || curl -fsS "http://127.0.0.1:$2/v2/oci/$1/blobs/sha256:$d" |
            tar -xzf - -C "$3" 2>/dev/null || true
    done
}

declare -A R
for net in $NETS; do
    port=$(proxy_for "$net")
    for tool in $TOOLS; do
        [[ $tool == shoal-* ]] && start_service
        for w in $WORKLOADS; do
            img=$(image_of "$w")
            for round in $(seq "$ROUNDS"); do
                drop_caches
                l0=$(wc -l <"$rlog")
                if [ "$tool" = oci-pull ]; then
                    s=$(date +%s.%N)
                    oci_pull "$img" "$port" "$tmp/pulled"
                    mkdir -p "$tmp/pulled/proc" "$tmp/pulled/dev"
                    m=$(date +%s.%N)
                    run_in "$tmp/pulled" "$w" >/dev/null 2>&1
                    e=$(date +%s.%N)
                    warm=$(t run_in "$tmp/pulled" "$w")
                else
                    mnt=$tmp/mnt-$tool-$w-$round
                    s=$(date +%s.%N)
                    mount_tool "$tool" "$img" "$mnt" "$port" "$round"
                    m=$(date +%s.%N)
                    run_in "$mnt" "$w" >/dev/null 2>&1
                    e=$(date +%s.%N)
                    warm=$(t run_in "$mnt" "$w")
                    umount_tool "$tool" "$mnt"
                fi
                setup=$(bc -l <<<"$m - $s") cold=$(bc -l <<<"$e - $m")
                read -r bytes reqs < <(registry_count "$rlog" "$l0")
                R[$net,$tool,$w,cold]+=" $cold" R[$net,$tool,$w,warm]+=" $warm"
                R[$net,$tool,$w,setup]+=" $setup"
                R[$net,$tool,$w,bytes]+=" $bytes" R[$net,$tool,$w,reqs]+=" $reqs"
            done
        done
        [[ $tool == shoal-* ]] && stop_service
    done
    # The net's proxy serves every tool; it started inside $(proxy_for …), a
    # subshell, so its pid is not in pids.
    pkill -f "$shoal net-proxy" 2>/dev/null || true
done

echo "| net | tool | workload | mount s | cold s | total s | warm s | wire MB | requests | MB/request | wire / opened |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for net in $NETS; do
    label="0 ms"; [ "$net" != 0 ] && label="${net} ms, ${MBIT} Mbit/s"
    for w in $WORKLOADS; do
        for tool in $TOOLS; do
            c=$(median "${R[$net,$tool,$w,cold]}") wm=$(median "${R[$net,$tool,$w,warm]}")
            b=$(median "${R[$net,$tool,$w,bytes]}") q=$(median "${R[$net,$tool,$w,reqs]}")
            su=$(median "${R[$net,$tool,$w,setup]}")
            printf '| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.1f | %d | %.2f | %.2f |\n' "$label" "$tool" "$w" \
                "$su" "$c" "$(bc -l <<<"$su + $c")" "$wm" "$(bc -l <<<"$b/1000000")" "$q" "$(bc -l <<<"$b/1000000/($q+0.0001)")" \
                "$(bc -l <<<"$b/${OPENED[$w]}")"
        done
    done
done
echo "(medians of $ROUNDS; opened MB: base $(bc <<<"${OPENED[base]}/1000000"), py $(bc <<<"${OPENED[py]}/1000000"), web $(bc <<<"${OPENED[web]}/1000000"), tree $(bc <<<"${OPENED[tree]}/1000000"); mount: the mount command, with a running shoal daemon (oci-pull: download + unpack); cold: the workload's first run; total: both)"
