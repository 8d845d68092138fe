#!/usr/bin/env bash
# Two-VM smoke test of the guest image under TCG: boots node a (sender) and
# node b (receiver) joined back to back by `-netdev dgram` over two unix
# sockets, then checks that both reach STASIS-READY, both print probe lines,
# and UDP and TCP sequence-numbered flows a -> b arrive complete with
# missing=0 and dups=0. Exits non-zero on any failure; QEMUs are killed on
# exit. Set KEEP=1 to keep the logs (their directory is printed).
# b's workload arrives through -fw_cfg, a's through stasis.run; when the image
# has iperf3, a 2 s iperf3 run a -> b checks the copied shared libraries.
# Also proves the probe on real guests: node b steps its realtime clock by
# +10 s (date -s) and the probe must report it; node a is paused 3 s over QMP
# in the middle of its flows, and under TCG no clock may show that pause.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${COUNT:-1000}   # records per flow
RATE=${RATE:-200}      # records per second per flow
TIMEOUT=${TIMEOUT:-240}  # seconds for the whole run; boots take 10-35 s on a busy 2-core host

"$ROOT/guest/build.sh"
for c in jq socat qemu-system-x86_64; do
    command -v $c >/dev/null || { echo "smoke: $c missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/stasis-smoke.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$rc" != 0 ] || [ -n "${KEEP:-}" ]; then
        echo "smoke: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail() {
    echo "smoke: FAIL: $*" >&2
    for n in a b; do
        echo "---- tail of $n.log" >&2
        tail -n 15 "$WORK/$n.log" 2>/dev/null | tr -d '\r' >&2 || true
    done
    exit 1
}

boot() { # name ip mac local-sock remote-sock script how(cmdline|fw_cfg)
    local runarg= fwcfg=()
    if [ "$7" = fw_cfg ]; then
        printf '%s\n' "$6" > "$WORK/$1.run.sh"
        fwcfg=(-fw_cfg "name=opt/stasis/run,file=$WORK/$1.run.sh")
    else
        runarg="stasis.run=$(printf '%s' "$6" | base64 -w0)"
    fi
    qemu-system-x86_64 -accel tcg -cpu max -m 256 -nodefaults -no-reboot \
        -display none -monitor none -serial "file:$WORK/$1.log" \
        -qmp "unix:$WORK/$1.qmp,server=on,wait=off" \
        -kernel "$ROOT/target/guest/vmlinuz" -initrd "$ROOT/target/guest/initrd.img" \
        -append "console=ttyS0 quiet loglevel=1 panic=-1 stasis.node=$1 stasis.ip=eth0:$2 $runarg" \
        "${fwcfg[@]}" \
        -netdev "dgram,id=n0,local.type=unix,local.path=$4,remote.type=unix,remote.path=$5" \
        -device "virtio-net-pci,netdev=n0,mac=$3,romfile=" \
        </dev/null >"$WORK/$1.qemu.out" 2>&1 &
    PIDS+=($!)
}

# iperf3 (a host program copied into the image with its libraries) runs
# after the flows when the image has it.
IPERF=
grep -qx 'bin iperf3' "$ROOT/target/guest/inputs.sha256" && IPERF=1

# b's script comes through fw_cfg, a's through the kernel command line.
RECV_SCRIPT='stasis-probe --report-ms 1000 &
stasis-traffic recv --port 5000 --proto udp &
stasis-traffic recv --port 5001 --proto tcp &
'"${IPERF:+iperf3 -s -1 >/dev/null 2>&1 &}"'
sleep 3
date -s "@$(( $(date +%s) + 10 ))" >/dev/null'
SEND_SCRIPT="stasis-probe --report-ms 1000 &
until ping -c1 -W1 10.1.1.2 >/dev/null 2>&1; do sleep 0.2; done
sleep 3  # b answers pings a moment before its receivers have bound
stasis-traffic send --to 10.1.1.2:5000 --proto udp --rate $RATE --count $COUNT --flow 7 --size 200 &
u=\$!
stasis-traffic send --to 10.1.1.2:5001 --proto tcp --rate $RATE --count $COUNT --flow 8 --size 200 &
t=\$!
wait \$u \$t
${IPERF:+iperf3 -c 10.1.1.2 -t 2 && echo IPERF-OK}"

t0=$(date +%s%N)
boot b 10.1.1.2/24 52:54:00:00:00:02 "$WORK/b.sock" "$WORK/a.sock" "$RECV_SCRIPT" fw_cfg
boot a 10.1.1.1/24 52:54:00:00:00:01 "$WORK/a.sock" "$WORK/b.sock" "$SEND_SCRIPT" cmdline

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
declare -A READY_MS=()
deadline=$(( $(date +%s) + TIMEOUT ))
while [ ${#READY_MS[@]} -lt 2 ]; do
    for n in a b; do
        if [ -z "${READY_MS[$n]:-}" ] && [ -f "$WORK/$n.log" ] \
            && tr -d '\r' < "$WORK/$n.log" | grep -aqE "STASIS-READY node=$n\$"; then
            READY_MS[$n]=$(ms_since "$t0")
            echo "smoke: node $n STASIS-READY after ${READY_MS[$n]} ms (host wall clock from QEMU start)"
        fi
    done
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || fail "a QEMU exited early ($(cat "$WORK"/*.qemu.out))"; done
    [ "$(date +%s)" -lt "$deadline" ] || fail "not ready within ${TIMEOUT}s"
    sleep 0.1
done

json() { # node jq-filter: matching JSON lines of a node's console
    grep -a '^{' "$WORK/$1.log" | tr -d '\r' | jq -c "select($2)" 2>/dev/null || true
}
want() { # node jq-filter: true once a line matches
    [ -n "$(json "$1" "$2" | head -n1)" ]
}

qmp() { # node command...: runs QMP commands on a node
    local n=$1; shift
    { echo '{"execute":"qmp_capabilities"}'; for c in "$@"; do echo "{\"execute\":\"$c\"}"; done; } \
        | socat -t 1 - "UNIX-CONNECT:$WORK/$n.qmp" >/dev/null || fail "QMP $* on $n failed"
}
# Pause a for 3 s once its flows are running.
while ! want a '.tool=="traffic" and .role=="send" and .sent > 0'; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "sender never started"
    sleep 0.2
done
qmp a stop
echo "smoke: node a stopped over QMP for 3 s"
sleep 3
qmp a cont

UDP_DONE=".tool==\"traffic\" and .role==\"recv\" and .proto==\"udp\" and .flow==\"10.1.1.1/7\" and .received==$COUNT and .total==$COUNT"
TCP_DONE=".tool==\"traffic\" and .role==\"recv\" and .proto==\"tcp\" and .flow==\"10.1.1.1/8\" and .received==$COUNT and .total==$COUNT"
while ! { want b "$UDP_DONE" && want b "$TCP_DONE" \
          && want a '.tool=="traffic" and .role=="send" and .proto=="udp" and .done' \
          && want a '.tool=="traffic" and .role=="send" and .proto=="tcp" and .done'; }; do
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || fail "a QEMU exited early"; done
    [ "$(date +%s)" -lt "$deadline" ] || fail "flows not complete within ${TIMEOUT}s"
    sleep 0.5
done
# Give the receivers one more report window, then judge every line.
sleep 1.5

for n in a b; do
    probes=$(json $n ".tool==\"probe\" and .node==\"$n\"" | wc -l)
    [ "$probes" -ge 2 ] || fail "node $n printed $probes probe lines"
    echo "smoke: node $n: $probes probe lines; last: $(json $n '.tool=="probe"' | tail -n1)"
done
# The +10 s realtime step on b (9-10 s: date -s takes whole seconds) must show
# in realtime only.
step=$(json b '.tool=="probe" and .max_step_ns.real > 5000000000' | head -n1)
[ -n "$step" ] || fail "probe on b missed the +10 s realtime step"
echo "$step" | jq -e '.max_disagree_ns.real_mono > 5000000000 and .max_step_ns.mono < 1000000000 and .max_step_ns.boot < 1000000000' >/dev/null \
    || fail "realtime step misattributed: $step"
echo "smoke: b probe saw the realtime step: $(echo "$step" | jq -c '{window,max_step_ns,max_disagree_ns}')"
# Under TCG a stop/cont must not leak into any guest clock of a.
worst=$(json a '.tool=="probe" and .max_step_ns.mono != null' \
    | jq -s '[.[] | .max_step_ns | [.mono, .real, .boot, .tsc] | max] | max')
echo "smoke: a largest clock step over the run incl. the 3 s pause: $worst ns"
[ "$worst" -lt 1000000000 ] || fail "the 3 s pause leaked into a's clocks ($worst ns)"
for proto in udp tcp; do
    final=$(json b ".tool==\"traffic\" and .role==\"recv\" and .proto==\"$proto\"" | tail -n1)
    echo "smoke: b recv $proto: $final"
    echo "$final" | jq -e ".received==$COUNT and .missing==0 and .dups==0 and .highest==$((COUNT-1))" >/dev/null \
        || fail "$proto flow not clean: $final"
    bad=$(json b ".tool==\"traffic\" and .role==\"recv\" and .proto==\"$proto\" and (.missing!=0 or .dups!=0)" | wc -l)
    [ "$bad" = 0 ] || fail "$proto: $bad receiver lines with missing or dups"
    echo "smoke: a send $proto: $(json a ".tool==\"traffic\" and .role==\"send\" and .proto==\"$proto\" and .done")"
done
if [ -n "$IPERF" ]; then
    while ! tr -d '\r' < "$WORK/a.log" | grep -aq '^IPERF-OK'; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "iperf3 a -> b did not finish"
        sleep 0.5
    done
    echo "smoke: iperf3 a -> b: $(tr -d '\r' < "$WORK/a.log" | grep -a 'receiver$' | tr -s ' ')"
fi
# Every console line that looks like JSON must parse: no torn lines.
torn=$(for n in a b; do grep -a '^{' "$WORK/$n.log" | tr -d '\r' | while IFS= read -r l; do
    echo "$l" | jq -e . >/dev/null 2>&1 || echo "$l"; done; done | wc -l)
[ "$torn" = 0 ] || fail "$torn torn JSON lines on the consoles"
echo "smoke: PASS (ready: a ${READY_MS[a]} ms, b ${READY_MS[b]} ms; $COUNT records per flow, udp+tcp, missing=0 dups=0; realtime step seen; 3 s pause invisible)"
