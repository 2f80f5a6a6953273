#!/usr/bin/env bash
# Container start benchmark, HelloBench-style: the corpus images (base,
# base+py, base+web) run one short command each in containerd, lazily from
# a shoal image (`ctr-remote rpull` + `shoal snapshotter`) and from the
# ordinary gzip/zstd OCI image (`ctr pull`, overlayfs), both from a local
# docker-registry. Two shoal images: `shoal`, converted as is, and
# `shoal-ord`, converted with `--order` from a recorded start (the files the
# command opened, first open first, traced once on the unpacked tree, as
# `ctr-remote image optimize` records one for stargz). Cold: a fresh containerd, shoal daemon and snapshotter
# (empty stores and caches) and dropped page cache, timed from the start of
# the pull to the end of the container; warm: the same image, run again.
# Registry bytes and requests are those of the cold pull and run; "opened"
# is the size of the distinct regular files the command opens (strace in a
# chroot of the unpacked tree). Medians of RUNS (default 3). MB = 10^6 bytes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"
corpus=${CORPUS:-$root/../shared/corpus}
runs=${RUNS:-3}   # IMAGES="py" for a subset; CHUNK_SIZE for shoal convert
# TOOLS="shoal-ord overlayfs" for a subset; SNAPSHOTTER_ARGS are added to
# `shoal snapshotter` (e.g. --mount-on-pull).
tools=(${TOOLS:-shoal shoal-ord overlayfs})
shoal=$root/target/release/shoal
cargo build --release -q --manifest-path "$root/Cargo.toml"
command -v strace >/dev/null || apt-get install -y -qq strace >/dev/null
tmp=$(mktemp -d)
pids=() stack=() ctd= namespaces=() m=()

stop() { for p in "$@"; do kill "$p" 2>/dev/null || true; done; for p in "$@"; do wait "$p" 2>/dev/null || true; done; }
# Mounts below a directory, deepest first, lazily unmounted.
umount_under() {
  awk -v d="$1/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}
# The daemon's fanotify pump outlives the daemon by design: end ours by pid.
stop_pumps() { for p in $(pgrep -f "fanotify-pump --socket $tmp/" || true); do kill "$p" 2>/dev/null || true; done; }
wait_for() { for _ in $(seq 400); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "timed out: $*" >&2; exit 1; }

# A fresh shoal daemon, snapshotter and containerd under DIR.
start_stack() {
  local d=$1; mkdir -p "$d/ctd"
  "$shoal" daemon --socket "$d/shoal.sock" --work-dir "$d/work" >"$d/daemon.log" 2>&1 & stack=($!)
  wait_for env SHOAL_SOCKET="$d/shoal.sock" "$shoal" status --json
  "$shoal" snapshotter --socket "$d/sn.sock" --root "$d/sn" --daemon-socket "$d/shoal.sock" ${SNAPSHOTTER_ARGS:-} \
    >"$d/sn.log" 2>&1 & stack+=($!)
  wait_for test -S "$d/sn.sock"
  cat >"$d/ctd/config.toml" <<CONF
version = 2
root = "$d/ctd/root"
state = "$d/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/ctd/c.sock"
[proxy_plugins.shoal]
  type = "snapshot"
  address = "$d/sn.sock"
CONF
  containerd --config "$d/ctd/config.toml" >"$d/ctd/log" 2>&1 & stack+=($!)
  ctd=$d/ctd/c.sock
  wait_for ctr --address "$ctd" version
}
# Tasks left by an interrupted run, then containerd, the snapshotter, the
# mounts, the daemon and its pump; the directory goes too.
stop_stack() {
  local d=$1 ns t
  for ns in $( [ -S "$ctd" ] && ctr --address "$ctd" namespaces ls -q 2>/dev/null); do
    for t in $(ctr --address "$ctd" -n "$ns" tasks ls -q 2>/dev/null); do
      ctr --address "$ctd" -n "$ns" tasks rm -f "$t" >/dev/null 2>&1 || true; done
  done
  [ ${#stack[@]} -eq 3 ] && stop "${stack[2]}"
  [ ${#stack[@]} -ge 2 ] && stop "${stack[1]}"
  umount_under "$d"
  [ ${#stack[@]} -ge 1 ] && stop "${stack[0]}"
  stop_pumps; stack=() ctd=; rm -rf "$d"
}
cleanup() {
  set +e
  stop_stack "$tmp/run"
  stop "${pids[@]}"
  umount_under "$tmp"; stop_pumps
  for ns in "${namespaces[@]}"; do rmdir /sys/fs/cgroup/*/"$ns" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(free_port)
cat >"$tmp/registry.yml" <<CONF
version: 0.1
log: {level: info, formatter: text}
storage: {filesystem: {rootdirectory: $tmp/registry}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$port}
CONF
docker-registry serve "$tmp/registry.yml" >"$tmp/registry.log" 2>&1 & pids+=($!)
wait_for bash -c "exec 3<>/dev/tcp/127.0.0.1/$port"
reg=127.0.0.1:$port
fixture=$root/crates/shoal/tests/fixtures/oci_image.py

declare -A layers=(
  [base]="$corpus/base.tar.gz"
  [py]="$corpus/base.tar.gz $corpus/py-layer.tar.gz"
  [web]="$corpus/base.tar.gz $corpus/web-layer.tar.zst"
)
read -r -a images <<<"${IMAGES:-base py web}"
setcmd() {
  case $1 in
    base) cmd=(cat /etc/os-release) ;;
    py) cmd=(python3 -c 'import json, email, http.client, yaml') ;;
    web) cmd=(nginx -t) ;;
  esac
}

# Bytes of the distinct regular files (by inode) that the workload opens or
# executes, traced on the host in a chroot of the image's unpacked tree.
opened_bytes() {
  local t=$tmp/tree-$1; setcmd "$1"
  mkdir -p "$t/proc" "$t/dev"; mount --bind /proc "$t/proc"; mount --bind /dev "$t/dev"
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root strace -f -y -qq -e trace=open,openat,execve,chroot \
    -o "$tmp/strace-$1" chroot "$t" "${cmd[@]}" >"$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
  umount "$t/proc" "$t/dev"
  python3 "$root/scripts/opened-bytes.py" "$t" "$tmp/strace-$1" "$tmp/order-$1"
}

for i in "${images[@]}"; do
  # shellcheck disable=SC2086
  python3 "$fixture" "$tmp/layout-$i" "$i" ${layers[$i]} >/dev/null
  skopeo copy -q --dest-tls-verify=false "oci:$tmp/layout-$i:$i" "docker://$reg/src/$i:v1"
  "$shoal" convert --chunk-size "${CHUNK_SIZE:-1048576}" "oci://$reg/src/$i:v1" "oci://$reg/shoal/$i:v1" --json >/dev/null
  rm -rf "$tmp/layout-$i"; mkdir -p "$tmp/tree-$i"
  for l in ${layers[$i]}; do tar -xf "$l" -C "$tmp/tree-$i" --same-owner --xattrs 2>/dev/null || true; done
  # whiteouts as a plain unpack leaves them: remove them and their targets
  find "$tmp/tree-$i" -name '.wh.*' -print0 | while IFS= read -r -d '' w; do
    b=$(basename "$w"); t="$(dirname "$w")/${b#.wh.}"; rm -rf "$w" "$t"; done
  # The recorded start, and the image converted with it.
  opened_bytes "$i" >"$tmp/opened-$i"
  "$shoal" convert --chunk-size "${CHUNK_SIZE:-1048576}" --order "$tmp/order-$i" \
    "oci://$reg/src/$i:v1" "oci://$reg/shoal-ord/$i:v1" --json >/dev/null
done

now() { date +%s.%N; }
# Bytes written and requests answered by the registry after log line N.
served() {
  tail -n +"$(($1 + 1))" "$tmp/registry.log" | awk '/msg="response completed"/ { n++
    if (match($0, /http.response.written=[0-9]+/)) s += substr($0, RSTART + 22, RLENGTH - 22) }
    END { printf "%d %d\n", s, n }'
}
ctr_() { local t=$1; shift; timeout 600 "$t" --address "$ctd" -n "$ns" "$@"; }
pull() {
  case $tool in
    shoal*) ctr_ ctr-remote images rpull --plain-http --snapshotter shoal "$reg/$tool/$i:v1" ;;
    *) ctr_ ctr images pull --plain-http "$reg/src/$i:v1" ;;
  esac >"$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
}
run() {
  case $tool in
    shoal*) ctr_ ctr run --rm --snapshotter shoal --net-host "$reg/$tool/$i:v1" "$1" "${cmd[@]}" ;;
    *) ctr_ ctr run --rm --net-host "$reg/src/$i:v1" "$1" "${cmd[@]}" ;;
  esac >"$tmp/out" 2>&1 || { cat "$tmp/out"; exit 1; }
}

printf '| %-8s | %-9s | %7s | %7s | %7s | %11s | %8s | %9s |\n' workload tool "cold s" "pull s" "warm s" "registry MB" requests "opened MB"
printf '|----------|-----------|---------|---------|---------|-------------|----------|-----------|\n'
for i in "${images[@]}"; do
  opened=$(cat "$tmp/opened-$i")
  setcmd "$i"
  for tool in "${tools[@]}"; do
    : >"$tmp/r"
    for n in $(seq "$runs"); do
      ns=$tool-$i-$n; namespaces+=("$ns")
      start_stack "$tmp/run"
      sync; echo 3 >/proc/sys/vm/drop_caches
      l0=$(wc -l <"$tmp/registry.log")
      t0=$(now); pull; tp=$(now); run "cold-$n"; t1=$(now)
      read -r bytes reqs < <(served "$l0")
      t2=$(now); run "warm-$n"; t3=$(now)
      echo "$(echo "$t1 - $t0" | bc) $(echo "$t3 - $t2" | bc) $bytes $reqs $(echo "$tp - $t0" | bc)" >>"$tmp/r"
      stop_stack "$tmp/run"
    done
    # RAW=1: every run's cold, warm, bytes, requests and pull, on stderr.
    [ -n "${RAW:-}" ] && sed "s/^/raw $i $tool: /" "$tmp/r" >&2
    for c in 1 2 3 4 5; do m[c]=$(awk -v c=$c '{print $c}' "$tmp/r" | median); done
    echo "$i $tool ${m[1]} ${m[3]}" >>"$tmp/summary"
    printf '| %-8s | %-9s | %7.2f | %7.2f | %7.2f | %11.1f | %8d | %9.1f |\n' "$i" "$tool" "${m[1]}" "${m[5]}" "${m[2]}" \
      "$(echo "${m[3]} / 10^6" | bc -l)" "${m[4]}" "$(echo "$opened / 10^6" | bc -l)"
  done
done
echo
awk -v o="$(cat "$tmp/opened-py")" '$1 == "py" { s[$2] = $3; b[$2] = $4 } END {
  for (t in s) if (t != "overlayfs") {
    printf "cold py: %s is %.1fx faster than overlayfs (target >= 8x)\n", t, s["overlayfs"] / s[t]
    printf "py: %s registry bytes / opened bytes = %.2f (target <= 1.2)\n", t, b[t] / o } }' "$tmp/summary"
