#!/usr/bin/env bash
# Idempotent machine set-up for stasis on Debian 12: installs the host
# packages that are missing, unpacks the guest kernel into .cache/kernel/ and
# its headers (for guest-kmod/) into .cache/headers/.
# The guest kernel is never installed into the host: it is downloaded with
# `apt-get download` and extracted with `dpkg-deb -x`.
#
# Safe to run repeatedly and from any directory; quiet when nothing is to do.
# Environment:
#   STASIS_KERNEL_PKG     binary package of the guest kernel (default: the one
#                         `linux-image-amd64` depends on, e.g. linux-image-6.1.0-56-amd64)
#   STASIS_KERNEL_UPDATE  set to re-resolve that default (the kernel is otherwise
#                         pinned once unpacked)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="$ROOT/.cache"

die() { echo "setup.sh: error: $*" >&2; exit 1; }
say() { echo "setup.sh: $*"; }

SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and sudo is missing"
    SUDO=sudo
fi
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        $SUDO apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
}

# --- host packages -----------------------------------------------------------
# qemu-system-x86: the VMs; busybox-static, cpio, gzip, xz-utils, zstd: the guest
# image build (modules may be compressed); file: checks the tools are static;
# jq: guest/smoke.sh reads the JSON lines; socat, iproute2, iperf3: the eval and tests.
# libc6-dev, binutils: static (crt-static) linking and stripping of the guest tools.
# make, gcc-12 (the compiler Debian's kernel headers name), libelf1, libssl3
# (linked by kbuild's prebuilt modpost): guest-kmod/ against .cache/headers.
# ctorrent, opentracker: the BitTorrent eval's client and tracker, copied into
# the guest image (docs/eval-bt.md); never run on the host.
PKGS=(qemu-system-x86 qemu-utils busybox-static cpio gzip xz-utils zstd file libc6-dev binutils jq socat iproute2 iperf3
      make gcc-12 libelf1 libssl3)
PKGS+=(ctorrent opentracker)
missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    say "installing: ${missing[*]}"
    # iperf3's postinst asks whether to start a daemon; never.
    echo "iperf3 iperf3/start_daemon boolean false" | $SUDO debconf-set-selections 2>/dev/null || true
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        || die "apt-get install ${missing[*]} failed"
    # opentracker's package enables a tracker daemon on the host: it is only
    # wanted inside guests.
    if [[ " ${missing[*]} " == *" opentracker "* ]] && command -v systemctl >/dev/null; then
        $SUDO systemctl disable --now opentracker >/dev/null 2>&1 || true
    fi
fi

# --- guest kernel ------------------------------------------------------------
# The kernel is pinned once unpacked: later apt updates do not change the
# guest under existing experiments. STASIS_KERNEL_UPDATE=1 re-resolves it.
setup_kernel() {
STAMP="$CACHE/kernel/.stasis-kernel"
if [ -z "${STASIS_KERNEL_PKG:-}" ] && [ -z "${STASIS_KERNEL_UPDATE:-}" ] && [ -f "$STAMP" ]; then
    pinned=$(cat "$STAMP")
    if [ -f "$CACHE/kernel/boot/vmlinuz-${pinned#linux-image-}" ]; then
        return 0
    fi
fi
kernel_pkg() {
    if [ -n "${STASIS_KERNEL_PKG:-}" ]; then echo "$STASIS_KERNEL_PKG"; return; fi
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/^ *Depends: linux-image-[0-9]/ { print $2; exit }'
}
KPKG=$(kernel_pkg)
if [ -z "$KPKG" ]; then
    apt_update_once
    KPKG=$(kernel_pkg)
fi
[ -n "$KPKG" ] || die "cannot find the package that linux-image-amd64 depends on (apt lists missing?)"
KREL=${KPKG#linux-image-}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KPKG" ] \
    && [ -f "$CACHE/kernel/boot/vmlinuz-$KREL" ] && [ -d "$CACHE/kernel/lib/modules/$KREL" ]; then
    return 0
fi

mkdir -p "$CACHE/debs"
deb=$(ls "$CACHE/debs/${KPKG}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
if [ -z "$deb" ]; then
    say "downloading $KPKG (guest kernel, not installed on the host)"
    # apt-get download writes into the current directory; as root it warns that
    # the download is unsandboxed, which is expected here.
    if ! (cd "$CACHE/debs" && apt-get download -qq "$KPKG" 2>/dev/null); then
        apt_update_once
        (cd "$CACHE/debs" && apt-get download -qq "$KPKG") || die "apt-get download $KPKG failed"
    fi
    deb=$(ls "$CACHE/debs/${KPKG}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$deb" ] || die "download of $KPKG produced no .deb"
fi

say "extracting $(basename "$deb") into .cache/kernel/"
rm -rf "$CACHE/kernel.tmp"
mkdir -p "$CACHE/kernel.tmp"
dpkg-deb -x "$deb" "$CACHE/kernel.tmp" || die "dpkg-deb -x $deb failed"
[ -f "$CACHE/kernel.tmp/boot/vmlinuz-$KREL" ] || die "$deb has no boot/vmlinuz-$KREL"
# The .deb carries no modules.dep (depmod runs at install time); guest/build.sh
# reads each module's own depends= field instead.
[ -d "$CACHE/kernel.tmp/lib/modules/$KREL/kernel" ] || die "$deb has no modules for $KREL"
echo "$KPKG" > "$CACHE/kernel.tmp/.stasis-kernel"
rm -rf "$CACHE/kernel"
mv "$CACHE/kernel.tmp" "$CACHE/kernel"
say "guest kernel $KREL ready"
}

# --- guest kernel headers (for guest-kmod/) -------------------------------------
# The Debian headers of exactly the pinned kernel's version, split by Debian
# into linux-headers-KREL (arch: .config, Module.symvers, generated headers),
# linux-headers-KREL-common (the source headers and top Makefile) and
# linux-kbuild-X.Y (scripts, prebuilt fixdep/modpost), are downloaded and
# unpacked side by side into .cache/headers/usr/{src,lib}/, never installed.
# The arch tree's Makefile includes /usr/src/linux-headers-*-common/Makefile
# by absolute path: it is rewritten to the relative sibling, so
# `make -C .cache/headers/usr/src/linux-headers-KREL M=DIR modules` works.
setup_headers() {
    local kpkg krel deb ver hstamp hdir pkgs p
    kpkg=$(cat "$CACHE/kernel/.stasis-kernel")
    krel=${kpkg#linux-image-}
    deb=$(ls "$CACHE/debs/${kpkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$deb" ] || die "no .deb of $kpkg in .cache/debs (needed to pin the headers' version)"
    ver=$(dpkg-deb -f "$deb" Version)
    hstamp="$CACHE/headers/.stasis-headers"
    hdir="$CACHE/headers/usr/src/linux-headers-$krel"
    if [ -f "$hstamp" ] && [ "$(cat "$hstamp")" = "$kpkg=$ver" ] && [ -f "$hdir/Module.symvers" ]; then
        return 0
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
    rm -rf "$CACHE/headers.tmp"
    mkdir -p "$CACHE/headers.tmp"
    for p in "linux-headers-$krel" $pkgs; do
        deb=$(ls "$CACHE/debs/${p}_${ver}_"*.deb 2>/dev/null | tail -n1 || true)
        if [ -z "$deb" ]; then
            say "downloading $p $ver (guest kernel headers, not installed on the host)"
            if ! (cd "$CACHE/debs" && apt-get download -qq "$p=$ver" 2>/dev/null); then
                apt_update_once
                (cd "$CACHE/debs" && apt-get download -qq "$p=$ver") || die "apt-get download $p=$ver failed"
            fi
            deb=$(ls "$CACHE/debs/${p}_${ver}_"*.deb 2>/dev/null | tail -n1 || true)
            [ -n "$deb" ] || die "download of $p=$ver produced no .deb"
        fi
        dpkg-deb -x "$deb" "$CACHE/headers.tmp" || die "dpkg-deb -x $deb failed"
    done
    local mk="$CACHE/headers.tmp/usr/src/linux-headers-$krel/Makefile"
    [ -f "$mk" ] || die "linux-headers-$krel has no Makefile"
    sed -i 's|^include /usr/src/\(linux-headers-[^/]*\)/Makefile$|include ../\1/Makefile|' "$mk"
    grep -q '^include \.\./linux-headers-.*-common/Makefile$' "$mk" \
        || die "unexpected top Makefile in linux-headers-$krel: $(head -n3 "$mk")"
    # Kbuild's host programs are prebuilt: check they can run here.
    if ldd "$CACHE/headers.tmp/usr/src/linux-headers-$krel/scripts/mod/modpost" 2>&1 | grep -q 'not found'; then
        die "kbuild's modpost misses libraries: $(ldd "$CACHE/headers.tmp/usr/src/linux-headers-$krel/scripts/mod/modpost" | grep 'not found')"
    fi
    echo "$kpkg=$ver" > "$CACHE/headers.tmp/.stasis-headers"
    rm -rf "$CACHE/headers"
    mv "$CACHE/headers.tmp" "$CACHE/headers"
    say "guest kernel headers $krel ($ver) ready in .cache/headers/"
}

setup_kernel
setup_headers
