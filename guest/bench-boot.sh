#!/usr/bin/env bash
# Boot-time benchmark of the guest image under TCG: boots one guest RUNS
# times (default 5) and prints, per run, the host wall time from QEMU start to
# STASIS-READY, QEMU's CPU time (user+sys) by then (less sensitive to other
# load on the host), and the guest's own uptime at that point.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
"$ROOT/guest/build.sh"
WORK=$(mktemp -d /tmp/stasis-bench-boot.XXXXXX)
PID=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
TICK=$(getconf CLK_TCK)
RUN=$(printf 'cut -d" " -f1 /proc/uptime | sed "s/^/uptime=/"\n' | base64 -w0)
echo "run wall_ms qemu_cpu_ms guest_uptime_s load1"
for i in $(seq 1 "$RUNS"); do
    log="$WORK/$i.log"
    start=$(date +%s%N)
    qemu-system-x86_64 -accel tcg -cpu max -m 256 -nodefaults -no-reboot -display none -monitor none \
        -serial "file:$log" -kernel "$ROOT/target/guest/vmlinuz" -initrd "$ROOT/target/guest/initrd.img" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 stasis.node=bench stasis.ip=eth0:10.9.9.9/24 stasis.run=$RUN" \
        -netdev "dgram,id=n0,local.type=unix,local.path=$WORK/s1,remote.type=unix,remote.path=$WORK/s2" \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:00:00:09,romfile= </dev/null >/dev/null 2>&1 &
    PID=$!
    until grep -aq STASIS-READY "$log" 2>/dev/null; do
        kill -0 "$PID" 2>/dev/null || { echo "bench-boot: QEMU exited" >&2; exit 1; }
        sleep 0.02
    done
    wall=$(( ($(date +%s%N) - start) / 1000000 ))
    read -r -a st < "/proc/$PID/stat"
    cpu=$(( (st[13] + st[14]) * 1000 / TICK ))
    until grep -aq '^uptime=' "$log"; do sleep 0.05; done
    up=$(grep -a '^uptime=' "$log" | head -n1 | tr -d '\r' | cut -d= -f2)
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    echo "$i $wall $cpu $up $(cut -d' ' -f1 /proc/loadavg)"
done
