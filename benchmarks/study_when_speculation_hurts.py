"""Study: when speculation hurts — mean latency vs request rate for fixed k and SmartSpec.

One profile (the bundled ``llama70b-4xh100-smartspec`` published fit, draft-model acceptance
only: per-request α ~ Beta(7, 3)), one trace shape (Poisson arrivals, every request a
``--prompt``-token prompt and ``--output``-token output; the same seed and unit-rate gaps at every
rate, so only the rate changes), one replica at the profile's capacity (batch ≤ 256, 450k KV
tokens, 8192 tokens per step), FCFS. Configurations: plain decoding (``--spec none``, k = 0),
``draft:k=1``, ``draft:k=3``, ``draft:k=5`` (fixed k), and ``draft:k=5`` with
``--spec-len smartspec`` (cumulative accepted/drafted positions, as the authors' code reads the
engine's counters), ``smartspec:probe=10`` (drafts one token every 10th step while k = 0) and
``smartspec-per-request`` (k chosen in 0..5). The profile charges drafting at 4 % of a target step
once per speculative step (its ``draft_step`` is ``"per": "step"``, as its source does).

Prints the table and writes, under ``--out`` (default ``docs/studies``):
``when_speculation_hurts.csv`` (one row per rate × configuration), ``when_speculation_hurts.json``
(the command, seed and settings) and ``when_speculation_hurts.png``.

    python benchmarks/study_when_speculation_hurts.py            # the committed results (seed 0)
    python benchmarks/study_when_speculation_hurts.py --seed 1 --out /tmp/s1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from simspec.atomic import write_json, write_png, write_text
from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.traces.synthetic import FixedLengths, PoissonArrivals, synthesize

PROFILE = "llama70b-4xh100-smartspec"
CONFIGS = [  # (label, --spec, --spec-len)
    ("k=0 (none)", "none", "fixed"),
    ("k=1", "draft:k=1", "fixed"),
    ("k=3", "draft:k=3", "fixed"),
    ("k=5", "draft:k=5", "fixed"),
    ("smartspec", "draft:k=5", "smartspec"),
    ("smartspec probe=10", "draft:k=5", "smartspec:probe=10"),
    ("smartspec-per-request", "draft:k=5", "smartspec-per-request"),
]
FIXED = [c[0] for c in CONFIGS if c[2] == "fixed"]


def run_one(trace, profile, spec: str, spec_len: str, seed: int) -> dict:
    cfg = RunConfig(method=ComponentSpec.parse(spec, "--spec"), spec_len=ComponentSpec.parse(spec_len, "--spec-len"),
                    seed=seed)
    res = simulate(cfg, trace, profile)
    s, st = res.summary, res.steps
    dec = st[st["prefills"] < st["batch_size"]]  # steps with decode members
    return {
        "latency_ms_mean": s["latency_ms_mean"], "latency_ms_p50": s["latency_ms_p50"],
        "latency_ms_p99": s["latency_ms_p99"], "ttft_ms_mean": s["ttft_ms_mean"], "tpot_ms_mean": s["tpot_ms_mean"],
        "throughput_tokens_per_s": s["throughput_tokens_per_s"], "mean_batch_size": s["mean_batch_size"],
        "tokens_per_decode_step": s["mean_tokens_per_decode_step"], "acceptance_rate": s["draft_acceptance_rate"],
        "utilisation": s["replica_utilisation"][0],
        "mean_k": float(dec["k_max"].mean()) if len(dec) else 0.0,
        "mean_alpha_hat": float(st["policy_value"].mean()) if st["policy_value"].notna().any() else float("nan"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1,2,4,8,12,16,20,24,28,32,40", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=800, help="requests per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--output", type=int, default=256, help="output tokens per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/studies")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    profile = load_profile(PROFILE)
    rows = []
    t0 = time.perf_counter()
    for rate in rates:
        trace = synthesize(PoissonArrivals(rate), FixedLengths(args.prompt, args.output), n=args.requests,
                           seed=args.seed, source=f"poisson-{rate:g}")
        for label, spec, spec_len in CONFIGS:
            rows.append({"rate_per_s": rate, "config": label, "spec": spec, "spec_len": spec_len,
                         **run_one(trace, profile, spec, spec_len, args.seed)})
        print(f"  rate {rate:g}/s done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    df = pd.DataFrame(rows)
    # each configuration's mean latency relative to the best fixed k at that rate
    best = df[df["config"].isin(FIXED)].groupby("rate_per_s")["latency_ms_mean"].min()
    df["vs_best_fixed"] = df["latency_ms_mean"] / df["rate_per_s"].map(best)

    table = df.pivot(index="rate_per_s", columns="config", values="latency_ms_mean")[[c[0] for c in CONFIGS]]
    ks = df[df["config"].str.startswith("smartspec")].pivot(index="rate_per_s", columns="config", values="mean_k")
    pd.set_option("display.width", 200)
    print(f"\nmean latency (ms), {args.requests} requests, prompt {args.prompt}, output {args.output}, "
          f"seed {args.seed}, profile {PROFILE}")
    show = table.round(0).astype(int)
    show["best fixed"] = table[FIXED].idxmin(axis=1)
    show["smartspec/best"] = (table["smartspec"] / table[FIXED].min(axis=1)).round(3)
    show["probe/best"] = (table["smartspec probe=10"] / table[FIXED].min(axis=1)).round(3)
    show["smartspec mean k"] = ks["smartspec"].round(2)
    show["mean batch (k=0)"] = df[df["config"] == "k=0 (none)"].set_index("rate_per_s")["mean_batch_size"].round(1)
    print(show.to_string())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "when_speculation_hurts.csv", df.to_csv(index=False, float_format="%.6g"))
    write_json(out / "when_speculation_hurts.json", {
        "command": "python benchmarks/study_when_speculation_hurts.py " + " ".join(argv or sys.argv[1:]),
        "profile": PROFILE, "seed": args.seed, "requests": args.requests, "prompt_tokens": args.prompt,
        "output_tokens": args.output, "rates_per_s": rates, "scheduler": "fcfs", "replicas": 1,
        "configs": [{"label": c[0], "spec": c[1], "spec_len": c[2]} for c in CONFIGS]})
    plot(df, out / "when_speculation_hurts.png", args)
    print(f"\nwrote {out}/when_speculation_hurts.{{csv,json,png}} in {time.perf_counter() - t0:.0f} s")
    return 0


def plot(df: pd.DataFrame, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"smartspec": dict(color="k", lw=2.2), "smartspec probe=10": dict(color="0.45", lw=2.0, ls=":"),
              "smartspec-per-request": dict(color="k", lw=1.2, ls="--")}
    for label, *_ in CONFIGS:
        d = df[df["config"] == label].sort_values("rate_per_s")
        kw = styles.get(label, dict(marker="o", ms=3))
        ax1.plot(d["rate_per_s"], d["latency_ms_mean"] / 1000.0, label=label, **kw)
        ax2.plot(d["rate_per_s"], d["vs_best_fixed"], label=label, **kw)
    ax1.set_yscale("log")
    ax1.set_xlabel("request rate (req/s)")
    ax1.set_ylabel("mean latency (s)")
    ax1.set_title("mean latency")
    ax2.axhline(1.0, color="0.6", lw=0.8)
    ax2.set_xlabel("request rate (req/s)")
    ax2.set_ylabel("mean latency / best fixed k")
    ax2.set_title("relative to the best fixed k at each rate")
    ax2.legend(fontsize=8)
    fig.suptitle(f"When speculation hurts: {PROFILE}, Poisson, prompt {args.prompt} / output {args.output}, "
                 f"seed {args.seed}", fontsize=10)
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
