#!/usr/bin/env python3
"""Interleaved A/B of checkpoint stop/resume modes on one running experiment
(docs/eval-time.md, "Equal frozen duration, tighter").

Usage: eval/scripts/resume_ab.py N MODE [MODE ...]
  MODE = name=ENV1=v,ENV2=v (environment of each `stasis checkpoint`), e.g.
  old=STASIS_FREEZE_LEGACY=1,STASIS_RESUME_ARMED=0,STASIS_RESUME_BOOST=0,STASIS_STOP_BOOST=0,STASIS_RESUME_LEAD_US=0 new=

Boots nodes a, b (probe + clockx over a 0 ms link) in a private state
directory under /tmp, takes N checkpoints with 1 s pauses cycling through the
modes, prints one JSON line per checkpoint (host frozen errors, the guests'
dtheta from clockx, stop/resume command latencies) and a summary per mode,
and tears everything down. Needs `cargo build --bins` and the guest image."""
import json, os, subprocess, sys, time, tempfile, statistics, re
BIN = os.environ.get("STASIS_BIN") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "target", "debug", "stasis")
N = int(sys.argv[1]); modes = []
for m in sys.argv[2:]:
    name, _, envs = m.partition("=")
    env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
    modes.append((name, env))
d = tempfile.mkdtemp(prefix="fw-ab-", dir="/tmp")
state = os.path.join(d, "state")
exp = "fwab"
spec = f'''name = "{exp}"
[defaults]
memory = "256M"
[[node]]
name = "a"
run = ["stasis-probe --node a --report-ms 500", "stasis-traffic clockx --serve 7000 --node a"]
[[node]]
name = "b"
run = ["stasis-probe --node b --report-ms 500", "sleep 2; stasis-traffic clockx --peer 10.0.1.1:7000 --node b"]
[[link]]
name = "l0"
a = "a"
b = "b"
delay = "0ms"
'''
open(os.path.join(d, "s.toml"), "w").write(spec)
def st(args, env=None):
    e = dict(os.environ); e.update(env or {})
    r = subprocess.run([BIN, "--state-dir", state, "-e", exp] + args + ["--json"], capture_output=True, text=True, env=e)
    if r.returncode != 0:
        raise SystemExit(f"stasis {args}: {r.stderr}")
    for l in r.stderr.splitlines():
        if "boosted" in l: print("STDERR", l[:300], flush=True)
    return json.loads(r.stdout)
def clockx():
    p = os.path.join(state, exp, "run/vm/b/serial-1.log")
    out = []
    for l in open(p, errors="replace"):
        i = l.find('{"tool":"clockx"')
        if i >= 0:
            try: out.append(json.loads(l[i:].strip()))
            except Exception: pass
    return out
try:
    st(["up", os.path.join(d, "s.toml")])
    while len(clockx()) < 50: time.sleep(0.5)
    rows = []
    for i in range(N):
        name, env = modes[i % len(modes)]
        before = clockx()
        c = st(["checkpoint", "--pause-ms", "1000"], env)
        n1 = len(clockx())
        while len(clockx()) < n1 + 40: time.sleep(0.3)
        after = clockx()
        th = lambda w: statistics.median(x["theta_ns"] for x in w)
        def thf(w):
            w = sorted(w, key=lambda x: x["delta_ns"])[:max(1, len(w)//4)]
            return th(w)
        dth = th(after[n1:n1+40]) - th(before[-40:])
        dthf = thf(after[n1:n1+40]) - thf(before[-40:])
        show = st(["show", c["info"]["id"]])
        comps = {x["name"]: x for x in show["manifest"]["components"]}
        D = show["manifest"]["freeze"]["frozen_duration_ns"]
        pred = comps["b"]["frozen_ns"] - comps["a"]["frozen_ns"]
        res = {r["component"]: r for r in show["report"]["resumes"]}
        errs = {k: (res[k]["reported_ns"] or 0) - res[k]["planned_ns"] for k in ("a", "b")}
        lat = {k: (res[k]["reported_ns"] or 0) - res[k]["sent_ns"] for k in ("a", "b")}
        stp = {x["component"]: x for x in show["report"]["stops"]}
        stop_lat = {k: ((stp[k]["stop_event_ns"] or 0) - stp[k]["sent_ns"])/1e3 for k in ("a", "b")}
        sent_late = {k: (stp[k]["sent_ns"] - stp[k]["planned_ns"])/1e3 for k in ("a", "b")}
        row = dict(mode=name, dtheta_us=dth/1e3, dtheta_fast_us=dthf/1e3, pred_us=pred/1e3, maxerr_us=c["max_frozen_error_ns"]/1e3,
                   res_err_us={k: v/1e3 for k, v in errs.items()}, cont_lat_us={k: v/1e3 for k, v in lat.items()},
                   fe_us={k: (comps[k]["frozen_ns"] - D)/1e3 for k in comps}, stop_lat_us=stop_lat, stop_sent_late_us=sent_late,
                   pred_stopevent_us=(pred - (stp["b"]["stop_event_ns"]-stp["b"]["freeze_ns"]) + (stp["a"]["stop_event_ns"]-stp["a"]["freeze_ns"]))/1e3, load=os.getloadavg()[0])
        rows.append(row); print(json.dumps(row), flush=True)
        time.sleep(2)
    print("SUMMARY")
    for name, _ in modes:
        rs = [r for r in rows if r["mode"] == name]
        dt = sorted(abs(r["dtheta_us"]) for r in rs); pr = sorted(abs(r["pred_us"]) for r in rs)
        re_ = sorted(abs(v) for r in rs for v in r["res_err_us"].values())
        fe = sorted(abs(v) for r in rs for k, v in r["fe_us"].items())
        lat = sorted(v for r in rs for v in r["cont_lat_us"].values())
        q = lambda xs, p: xs[min(len(xs)-1, int(round(p*(len(xs)-1))))] if xs else None
        print(json.dumps(dict(mode=name, n=len(rs), absdtheta_p50=q(dt,.5), absdtheta_max=q(dt,1), abspred_p50=q(pr,.5), abspred_max=q(pr,1),
              resume_err_p50=q(re_,.5), resume_err_p99=q(re_,.99), frozen_err_p50=q(fe,.5), frozen_err_p99=q(fe,.99), cont_lat_p50=q(lat,.5), cont_lat_max=q(lat,1))))
finally:
    subprocess.run([BIN, "--state-dir", state, "-e", exp, "down"], capture_output=True)
    subprocess.run(["rm", "-rf", d])
