"""Scale: does a replay cost time and memory linear in the number of requests?

    python benchmarks/bench_scale.py [--requests 100000,1000000] [--replicas 16] [--rate-per-replica 5]
        [--spec draft:k=4] [--policy fcfs] [--steps-log none] [--workdir bench_scale] [--keep]

For each size N: writes a synthetic canonical trace of N requests (deterministic: seed 0; Poisson
arrivals at ``replicas × rate-per-replica`` req/s, lognormal prompt and output lengths as in
``bench_replay.py``), then, in a fresh process so that each size's peak memory is its own, does what
``simspec replay TRACE --replicas R --spec SPEC --steps-log MODE --out DIR`` does: load the trace,
simulate, build the result tables and the summary, and write the run directory. Prints, per size:
the time of each phase, the whole wall time, peak RSS (the process's VmHWM), simulated steps,
request-steps and request-steps per second of simulation, and the load average before and after
(this project's machine is shared; read ratios, not absolute seconds). The last line compares the
sizes: per-request wall time and peak RSS of the largest over the smallest.

``--post-only``: skip the engine and time what follows it, on a request table filled with
plausible finished values (seeded): building requests.parquet's frame, the summary and writing
the parquet file, to check that post-processing stays linear and lean at sizes whose replay would
take too long here.

No assertions and no timed tests: a script that prints figures (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, sys, time
t_start = time.perf_counter()

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

trace_path, out_dir, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from simspec.profile import load_profile
from simspec.simulator import run as run_mod
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.output import write_run
from simspec.traces.formats import load_trace

phase = {}
def timed(name, fn):  # wrap a post-processing step of simulate() to time it
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phase[name] = phase.get(name, 0.0) + time.perf_counter() - t0
            hwm_after[name] = hwm_mib()
    return wrapper
hwm_after = {}  # peak RSS (MiB) when each phase has run: where the peak is reached

for name in ("requests_frame", "steps_frame", "summary"):
    setattr(run_mod, name, timed(name, getattr(run_mod, name)))
t_imports = time.perf_counter() - t_start
t0 = time.perf_counter()
trace = load_trace(trace_path)
t_load = time.perf_counter() - t0
hwm_load = hwm_mib()
cfg = RunConfig(scheduler=ComponentSpec.parse(opts["policy"], "policy"),
                method=ComponentSpec.parse(opts["spec"], "spec"), replicas=opts["replicas"],
                steps_log=opts["steps_log"], seed=0)
t0 = time.perf_counter()
res = run_mod.simulate(cfg, trace, load_profile(opts["profile"]))
t_sim = time.perf_counter() - t0
hwm_after["simulate"] = hwm_mib()
t0 = time.perf_counter()
write_run(res, out_dir, overwrite=True)
hwm_after["write"] = hwm_mib()
t_write = time.perf_counter() - t0
post = sum(phase.values())
print(json.dumps({"imports_s": t_imports, "load_s": t_load, "engine_s": t_sim - post, "post_s": phase,
                  "write_s": t_write, "wall_s": time.perf_counter() - t_start, "peak_rss_mib": hwm_mib(),
                  "rss_after_load_mib": hwm_load, "peak_rss_after_mib": hwm_after, "steps": res.summary["steps"],
                  "request_steps": res.summary["request_steps"], "mean_batch": res.summary["mean_batch_size"],
                  "steps_rows": int(len(res.steps))}))
"""


_POST_CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np

def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from simspec.simulator import metrics
from simspec.simulator.output import write_parquet
from simspec.simulator.run import canonical_order
from simspec.simulator.state import RequestTable
from simspec.simulator.steplog import StepLog
from simspec.traces.formats import load_trace

replicas = int(sys.argv[2])
t = RequestTable.from_trace(canonical_order(load_trace(sys.argv[1])))
n = len(t)
rng = np.random.default_rng(0)  # a finished run's columns, plausible values
t.start_s[:] = t.arrival_s + rng.random(n)
t.first_token_s[:] = t.start_s + rng.random(n)
t.completion_s[:] = t.first_token_s + rng.random(n) * 10
t.generated[:] = t.output_tokens
t.decode_steps[:] = t.output_tokens // 2
t.steps[:] = t.decode_steps + 1
t.drafted[:] = t.decode_steps * 4
t.accepted[:] = t.decode_steps
t.replica[:] = np.arange(n) % replicas
before = hwm_mib()
out = {}
t0 = time.perf_counter()
req = metrics.requests_frame(t, {})
out["requests_frame_s"] = time.perf_counter() - t0
steps = metrics.steps_frame([StepLog(mode="none") for _ in range(replicas)])
t0 = time.perf_counter()
metrics.summary(req, steps, [1.0] * replicas, 1000.0, 50.0, n_steps=0, batch_size_sum=0)
out["summary_s"] = time.perf_counter() - t0
with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    write_parquet(req, Path(d) / "requests.parquet")
    out["write_requests_parquet_s"] = time.perf_counter() - t0
    out["requests_parquet_mb"] = (Path(d) / "requests.parquet").stat().st_size / 1e6
out["peak_rss_mib"] = hwm_mib()
out["rss_before_mib"] = before
print(json.dumps(out))
"""


def write_trace(n: int, rate_per_s: float, path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_replay import synthetic_trace

    from simspec.traces.formats import write_canonical

    write_canonical(synthetic_trace(n, rate_per_s, seed=0), path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", default="100000,1000000", help="trace sizes, comma list")
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--rate-per-replica", type=float, default=5.0,
                    help="mean arrivals per second per replica (the trace's rate is replicas × this)")
    ap.add_argument("--spec", default="draft:k=4")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--profile", default="llama70b-4xh100-smartspec")
    ap.add_argument("--steps-log", default="none", choices=["full", "sampled", "none"])
    ap.add_argument("--workdir", default="bench_scale")
    ap.add_argument("--keep", action="store_true", help="keep the traces and run directories")
    ap.add_argument("--post-only", action="store_true",
                    help="skip the engine: time building the requests frame, the summary and requests.parquet")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rate = args.replicas * args.rate_per_replica
    opts = {"policy": args.policy, "spec": args.spec, "replicas": args.replicas, "steps_log": args.steps_log,
            "profile": args.profile}
    rows = []
    for n in [int(x) for x in args.requests.split(",")]:
        trace = work / f"scale_{n}_{rate:g}rps.csv"
        if not trace.exists():
            write_trace(n, rate, trace)
        out = work / f"run_{n}"
        load_before = os.getloadavg()
        if args.post_only:
            r = subprocess.run([sys.executable, "-c", _POST_CHILD, str(trace), str(args.replicas)],
                               capture_output=True, text=True, cwd=work)
            if r.returncode != 0:
                raise SystemExit(f"{n} requests: failed: {r.stderr.strip()[-2000:]}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{n:,} requests, post-processing only: requests frame {m['requests_frame_s']:.2f} s, summary "
                  f"{m['summary_s']:.2f} s, requests.parquet {m['write_requests_parquet_s']:.2f} s "
                  f"({m['requests_parquet_mb']:.1f} MB); peak RSS {m['peak_rss_mib']:,.0f} MiB (before: "
                  f"{m['rss_before_mib']:,.0f} MiB with the trace and the table); load average "
                  f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
            continue
        r = subprocess.run([sys.executable, "-c", _CHILD, str(trace), str(out), json.dumps(opts)],
                           capture_output=True, text=True, cwd=work)
        load_after = os.getloadavg()
        if r.returncode != 0:
            raise SystemExit(f"{n} requests: failed: {r.stderr.strip()[-2000:]}")
        m = json.loads(r.stdout.strip().splitlines()[-1])
        sim_s = m["engine_s"]
        post = ", ".join(f"{k} {v:.2f} s" for k, v in m["post_s"].items())
        print(f"{n:,} requests, {args.replicas} replicas, {rate:g} req/s, {args.spec}, {args.policy}, "
              f"--steps-log {args.steps_log}: wall {m['wall_s']:.1f} s (imports {m['imports_s']:.1f}, load trace "
              f"{m['load_s']:.2f}, engine {sim_s:.1f}, {post}, write {m['write_s']:.2f}); peak RSS "
              f"{m['peak_rss_mib']:,.0f} MiB (after loading the trace {m['rss_after_load_mib']:,.0f}; peak so far after "
              f"{', '.join(f'{k} {v:,.0f}' for k, v in m['peak_rss_after_mib'].items())}); "
              f"{m['steps']:,} steps (mean batch {m['mean_batch']:.1f}), {m['request_steps']:,} request-steps, "
              f"{m['request_steps'] / sim_s:,.0f} request-steps/s of engine time, "
              f"{m['steps_rows']:,} steps.parquet rows; load average "
              f"{load_before[0]:.2f} -> {load_after[0]:.2f}", flush=True)
        rows.append((n, m))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    n0, a = rows[0] if rows else (0, {})
    for n1, b in rows[1:]:
        print(f"{n1:,} vs {n0:,} requests ({n1 / n0:g}x): wall {b['wall_s'] / a['wall_s']:.2f}x, engine "
              f"{b['engine_s'] / a['engine_s']:.2f}x, request-steps {b['request_steps'] / a['request_steps']:.2f}x, "
              f"peak RSS {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
