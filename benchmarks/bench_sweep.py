"""Sweep speed: one 100-run grid with 1 and with 2 local worker processes (optionally on Dask).

The grid: 2 schedulers x 5 speculation settings x 5 request rates x 2 seeds on the first 200
requests of the bundled Azure coding trace. Each measurement starts from an empty sweep directory
and includes starting the workers, writing every run directory and sweep.parquet. Prints the wall
time, runs per second, the speed-up over 1 worker, the CPU time the runs took in the workers (which
other load on the machine does not inflate), and the sum of the runs' in-process simulate() times
(what 1 worker can at best approach).

    python benchmarks/bench_sweep.py [--workers 1,2] [--requests 200] [--dask]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

GRID = {
    "name": "bench100",
    "base": {"trace": "azure_code_2023", "first": 200, "slo_ttft_ms": 3000, "slo_tpot_ms": 150},
    "axes": {
        "policy": ["fcfs", "srpt:predictor=oracle"],
        "spec": ["none", "draft:k=2", "draft:k=4", "draft:k=6", "draft:k=8"],
        "rate": [0.25, 0.5, 1.0, 2.0, 4.0],
        "seed": [0, 1],
    },
}


def serial_simulate_s(grid) -> tuple[float, float]:
    """Sum of simulate() wall and CPU times over the grid's runs, in this process (no files written)."""
    from simspec.simulator.config import RunConfig
    from simspec.simulator.run import simulate
    from simspec.sweep import TRANSFORM_KEYS, _load_run_profile, load_run_trace

    total = cpu = 0.0
    for r in grid.runs:
        o = r.options
        trace = load_run_trace(o["trace"], o["format"], r.trace_sha256, {k: o[k] for k in TRANSFORM_KEYS}, o["seed"])
        prof = _load_run_profile(o["profile"], r.profile_sha256)
        t0, c0 = time.perf_counter(), time.process_time()
        simulate(RunConfig.from_dict(r.run_config), trace, prof)
        total += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return total, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma list of local worker counts")
    ap.add_argument("--requests", type=int, default=200, help="first N requests of the trace")
    ap.add_argument("--dask", action="store_true", help="also run on a 2-worker Dask LocalCluster (processes)")
    ap.add_argument("--no-serial", action="store_true", help="skip the in-process simulate() baseline")
    args = ap.parse_args()

    from simspec.sweep import expand_grid, run_sweep

    doc = {**GRID, "base": {**GRID["base"], "first": args.requests}}
    grid = expand_grid(doc)
    n = len(grid.runs)
    print(f"grid: {n} runs (2 policies x 5 methods x 5 rates x 2 seeds), first {args.requests} requests "
          f"of azure_code_2023; {os.cpu_count()} CPU(s); load average {os.getloadavg()[0]:.1f}")
    if not args.no_serial:
        s, c = serial_simulate_s(grid)
        print(f"in-process simulate() total: {s:7.2f} s  ({s / n * 1000:.0f} ms per run; {c:.1f} CPU-s)")
    base = None
    for w in [int(x) for x in args.workers.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            res = run_sweep(grid, Path(d) / "sweep", workers=w, progress=False)
            wall = time.perf_counter() - t0
        assert res.n_executed == n and res.n_failed == 0, res
        base = base or wall
        print(f"sweep, {w} local worker(s):   {wall:7.2f} s  ({n / wall:5.2f} runs/s, speed-up x{base / wall:.2f}; "
              f"runs used {res.run_cpu_s:.1f} CPU-s in the workers)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine skew the figures)")
    if args.dask:
        from dask.distributed import LocalCluster

        t0 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                tempfile.TemporaryDirectory() as d:
            t1 = time.perf_counter()
            res = run_sweep(grid, Path(d) / "sweep", scheduler_address=cluster.scheduler_address, progress=False)
            wall = time.perf_counter() - t1
        assert res.n_executed == n and res.n_failed == 0, res
        print(f"sweep, Dask 2 workers:       {wall:7.2f} s  ({n / wall:5.2f} runs/s; cluster start "
              f"{t1 - t0:.1f} s not included)")


if __name__ == "__main__":
    main()
