#!/usr/bin/env bash
# Idempotent: the host packages guest/debian/build.sh needs to build an OS
# image without mounting anything: mmdebstrap (the root file system),
# fdisk (sfdisk writes the partition table into a plain file), e2fsprogs
# (mkfs.ext4 -d), qemu-utils (qemu-img, already there with QEMU) and zstd.
# Installs with apt, never removing or downgrading a package (scripts/lib/apt.sh).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHO=image-tools.sh
# shellcheck source=lib/apt.sh
. "$ROOT/scripts/lib/apt.sh"

mapfile -t missing < <(missing_pkgs mmdebstrap fdisk e2fsprogs zstd)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    say "installing: ${missing[*]}"
    apt_install "${missing[@]}"
fi
for c in mmdebstrap sfdisk mkfs.ext4 qemu-img zstd; do
    command -v "$c" >/dev/null 2>&1 || die "$c is missing after set-up"
done
