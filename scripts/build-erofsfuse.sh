#!/usr/bin/env bash
# Build erofsfuse from Debian's erofs-utils source package (the benchmark
# peer; Debian ships no erofsfuse binary). Output: target/peers/erofsfuse.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/target/peers
mkdir -p "$out"
[ -x "$out/erofsfuse" ] && { echo "$out/erofsfuse"; exit 0; }
if ! apt-get source --print-uris erofs-utils >/dev/null 2>&1; then
    cat >/etc/apt/sources.list.d/shoal-src.sources <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfuse-dev autoconf automake libtool pkg-config uuid-dev >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get source -qq erofs-utils >/dev/null 2>&1)
src=$(echo "$tmp"/erofs-utils-*/)
(cd "$src" && ./autogen.sh >/dev/null 2>&1 && ./configure -q --enable-fuse --disable-lz4 >/dev/null && make -s -j2 >/dev/null)
cp "$src/fuse/erofsfuse" "$out/erofsfuse"
echo "$out/erofsfuse"
