"""Measure the tree-acceptance *rank hazard* on the bundled model (a real measurement, CPU, fp32).

The tree model (simspec.simulator.acceptance_tree) needs, per class, the rank distribution of the
target's next token in the drafter's distribution: P(rank 1) = the per-token acceptance α, and a
geometric tail P(rank r+1 | rank > r) = h for r ≥ 1 beyond the top-1. This script measures it with
the drafter simspec can run for real — the bundled SmolLM2-135M's Kangaroo exit adapter at layer 2
(the early-exit drafter of `kangaroo`) — against the full model's greedy tokens: for each prompt
(Spec-Bench's bundled prompts, the first N per class, as calibration uses them), the full model
greedily continues the prompt; then, at every continuation position, the rank of the full model's
token among the exit's logits is recorded. h is the pooled hazard over ranks 2..R_MAX
(Σ n_r / Σ n_{≥r}, r = 2..R_MAX: the maximum-likelihood geometric rate with ranks beyond R_MAX
censored), per class and overall; the per-rank hazards are printed to show how geometric the tail is.

    python benchmarks/measure_rank_hazard.py --per-class 4 --new-tokens 48 --out docs/studies/rank_hazard.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

R_MAX = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--exit", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from simspec.calibrate import prompts as P
    from simspec.calibrate.adapter import load_adapters
    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model, silence_progress_bars

    silence_progress_bars()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", "fp32", "cpu")
    lm = LayeredLM(loaded.model)
    ad = load_adapters(P.bundled_prompts_path().parent.parent / "adapters" / "smollm2-135m", lm, [args.exit])[args.exit]
    tok = loaded.tokenizer
    chosen = P.select(P.load_prompts(P.bundled_prompts_path()), args.per_class, 0, None)
    ranks: dict[str, list[int]] = {}
    with torch.no_grad():
        for cls, prompts in sorted(chosen.items()):
            for pr in prompts:
                ids = P.encode(tok, pr.text, 512)
                out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=args.new_tokens, do_sample=False,
                                            pad_token_id=tok.eos_token_id)
                seq = out[0].tolist()
                n_new = len(seq) - len(ids)
                if n_new < 2:
                    continue
                kv = lm.new_kv()
                h = lm.run(lm.embed(seq[:-1]), 0, args.exit, kv)
                logits = lm.head(ad(lm, h, 0, None), normed=True)[0]  # [T-1, vocab]
                pos = torch.arange(len(ids) - 1, len(seq) - 1)
                target = torch.tensor(seq[len(ids):])
                tl = logits[pos, target]
                r = (logits[pos] > tl[:, None]).sum(dim=1) + 1
                ranks.setdefault(cls, []).extend(int(x) for x in r)
    report = {"model": loaded.model_id, "drafter": f"exit-{args.exit} Kangaroo adapter (bundled)",
              "prompts_per_class": args.per_class, "new_tokens": args.new_tokens, "r_max": R_MAX, "classes": {}}
    allr: list[int] = []
    for cls, rs in sorted(ranks.items()):
        report["classes"][cls] = _fit(np.array(rs))
        allr += rs
    report["all"] = _fit(np.array(allr))
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


def _fit(r: np.ndarray) -> dict:
    n = int(r.size)
    counts = np.array([int((r == k).sum()) for k in range(1, R_MAX + 1)])
    at_least = np.array([int((r >= k).sum()) for k in range(1, R_MAX + 1)])
    hz = [round(float(counts[k] / at_least[k]), 4) if at_least[k] else None for k in range(1, R_MAX)]
    pooled = float(counts[1:].sum() / at_least[1:].sum()) if at_least[1:].sum() else None
    return {"n_positions": n, "top1_rate": round(float(counts[0] / n), 4) if n else None,
            "rank_counts_1_to_rmax": counts.tolist(), "beyond_rmax": int((r > R_MAX).sum()),
            "hazard_by_rank_2_to_rmax": hz, "rank_hazard": round(pooled, 4) if pooled is not None else None}


if __name__ == "__main__":
    main()
