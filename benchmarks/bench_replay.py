"""Replay speed: a synthetic 100,000-request trace on 4 replicas with draft-model speculation (k=4).

Prints wall time, simulated steps, request-steps per second and peak memory. Target (issue 2):
at least 1,000,000 request-steps per second on one core.

    python benchmarks/bench_replay.py [--requests 100000] [--rate 40] [--replicas 4] [--spec draft:k=4]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=40.0, help="mean arrivals per second (whole cluster)")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--spec", default="draft:k=4")
    ap.add_argument("--policy", default="fcfs")
    ap.add_argument("--profile", default="llama70b-4xh100-smartspec")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    trace = synthetic_trace(args.requests, args.rate, args.seed)
    profile = load_profile(args.profile)
    cfg = RunConfig(scheduler=ComponentSpec.parse(args.policy, "policy"), method=ComponentSpec.parse(args.spec, "spec"),
                    replicas=args.replicas, seed=args.seed)
    t0 = time.perf_counter()
    res = simulate(cfg, trace, profile)
    wall = time.perf_counter() - t0
    s = res.summary
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"requests              {args.requests:,} on {args.replicas} replicas, {args.spec}, {args.policy}, "
          f"{args.rate:g} req/s")
    print(f"wall time             {wall:.2f} s")
    print(f"simulated steps       {s['steps']:,}  (mean batch {s['mean_batch_size']:.1f})")
    print(f"request-steps         {s['request_steps']:,}")
    print(f"request-steps / s     {s['request_steps'] / wall:,.0f}")
    print(f"steps / s             {s['steps'] / wall:,.0f}")
    print(f"simulated makespan    {s['makespan_s']:,.0f} s; mean latency {s['latency_ms_mean'] / 1000:.1f} s")
    print(f"peak memory (RSS)     {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
