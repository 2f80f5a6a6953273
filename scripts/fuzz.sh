#!/usr/bin/env bash
# Fuzz the EROFS image reader, the tar layer reader, the frame table
# (compressed remote objects) and the multi-range reply parser.
#
#   scripts/fuzz.sh [SECONDS]     (default 30 s per target)
#
# Installs cargo-fuzz if missing, writes seed inputs into fuzz/corpus/ (valid
# shoal images and tars from the hostile tests, plus mkfs.erofs images when
# erofs-utils is installed), then runs each target for SECONDS with overflow
# checks, AddressSanitizer, a per-input timeout and an allocation cap. Exits
# non-zero if any target finds a crash, hang or over-allocation; the
# reproducer is left in fuzz/artifacts/<target>/.
#
# cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP=1 lets stable allow them.
set -euo pipefail

secs=${1:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

corpus=$root/fuzz/corpus
mkdir -p "$corpus/image_reader" "$corpus/tar_layer" "$corpus/frame_table" "$corpus/byteranges"
# A multi-range reply of two parts, for ranges (0, 4) and (11, 2).
printf '\001\000\000\004\000\006\000\002\000--B\r\nContent-Range: bytes 0-3/100\r\n\r\nabcd\r\n--B\r\nContent-Range: bytes 11-12/100\r\n\r\nkl\r\n--B--\r\n' \
    >"$corpus/byteranges/two-parts"

echo "== seeds"
SHOAL_FUZZ_CORPUS=$corpus cargo test -q -p shoal-erofs --test hostile -- \
    --ignored --exact write_fuzz_seeds
# The hostile and unusual layers of the differential test (tests/layers.rs).
layers=$(mktemp -d)
if python3 crates/shoal/tests/fixtures/layers.py "$layers" >/dev/null 2>&1; then
    cp "$layers"/*.tar "$layers"/refuse/*.tar "$corpus/tar_layer/"
fi
rm -rf "$layers"

if command -v mkfs.erofs >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    src=$tmp/src
    mkdir -p "$src/dir/sub"
    echo hello >"$src/dir/sub/small"
    seq 1 3000 >"$src/dir/big"
    ln -s dir/sub/small "$src/link"
    ln "$src/dir/big" "$src/hard"
    for i in $(seq 1 150); do : >"$src/dir/entry-with-a-long-name-$i"; done
    if command -v setfattr >/dev/null 2>&1; then
        setfattr -n user.a -v 1 "$src/dir/big" || true
        setfattr -n user.a -v 1 "$src/dir/sub/small" || true
        setfattr -n user.b -v inline "$src/link" 2>/dev/null || true
    fi
    n=0
    for opts in "" "-E noinline_data" "-x1" "--chunksize=4096" "-zlz4" "-T0 --all-root"; do
        n=$((n + 1))
        # shellcheck disable=SC2086 # word splitting of $opts is intended
        if mkfs.erofs --quiet $opts "$tmp/img$n" "$src" >/dev/null 2>&1; then
            # Length prefix 0xffffffff: the whole rest is the image.
            { printf '\377\377\377\377'; cat "$tmp/img$n"; } >"$corpus/image_reader/mkfs-$n"
        fi
    done
    if mkfs.erofs --quiet --chunksize=4096 --blobdev="$tmp/blob" "$tmp/imgb" "$src" >/dev/null 2>&1; then
        size=$(stat -c %s "$tmp/imgb")
        le=$(printf '\\%03o\\%03o\\%03o\\%03o' $((size & 255)) $((size >> 8 & 255)) \
            $((size >> 16 & 255)) $((size >> 24 & 255)))
        # shellcheck disable=SC2059 # the format is the escaped length
        { printf "$le"; cat "$tmp/imgb" "$tmp/blob"; } >"$corpus/image_reader/mkfs-blobdev"
    fi
fi

status=0
for target in image_reader tar_layer frame_table byteranges; do
    echo "== fuzz $target for ${secs}s"
    if ! (cd fuzz && cargo fuzz run --debug-assertions --sanitizer address "$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=512 \
        -print_final_stats=1); then
        echo "!! $target failed: see fuzz/artifacts/$target/" >&2
        status=1
    fi
done
exit $status
