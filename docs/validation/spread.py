"""The simulator's error judged against the real runs' own spread (issue 16, point 5a of
docs/validation/README.md).

    python docs/validation/spread.py [ROOT ...]     (default: batched batched-quiet batched-speedref)

Each ROOT holds one pass of the batched validation runs (`rerun.sh`): for every run name found in
all of them, the real runs of the passes did the same work (identical per request: see
`repeatability.py`) at different machine speeds, and each pass's simulated run used the overhead
fitted in that pass. Prints, per run, from the committed `per_request.csv` files:

- real vs real: per-request latency MAPE between the passes' real runs (mean over the pairs, and
  the largest pair) — how far this machine is from itself on the same work;
- sim vs own real: each pass's reported MAPE (mean and range over the passes);
- sim vs other passes' real: each pass's simulated run against the other passes' real runs (mean);
- within spread: share of (pass, request) pairs whose simulated latency lies within the range of
  that request's real latencies over all passes.

The simulator's error is "as good as this machine allows" where sim vs real is no larger than real
vs real.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def mape(a: np.ndarray, ref: np.ndarray) -> float:
    """Mean over requests of |a − ref| / ref, in per cent."""
    return float(100.0 * np.mean(np.abs(a - ref) / ref))


def load(root: Path, name: str) -> pd.DataFrame | None:
    p = root / name / "per_request.csv"
    if not p.is_file():
        return None
    return pd.read_csv(p).set_index("request_id").sort_index()


def main() -> None:
    roots = [Path(a) for a in sys.argv[1:]] or [HERE / "batched", HERE / "batched-quiet", HERE / "batched-speedref"]
    names = sorted(set.intersection(*[{p.parent.name for p in r.glob("*/per_request.csv")} for r in roots]))
    if not names:
        raise SystemExit("no run name has a per_request.csv in every root")
    print(f"passes: {', '.join(r.name for r in roots)}")
    head = ("run", "real vs real MAPE (mean / max pair)", "sim vs own real (mean, range)", "sim vs other passes' real",
            "sim within the real range")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        runs = [load(r, name) for r in roots]
        ids = runs[0].index
        if any(not r.index.equals(ids) for r in runs):
            print(f"| {name} | (requests differ between passes) |  |  |  |")
            continue
        real = np.stack([r["latency_ms_real"].to_numpy() for r in runs])
        sim = np.stack([r["latency_ms_sim"].to_numpy() for r in runs])
        rr = [mape(real[j], real[i]) for i, j in itertools.permutations(range(len(runs)), 2)]
        own = [mape(sim[i], real[i]) for i in range(len(runs))]
        cross = [mape(sim[i], real[j]) for i, j in itertools.permutations(range(len(runs)), 2)]
        lo, hi = real.min(axis=0), real.max(axis=0)
        within = float(np.mean((sim >= lo[None, :]) & (sim <= hi[None, :])))
        print(f"| {name} | {np.mean(rr):.1f}% / {np.max(rr):.1f}% | {np.mean(own):.1f}% ({min(own):.1f}–{max(own):.1f}%) "
              f"| {np.mean(cross):.1f}% | {100 * within:.0f}% |")


if __name__ == "__main__":
    main()
