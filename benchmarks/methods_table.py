"""Side-by-side speculation methods on one analytic profile: the same trace under none / draft /
kangaroo / hispec at a low and a high request rate, each a real ``simspec replay`` run (a
subprocess of the CLI; its summary.json is read back). Prints a Markdown table (docs/methods.md).

The trace: Poisson arrivals; chat-like lognormal lengths (prompt mean 400, output mean 250 tokens,
CV 1 each, both capped at 1024 so every request fits Vicuna-7B's 2,048-token context); the same
request lengths at every rate (only arrival times are rescaled).

    python benchmarks/methods_table.py [--profile vicuna7b-a100-analytic] [--requests 400]
                                       [--rates 1,8] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simspec.traces.synthetic import LognormalLengths, PoissonArrivals, synthesize
from simspec.traces.transforms import cap_lengths, rescale_rate

SPECS = ("none", "draft:k=4", "kangaroo", "hispec")


def make_trace(n: int, seed: int):
    """The base trace at 1 request/s; other rates rescale its arrival times."""
    base = synthesize(PoissonArrivals(1.0), LognormalLengths.from_moments(400, 1.0, 250, 1.0), n=n, seed=seed)
    return cap_lengths(base, max_prompt_tokens=1024, max_output_tokens=1024)


def replay(trace_csv: Path, profile: str, spec: str, out: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "simspec.cli", "replay", str(trace_csv), "--profile", profile, "--spec", spec,
           "--seed", str(seed), "--out", str(out), "--force", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"replay failed ({' '.join(cmd)}): {r.stderr.strip()}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="vicuna7b-a100-analytic")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rates", default="1,8", help="request rates (req/s), comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rates = [float(x) for x in args.rates.split(",")]
    base = make_trace(args.requests, args.seed)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for rate in rates:
            tr = rescale_rate(base, scale=rate)
            path = Path(tmp) / f"trace-{rate:g}.csv"
            tr.to_frame().to_csv(path, index=False)
            for spec in SPECS:
                s = replay(path, args.profile, spec, Path(tmp) / f"run-{rate:g}-{spec.replace(':', '_')}", args.seed)
                rows.append((rate, spec, s))
    wall = time.perf_counter() - t0
    print(f"profile {args.profile} [ANALYTIC]; {args.requests} requests (prompt mean "
          f"{base.prompt_tokens.mean():.0f}, output mean {base.output_tokens.mean():.0f} tokens); "
          f"fcfs; fixed speculation length; seed {args.seed}\n")
    print("| rate (req/s) | method | mean latency (ms) | p99 latency (ms) | mean TPOT (ms) | tokens / decode step "
          "| acceptance rate | vs none (mean latency) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rate in rates:
        ref = next(s for r, sp, s in rows if r == rate and sp == "none")["latency_ms_mean"]
        for r, spec, s in rows:
            if r != rate:
                continue
            acc = s.get("draft_acceptance_rate")
            print(f"| {rate:g} | {spec} | {s['latency_ms_mean']:,.0f} | {s['latency_ms_p99']:,.0f} | "
                  f"{s['tpot_ms_mean']:.2f} | {s['mean_tokens_per_decode_step']:.2f} | "
                  f"{'-' if acc is None else f'{acc:.2f}'} | {ref / s['latency_ms_mean']:.2f}x |")
    print(f"\n({len(rows)} replays in {wall:.0f} s wall)")


if __name__ == "__main__":
    main()
