"""Study: draft model vs EAGLE (chain and trees) vs n-gram lookup vs plain decoding across load, under
FCFS (vLLM batching) and LAPS-SD (preemptive batching), on one analytic A100 profile of Vicuna-7B.

**Profile** (built here, deterministic; `simspec profile analytic --gpu a100-80gb --model vicuna-7b
--draft llama-68m --eagle eagle-vicuna-7b-v1.3` gives the same stages): roofline latencies of
Vicuna-7B v1.3 on one A100 80GB (cuda-graph engine), the llama-68m draft model (`draft_step`) and
the public EAGLE head for Vicuna-7B (`eagle_head`: one decoder layer + fc + the shared LM head).

**Acceptance** (inputs, not results: each method's level is fitted to its *measured* mean accepted
length τ on Spec-Bench (per step, as Spec-Bench averages) — the leaderboard's Vicuna-7B v1.3 greedy figures, "#Mean Accepted Tokens":
SpS (draft model) 2.29, EAGLE-2 4.36, PLD (prompt lookup) 1.74 — at the setting each was measured
with; the study then predicts latency under load, which Spec-Bench does not measure):

- per-request per-token acceptance ~ Beta(m·10, (1 − m)·10) (the concentration of the bundled
  analytic profiles' default spread), m fitted by :func:`simspec.calibrate.tree_fit.fit_beta_mean`;
- ``draft``: a chain of k = 4 (simspec's draft default; the SpS setting is not in the leaderboard);
- ``eagle``: EAGLE-2's setting as public EAGLE runners pass it (6 drafting iterations, top-10 per
  iteration, 60-token tree: e.g. `--eagle-num-iter 6 --eagle-topk-per-iter 10 --eagle-tree-size 60`),
  with the rank hazard h *measured* on the bundled model (`benchmarks/measure_rank_hazard.py`:
  SmolLM2-135M's exit-2 drafter vs the full model, `docs/studies/rank_hazard.json`) — a transfer
  assumption (EAGLE's head on Vicuna-7B is not that drafter);
- ``ngram``: 10 proposed tokens (Prompt Lookup Decoding's reference ``num_pred_tokens``), hit
  probability π = 0.5 per step — simspec's assumption (Spec-Bench reports τ only; π and the
  acceptance given a hit are not separable from it).

The same α then drives every EAGLE shape run here (a chain of 3 as vLLM's EAGLE runs, a 16-token
top-4 tree as SGLang serves, the 60-token EAGLE-2 tree) and SmartSpec over the tree (the
goodput-optimal tree size per batch). Caveat: the analytic LM head prices logits for at most 16
positions per request (simspec.analytic.LOGITS_TOKENS_CAP), so the 60-token tree's verification is
under-priced; the 16-token tree is not affected.

Trace: Poisson arrivals; prompt and output lengths lognormal with means ``--prompt`` / ``--output``
tokens and CV ``--cv`` (1.0; capped at 1,024 / 1,000 tokens to stay in Vicuna's 2,048-token window),
the same seed at every rate. One replica, at most ``--max-batch`` 32 requests per step (so that whom a scheduler runs first
matters once more than 32 are in flight), the profile's KV budget and 8,192 tokens per step.

    python benchmarks/study_tree_methods.py            # writes docs/studies/tree_methods.{csv,json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from simspec.analytic import build_profile, load_model_config
from simspec.analytic_heads import load_head
from simspec.atomic import write_json, write_text
from simspec.calibrate.tree_fit import fit_beta_mean, tau_curve
from simspec.profile import profile_from_doc
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.traces.synthetic import LognormalLengths, PoissonArrivals, synthesize

SPEC_BENCH_TAU = {"draft": 2.29, "eagle": 4.36, "ngram": 1.74}  # Spec-Bench leaderboard, Vicuna-7B v1.3
CONCENTRATION = 10.0
NGRAM_HIT = 0.5  # assumption (see the module doc)
EAGLE2 = {"depth": 6, "topk": 10, "tokens": 60}
CONFIGS = [  # (label, --spec, --spec-len)
    ("none", "none", "fixed"),
    ("draft k=4", "draft:k=4", "fixed"),
    ("ngram 10", "ngram:depth=10", "fixed"),
    ("eagle chain 3", "eagle:depth=3", "fixed"),
    ("eagle tree 16", "eagle:depth=5,topk=4,tokens=16", "fixed"),
    ("eagle-2 tree 60", "eagle:depth=6,topk=10,tokens=60", "fixed"),
    ("eagle tree 16 smartspec", "eagle:depth=5,topk=4,tokens=16", "smartspec"),
]
#: (scheduler, batching): FCFS under vLLM's scheduler; LAPS-SD as its paper defines it (re-ranks every step:
#: --batching preemptive — under vLLM batching with room for everyone it admits like FCFS, docs/engine.md)
POLICIES = [("fcfs", "vllm"), ("laps-sd", "preemptive")]


def study_profile(rank_hazard: float) -> tuple[dict, dict]:
    """The profile document and what was fitted."""
    vicuna = load_model_config("vicuna-7b")
    doc = build_profile("a100-80gb", vicuna, draft=load_model_config("llama-68m"),
                        heads=[load_head("eagle", "eagle-vicuna-7b-v1.3", vicuna)], date="2026-12-04",
                        name="vicuna7b-a100-eagle-study")
    fits = {
        "draft": (tau_curve(4, 1, 5, 0.0), {}),
        "eagle": (tau_curve(EAGLE2["depth"], EAGLE2["topk"], EAGLE2["tokens"], rank_hazard),
                  {"rank_hazard": rank_hazard}),
        "ngram": (tau_curve(10, 1, 11, 0.0, hit=NGRAM_HIT), {"hit_probability": NGRAM_HIT}),
    }
    fitted = {}
    for method, (curve, extra) in fits.items():
        m = fit_beta_mean(SPEC_BENCH_TAU[method], curve, CONCENTRATION)
        a, b = round(m * CONCENTRATION, 4), round((1 - m) * CONCENTRATION, 4)
        doc["acceptance"][method] = {"default": {
            "alpha": {"kind": "beta", "a": a, "b": b}, **extra,
            "mean_tokens_per_step": SPEC_BENCH_TAU[method], "source": "fitted to Spec-Bench's #mean accepted tokens",
            "settings": {"draft": {"k": 4}, "eagle": EAGLE2, "ngram": {"depth": 10}}[method]}}
        fitted[method] = {"beta_mean": round(m, 4), "a": a, "b": b, "tau_target": SPEC_BENCH_TAU[method], **extra}
    return doc, fitted


def run_one(trace, profile, policy: str, batching: str, spec: str, spec_len: str, seed: int,
            max_batch: int) -> dict:
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "--policy"), method=ComponentSpec.parse(spec, "--spec"),
                    spec_len=ComponentSpec.parse(spec_len, "--spec-len"), seed=seed, batching=batching,
                    max_batch_size=max_batch)
    res = simulate(cfg, trace, profile)
    s, st = res.summary, res.steps
    dec = st[st["prefills"] < st["batch_size"]]
    return {"latency_ms_mean": s["latency_ms_mean"], "latency_ms_p99": s["latency_ms_p99"],
            "ttft_ms_mean": s["ttft_ms_mean"], "tpot_ms_mean": s["tpot_ms_mean"],
            "throughput_tokens_per_s": s["throughput_tokens_per_s"], "mean_batch_size": s["mean_batch_size"],
            "tokens_per_decode_step": s["mean_tokens_per_decode_step"],
            "mean_k": float(dec["k_max"].mean()) if len(dec) else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1,2,4,8,12,16,24", help="request rates (req/s), comma-separated")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--max-batch", type=int, default=32, help="requests per step (vLLM's max_num_seqs)")
    ap.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of both lengths (lognormal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank-hazard-file", default="docs/studies/rank_hazard.json")
    ap.add_argument("--out", default="docs/studies")
    args = ap.parse_args(argv)
    hz = json.loads(Path(args.rank_hazard_file).read_text())["all"]["rank_hazard"]
    doc, fitted = study_profile(hz)
    profile = profile_from_doc(doc, "vicuna7b-a100-eagle-study")
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    t0 = time.perf_counter()
    for rate in rates:
        trace = synthesize(PoissonArrivals(rate), LognormalLengths.from_moments(args.prompt, args.cv, args.output,
                                                                                args.cv),
                           n=args.requests, seed=args.seed, source=f"poisson-{rate:g}")
        # within Vicuna's 2,048-token context
        trace = replace(trace, prompt_tokens=np.minimum(trace.prompt_tokens, 1024),
                        output_tokens=np.minimum(trace.output_tokens, 1000))
        for policy, batching in POLICIES:
            for label, spec, spec_len in CONFIGS:
                rows.append({"rate_per_s": rate, "policy": policy, "batching": batching, "config": label, "spec": spec,
                             "spec_len": spec_len,
                             **run_one(trace, profile, policy, batching, spec, spec_len, args.seed,
                                       args.max_batch)})
        print(f"  rate {rate:g}/s done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    df = pd.DataFrame(rows)
    pd.set_option("display.width", 220)
    for policy, batching in POLICIES:
        t = df[df["policy"] == policy].pivot(index="rate_per_s", columns="config", values="latency_ms_mean")
        t = t[[c[0] for c in CONFIGS]].round(0).astype(int)
        print(f"\nmean latency (ms), {policy} (--batching {batching}), {args.requests} requests, "
              f"lognormal prompt/output means {args.prompt}/{args.output} (CV {args.cv:g}), max batch "
              f"{args.max_batch}, seed {args.seed}")
        print(t.to_string())
    tau = df[(df["policy"] == "fcfs") & (df["rate_per_s"] == rates[0])].set_index("config")["tokens_per_decode_step"]
    print("\ntokens per decode step at the lowest rate (fcfs):\n" + tau.round(2).to_string())
    print("\nfitted acceptance: " + json.dumps(fitted))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tree_methods.csv", df.to_csv(index=False, float_format="%.6g"))
    write_json(out / "tree_methods.json", {
        "command": "python benchmarks/study_tree_methods.py " + " ".join(argv or sys.argv[1:]),
        "profile": "vicuna7b-a100-eagle-study (built by the script)", "seed": args.seed, "requests": args.requests,
        "prompt_tokens_mean": args.prompt, "output_tokens_mean": args.output, "length_cv": args.cv, "max_batch": args.max_batch,
        "rates_per_s": rates,
        "policies": [{"policy": p, "batching": b} for p, b in POLICIES],
        "fitted_acceptance": fitted, "spec_bench_tau": SPEC_BENCH_TAU, "rank_hazard": hz,
        "configs": [{"label": c[0], "spec": c[1], "spec_len": c[2]} for c in CONFIGS]})
    plot(df, out / "tree_methods.png", args)
    print(f"\nwrote {out}/tree_methods.{{csv,json,png}} in {time.perf_counter() - t0:.0f} s")
    return 0


def plot(df: pd.DataFrame, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(POLICIES), figsize=(11, 4.2), sharey=True)
    for ax, (policy, batching) in zip(axes, POLICIES):
        for label, *_ in CONFIGS:
            d = df[(df["policy"] == policy) & (df["config"] == label)].sort_values("rate_per_s")
            ax.plot(d["rate_per_s"], d["latency_ms_mean"] / 1000.0, marker="o", ms=3, label=label,
                    ls="--" if "smartspec" in label else "-")
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(f"{policy} (--batching {batching})")
    axes[0].set_ylabel("mean latency (s)")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"Vicuna-7B on A100 (analytic): speculation methods across load, lognormal prompt {args.prompt} / "
                 f"output {args.output}, seed {args.seed}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
