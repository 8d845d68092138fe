#!/usr/bin/env bash
# Builds an OS image stasis nodes boot from (`image = "…"` in a spec; see
# docs/images.md): by default the project's Debian 12 reference image into
# target/images/debian-12/:
#   disk.qcow2   the root disk: an MBR-partitioned disk, partition 1 ext4
#                (made with mkfs.ext4 -d: no loop device, no mount), GRUB in
#                the MBR and the gap after it, so SeaBIOS boots it (firmware boot)
#   vmlinuz, initrd.img, kernel-args
#                the same kernel and initramfs, and the `root=UUID=…` command
#                line, for direct kernel boot
#   image.toml   what the image is (kernel release, packages, sizes)
#   inputs.sha256  every input; the image is rebuilt only when one changes
# In the image: systemd, openssh-server, chrony, iperf3, qemu-guest-agent,
# cloud-init (NoCloud: stasis attaches a seed per node), the stasis guest
# kmod built against this image's own kernel and loaded at boot
# (/etc/modules-load.d), and the static stasis guest tools in /usr/local/bin.
#
# Two stages: the root file system (mmdebstrap, ~3 min, the slow part) is
# kept as .cache/images/rootfs-<hash>.tar.zst, keyed by what mmdebstrap is
# given; the disk is assembled from it in seconds, keyed by everything else.
#
# Options (also for building your own image the same way):
#   --name NAME        output directory target/images/NAME (default debian-12)
#   --out DIR          output directory (overrides --name's)
#   --suite SUITE      Debian suite (default bookworm)
#   --mirror URL       Debian mirror (default http://deb.debian.org/debian)
#   --include PKGS     extra packages, comma-separated
#   --size SIZE        virtual size of the root disk (default 4G)
#   --files DIR        a tree copied over the root file system (your own
#                      configuration, programs, data), after the project's
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE="$ROOT/.cache"
HERE="$ROOT/guest/debian"
WHO=guest/debian/build.sh
die() { echo "$WHO: error: $*" >&2; exit 1; }
say() { echo "$WHO: $*"; }

NAME=debian-12 OUT= SUITE=bookworm MIRROR=http://deb.debian.org/debian EXTRA= SIZE=4G USER_FILES=
while [ $# -gt 0 ]; do
    case "$1" in
        --name) NAME=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --include) EXTRA=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --files) USER_FILES=$(cd "$2" && pwd); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--name $NAME: use letters, digits, . _ -"
OUT=${OUT:-$ROOT/target/images/$NAME}
[ "$(id -u)" = 0 ] || die "needs root: the root file system keeps its owners and device nodes (mmdebstrap --mode=root)"

bash "$ROOT/scripts/image-tools.sh"
[ -f "$CACHE/kernel/.stasis-kernel" ] || bash "$ROOT/scripts/setup.sh"

# What the image holds. The kernel is linux-image-amd64's current one; the
# guest kmod is built against its headers below, whatever version it is.
PACKAGES=systemd,systemd-sysv,udev,dbus,kmod,e2fsprogs,iproute2,iputils-ping,procps,netbase,less,sudo,ca-certificates
PACKAGES+=,openssh-server,chrony,iperf3,qemu-guest-agent,cloud-init,linux-image-amd64,initramfs-tools,grub-pc-bin
[ -z "$EXTRA" ] || PACKAGES+=",$EXTRA"
case "$SUITE" in
    bookworm|bullseye|trixie)
        SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb ${MIRROR%/debian}/debian-security $SUITE-security main") ;;
    *) SOURCES=("deb $MIRROR $SUITE main") ;;
esac

mkdir -p "$OUT" "$CACHE/images"
exec 9>"$OUT/.build.lock"
flock 9 || die "cannot lock $OUT/.build.lock"

# --- stage 1: root file system (mmdebstrap) -------------------------------------
stage1_key=$(printf '%s\n' "mmdebstrap $(mmdebstrap --version)" "variant apt" "suite $SUITE" "packages $PACKAGES" "${SOURCES[@]}" | sha256sum | cut -c1-16)
ROOTFS_TAR="$CACHE/images/rootfs-$stage1_key.tar.zst"
if [ ! -f "$ROOTFS_TAR" ]; then
    say "building the root file system with mmdebstrap ($SUITE: ${PACKAGES//,/ }); takes a few minutes"
    t0=$(date +%s)
    exec 8>"$CACHE/images/.rootfs-$stage1_key.lock"
    flock 8
    if [ ! -f "$ROOTFS_TAR" ]; then
        log="$CACHE/images/rootfs-$stage1_key.log"
        # mmdebstrap compresses by the name's extension.
        partial="$CACHE/images/partial-$stage1_key.tar.zst"
        # The kernel's postinst must not try a bootloader: there is none in
        # the chroot; stasis writes GRUB into the disk image itself below.
        if ! mmdebstrap --mode=root --variant=apt --components=main \
            --include="$PACKAGES" \
            --essential-hook='mkdir -p "$1/etc/kernel"; echo "do_symlinks = yes" > "$1/etc/kernel-img.conf"' \
            "$SUITE" "$partial" "${SOURCES[@]}" >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            rm -f "$partial"
            die "mmdebstrap failed (whole log: $log)"
        fi
        mv "$partial" "$ROOTFS_TAR"
        say "root file system ready in $(( $(date +%s) - t0 )) s: ${ROOTFS_TAR#"$ROOT"/} ($(( $(stat -c %s "$ROOTFS_TAR") >> 20 )) MiB)"
    fi
    exec 8>&-
fi

# --- stage 2: the disk ---------------------------------------------------------------
TOOLS_DIR="$ROOT/target/guest-tools/x86_64-unknown-linux-gnu/release"
TOOLS=(stasis-probe stasis-traffic)
for t in "${TOOLS[@]}"; do
    [ -x "$TOOLS_DIR/$t" ] || bash "$ROOT/guest/build.sh" >/dev/null
    [ -x "$TOOLS_DIR/$t" ] || die "$TOOLS_DIR/$t missing after guest/build.sh"
done
KMOD_FILES=(Kbuild stasis_fw.c)
tree_hash() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum); }
inputs=$(
    echo "rootfs $stage1_key"
    echo "size $SIZE"
    sha256sum "$HERE/build.sh" | sed "s|  .*|  build.sh|"
    tree_hash "$HERE/files" | sed 's|  \./|  files/|'
    [ -z "$USER_FILES" ] || tree_hash "$USER_FILES" | sed 's|  \./|  user-files/|'
    for f in "${KMOD_FILES[@]}"; do sha256sum "$ROOT/guest-kmod/$f" | sed "s|  .*|  guest-kmod/$f|"; done
    for t in "${TOOLS[@]}"; do sha256sum "$TOOLS_DIR/$t" | sed "s|  .*|  $t|"; done
)
if [ -f "$OUT/inputs.sha256" ] && [ "$(cat "$OUT/inputs.sha256")" = "$inputs" ] \
    && [ -f "$OUT/disk.qcow2" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd.img" ]; then
    echo "OS image: cached ($NAME, ${OUT#"$ROOT"/}/)"
    exit 0
fi
t0=$(date +%s)
rm -f "$OUT/inputs.sha256"
STAGE="$OUT/stage"
RAW="$OUT/disk.raw"
trap 'rm -rf "$STAGE" "$RAW"' EXIT
rm -rf "$STAGE"
mkdir -p "$STAGE"
tar --zstd -xpf "$ROOTFS_TAR" -C "$STAGE" --numeric-owner --xattrs --xattrs-include='*' \
    || die "cannot unpack $ROOTFS_TAR"

# The image's own kernel, and headers of exactly its version for the kmod.
KREL=$(ls "$STAGE/lib/modules" | sort -V | tail -n1)
[ -n "$KREL" ] && [ -f "$STAGE/boot/vmlinuz-$KREL" ] || die "no kernel in the root file system"
KVER=$(dpkg-query --admindir="$STAGE/var/lib/dpkg" -W -f='${Version}' "linux-image-$KREL")
HDEST="$CACHE/image-headers/$KREL-$KVER"
if [ "$(cat "$CACHE/headers/.stasis-headers" 2>/dev/null)" = "linux-image-$KREL=$KVER" ]; then
    HDEST="$CACHE/headers"   # the same kernel as the busybox guest's
fi
bash "$ROOT/scripts/kernel-headers.sh" "$KREL" "$KVER" "$HDEST"
KMOD_OUT="$OUT/kmod"
mkdir -p "$KMOD_OUT"
for f in "${KMOD_FILES[@]}"; do cmp -s "$ROOT/guest-kmod/$f" "$KMOD_OUT/$f" || cp -p "$ROOT/guest-kmod/$f" "$KMOD_OUT/$f"; done
kmod_log=$(make -s -C "$HDEST/usr/src/linux-headers-$KREL" M="$KMOD_OUT" modules 2>&1) || die "guest-kmod build failed:
$kmod_log"
if echo "$kmod_log" | grep -q 'warning:'; then die "guest-kmod build warns:
$kmod_log"; fi
ko_magic() {
    case "$1" in
        *.ko.xz) xz -dc "$1" ;; *.ko.zst) zstd -qdc "$1" ;; *.ko.gz) gzip -dc "$1" ;; *) cat "$1" ;;
    esac | tr '\0' '\n' | sed -n 's/^vermagic=//p'
}
ref=$(find "$STAGE/lib/modules/$KREL/kernel/net/sched" -name 'sch_netem.ko*' | head -n1)
[ -n "$ref" ] || die "no sch_netem module in the image's kernel to compare vermagic with"
[ "$(ko_magic "$KMOD_OUT/stasis_fw.ko")" = "$(ko_magic "$ref")" ] \
    || die "stasis_fw.ko vermagic '$(ko_magic "$KMOD_OUT/stasis_fw.ko")' differs from the image kernel's '$(ko_magic "$ref")'"
install -D -m 0644 "$KMOD_OUT/stasis_fw.ko" "$STAGE/lib/modules/$KREL/updates/stasis_fw.ko"
chroot "$STAGE" /sbin/depmod -a "$KREL" || die "depmod in the image failed"

# Configuration, the guest tools, then the user's own tree.
cp -a "$HERE/files/." "$STAGE/"
for t in "${TOOLS[@]}"; do install -m 0755 "$TOOLS_DIR/$t" "$STAGE/usr/local/bin/$t"; done
[ -z "$USER_FILES" ] || cp -a "$USER_FILES/." "$STAGE/"
chroot "$STAGE" systemctl enable --quiet systemd-networkd.service
# Timers that would start package work in the middle of an experiment.
chroot "$STAGE" systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
# e2scrub_reap looks for LVM snapshots to clean at every boot (38 s of a TCG boot; there is no LVM).
chroot "$STAGE" systemctl mask --quiet e2scrub_reap.service
# Every node gets its own identity at its first boot.
echo uninitialized > "$STAGE/etc/machine-id"
rm -f "$STAGE/var/lib/dbus/machine-id"

# One UUID for the root file system, derived from the inputs: the same
# inputs give the same image identity.
hex=$(echo "$inputs" | sha256sum)
ROOT_UUID="${hex:0:8}-${hex:8:4}-4${hex:13:3}-8${hex:17:3}-${hex:20:12}"
DISK_ID="${hex:32:8}"
CMDLINE="root=UUID=$ROOT_UUID ro console=ttyS0,115200 net.ifnames=0 nokaslr"
echo "UUID=$ROOT_UUID / ext4 errors=remount-ro 0 1" > "$STAGE/etc/fstab"

# GRUB, the image's own (grub-pc-bin), read from the ext4 partition: its
# modules in /boot/grub/i386-pc as grub-install would put them, and a
# configuration that boots /vmlinuz and /initrd.img — the symlinks the
# Debian kernel packages keep current, so a kernel upgraded inside the
# guest still boots.
mkdir -p "$STAGE/boot/grub/i386-pc"
cp "$STAGE"/usr/lib/grub/i386-pc/*.mod "$STAGE"/usr/lib/grub/i386-pc/*.lst "$STAGE/boot/grub/i386-pc/"
cat > "$STAGE/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
menuentry 'stasis $NAME' {
    linux /vmlinuz $CMDLINE
    initrd /initrd.img
}
CFG
[ -e "$STAGE/vmlinuz" ] && [ -e "$STAGE/initrd.img" ] || die "the image has no /vmlinuz or /initrd.img symlink"
chroot "$STAGE" grub-mkimage -O i386-pc -d /usr/lib/grub/i386-pc -o /boot/grub/i386-pc/core.img \
    -p '(hd0,msdos1)/boot/grub' biosdisk part_msdos ext2 || die "grub-mkimage failed"
core="$STAGE/boot/grub/i386-pc/core.img"
# The core image lives in the gap between the MBR and partition 1 (sectors 1..2047).
[ "$(stat -c %s "$core")" -le $(( 2047 * 512 )) ] || die "GRUB core image larger than the 1 MiB gap"

# The disk: MBR partition table (sfdisk on a plain file), ext4 written
# straight into partition 1 by mkfs.ext4 -d at its offset, GRUB's boot
# sector and core image written with dd.
size_bytes=$(numfmt --from=iec "$SIZE") || die "--size $SIZE is not a size"
[ "$size_bytes" -ge $(( 1 << 30 )) ] || die "--size $SIZE: at least 1G"
rm -f "$RAW"
truncate -s "$size_bytes" "$RAW"
printf 'label: dos\nlabel-id: 0x%s\nstart=2048, type=83, bootable\n' "$DISK_ID" | sfdisk -q "$RAW" >/dev/null \
    || die "sfdisk failed"
fs_kib=$(( (size_bytes - (1 << 20)) / 1024 ))
mkfs.ext4 -q -F -L stasis-root -U "$ROOT_UUID" -E "offset=$(( 1 << 20 )),hash_seed=$ROOT_UUID" -d "$STAGE" "$RAW" "${fs_kib}k" \
    || die "mkfs.ext4 -d failed"
# boot.img's first 440 bytes (the partition table after them stays), with
# the jump over the boot-drive check replaced by NOPs as grub-bios-setup
# does for hard disks, then core.img from sector 1 (boot.img's default
# kernel sector; core.img's own blocklist defaults to the sectors after it).
dd if="$STAGE/usr/lib/grub/i386-pc/boot.img" of="$RAW" bs=440 count=1 conv=notrunc status=none
printf '\x90\x90' | dd of="$RAW" bs=1 seek=$(( 0x66 )) conv=notrunc status=none
dd if="$core" of="$RAW" bs=512 seek=1 conv=notrunc status=none

qemu-img convert -f raw -O qcow2 "$RAW" "$OUT/disk.qcow2.tmp" || die "qemu-img convert failed"
cp "$STAGE/boot/vmlinuz-$KREL" "$OUT/vmlinuz.tmp"
cp "$STAGE/boot/initrd.img-$KREL" "$OUT/initrd.img.tmp"
echo "$CMDLINE" > "$OUT/kernel-args"
used_kib=$(du -sk --apparent-size "$STAGE" | cut -f1)
cat > "$OUT/image.toml" <<TOML
# Written by guest/debian/build.sh; see docs/images.md.
name = "$NAME"
suite = "$SUITE"
kernel_release = "$KREL"
kernel_version = "$KVER"
root_uuid = "$ROOT_UUID"
kernel_args = "$CMDLINE"
size = "$SIZE"
files_mib = $(( used_kib / 1024 ))
packages = "$PACKAGES"
TOML
mv "$OUT/disk.qcow2.tmp" "$OUT/disk.qcow2"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$inputs" > "$OUT/inputs.sha256"
echo "OS image: built ($NAME, kernel $KREL, $(( used_kib / 1024 )) MiB of files, disk.qcow2 $(( $(stat -c %s "$OUT/disk.qcow2") >> 20 )) MiB, $(( $(date +%s) - t0 )) s) in ${OUT#"$ROOT"/}/"
