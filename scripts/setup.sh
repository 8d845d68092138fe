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

WHO=setup.sh
# shellcheck source=lib/apt.sh
. "$ROOT/scripts/lib/apt.sh"

# --- host packages -----------------------------------------------------------
# qemu-system-x86: the VMs; busybox-static, cpio, gzip, xz-utils, zstd: the guest
# image build (modules may be compressed); file: checks the tools are static;
# jq: guest/smoke.sh reads the JSON lines; socat, iproute2, iperf3: the eval and tests.
# libc6-dev, binutils: static (crt-static) linking and stripping of the guest tools.
# make, gcc-12 (the compiler Debian's kernel headers name), libelf1, libssl3
# (linked by kbuild's prebuilt modpost): guest-kmod/ against .cache/headers.
# ctorrent, opentracker: the BitTorrent eval's client and tracker, copied into
# the guest image (docs/eval-bt.md); never run on the host.
# QEMU itself is handled below (setup_qemu): its version must match qemu-utils'.
PKGS=(busybox-static cpio gzip xz-utils zstd file libc6-dev binutils jq socat iproute2 iperf3
      make gcc-12 libelf1 libssl3)
PKGS+=(ctorrent opentracker)
# tcl: tclsh evaluates Emulab NS scripts (crates/core/src/spec/tb_compat.tcl).
PKGS+=(tcl)
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
    apt_install "${missing[@]}"
    # opentracker's package enables a tracker daemon on the host: it is only
    # wanted inside guests.
    if [[ " ${missing[*]} " == *" opentracker "* ]] && command -v systemctl >/dev/null; then
        $SUDO systemctl disable --now opentracker >/dev/null 2>&1 || true
    fi
fi

# --- QEMU --------------------------------------------------------------------
# Two QEMUs, so the suite covers both save paths and a checkpoint moving from
# one version to the other (docs/qemu.md, "Versions"):
# - the system QEMU, installed with apt: the version of the machine's
#   qemu-utils when it has one, because installing another version makes apt
#   remove qemu-utils (qemu-system-common 7.2 Breaks qemu-utils >= 8.0; this
#   kind of machine ships qemu-utils 10.0.2 from bookworm-backports). Without
#   qemu-utils, QEMU 10.0 from bookworm-backports: Debian 13's QEMU, with
#   the mapped-ram + multifd + direct-io save path (>= 9.1).
# - the other one (Debian 12's 7.2 next to a 10.x, or backports' 10.x next
#   to a 7.2), unpacked into .cache/qemu/VERSION/ with `dpkg-deb -x` and never
#   installed; QEMU finds its firmware relative to its binary there.
BPO=bookworm-backports

has_suite() { apt-cache policy 2>/dev/null | grep -q " $1/main "; }

ensure_backports() {
    has_suite "$BPO" && return 0
    apt_update_once
    has_suite "$BPO" && return 0
    local f=/etc/apt/sources.list.d/stasis-$BPO.sources
    say "adding $BPO to apt's sources ($f; backports are never preferred over bookworm's packages)"
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$BPO" \
        | $SUDO tee "$f" >/dev/null
    $SUDO apt-get update -qq || die "apt-get update (with $BPO) failed"
    has_suite "$BPO" || die "$BPO is still unknown to apt after adding $f"
}

installed_version() { { dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } | awk '/^ii/ { print $2 }'; }

# The version of PKG that SUITE (bookworm, bookworm-security, bookworm-backports) offers.
suite_version() {
    apt-cache madison "$1" 2>/dev/null | awk -v s="$2" '$0 ~ " "s"/main " { print $3; exit }'
}

# The suite that offers version VER of qemu-system-x86.
suite_of() {
    apt-cache madison qemu-system-x86 2>/dev/null | awk -v v="$1" '$3 == v { split($6, a, "/"); print a[1]; exit }'
}

setup_qemu() {
    local sys utils want suite other other_suite dir stamp deb p missing_libs
    sys=$(installed_version qemu-system-x86)
    utils=$(installed_version qemu-utils)
    if [ -z "$sys" ] || [ -z "$utils" ]; then
        ensure_backports
        want=${sys:-$utils}
        [ -n "$want" ] || want=$(suite_version qemu-system-x86 "$BPO")
        [ -n "$want" ] || die "$BPO offers no qemu-system-x86"
        suite=$(suite_of "$want")
        [ -n "$suite" ] || die "no apt source offers qemu-system-x86 $want (the version of the installed QEMU packages)"
        say "installing QEMU $want from $suite (the version of the machine's ${utils:+qemu-utils}${sys:+qemu-system-x86})"
        apt_install -t "$suite" "qemu-system-x86=$want" "qemu-system-common=$want" "qemu-system-data=$want" "qemu-utils=$want"
        sys=$want
    fi
    # The other QEMU: 7.2 (bookworm) beside a newer one, else backports'.
    if dpkg --compare-versions "$sys" ge 1:8; then
        other_suite=bookworm
    else
        ensure_backports
        other_suite=$BPO
    fi
    other=$(suite_version qemu-system-x86 "$other_suite")
    if [ -z "$other" ]; then apt_update_once; other=$(suite_version qemu-system-x86 "$other_suite"); fi
    [ -n "$other" ] || die "$other_suite offers no qemu-system-x86"
    dir="$CACHE/qemu/$(qemu_short "$other")"
    stamp="$dir/.stasis-qemu"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$other" ] && [ -d "$dir/usr/lib/x86_64-linux-gnu/qemu" ] \
        && "$dir/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$CACHE/debs"
    rm -rf "$dir.tmp"
    mkdir -p "$dir.tmp"
    # The binary, its modules (qemu-system-common: accel-tcg-x86_64.so, which
    # 7.2 loads at start), its data (option ROMs, keymaps) and the firmware it
    # links to (qemu-system-data's bios-256k.bin is a relative symlink into
    # seabios). stasis points such a QEMU at its own modules and data
    # (stasis_qemu::vm::unpacked_prefix).
    for p in qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu; do
        local v
        # qemu-system-data is arch: all, so it lacks the +bN of binary rebuilds.
        if [ "$p" = qemu-system-x86 ] || [ "$p" = qemu-system-common ]; then v=$other; else v=$(suite_version "$p" "$other_suite"); fi
        [ -n "$v" ] || v=$(installed_version "$p")
        [ -n "$v" ] || die "no version of $p for QEMU $other"
        deb=$(ls "$CACHE/debs/${p}_"*"${v#*:}_"*.deb 2>/dev/null | tail -n1 || true)
        if [ -z "$deb" ]; then
            say "downloading $p $v (QEMU $other, unpacked, not installed)"
            if ! (cd "$CACHE/debs" && apt-get download -qq "$p=$v" 2>/dev/null); then
                apt_update_once
                (cd "$CACHE/debs" && apt-get download -qq "$p=$v") || die "apt-get download $p=$v failed"
            fi
            deb=$(ls "$CACHE/debs/${p}_"*"${v#*:}_"*.deb 2>/dev/null | tail -n1 || true)
            [ -n "$deb" ] || die "download of $p=$v produced no .deb"
        fi
        dpkg-deb -x "$deb" "$dir.tmp" || die "dpkg-deb -x $deb failed"
    done
    # Shared libraries the unpacked binary needs and the machine lacks: the
    # packages its control file depends on (added, never replacing anything).
    if ldd "$dir.tmp/usr/bin/qemu-system-x86_64" | grep -q 'not found'; then
        deb=$(ls "$CACHE/debs/qemu-system-x86_"*"${other#*:}_"*.deb | tail -n1)
        missing_libs=()
        for p in $(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/^ *//; s/[ (].*//' | grep '^lib'); do
            [ -n "$(installed_version "$p")" ] || missing_libs+=("$p")
        done
        [ ${#missing_libs[@]} -eq 0 ] || { apt_update_once; say "installing libraries of QEMU $other: ${missing_libs[*]}"; apt_install "${missing_libs[@]}"; }
        if ldd "$dir.tmp/usr/bin/qemu-system-x86_64" | grep -q 'not found'; then
            die "QEMU $other in $dir.tmp misses libraries: $(ldd "$dir.tmp/usr/bin/qemu-system-x86_64" | grep 'not found' | tr -s ' \n\t' ' ')"
        fi
    fi
    "$dir.tmp/usr/bin/qemu-system-x86_64" --version >/dev/null || die "QEMU $other unpacked in $dir.tmp does not run"
    echo "$other" > "$dir.tmp/.stasis-qemu"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    say "QEMU $other ready in ${dir#"$ROOT"/} (the suite's second QEMU)"
}

# 1:10.0.2+ds-2+deb13u1~bpo12+1 -> 10.0.2; 1:7.2+dfsg-7+deb12u18+b2 -> 7.2
qemu_short() { local v=${1#*:}; echo "${v%%[+~-]*}"; }

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
# The Debian headers of exactly the pinned kernel's version, unpacked (never
# installed) into .cache/headers/ by scripts/kernel-headers.sh, so
# `make -C .cache/headers/usr/src/linux-headers-KREL M=DIR modules` works.
setup_headers() {
    local kpkg deb
    kpkg=$(cat "$CACHE/kernel/.stasis-kernel")
    deb=$(ls "$CACHE/debs/${kpkg}_"*.deb 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$deb" ] || die "no .deb of $kpkg in .cache/debs (needed to pin the headers' version)"
    bash "$ROOT/scripts/kernel-headers.sh" "${kpkg#linux-image-}" "$(dpkg-deb -f "$deb" Version)" "$CACHE/headers"
}

setup_qemu
setup_kernel
setup_headers

# --- every tool the suite runs, checked -----------------------------------------
# A package can be "installed" and its command still missing (a diversion, a
# half-configured package, a PATH without /usr/sbin): name what is absent.
absent=()
for c in qemu-system-x86_64 qemu-img busybox cpio gzip xz zstd file jq socat ip iperf3 make gcc-12 ctorrent tclsh; do
    command -v "$c" >/dev/null 2>&1 || absent+=("$c")
done
[ -x /usr/bin/opentracker ] || absent+=(opentracker)
[ ${#absent[@]} -eq 0 ] || die "missing after set-up: ${absent[*]}"
qemu-system-x86_64 -machine help >/dev/null 2>&1 || die "qemu-system-x86_64 does not run: $(qemu-system-x86_64 -machine help 2>&1 | head -n3)"
qemu-img --version >/dev/null 2>&1 || die "qemu-img does not run"
