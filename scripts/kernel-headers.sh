#!/usr/bin/env bash
# kernel-headers.sh KREL VERSION DEST: the Debian headers of exactly kernel
# release KREL (e.g. 6.1.0-56-amd64) at package version VERSION (6.1.192-2),
# unpacked into DEST/usr/{src,lib}/ and never installed on the host.
# Debian splits them into linux-headers-KREL (arch: .config, Module.symvers,
# generated headers), linux-headers-KREL-common (the source headers and top
# Makefile) and linux-kbuild-X.Y (scripts, prebuilt fixdep/modpost). The arch
# tree's Makefile includes /usr/src/linux-headers-*-common/Makefile by
# absolute path: it is rewritten to the relative sibling, so
# `make -C DEST/usr/src/linux-headers-KREL M=DIR modules` works.
#
# Used by scripts/setup.sh (the project's guest kernel, DEST .cache/headers)
# and guest/debian/build.sh (the kernel inside the reference OS image).
# The .debs are kept in .cache/debs/. Idempotent: quiet when DEST has them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$ROOT/.cache"
WHO=kernel-headers.sh
# shellcheck source=lib/apt.sh
. "$ROOT/scripts/lib/apt.sh"

[ $# = 3 ] || die "usage: kernel-headers.sh KREL VERSION DEST"
krel=$1 ver=$2 dest=$3
hstamp="$dest/.stasis-headers"
hdir="$dest/usr/src/linux-headers-$krel"
if [ -f "$hstamp" ] && [ "$(cat "$hstamp")" = "linux-image-$krel=$ver" ] && [ -f "$hdir/Module.symvers" ]; then
    exit 0
fi
# linux-headers-KREL depends on the -common tree and the kbuild package.
headers_deps() {
    apt-cache depends "linux-headers-$krel=$ver" 2>/dev/null \
        | awk '/^ *Depends: linux-(headers|kbuild)-/ { print $2 }'
}
pkgs=$(headers_deps)
if [ -z "$pkgs" ]; then
    apt_update_once
    pkgs=$(headers_deps)
fi
[ -n "$pkgs" ] || die "cannot resolve the dependencies of linux-headers-$krel=$ver"
mkdir -p "$CACHE/debs"
rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
for p in "linux-headers-$krel" $pkgs; do
    deb=$(ls "$CACHE/debs/${p}_${ver}_"*.deb 2>/dev/null | tail -n1 || true)
    if [ -z "$deb" ]; then
        say "downloading $p $ver (kernel headers, not installed on the host)"
        if ! (cd "$CACHE/debs" && apt-get download -qq "$p=$ver" 2>/dev/null); then
            apt_update_once
            (cd "$CACHE/debs" && apt-get download -qq "$p=$ver") || die "apt-get download $p=$ver failed"
        fi
        deb=$(ls "$CACHE/debs/${p}_${ver}_"*.deb 2>/dev/null | tail -n1 || true)
        [ -n "$deb" ] || die "download of $p=$ver produced no .deb"
    fi
    dpkg-deb -x "$deb" "$dest.tmp" || die "dpkg-deb -x $deb failed"
done
mk="$dest.tmp/usr/src/linux-headers-$krel/Makefile"
[ -f "$mk" ] || die "linux-headers-$krel has no Makefile"
sed -i 's|^include /usr/src/\(linux-headers-[^/]*\)/Makefile$|include ../\1/Makefile|' "$mk"
grep -q '^include \.\./linux-headers-.*-common/Makefile$' "$mk" \
    || die "unexpected top Makefile in linux-headers-$krel: $(head -n3 "$mk")"
# Kbuild's host programs are prebuilt: check they can run here.
if ldd "$dest.tmp/usr/src/linux-headers-$krel/scripts/mod/modpost" 2>&1 | grep -q 'not found'; then
    die "kbuild's modpost misses libraries: $(ldd "$dest.tmp/usr/src/linux-headers-$krel/scripts/mod/modpost" | grep 'not found')"
fi
echo "linux-image-$krel=$ver" > "$dest.tmp/.stasis-headers"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
say "kernel headers $krel ($ver) ready in ${dest#"$ROOT"/}/"
