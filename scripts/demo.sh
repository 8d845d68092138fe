#!/usr/bin/env bash
# The short end-to-end demo behind `make demo`: bring up examples/lan3.toml,
# take two checkpoints under load, kill everything, restore the first, and
# show that the receivers got every frame exactly once.
set -euo pipefail
cd "$(dirname "$0")/.."
STASIS="$PWD/target/debug/stasis"
STATE="$(mktemp -d /tmp/stasis-demo.XXXXXX)"
export STASIS_STATE_DIR="$STATE"
cleanup() { "$STASIS" -e lan3 down >/dev/null 2>&1 || true; rm -rf "$STATE"; }
trap cleanup EXIT

console() { cat "$STATE/lan3/run/vm/$1/serial-$2.log" 2>/dev/null || true; }
received() { # last "received" of node $1 in incarnation $2 (0 if none yet)
  local r
  r=$(console "$1" "$2" | grep -a '"role":"recv"' | tail -n1 | sed -n 's/.*"received":\([0-9]*\).*/\1/p')
  echo "${r:-0}"
}
wait_received() { # node incarnation at-least timeout-s
  local n=0
  while [ "$(received "$1" "$2")" -lt "$3" ]; do
    sleep 1; n=$((n + 1))
    if [ "$n" -ge "$4" ]; then echo "timed out waiting for $1 to receive $3 frames" >&2; exit 1; fi
  done
}

echo "== stasis up examples/lan3.toml"
"$STASIS" up examples/lan3.toml
wait_received b 1 300 120
echo "== traffic flowing: b has $(received b 1) frames, c has $(received c 1)"
for name in first second; do
  echo "== stasis checkpoint --name $name"
  "$STASIS" checkpoint --name "$name"
  sleep 2
done
echo "== stasis list"
"$STASIS" list
echo "== stasis down (kill everything), then restore the first checkpoint"
"$STASIS" down
"$STASIS" restore first
echo "== waiting for the restored timeline to finish its 3000 frames per receiver"
wait_received b 2 3000 180
wait_received c 2 3000 180
for n in b c; do
  line=$(console "$n" 2 | grep -a '"role":"recv"' | tail -n1)
  echo "   $n: $line"
  case "$line" in
    *'"missing":0,"dups":0,'*) ;;
    *) echo "FAILED: $n lost or duplicated frames in the restored timeline" >&2; exit 1 ;;
  esac
done
echo "== clock probe, largest step per window in the restored timeline (ns):"
for n in a b c; do
  echo "   $n: $(console "$n" 2 | grep -a '"tool":"probe"' | sed -n 's/.*"max_step_ns":\({[^}]*}\).*/\1/p' | tail -n1)"
done
"$STASIS" status
echo "== demo done"
