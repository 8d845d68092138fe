#!/usr/bin/env bash
# Builds the stasis guest image into target/guest/: vmlinuz, initrd.img and
# inputs.sha256 (the hashes of everything the image is made of). Rebuilds
# only when an input changed; prints one line saying "built" or "cached".
#
# Inputs: the Debian kernel unpacked by scripts/setup.sh in .cache/kernel/,
# guest-kmod/ (built against .cache/headers/), the host's static busybox, guest/init, this script, and the static guest
# tools (guest/tools, built here with crt-static into target/guest-tools).
#
# Environment:
#   STASIS_GUEST_BINS  host programs copied in with their shared libraries
#                      (default: "iperf3" when installed; "" for none)
#                      (the default also has "ctorrent opentracker" when
#                      installed: the BitTorrent eval's swarm, docs/eval-bt.md)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/target/guest"
KDIR="$ROOT/.cache/kernel"
BUSYBOX=${STASIS_BUSYBOX:-/bin/busybox}
# Loaded in this order by /init; each module's own dependencies are added
# (and ordered before it) automatically.
LOAD_MODULES=(failover net_failover virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev
              virtio_pci virtio_net virtio_blk virtio_console sch_netem qemu_fw_cfg)
TOOLS=(stasis-probe stasis-traffic stasis-mandel)
TOOLS+=(stasis-bt)
# The guest agent (the qemu-ga protocol subset `stasis exec`/`cp` use).
TOOLS+=(stasis-ga)
BT_BINS_DEFAULT=${STASIS_GUEST_BINS+set}
if [ -z "${STASIS_GUEST_BINS+set}" ]; then
    STASIS_GUEST_BINS=$(command -v iperf3 >/dev/null && echo iperf3 || true)
fi
if [ -z "$BT_BINS_DEFAULT" ]; then
    for b in ctorrent opentracker; do
        command -v "$b" >/dev/null && STASIS_GUEST_BINS+=" $b"
    done
fi
read -r -a HOST_BINS <<< "$STASIS_GUEST_BINS"

die() { echo "guest/build.sh: error: $*" >&2; exit 1; }

[ -f "$KDIR/.stasis-kernel" ] || "$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed"

# One build at a time (make test may run several); readers of target/guest/
# only ever see complete files, which are replaced by rename.
mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"
flock 9 || die "cannot lock $OUT/.build.lock"
KPKG=$(cat "$KDIR/.stasis-kernel")
KREL=${KPKG#linux-image-}
VMLINUZ="$KDIR/boot/vmlinuz-$KREL"
MODROOT="$KDIR/lib/modules/$KREL"
[ -f "$VMLINUZ" ] || die "$VMLINUZ missing: run scripts/setup.sh"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing: run scripts/setup.sh (busybox-static)"
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not statically linked"

# --- static guest tools --------------------------------------------------------
TOOLS_DIR="$ROOT/target/guest-tools/x86_64-unknown-linux-gnu/release"
(cd "$ROOT" && CARGO_TARGET_DIR="$ROOT/target/guest-tools" RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --quiet -p stasis-guest-tools --features agent --release --target x86_64-unknown-linux-gnu) \
    || die "cargo build of stasis-guest-tools failed"
for t in "${TOOLS[@]}"; do
    file -L "$TOOLS_DIR/$t" | grep -Eq 'statically linked|static-pie linked' \
        || die "$t is not statically linked: $(file -L "$TOOLS_DIR/$t")"
done

# --- guest-kmod: stasis_fw.ko against the headers in .cache/headers ------------
# Built from a copy under target/guest-kmod/ (kbuild writes next to the
# sources); cp -p keeps mtimes so make stays incremental.
HSTAMP="$ROOT/.cache/headers/.stasis-headers"
[ -f "$HSTAMP" ] || "$ROOT/scripts/setup.sh" || die "scripts/setup.sh failed"
[ -f "$HSTAMP" ] || die "$HSTAMP missing: run scripts/setup.sh"
HDIR="$ROOT/.cache/headers/usr/src/linux-headers-$KREL"
KMOD_SRC="$ROOT/guest-kmod"
KMOD_OUT="$ROOT/target/guest-kmod"
KMOD_FILES=(Kbuild stasis_fw.c)
mkdir -p "$KMOD_OUT"
for f in "${KMOD_FILES[@]}"; do
    cmp -s "$KMOD_SRC/$f" "$KMOD_OUT/$f" || cp -p "$KMOD_SRC/$f" "$KMOD_OUT/$f"
done
kmod_log=$(make -s -C "$HDIR" M="$KMOD_OUT" modules 2>&1) || die "guest-kmod build failed:
$kmod_log"
# Compiler warnings are errors here: this is kernel code.
if echo "$kmod_log" | grep -q 'warning:'; then die "guest-kmod build warns:
$kmod_log"; fi
KMOD="$KMOD_OUT/stasis_fw.ko"

# --- modules: name -> file, dependencies from each module's depends= field ----
declare -A MODPATH=()
while IFS=$'\t' read -r n f; do
    n=${n%%.ko*}; n=${n//-/_}
    MODPATH[$n]=$f
done < <(find "$MODROOT/kernel" -name '*.ko*' -printf '%f\t%p\n')

ko_cat() { # decompressed bytes of a module file
    case "$1" in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) die "unknown module compression: $1" ;;
    esac
}
mod_deps() { ko_cat "${MODPATH[$1]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '; }

# The module must carry exactly the kernel's vermagic, or insmod refuses it.
kmod_magic=$(tr '\0' '\n' < "$KMOD" | sed -n 's/^vermagic=//p')
kernel_magic=$(ko_cat "${MODPATH[sch_netem]}" | tr '\0' '\n' | sed -n 's/^vermagic=//p')
[ -n "$kmod_magic" ] && [ "$kmod_magic" = "$kernel_magic" ] \
    || die "stasis_fw.ko vermagic '$kmod_magic' differs from the kernel's '$kernel_magic'"

ORDER=()
declare -A VISITED=()
visit() {
    local m=$1 d
    [ -n "${VISITED[$m]:-}" ] && return 0
    VISITED[$m]=1
    [ -n "${MODPATH[$m]:-}" ] || die "module $m not found under $MODROOT"
    for d in $(mod_deps "$m"); do visit "$d"; done
    ORDER+=("$m")
}
for m in "${LOAD_MODULES[@]}"; do visit "$m"; done

# --- host programs and the shared libraries they load ------------------------------
HOST_FILES=() # absolute paths, copied to the same path in the guest
for b in "${HOST_BINS[@]}"; do
    p=$(command -v "$b") || die "STASIS_GUEST_BINS: $b is not installed"
    HOST_FILES+=("$(readlink -f "$p")")
    while read -r lib; do
        HOST_FILES+=("$lib")
    done < <(ldd "$p" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done

# --- cache check ----------------------------------------------------------------
inputs=$(
    echo "kernel $KPKG"
    sha256sum "$VMLINUZ" | sed "s|  .*|  vmlinuz|"
    sha256sum "$BUSYBOX" | sed "s|  .*|  busybox|"
    sha256sum "$ROOT/guest/init" | sed "s|  .*|  init|"
    sha256sum "$ROOT/guest/build.sh" | sed "s|  .*|  build.sh|"
    echo "headers $(cat "$HSTAMP")"
    for f in "${KMOD_FILES[@]}"; do sha256sum "$KMOD_SRC/$f" | sed "s|  .*|  guest-kmod/$f|"; done
    for t in "${TOOLS[@]}"; do sha256sum "$TOOLS_DIR/$t" | sed "s|  .*|  $t|"; done
    for m in "${ORDER[@]}"; do sha256sum "${MODPATH[$m]}" | sed "s|  .*|  module:$m|"; done
    for b in "${HOST_BINS[@]}"; do echo "bin $b"; done
    for f in "${HOST_FILES[@]}"; do sha256sum "$(readlink -f "$f")" | sed "s|  .*|  file:$f|"; done
)
if [ -f "$OUT/inputs.sha256" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ] \
    && [ "$(cat "$OUT/inputs.sha256")" = "$inputs" ]; then
    echo "guest image: cached (kernel $KREL, target/guest/)"
    exit 0
fi

# --- build ----------------------------------------------------------------------
STAGE="$OUT/stage"
rm -rf "$STAGE" "$OUT/inputs.sha256"
mkdir -p "$STAGE"/{bin,dev,proc,sys,tmp,run,root,etc,lib/modules}
ln -s bin "$STAGE/sbin"
mkdir -p "$STAGE/usr"
ln -s ../bin "$STAGE/usr/bin"
ln -s ../bin "$STAGE/usr/sbin"
cp "$BUSYBOX" "$STAGE/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$STAGE/bin/$a"
done
for t in "${TOOLS[@]}"; do
    # Debug info stays in target/guest-tools; the guest gets stripped copies.
    if command -v strip >/dev/null; then strip -o "$STAGE/bin/$t" "$TOOLS_DIR/$t"; else cp "$TOOLS_DIR/$t" "$STAGE/bin/$t"; fi
    chmod 0755 "$STAGE/bin/$t"
done
for f in "${HOST_FILES[@]}"; do
    mkdir -p "$STAGE$(dirname "$f")"
    cp -L "$f" "$STAGE$f"
done
for b in "${HOST_BINS[@]}"; do
    [ -e "$STAGE/bin/$b" ] || ln -sf "$(readlink -f "$(command -v "$b")")" "$STAGE/bin/$b"
done
install -m 0755 "$ROOT/guest/init" "$STAGE/init"
echo "$KREL" > "$STAGE/etc/stasis-kernel"
echo "root:x:0:0:root:/root:/bin/sh" > "$STAGE/etc/passwd"
echo "root:x:0:" > "$STAGE/etc/group"
# opentracker drops its privileges to "nobody".
echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" >> "$STAGE/etc/passwd"
echo "nogroup:x:65534:" >> "$STAGE/etc/group"
# BitTorrent eval (docs/eval-bt.md): per payload, the .torrent and an env file
# (size, piece size, info-hash, SHA-1 of the whole file), and the tracker's
# whitelist of every info-hash. The payload itself is generated by the seeder
# guest from the same seed at boot. The seeder is the first member of the
# first LAN (10.0.1.1). Made by stasis-bt, whose hash is an input.
mkdir -p "$STAGE/etc/stasis-bt"
: > "$STAGE/etc/stasis-bt/whitelist"
for bt in "full 1 33554432" "quick 2 4194304"; do
    read -r kind seed size <<< "$bt"
    meta=$("$TOOLS_DIR/stasis-bt" torrent --seed "$seed" --size "$size" --piece-kib 64 --name payload.bin \
        --announce http://10.0.1.1:6969/announce --out "$STAGE/etc/stasis-bt/$kind.torrent") \
        || die "stasis-bt torrent ($kind) failed"
    hash=$(echo "$meta" | sed -n 's/.*"info_hash":"\([0-9a-f]*\)".*/\1/p')
    sha1=$(echo "$meta" | sed -n 's/.*"sha1":"\([0-9a-f]*\)".*/\1/p')
    [ ${#hash} = 40 ] && [ ${#sha1} = 40 ] || die "stasis-bt torrent ($kind) printed no digests: $meta"
    echo "$hash" >> "$STAGE/etc/stasis-bt/whitelist"
    printf 'BT_SEED=%s\nBT_SIZE=%s\nBT_PIECE_KIB=64\nBT_INFO_HASH=%s\nBT_SHA1=%s\n' "$seed" "$size" "$hash" "$sha1" \
        > "$STAGE/etc/stasis-bt/$kind.env"
done
printf '127.0.0.1\tlocalhost\n' > "$STAGE/etc/hosts"
# busybox insmod cannot load compressed modules: store them decompressed.
: > "$STAGE/lib/modules/load-order"
for m in "${ORDER[@]}"; do
    ko_cat "${MODPATH[$m]}" > "$STAGE/lib/modules/$m.ko"
    echo "$m" >> "$STAGE/lib/modules/load-order"
done
# Loaded by /init after load-order (not listed there: it is ours, not Debian's).
cp "$KMOD" "$STAGE/lib/modules/stasis_fw.ko"

(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) \
    | gzip -9n > "$OUT/initrd.img.tmp" || die "cpio/gzip failed"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
rm -rf "$STAGE"
echo "$inputs" > "$OUT/inputs.sha256"
echo "guest image: built (kernel $KREL, initrd $(( $(stat -c %s "$OUT/initrd.img") / 1024 )) KiB, modules: ${ORDER[*]} stasis_fw; host programs: ${HOST_BINS[*]:-none})"
