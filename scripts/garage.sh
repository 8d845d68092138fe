#!/usr/bin/env bash
# Idempotent install of Garage (the S3-compatible, replicated object store the
# object-store tests and `make demo-hosts` run as a 3-node cluster) into
# .cache/garage/VERSION/bin/garage, built from crates.io with
# `cargo install --locked` (~10 min on a 2-core machine the first time; a
# no-op once the binary is there). Never installs anything system-wide.
#
# Environment:
#   STASIS_GARAGE_VERSION  crate version to build (default below)
#   STASIS_GARAGE_JOBS     cargo build jobs (default: cargo's)
#   STASIS_GARAGE_OPT_LEVEL  rustc opt-level (default 1, enough for the
#                          tests; 3 for benchmarks: it then installs into
#                          .cache/garage/VERSION-O3/, and
#                          STASIS_GARAGE_BIN=that/bin/garage points the
#                          tests and stasis-objstore-bench at it)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=${STASIS_GARAGE_VERSION:-2.5.0}
OPT_LEVEL=${STASIS_GARAGE_OPT_LEVEL:-1}
DEST="$ROOT/.cache/garage/$VERSION"
[ "$OPT_LEVEL" = 1 ] || DEST="$DEST-O$OPT_LEVEL"
BIN="$DEST/bin/garage"

die() { echo "garage.sh: error: $*" >&2; exit 1; }
say() { echo "garage.sh: $*"; }

if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "v\?$VERSION"; then
    exit 0
fi
command -v cargo >/dev/null || die "cargo not found (needed to build garage $VERSION)"

# Build in a private directory and move the binary into place only once it
# is complete, so an interrupted build never leaves a half-written binary
# that the check above would take for a good one. Features: the LMDB metadata
# engine with bundled libs only (no metrics, no K2V, no SQLite), which builds
# noticeably faster than the defaults and is all the tests use.
TMP="$ROOT/.cache/garage/.build-$VERSION.$$"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP"
say "building garage $VERSION with cargo install --locked (once; several minutes here)"
jobs=()
[ -z "${STASIS_GARAGE_JOBS:-}" ] || jobs=(-j "$STASIS_GARAGE_JOBS")
# opt-level 1: the tests and the demo only move small objects through it, and
# the optimiser is most of the build's time on two cores.
CARGO_PROFILE_RELEASE_OPT_LEVEL=$OPT_LEVEL \
CARGO_TARGET_DIR="$TMP/target" cargo install garage --version "=$VERSION" --locked \
    --no-default-features --features bundled-libs,lmdb \
    --root "$TMP/root" "${jobs[@]}" --quiet \
    || die "cargo install garage $VERSION failed"
"$TMP/root/bin/garage" --version >/dev/null 2>&1 || die "the garage binary built does not run"
mkdir -p "$DEST/bin"
mv -f "$TMP/root/bin/garage" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
say "installed $("$BIN" --version 2>&1 | head -n1) at ${BIN#"$ROOT"/}"
