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

# The median of the numbers in $1 (space-separated).
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
