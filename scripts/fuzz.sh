#!/usr/bin/env bash
# The fuzz targets under fuzz/ (cargo-fuzz, libFuzzer), on the machine's one
# stable toolchain: cargo-fuzz's `-Zsanitizer=address` and `-Cpasses` are
# nightly flags, which RUSTC_BOOTSTRAP=1 lets the stable compiler take.
#
#   scripts/fuzz.sh install      cargo-fuzz into .cache/tools (idempotent)
#   scripts/fuzz.sh smoke [S]    every target S seconds (default 5) on its seeds
#   scripts/fuzz.sh bench [N [TARGET...]]
#                                every target (or the ones named) N inputs
#                                (default 10^6)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
TOOLS="$ROOT/.cache/tools"
FUZZ="$TOOLS/bin/cargo-fuzz"
VERSION=0.13.2
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$ROOT/fuzz/target"

install() {
    if [ -x "$FUZZ" ] && "$FUZZ" --version 2>/dev/null | grep -q "$VERSION"; then
        return
    fi
    cargo install --locked cargo-fuzz --version "$VERSION" --root "$TOOLS"
}

targets() { (cd fuzz && "$FUZZ" list); }

# run TARGET LIBFUZZER-ARGS...: on a scratch copy of the seeds, so the
# checked-in corpus never changes; prints libFuzzer's "Done N runs" line.
run() {
    local t="$1"
    shift
    local corpus log
    corpus="$(mktemp -d)"
    log="$(mktemp)"
    if [ -d "fuzz/seeds/$t" ]; then cp -r "fuzz/seeds/$t/." "$corpus/"; fi
    if ! (cd fuzz && "$FUZZ" run --sanitizer address "$t" "$corpus" -- "$@") >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $t FAILED (artifacts in fuzz/artifacts/$t)" >&2
        rm -rf "$corpus" "$log"
        return 1
    fi
    local done_line
    done_line="$(grep -E '^Done [0-9]+ runs' "$log" | tail -1)"
    printf '%-18s %s\n' "$t" "${done_line:-?}"
    rm -rf "$corpus" "$log"
}

case "${1:-smoke}" in
install) install ;;
smoke)
    install
    secs="${2:-5}"
    (cd fuzz && "$FUZZ" build --sanitizer address)
    for t in $(targets); do run "$t" -max_total_time="$secs"; done
    ;;
bench)
    install
    n="${2:-1000000}"
    shift $(($# > 1 ? 2 : $#))
    (cd fuzz && "$FUZZ" build --sanitizer address)
    for t in ${*:-$(targets)}; do run "$t" -runs="$n"; done
    ;;
*)
    echo "usage: $0 install|smoke [secs]|bench [runs]" >&2
    exit 2
    ;;
esac
