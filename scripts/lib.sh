# Shared helpers of the benchmark scripts (source it: . "$root/scripts/lib.sh").

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Wait until 127.0.0.1:PORT accepts connections.
wait_port() {
    until (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do sleep 0.05; done
}

# start_registry DIR PORT: docker-registry on 127.0.0.1:PORT storing under
# DIR, logging every response (with its size) to DIR.log. Prints its pid.
start_registry() {
    printf 'version: 0.1\nlog: {level: info, formatter: text}\nstorage: {filesystem: {rootdirectory: %s}}\nhttp: {addr: 127.0.0.1:%s}\n' \
        "$1" "$2" >"$1.yml"
    docker-registry serve "$1.yml" >"$1.log" 2>&1 &
    echo $!
    wait_port "$2"
}

# registry_count LOG N: "bytes requests" the registry answered after line N.
registry_count() {
    tail -n +"$(($2 + 1))" "$1" | awk '/msg="response completed"/ { n++
        if (match($0, /http.response.written=[0-9]+/)) s += substr($0, RSTART + 22, RLENGTH - 22) }
        END { printf "%d %d\n", s, n }'
}

# upload_blob HOST:PORT REPO FILE: push FILE as a blob (named by its sha256).
upload_blob() {
    local d loc
    d=$(sha256sum "$3" | cut -d' ' -f1)
    loc=$(curl -fsS -D - -o /dev/null -X POST "http://$1/v2/$2/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    case $loc in http*) ;; *) loc="http://$1$loc" ;; esac
    case $loc in *\?*) loc="$loc&digest=sha256:$d" ;; *) loc="$loc?digest=sha256:$d" ;; esac
    curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary @"$3" "$loc" >/dev/null
    echo "$d"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Seconds "$@" takes (output discarded, failure ignored: some workloads,
# like `nginx -t` in a read-only tree, fail after reading what they read).
t() {
    local s e
    s=$(date +%s.%N); "$@" >/dev/null 2>&1 || true; e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}

# The median of the numbers in "$@" (space-separated), or on stdin.
median() {
    if [ $# -gt 0 ]; then tr ' ' '\n' <<<"$*"; else cat; fi |
        grep . | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}

# The release binary, built now: sets $shoal.
build_release() {
    cargo build --release -q --manifest-path "$root/Cargo.toml"
    shoal=$root/target/release/shoal
}

# start_daemon WORK: a shoal daemon on $SHOAL_SOCKET with work dir WORK,
# its output discarded; sets $daemon and waits until it answers.
start_daemon() {
    "$shoal" daemon --work-dir "$1" >/dev/null 2>&1 &
    daemon=$!
    until "$shoal" status >/dev/null 2>&1; do sleep 0.05; done
}

# stop_daemon: SIGTERM the daemon started by start_daemon, wait for it.
stop_daemon() {
    if [ -n "${daemon:-}" ]; then
        kill "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
        daemon=
    fi
}

# The file workloads of the frontend benchmarks, over a tree TREE:
# workloads_setup TREE N writes $tmp/files (the 50 largest files over
# 64 KiB) and $tmp/rand.py (N random 4 KiB preads over them, fixed seed),
# and sets $big (the largest file). Then w_seq/w_rand/w_walk/w_tar MNT.
workloads_setup() {
    big=$(cd "$1" && find . -type f -printf '%s %p\n' | sort -n | tail -1 | cut -d' ' -f2-)
    (cd "$1" && find . -type f -size +64k -printf '%s %p\n' | sort -n | tail -50 | cut -d' ' -f2-) >"$tmp/files"
    cat >"$tmp/rand.py" <<PY
import os, random, sys
random.seed(7)
files = [l.rstrip("\\n") for l in open(sys.argv[1])]
fds = [(os.open(f, os.O_RDONLY), os.path.getsize(f)) for f in files]
for _ in range($2):
    fd, size = random.choice(fds)
    os.pread(fd, 4096, random.randrange(0, max(1, size - 4096)) & ~4095)
PY
}
w_seq() { dd if="$1/$big" of=/dev/null bs=1M status=none; }
w_rand() { (cd "$1" && "${PYTHON:-python3}" "$tmp/rand.py" "$tmp/files"); }
w_walk() { (cd "$1" && find . -ls >/dev/null); }
w_tar() { (cd "$1" && tar cf - . | cat >/dev/null); }
