"""The fidelity table of docs/fidelity.md: for every bundled analytic profile, the batch-1 step time,
the speculative/plain step-time ratio of `--spec draft` at k = 1..8, and the predicted speedup
(τ / ratio) against τ, the mean tokens per step a user measures on their own workload.

Everything goes through the simulator's own cost path (CostModel and the methods'
``expected_step_ms``), so the table is what `simspec replay` charges for a batch-1 decode step.

    python benchmarks/fidelity_table.py                      # markdown on stdout
    python benchmarks/fidelity_table.py --context 512 --profiles vicuna7b-a100-analytic
"""

from __future__ import annotations

import argparse

from simspec.profile import bundled_profiles, load_profile
from simspec.simulator.cost import CostModel
from simspec.simulator.methods import get_method_class

KS = range(1, 9)
TAUS = (1.5, 2.0, 2.3, 2.5, 3.0, 3.5, 4.0)
BATCHES = (1, 4, 16, 64, 128, 256)


def rows_for(name: str, context: int, k_speedup: int) -> dict:
    p = load_profile(name)
    cost = CostModel(p)
    plain = get_method_class("none")({}, p, cost).expected_step_ms(1, float(context), 0)
    out = {"name": name, "engine": (p.meta.get("analytic") or {}).get("engine", {}).get("name", "-"),
           "device": p.meta.get("device", "-"), "plain_ms": plain,
           "forward_ms": cost.forward_overhead_ms("target"), "ratios": {}, "draft_ms": None}
    if cost.has("draft_step"):
        for k in KS:
            m = get_method_class("draft")({"k": k}, p, cost)
            out["ratios"][k] = m.expected_step_ms(1, float(context), k) / plain
        out["draft_ms"] = cost.draft_ms(1, 1, float(context))
        out["speedup"] = {tau: tau / out["ratios"][k_speedup] for tau in TAUS}
        m = get_method_class("draft")({"k": k_speedup}, p, cost)
        none = get_method_class("none")({}, p, cost)
        out["by_batch"] = {b: m.expected_step_ms(b, float(b * context), k_speedup)
                           / none.expected_step_ms(b, float(b * context), 0) for b in BATCHES}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=256, help="cached tokens of the one request [256]")
    ap.add_argument("--k", type=int, default=4, help="k of the speedup-vs-tau columns [4]")
    ap.add_argument("--profiles", default=None, help="comma list [every bundled profile named *analytic*]")
    a = ap.parse_args(argv)
    names = a.profiles.split(",") if a.profiles else [n for n in bundled_profiles() if "analytic" in n]
    rows = [rows_for(n, a.context, a.k) for n in names]
    print(f"Batch 1, {a.context} cached tokens, `--spec draft` at k drafts per step (the profile's draft_step), "
          f"scheduler overhead as in the profile (0 for analytic profiles).\n")
    print("| profile | engine | plain step (ms) | per-forward (ms) | draft pass (ms) | "
          + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(KS))
    for r in rows:
        ratios = " | ".join(f"{r['ratios'][k]:.3f}" for k in KS) if r["ratios"] else " | ".join("-" for _ in KS)
        draft = f"{r['draft_ms']:.3f}" if r["draft_ms"] is not None else "-"
        print(f"| `{r['name']}` | {r['engine']} | {r['plain_ms']:.2f} | {r['forward_ms']:.3f} | {draft} | {ratios} |")
    print(f"\nPredicted speedup over plain decoding at k={a.k}, as τ / (speculative/plain step ratio), for the τ "
          f"(mean tokens per step, bonus token included) of your workload:\n")
    _per_profile_table(rows, "speedup", TAUS, lambda t: f"τ={t:g}", "{:.2f}x")
    print(f"\nSpeculative/plain step-time ratio at k={a.k} by batch size ({a.context} cached tokens per request) "
          f"-- the break-even τ: speculation pays when the workload's τ exceeds it:\n")
    _per_profile_table(rows, "by_batch", BATCHES, lambda b: f"B={b}", "{:.2f}")


def _per_profile_table(rows: list[dict], key: str, columns, header, cell: str) -> None:
    """A Markdown table: one row per profile with a draft stage, one column per entry of
    ``columns`` (``row[key][column]`` formatted with ``cell``)."""
    print("| profile | " + " | ".join(header(c) for c in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for r in rows:
        if r["ratios"]:
            print(f"| `{r['name']}` | " + " | ".join(cell.format(r[key][c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
