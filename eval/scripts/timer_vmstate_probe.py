#!/usr/bin/env python3
"""Prototype for the next step of docs/eval-time.md ("read the freeze instant
out of the saved state"): a bare TCG QEMU (-machine pc, no guest) is resumed
and stopped 4 times, its state saved each time with `migrate exec:`; the
`timer` vmstate section (cpu_ticks_offset, unused, cpu_clock_offset: the
virtual clock when the ticks were disabled) is found by its header and the
freeze instant derived as RESUME stamp + (V now - V at the previous save).
Prints, per round, where that instant falls against the stop's write and its
STOP event. The host instants are taken in Python after the write (so
"sent" is late by the interpreter's overhead); good to ~0.3 ms only."""
import json, os, socket, subprocess, time, struct, ctypes
def mono():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
d = "/tmp/stasis-timer-probe"; os.makedirs(d, exist_ok=True)
sock = d + "/qmp.sock"
for f in (sock, d + "/state"):
    if os.path.exists(f): os.remove(f)
q = subprocess.Popen(["qemu-system-x86_64", "-name", "guest=t,debug-threads=on", "-machine", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64", "-S",
                      "-qmp", f"unix:{sock},server=on,wait=off"])
try:
    while not os.path.exists(sock): time.sleep(0.05)
    s = socket.socket(socket.AF_UNIX); s.connect(sock); f = s.makefile("rwb")
    f.readline()
    def cmd(c, args=None):
        m = {"execute": c}
        if args: m["arguments"] = args
        f.write((json.dumps(m) + "\n").encode()); f.flush()
        sent = mono(); evs = []
        while True:
            r = json.loads(f.readline())
            if "event" in r: evs.append(r); continue
            return sent, mono(), r, evs
    cmd("qmp_capabilities")
    def ev_mono(e):
        wall = e["timestamp"]["seconds"] * 10**9 + e["timestamp"]["microseconds"] * 1000
        return wall - time.clock_gettime_ns(time.CLOCK_REALTIME) + mono()
    prevV = None; prev_en = None
    for rnd in range(4):
        sent, rep, r, evs = cmd("cont")
        resumes = [e for e in evs if e["event"] == "RESUME"]
        if not resumes:
            while True:
                r = json.loads(f.readline())
                if r.get("event") == "RESUME": resumes = [r]; break
        t_en = ev_mono(resumes[0])
        time.sleep(1.0)
        s_sent, s_rep, r, evs = cmd("stop")
        stops = [e for e in evs if e["event"] == "STOP"]
        while not stops:
            r = json.loads(f.readline())
            if r.get("event") == "STOP": stops = [r]
        stop_ev = ev_mono(stops[0])
        if os.path.exists(d + "/state"): os.remove(d + "/state")
        cmd("migrate", {"uri": f"exec:cat > {d}/state"})
        while True:
            _, _, r, _ = cmd("query-migrate")
            if r["return"].get("status") in ("completed", "failed"): break
            time.sleep(0.05)
        data = open(d + "/state", "rb").read()
        i = data.rfind(b"\x05timer\x00\x00\x00\x00\x00\x00\x00\x02")
        ticks_off, dummy, V = struct.unpack(">qqq", data[i + 14:i + 38])
        out = {"round": rnd, "V_ns": V, "cont_lat_us": (t_en - sent) / 1e3, "STOP-sent_us": (stop_ev - s_sent) / 1e3}
        if prevV is not None:
            t_dis = t_en + (V - prevV)
            out.update({"t_dis-sent_us": (t_dis - s_sent) / 1e3, "STOP-t_dis_us": (stop_ev - t_dis) / 1e3})
        print(json.dumps(out))
        prevV = V
finally:
    q.kill(); q.wait()
