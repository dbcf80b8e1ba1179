"""Replay speed: a synthetic trace on 4 replicas with draft-model speculation (k=4), at low, medium
and saturated load (``--rate`` one value, or the default three: 5, 20 and 40 req/s on the bundled
Llama-2-70B profile, mean batch about 3, 20 and 180).

Prints wall time, simulated steps, mean batch, request-steps per second and peak memory per load.

    python benchmarks/bench_replay.py [--requests 20000] [--rate 5,20,40] [--replicas 4] [--spec draft:k=4]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from simspec.profile import load_profile
from simspec.rng import stream
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.trace import Trace


def synthetic_trace(n: int, rate_per_s: float, seed: int) -> Trace:
    """Poisson arrivals; lognormal prompt (median ~600) and output (median ~200) lengths."""
    rng = stream(seed, "bench-trace")
    arrival = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))
    prompt = np.clip(np.round(rng.lognormal(np.log(600), 0.8, size=n)), 16, 4096).astype(np.int64)
    output = np.clip(np.round(rng.lognormal(np.log(200), 0.8, size=n)), 4, 2048).astype(np.int64)
    return Trace.from_columns(request_id=[f"r{i}" for i in range(n)], arrival_s=arrival, prompt_tokens=prompt,
                              output_tokens=output, source="synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rate", default="5,20,40", help="mean arrivals per second (whole cluster), comma list")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--spec", default="draft:k=4")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--profile", default="llama70b-4xh100-smartspec")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    profile = load_profile(args.profile)
    for rate in [float(r) for r in str(args.rate).split(",")]:
        trace = synthetic_trace(args.requests, rate, args.seed)
        cfg = RunConfig(scheduler=ComponentSpec.parse(args.policy, "policy"),
                        method=ComponentSpec.parse(args.spec, "spec"), replicas=args.replicas, seed=args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        res = simulate(cfg, trace, profile)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        s = res.summary
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"rate {rate:g} req/s: {args.requests:,} requests on {args.replicas} replicas, {args.spec}, "
              f"{args.policy}: {wall:.2f} s wall, {cpu:.2f} s CPU, {s['steps']:,} steps (mean batch {s['mean_batch_size']:.1f}), "
              f"{s['request_steps']:,} request-steps, {s['request_steps'] / wall:,.0f} request-steps/s, "
              f"{s['request_steps'] / cpu:,.0f} request-steps per CPU s, "
              f"{s['steps'] / wall:,.0f} steps/s, peak RSS {peak_mib:,.0f} MiB, load {os.getloadavg()[0]:.2f}")

if __name__ == "__main__":
    main()
