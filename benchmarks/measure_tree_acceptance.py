"""Measure chain and tree acceptance on the bundled model with the real lossless tree runner, and
check the tree model's prediction against it (CPU, fp32).

The drafter is SmolLM2-135M's exit-2 Kangaroo adapter (top-k candidates from layers 0..1 + adapter +
LM head); the target is the full model (calibrate/tree_runner.py). For every prompt (Spec-Bench's
bundled prompts, the first N per class) the runner generates with a chain (depth D, top-1) and with a
tree (depth D, top-K, N_T tokens). The tree model is then tested *out of sample*: each request's level
α_r is fitted to its chain τ (simspec.calibrate.tree_fit.alpha_for_tau on the chain's τ(α)); with the
rank hazard h measured separately (docs/studies/rank_hazard.json), the model predicts the request's
tree τ, compared with the measured one (mean over requests, and per class).

    python benchmarks/measure_tree_acceptance.py --per-class 3 --new-tokens 32 --out docs/studies/tree_acceptance_bundled.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rank-hazard-file", default="docs/studies/rank_hazard.json")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from simspec.calibrate import prompts as P
    from simspec.calibrate.adapter import load_adapters
    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model, silence_progress_bars
    from simspec.calibrate.runners import greedy_reference
    from simspec.calibrate.tree_fit import alpha_for_tau, tau_curve
    from simspec.calibrate.tree_runner import TreeRunner

    silence_progress_bars()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    h = json.loads(Path(args.rank_hazard_file).read_text())["all"]["rank_hazard"]
    loaded = load_model("smollm2-135m", "fp32", "cpu")
    lm = LayeredLM(loaded.model)
    ad = load_adapters(P.bundled_prompts_path().parent.parent / "adapters" / "smollm2-135m", lm, [2])[2]
    eos = loaded.tokenizer.eos_token_id
    chain = TreeRunner(lm, 2, ad, args.depth, 1, args.depth + 1, eos_token_id=eos)
    tree = TreeRunner(lm, 2, ad, args.depth, args.topk, args.tokens, eos_token_id=eos)
    chain_curve = tau_curve(args.depth, 1, args.depth + 1, 0.0)
    tree_curve = tau_curve(args.depth, args.topk, args.tokens, h)
    rows, mismatches = [], 0
    for cls, prompts in sorted(P.select(P.load_prompts(P.bundled_prompts_path()), args.per_class, 0, None).items()):
        for pr in prompts:
            ids = P.encode(loaded.tokenizer, pr.text, 256)
            rc = chain.generate(ids, args.new_tokens)
            rt = tree.generate(ids, args.new_tokens)
            ref = greedy_reference(loaded.model, ids, args.new_tokens, eos)
            mismatches += (rc.tokens != ref) + (rt.tokens != ref)
            if not rc.steps or not rt.steps:
                continue
            tau_c = sum(s.committed for s in rc.steps) / len(rc.steps)
            tau_t = sum(s.committed for s in rt.steps) / len(rt.steps)
            a = alpha_for_tau(tau_c, chain_curve)
            pred = float(np.interp(a, tree_curve[0], tree_curve[1]))
            rows.append({"class": cls, "tau_chain": tau_c, "tau_tree": tau_t, "alpha_fit": a, "tau_tree_model": pred})
    def summary(rs):
        return {"n_requests": len(rs), "tau_chain": round(float(np.mean([r["tau_chain"] for r in rs])), 4),
                "tau_tree_measured": round(float(np.mean([r["tau_tree"] for r in rs])), 4),
                "tau_tree_model": round(float(np.mean([r["tau_tree_model"] for r in rs])), 4)}
    report = {"model": loaded.model_id, "drafter": "exit-2 Kangaroo adapter (bundled)", "rank_hazard": h,
              "chain": {"depth": args.depth, "topk": 1, "tokens": args.depth + 1},
              "tree": {"depth": args.depth, "topk": args.topk, "tokens": args.tokens},
              "new_tokens": args.new_tokens, "prompts_per_class": args.per_class,
              "lossless_mismatches": int(mismatches), "all": summary(rows),
              "classes": {c: summary([r for r in rows if r["class"] == c]) for c in sorted({r["class"] for r in rows})},
              "wall_s": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
