#!/usr/bin/env bash
# Two real TCG guests (the project's guest image) joined through delay-node by
# QEMU `-netdev stream` (client mode): a pings b over a 10 ms + 10 ms link; the
# RTT must be at least the configured 20 ms and below 20 ms + SLACK_MS. Then the
# node is frozen for 1 s in the middle of a ping series (VMs keep running) and
# no ping may be lost. Needs target/guest/{vmlinuz,initrd.img} (guest/build.sh).
# Not part of `cargo test` (boots take 10-35 s on a busy 2-core host).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SLACK_MS=${SLACK_MS:-15}
BIN=${BIN:-$ROOT/target/debug/delay-node}
[ -x "$BIN" ] || (cd "$ROOT" && cargo build -p delay-node)
W=$(mktemp -d /tmp/dn-qemu.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && echo "logs in $W" || rm -rf "$W"; }
trap cleanup EXIT
cat > "$W/topo.json" <<JSON
{"seed":1,"ports":[{"name":"a","socket":"$W/a.sock"},{"name":"b","socket":"$W/b.sock"}],
 "links":[{"name":"l","a":"a","b":"b","a_to_b":{"delay_ns":10000000,"bandwidth_bps":100000000},"b_to_a":{"delay_ns":10000000,"bandwidth_bps":100000000}}]}
JSON
"$BIN" --topology "$W/topo.json" --control "$W/ctl.sock" --events "$W/events.jsonl" 2>"$W/node.log" &
PIDS+=($!)
until [ -S "$W/ctl.sock" ]; do sleep 0.05; done
boot() { # name ip mac script
    qemu-system-x86_64 -accel tcg -cpu max -m 256 -nodefaults -no-reboot -display none -monitor none \
        -serial "file:$W/$1.log" -kernel "$ROOT/target/guest/vmlinuz" -initrd "$ROOT/target/guest/initrd.img" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 stasis.node=$1 stasis.ip=eth0:$2 stasis.run=$(printf '%s' "$4" | base64 -w0)" \
        -netdev "stream,id=n0,server=off,addr.type=unix,addr.path=$W/$1.sock" \
        -device "virtio-net-pci,netdev=n0,mac=$3,romfile=" </dev/null >"$W/$1.qemu.out" 2>&1 &
    PIDS+=($!)
}
boot b 10.1.1.2/24 52:54:00:00:00:02 "sleep 100000"
boot a 10.1.1.1/24 52:54:00:00:00:01 'until ping -c1 -W1 10.1.1.2 >/dev/null 2>&1; do sleep 0.2; done
ping -c 10 -i 0.2 10.1.1.2; echo PING1-DONE
ping -c 20 -i 0.1 -W 5 10.1.1.2; echo PING2-DONE'
ctl() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode()+b"\n"); print(s.makefile().readline().strip())' "$W/ctl.sock" "$1"; }
mono() { python3 -c 'import time; print(time.monotonic_ns())'; }
log() { tr -d "\r" < "$W/a.log" 2>/dev/null || true; }
for _ in $(seq 600); do log | grep -q PING1-DONE && break; sleep 0.5; done
log | grep -q PING1-DONE || { echo "qemu_smoke: FAIL: first ping series did not finish"; KEEP=1; exit 1; }
avg=$(log | grep -m1 round-trip | sed 's#.*= [0-9.]*/\([0-9.]*\)/.*#\1#')
echo "qemu_smoke: RTT avg ${avg} ms through a 10 ms + 10 ms link"
python3 -c "import sys; a=float('$avg'); sys.exit(0 if 20 <= a < 20 + $SLACK_MS else 1)" || { echo "qemu_smoke: FAIL: RTT $avg ms"; exit 1; }
# Freeze the node 1 s during the second series: pings are delayed, none lost.
sleep 0.5
now=$(mono); ctl "{\"cmd\":\"freeze_at\",\"at\":$((now + 200000000)),\"hold_lead_ns\":0}"
ctl "{\"cmd\":\"thaw_at\",\"at\":$((now + 1200000000))}"
for _ in $(seq 120); do log | grep -q PING2-DONE && break; sleep 0.5; done
loss=$(log | grep 'packets transmitted' | tail -1)
echo "qemu_smoke: second series: $loss"
echo "$loss" | grep -q ' 0% packet loss' || { echo "qemu_smoke: FAIL: pings lost across the freeze"; KEEP=1; exit 1; }
ctl '{"cmd":"stats"}' | python3 -c 'import json,sys; s=json.load(sys.stdin)["ok"]; print("qemu_smoke: release error", s["release_error"]); [print("qemu_smoke:", p["name"], p["frames_in"], p["frames_out"], p["dropped_queue"], p["dropped_loss"]) for p in s["pipes"]]'
echo "qemu_smoke: OK"
