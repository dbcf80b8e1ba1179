"""Real-vs-real repeatability of the committed validation runs: how much two real runs of the same
configuration on this machine differ from each other, in the same terms as the simulator's error.

For each pair of report directories (A, B) it compares the *real* runs only (`per_request.csv`,
column `latency_ms_real`): per-request latency MAPE of B relative to A (mean over requests of
|B - A| / A), mean and p99 error of B relative to A (numpy linear-interpolation percentiles, as in
`simspec/validation_report.py`), whether the two runs made the same per-request work
(`real_requests.csv`: decode steps, drafts, accepted drafts, generated tokens — whichever columns
the report has), the real/model step-time ratio of each (median over decode steps of the real step
time over the latency model's time for that exact step shape, no overhead term:
`heldout.steps.decode_real_over_model_median` for simspec's batched runners,
`heldout.engine_steps.decode_real_over_model_median` for transformers-cb) and each report's
simulator MAPE for reference. Prints markdown tables.

Usage:
  python docs/validation/repeatability.py                  # the committed comparisons (below)
  python docs/validation/repeatability.py ROOT_A ROOT_B    # every run name with a report in both roots
  python docs/validation/repeatability.py --pairs RUN_A RUN_B [RUN_A RUN_B ...]

Without arguments: batched/ (first runs, 4 December 13:03-16:19 UTC) against batched-quiet/ (reruns
with --max-other-cores 0.1, 19:10-19:28 UTC), then the four real transformers-cb engine runs of
the held-out trace (transformers-cb/b8/none-fifo, b8/none-fifo-raw-profile, b8-quiet/none-fifo,
b8-quiet/none-fifo-raw-profile) pairwise, and the calibration run b8 vs b8-quiet."""
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
WORK_COLS = ("generated_tokens", "decode_steps", "drafted", "accepted")


def _load(d: Path):
    doc = json.loads((d / "validation.json").read_text())
    lat = pd.read_csv(d / "per_request.csv").set_index("request_id")["latency_ms_real"]
    real = pd.read_csv(d / "real_requests.csv").set_index("request_id")
    h = doc["heldout"]
    ratio = (h.get("steps") or h.get("engine_steps") or {}).get("decode_real_over_model_median")
    return doc, lat, real, ratio


def compare(a: Path, b: Path) -> dict:
    da, la, ra, qa = _load(a)
    db, lb, rb, qb = _load(b)
    ids = la.index.intersection(lb.index)
    la, lb = la.loc[ids].to_numpy(), lb.loc[ids].to_numpy()
    cols = [c for c in WORK_COLS if c in ra.columns and c in rb.columns]
    same = int((ra.loc[ids, cols] == rb.loc[ids, cols]).all(axis=1).sum()) if cols else None
    return {
        "n": len(ids),
        "same_work": same,
        "work_cols": cols,
        "forced": bool(da["meta"].get("batch", {}).get("forced")),
        "mape": float(np.mean(np.abs(lb - la) / la) * 100),
        "mean": float((lb.mean() / la.mean() - 1) * 100),
        "p99": float((np.percentile(lb, 99) / np.percentile(la, 99) - 1) * 100),
        "ratio_a": qa,
        "ratio_b": qb,
        "sim_mape_a": da["errors"]["latency_mape_pct"],
        "sim_mape_b": db["errors"]["latency_mape_pct"],
        "other_a": da["meta"]["machine_load_during"]["other_processes_cores_mean"],
        "other_b": db["meta"]["machine_load_during"]["other_processes_cores_mean"],
    }


def _ratios(c: dict) -> str:
    if c["ratio_a"] is None or c["ratio_b"] is None:
        return "-"
    return f"{c['ratio_a']:.3f} → {c['ratio_b']:.3f} ({(c['ratio_b'] / c['ratio_a'] - 1) * 100:+.1f}%)"


def _same(c: dict) -> str:
    return "-" if c["same_work"] is None else f"{c['same_work']}/{c['n']}"


def by_name(root_a: Path, root_b: Path) -> None:
    names = sorted(p.parent.name for p in root_b.glob("*/validation.json") if (root_a / p.parent.name / "validation.json").exists())
    print(f"A = `{root_a.name}/`, B = `{root_b.name}/`; real B relative to real A\n")
    print("| run | acceptance | requests with identical work | real-vs-real latency MAPE | mean | p99 | "
          "real/model decode step time A → B | other procs' cores A / B | simulator MAPE A → B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        c = compare(root_a / n, root_b / n)
        print(f"| {n} | {'forced' if c['forced'] else 'real'} | {_same(c)} | **{c['mape']:.1f}%** | {c['mean']:+.1f}% | "
              f"{c['p99']:+.1f}% | {_ratios(c)} | {c['other_a']} / {c['other_b']} | "
              f"{c['sim_mape_a']:.1f}% → {c['sim_mape_b']:.1f}% |")
    print(f"\nwork compared per request: {', '.join(c['work_cols'])}" if names else "(no common runs)")


def pairs(dirs: list) -> None:
    base = HERE
    def label(p: Path) -> str:
        try:
            return str(p.resolve().relative_to(base))
        except ValueError:
            return str(p)
    print("| run A | run B | requests with identical work | real-vs-real latency MAPE | mean | p99 | "
          "real/model decode step time A → B | other procs' cores A / B |")
    print("|---|---|---|---|---|---|---|---|")
    cols = []
    for a, b in dirs:
        c = compare(a, b)
        cols = c["work_cols"]
        print(f"| {label(a)} | {label(b)} | {_same(c)} | **{c['mape']:.1f}%** | {c['mean']:+.1f}% | {c['p99']:+.1f}% | "
              f"{_ratios(c)} | {c['other_a']} / {c['other_b']} |")
    print(f"\nreal B relative to real A; work compared per request: {', '.join(cols)}")


def main(argv: list) -> None:
    if not argv:
        by_name(HERE / "batched", HERE / "batched-quiet")
        print()
        cb = HERE / "transformers-cb"
        held = [cb / "b8" / "none-fifo", cb / "b8" / "none-fifo-raw-profile",
                cb / "b8-quiet" / "none-fifo", cb / "b8-quiet" / "none-fifo-raw-profile"]
        pairs(list(itertools.combinations(held, 2)) + [(cb / "b8" / "calib-none-fifo", cb / "b8-quiet" / "calib-none-fifo")])
    elif argv[0] == "--pairs":
        ds = [Path(a) for a in argv[1:]]
        if not ds or len(ds) % 2:
            sys.exit("--pairs needs an even number of run directories")
        pairs(list(zip(ds[::2], ds[1::2])))
    elif len(argv) == 2:
        by_name(Path(argv[0]), Path(argv[1]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
