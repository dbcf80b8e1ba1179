"""Study: acceptance-aware scheduling — FCFS, SRPT (predicted), LAS and LAPS-SD on a trace mixing
acceptance classes, at moderate and high load.

Profile: ``docs/studies/llama70b-4xh100-smartspec-2class.json`` — the bundled published
``llama70b-4xh100-smartspec`` latency fit with two study acceptance classes under ``draft``:
``code`` (per-request α ~ Beta(17, 3), mean 0.85) and ``chat`` (α ~ Beta(5, 5), mean 0.5).

Traces (built here with numpy, every stream from ``simspec.rng.stream(seed, name)``): Poisson
arrivals, half the requests ``code``, half ``chat``, lognormal lengths (outputs capped at 4000), two
mixes (:data:`MIXES`): **A** code short (prompt mean 512 / CV 0.6, output 96 / 0.8), chat long
(prompt 256 / 0.8, output 384 / 0.8) — the issue's example, where the easy-to-draft requests are
also the short ones; **B** code long (output 320 / 0.8), chat short (output 160 / 0.8) — the token
order and the time order disagree more. One replica,
``draft:k=4`` with fixed k, ``--max-batch 16`` (a latency-oriented deployment: with the profile's
256 the batch only fills, and the order only matters, in overload), the profile's KV budget.

Load: each mix's capacity is measured first (FCFS on the same trace shape arriving at 50 req/s:
requests completed per second of makespan, seed 0); ``moderate`` = 0.8 × capacity, ``high`` =
1.0 × capacity (critically loaded). Policies: ``fcfs``, ``srpt:predictor=lognormal`` (σ = 0.5), ``las``,
``laps-sd:predictor=lognormal`` (σ = 0.5; the same predictions as SRPT: same stream and seed), each
over ``--seeds`` (default 0, 1; the trace and the run use the same seed). Then a small ablation
per mix at high load, seed 0: oracle predictors, ``merge=ahead``, ``service=time``, least attained
service inside each queue (``within=attained``) for LAS and LAPS-SD. ``--batching vllm|preemptive``
(the engine's batching mode; it is in every output's file name and in the plot's title).

Prints the tables and writes under ``--out`` (default ``docs/studies``), with MODE the batching
mode: ``acceptance_aware_MODE.csv`` (one row per mix × load × policy × seed, then the ablation
rows), ``acceptance_aware_MODE_summary.csv`` (seed means), ``acceptance_aware_MODE.json``
(command, seeds, capacity, rates, reductions) and ``acceptance_aware_MODE.png``. ``--replot``
redraws the plot from the saved summary and JSON without simulating.

    python benchmarks/study_acceptance_aware.py                 # the committed results (vllm)
    python benchmarks/study_acceptance_aware.py --batching preemptive
    python benchmarks/study_acceptance_aware.py --seeds 2,3 --out /tmp/aa
    python benchmarks/study_acceptance_aware.py --batching preemptive --replot
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
from simspec.rng import stream
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.trace import Trace

PROFILE = Path(__file__).resolve().parent.parent / "docs" / "studies" / "llama70b-4xh100-smartspec-2class.json"
SPEC = "draft:k=4"
MAX_BATCH = 16
POLICIES = [("FCFS", "fcfs"), ("SRPT (predicted)", "srpt:predictor=lognormal"), ("LAS", "las"),
            ("LAPS-SD", "laps-sd:predictor=lognormal")]
ABLATION = [("SRPT (oracle)", "srpt"), ("LAPS-SD (oracle)", "laps-sd"),
            ("LAPS-SD merge=ahead", "laps-sd:predictor=lognormal,merge=ahead"),
            ("LAPS-SD service=time", "laps-sd:predictor=lognormal,service=time"),
            ("LAS (within=attained)", "las:within=attained"),
            ("LAPS-SD within=attained", "laps-sd:predictor=lognormal,within=attained")]
LOADS = [("moderate", 0.8), ("high", 1.0)]
CLASS_NAMES = ("code", "chat")
MIXES = {  # mix: {class: (share, prompt mean, prompt CV, output mean, output CV)}
    # A (the example): easy-to-draft requests are also short, so token order ≈ time order
    "A: code short, chat long": {"code": (0.5, 512, 0.6, 96, 0.8), "chat": (0.5, 256, 0.8, 384, 0.8)},
    # B: easy-to-draft requests are longer; per request, time ∝ tokens / (tokens per step), and the
    # two orders disagree
    "B: code long, chat short": {"code": (0.5, 512, 0.6, 320, 0.8), "chat": (0.5, 256, 0.8, 160, 0.8)},
}
MAX_OUTPUT = 4000


def _lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    s2 = np.log1p(cv * cv)
    return np.maximum(1, np.round(rng.lognormal(np.log(mean) - s2 / 2, np.sqrt(s2), n))).astype(np.int64)


def mixed_trace(mix: dict, n: int, rate_per_s: float, seed: int) -> Trace:
    """Poisson arrivals at ``rate_per_s``; classes and lengths per ``mix`` (one of :data:`MIXES`). The
    unit-rate gaps, classes and lengths depend on the seed only: traces at different rates differ
    only in time."""
    gaps = stream(seed, "arrivals").exponential(1.0, n) / rate_per_s
    names = list(mix)
    share = np.array([mix[c][0] for c in names])
    cls = stream(seed, "classes").choice(len(names), size=n, p=share / share.sum())
    rng = stream(seed, "lengths")
    prompt = np.empty(n, dtype=np.int64)
    output = np.empty(n, dtype=np.int64)
    for ci, name in enumerate(names):
        _, pm, pcv, om, ocv = mix[name]
        p, o = _lognormal(rng, pm, pcv, n), _lognormal(rng, om, ocv, n)  # drawn for all: stable streams
        sel = cls == ci
        prompt[sel], output[sel] = p[sel], np.minimum(o[sel], MAX_OUTPUT)
    return Trace.from_columns(request_id=[f"mix-{i}" for i in range(n)], arrival_s=np.cumsum(gaps),
                              prompt_tokens=prompt, output_tokens=output,
                              acceptance_class=np.asarray(names, dtype=object)[cls],
                              source=f"mixed code/chat, Poisson {rate_per_s:.3f}/s, seed {seed}")


BATCHING = {"mode": "vllm"}  # set from --batching


def run(trace: Trace, profile, policy: str, seed: int):
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "--policy"), method=ComponentSpec.parse(SPEC, "--spec"),
                    max_batch_size=MAX_BATCH, seed=seed, batching=BATCHING["mode"])
    return simulate(cfg, trace, profile)


def metrics(res) -> dict:
    s, r = res.summary, res.requests
    lat = r["latency_s"].to_numpy() * 1000.0
    out = {"latency_ms_mean": s["latency_ms_mean"], "latency_ms_p50": s["latency_ms_p50"],
           "latency_ms_p99": s["latency_ms_p99"], "ttft_ms_mean": s["ttft_ms_mean"],
           "throughput_requests_per_s": s["throughput_requests_per_s"], "mean_batch_size": s["mean_batch_size"],
           "preemptions": s["preemptions"], "recomputes": s["recomputes"]}
    for c in CLASS_NAMES:
        out[f"latency_ms_mean_{c}"] = float(lat[(r["acceptance_class"] == c).to_numpy()].mean())
    if "perceptible_at_s" in r:
        out["perceptible_share"] = float(r["perceptible_at_s"].notna().mean())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per run")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--no-ablation", action="store_true", help="skip the ablation runs")
    ap.add_argument("--out", default="docs/studies")
    ap.add_argument("--batching", default="vllm", choices=["vllm", "preemptive"],
                    help="engine batching mode; named in the output files (acceptance_aware_MODE.*) and the plot")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw acceptance_aware_MODE.png from the saved _summary.csv and .json under --out")
    args = ap.parse_args(argv)
    BATCHING["mode"] = args.batching
    sfx = "_" + args.batching
    out = Path(args.out)
    if args.replot:
        return replot(out, sfx, args.batching)
    seeds = [int(s) for s in args.seeds.split(",")]
    profile = load_profile(PROFILE)
    t0 = time.perf_counter()
    rows, ablation, capacity, rates = [], [], {}, {}
    for mix_name, mix in MIXES.items():
        sat = run(mixed_trace(mix, args.requests, 50.0, 0), profile, "fcfs", 0)
        capacity[mix_name] = cap = float(sat.summary["throughput_requests_per_s"])
        rates[mix_name] = {load: frac * cap for load, frac in LOADS}
        for load, _ in LOADS:
            for seed in seeds:
                trace = mixed_trace(mix, args.requests, rates[mix_name][load], seed)
                for label, policy in POLICIES:
                    rows.append({"mix": mix_name, "load": load, "rate_per_s": rates[mix_name][load], "seed": seed,
                                 "policy": label, "spec": policy, **metrics(run(trace, profile, policy, seed))})
                print(f"  {mix_name} / {load} / seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if not args.no_ablation:
            trace = mixed_trace(mix, args.requests, rates[mix_name]["high"], seeds[0])
            for label, policy in POLICIES + ABLATION:
                same = [r for r in rows if r["mix"] == mix_name and r["load"] == "high" and r["seed"] == seeds[0]
                        and r["spec"] == policy]
                m = same[0] if same else {"mix": mix_name, "load": "high", "rate_per_s": rates[mix_name]["high"],
                                          "seed": seeds[0], "policy": label, "spec": policy,
                                          **metrics(run(trace, profile, policy, seeds[0]))}
                ablation.append({**m, "policy": label})

    df = pd.DataFrame(rows)
    cols = ["latency_ms_mean", "latency_ms_p99", "latency_ms_mean_code", "latency_ms_mean_chat", "ttft_ms_mean",
            "mean_batch_size", "preemptions"]
    summ = df.groupby(["mix", "load", "policy"], sort=False)[cols].mean().reset_index()
    reductions, per_seed = {}, {}
    for mix_name in MIXES:
        for load, _ in LOADS:
            key = f"{mix_name} / {load}"
            s = summ[(summ["mix"] == mix_name) & (summ["load"] == load)].set_index("policy")
            laps = s.loc["LAPS-SD"]
            reductions[key] = {b: {"mean_pct": 100.0 * (1 - laps["latency_ms_mean"] / s.loc[b, "latency_ms_mean"]),
                                   "p99_pct": 100.0 * (1 - laps["latency_ms_p99"] / s.loc[b, "latency_ms_p99"])}
                               for b in s.index if b != "LAPS-SD"}
            d = df[(df["mix"] == mix_name) & (df["load"] == load)].pivot(index="seed", columns="policy",
                                                                          values="latency_ms_mean")
            per_seed[key] = {b: [round(100.0 * (1 - x / y), 1) for x, y in zip(d["LAPS-SD"], d[b])]
                             for b in d.columns if b != "LAPS-SD"}

    pd.set_option("display.width", 220)
    print(f"\n{args.requests} requests per run, seeds {seeds}, {SPEC}, max batch {MAX_BATCH}; latency in ms, "
          f"mean over seeds")
    for mix_name in MIXES:
        for load, frac in LOADS:
            key = f"{mix_name} / {load}"
            s = summ[(summ["mix"] == mix_name) & (summ["load"] == load)].set_index("policy")[cols]
            print(f"\n{key} load: {frac:.2f} x capacity {capacity[mix_name]:.3f} = {rates[mix_name][load]:.3f} req/s")
            print(s.round(1).to_string())
            print("LAPS-SD latency reduction vs " + "; ".join(
                f"{b}: mean {v['mean_pct']:+.1f}%, p99 {v['p99_pct']:+.1f}% (mean, per seed: {per_seed[key][b]})"
                for b, v in reductions[key].items()))
    if ablation:
        ab = pd.DataFrame(ablation).set_index(["mix", "policy"])[cols + ["perceptible_share"]]
        print(f"\nablation: high load, seed {seeds[0]}")
        print(ab.round(2).to_string())

    out.mkdir(parents=True, exist_ok=True)
    full = pd.concat([df.assign(part="main"), pd.DataFrame(ablation).assign(part="ablation")], ignore_index=True)
    write_text(out / f"acceptance_aware{sfx}.csv", full.to_csv(index=False, float_format="%.6g"))
    write_text(out / f"acceptance_aware{sfx}_summary.csv", summ.to_csv(index=False, float_format="%.6g"))
    write_json(out / f"acceptance_aware{sfx}.json", {
        "command": "python benchmarks/study_acceptance_aware.py " + " ".join(argv or sys.argv[1:]),
        "profile": "docs/studies/" + PROFILE.name, "spec": SPEC, "max_batch_size": MAX_BATCH,
        "batching": args.batching,
        "requests": args.requests, "seeds": seeds, "capacity_requests_per_s": capacity,
        "loads": {m: {k: {"fraction_of_capacity": f, "rate_per_s": rates[m][k]} for k, f in LOADS} for m in MIXES},
        "mixes": {m: {c: dict(zip(("share", "prompt_mean", "prompt_cv", "output_mean", "output_cv"), v))
                      for c, v in mix.items()} for m, mix in MIXES.items()},
        "policies": dict((lbl, p) for lbl, p in POLICIES + ABLATION),
        "laps_sd_reduction_pct": reductions, "laps_sd_reduction_of_mean_per_seed_pct": per_seed})
    plot(summ, out / f"acceptance_aware{sfx}.png", capacity, args.batching, args.requests, seeds)
    print(f"\nwrote {out}/acceptance_aware{sfx}{{.csv,_summary.csv,.json,.png}} in {time.perf_counter() - t0:.0f} s")
    return 0


def replot(out: Path, sfx: str, batching: str) -> int:
    """Redraw the plot from a finished study's summary CSV and JSON (no simulation)."""
    import json

    summary_csv, meta_json = out / f"acceptance_aware{sfx}_summary.csv", out / f"acceptance_aware{sfx}.json"
    for f in (summary_csv, meta_json):
        if not f.is_file():
            print(f"error: {f}: not found; run the study with --batching {batching} first", file=sys.stderr)
            return 2
    meta = json.loads(meta_json.read_text())
    if meta.get("batching", "vllm") != batching:
        print(f"error: {meta_json}: field batching is {meta.get('batching')!r}, not {batching!r}", file=sys.stderr)
        return 2
    plot(pd.read_csv(summary_csv), out / f"acceptance_aware{sfx}.png", meta["capacity_requests_per_s"], batching,
         meta["requests"], meta["seeds"])
    print(f"wrote {out}/acceptance_aware{sfx}.png")
    return 0


BATCHING_WORDS = {"vllm": "vllm batching (vLLM V1 schedule: running first, admission in priority order)",
                  "preemptive": "preemptive batching (top of the order each step, residents paused)"}


def plot(summ: pd.DataFrame, path: Path, capacity: dict, batching: str, requests: int, seeds: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [p for p, _ in POLICIES]
    groups = [(m, ld) for m in MIXES for ld, _ in LOADS]
    x = np.arange(len(groups))
    w = 0.8 / len(labels)
    for ax, metric, title in ((axes[0], "latency_ms_mean", "mean latency"), (axes[1], "latency_ms_p99", "p99 latency")):
        for i, lbl in enumerate(labels):
            vals = [float(summ[(summ["mix"] == m) & (summ["load"] == ld) & (summ["policy"] == lbl)][metric].iloc[0])
                    / 1000.0 for m, ld in groups]
            ax.bar(x + (i - (len(labels) - 1) / 2) * w, vals, w, label=lbl)
        ax.set_xticks(x, [f"{m.split(':')[0]} {ld}\n({dict(LOADS)[ld]:.1f}x {capacity[m]:.2f}/s)" for m, ld in groups],
                      fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Acceptance-aware scheduling, {BATCHING_WORDS[batching]}\n"
                 f"code α≈0.85 / chat α≈0.5; mix A code short, mix B code long; {SPEC}, max batch {MAX_BATCH}; "
                 f"{requests} requests, mean over seeds {', '.join(map(str, seeds))}", fontsize=10)
    fig.tight_layout()
    write_png(path, fig, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
