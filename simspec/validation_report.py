"""Simulator-vs-real error report for ``simspec validate`` (no torch: works on plain tables).

Inputs are two per-request tables (pandas DataFrames) of the same trace: the *real* run (measured by
:mod:`simspec.calibrate.validate`) and the *simulated* run (:func:`simspec.simulator.run.simulate`).
Both need the columns ``request_id``, ``arrival_s``, ``first_token_s`` and ``completion_s``
(seconds, on each run's own clock, starting at 0 with the first arrival at its trace time).

Error conventions (every error is a signed percentage, simulated relative to real):

- ``err_pct(sim, real) = 100 · (sim − real) / real``;
- per request: latency ``completion − arrival`` and TTFT ``first_token − arrival`` in ms, and
  their per-request errors;
- aggregates: mean, p50, p90, p99 of each distribution (numpy's linear-interpolation percentile,
  computed separately over the real and the simulated values), and the error of each;
- ``latency_mape_pct`` = mean over requests of ``|sim − real| / real`` · 100 (likewise
  ``ttft_mape_pct``);
- makespan = last completion − first arrival, and its error.

:func:`compare` returns a JSON-ready dict; :func:`format_table` renders the terminal table;
:func:`write_report` writes ``validation.json``, ``per_request.csv`` and ``latency_scatter.png``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simspec.atomic import write_json, write_text
from simspec.errors import SimspecError

STATS = ("mean", "p50", "p90", "p99")
NEEDED = ("request_id", "arrival_s", "first_token_s", "completion_s")
#: the issue's target: per-request MAPE, mean and p99 latency error within this many percent
TARGET_PCT = 5.0


def err_pct(sim: float, real: float) -> float | None:
    """Signed error of ``sim`` relative to ``real`` in percent (None when real is 0 or not finite)."""
    if real is None or sim is None or not math.isfinite(real) or not math.isfinite(sim) or real == 0:
        return None
    return 100.0 * (sim - real) / real


def stats_ms(values_ms: np.ndarray) -> dict[str, float]:
    """mean / p50 / p90 / p99 of ``values_ms`` (linear-interpolation percentiles)."""
    v = np.asarray(values_ms, dtype=float)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}


def _check(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise SimspecError(f"{what} results: missing column {missing[0]}")
    if df.empty:
        raise SimspecError(f"{what} results: no requests")
    bad = df[~np.isfinite(df["completion_s"].astype(float)) | ~np.isfinite(df["first_token_s"].astype(float))]
    if len(bad):
        raise SimspecError(f"{what} results: request {bad['request_id'].iloc[0]} did not complete")


def per_request(real: pd.DataFrame, sim: pd.DataFrame) -> pd.DataFrame:
    """One row per request (real order): real and simulated latency / TTFT (ms) and their errors (%)."""
    _check(real, "real")
    _check(sim, "simulated")
    r = real.assign(request_id=real["request_id"].astype(str))
    s = sim.assign(request_id=sim["request_id"].astype(str))
    if set(r["request_id"]) != set(s["request_id"]) or len(r) != len(s):
        only = sorted(set(r["request_id"]) ^ set(s["request_id"]))
        raise SimspecError(f"real and simulated results cover different requests (e.g. {only[:1] or 'duplicates'})")
    m = r[list(NEEDED)].merge(s[list(NEEDED)], on="request_id", suffixes=("_real", "_sim"), validate="1:1")
    out = pd.DataFrame({"request_id": m["request_id"], "arrival_s": m["arrival_s_real"]})
    for side in ("real", "sim"):
        out[f"latency_ms_{side}"] = 1e3 * (m[f"completion_s_{side}"] - m[f"arrival_s_{side}"])
        out[f"ttft_ms_{side}"] = 1e3 * (m[f"first_token_s_{side}"] - m[f"arrival_s_{side}"])
    for what in ("latency", "ttft"):
        out[f"{what}_err_pct"] = 100.0 * (out[f"{what}_ms_sim"] - out[f"{what}_ms_real"]) / out[f"{what}_ms_real"]
    for extra in ("acceptance_class", "prompt_tokens", "output_tokens", "preemptions"):
        if extra in real.columns:
            out[extra] = real.set_index(real["request_id"].astype(str)).loc[out["request_id"], extra].to_numpy()
    return out


def makespan_s(df: pd.DataFrame) -> float:
    """Last completion minus first arrival (seconds)."""
    return float(df["completion_s"].max() - df["arrival_s"].min())


def compare(real: pd.DataFrame, sim: pd.DataFrame) -> dict[str, Any]:
    """Aggregate errors of ``sim`` against ``real`` (see the module docstring); JSON-ready."""
    pr = per_request(real, sim)
    out: dict[str, Any] = {"n_requests": int(len(pr))}
    for what in ("latency", "ttft"):
        rs, ss = stats_ms(pr[f"{what}_ms_real"]), stats_ms(pr[f"{what}_ms_sim"])
        out[what] = {st: {"real_ms": rs[st], "sim_ms": ss[st], "err_pct": err_pct(ss[st], rs[st])} for st in STATS}
        ape = (pr[f"{what}_ms_sim"] - pr[f"{what}_ms_real"]).abs() / pr[f"{what}_ms_real"]
        out[f"{what}_mape_pct"] = float(100.0 * ape.mean())
        out[f"{what}_max_ape_pct"] = float(100.0 * ape.max())
    mr, ms = makespan_s(real), makespan_s(sim)
    out["makespan"] = {"real_s": mr, "sim_s": ms, "err_pct": err_pct(ms, mr)}
    lat = out["latency"]
    out["target"] = {
        "threshold_pct": TARGET_PCT,
        "met": bool(out["latency_mape_pct"] <= TARGET_PCT
                    and abs(lat["mean"]["err_pct"] or 0.0) <= TARGET_PCT
                    and abs(lat["p99"]["err_pct"] or 0.0) <= TARGET_PCT),
        "checks": "latency_mape_pct, |latency mean err|, |latency p99 err| <= threshold_pct",
    }
    return out


# ------------------------------------------------------------------------------------ rendering


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _signed(v: Any) -> str:
    return "-" if v is None else f"{v:+.1f}%"


def format_table(errors: dict[str, Any], title: str = "") -> str:
    """The terminal table: real vs simulated and the error for each statistic."""
    rows = [["metric", "real", "simulated", "error"]]
    for what, label in (("latency", "latency"), ("ttft", "TTFT")):
        for st in STATS:
            d = errors[what][st]
            rows.append([f"{st} {label} (ms)", _f(d["real_ms"]), _f(d["sim_ms"]), _signed(d["err_pct"])])
    mk = errors["makespan"]
    rows.append(["makespan (s)", _f(mk["real_s"], 2), _f(mk["sim_s"], 2), _signed(mk["err_pct"])])
    rows.append(["latency MAPE", "", "", f"{errors['latency_mape_pct']:.1f}%"])
    rows.append(["TTFT MAPE", "", "", f"{errors['ttft_mape_pct']:.1f}%"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [title] if title else []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    t = errors.get("target")
    if t:
        lines.append(f"target (MAPE, mean, p99 within {t['threshold_pct']:g}%): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def format_heldout(heldout: dict[str, Any]) -> str:
    """Held-out latency and acceptance checks as text lines."""
    lines = []
    lat = heldout.get("latency_model")
    if lat and lat.get("points"):
        lines.append(f"latency model at {len(lat['points'])} off-grid shapes: mean |err| "
                     f"{_f(lat['mean_abs_err_pct'])}%, max |err| {_f(lat['max_abs_err_pct'])}%")
        for p in lat["points"]:
            lines.append(f"  {p['what']:<22} B={p['batch_size']} T={p['tokens']:<3} C={p['context_tokens']:<4} "
                         f"measured {p['measured_ms']:.2f} ms  model {p['model_ms']:.2f} ms  "
                         f"{_signed(p['err_pct'])}")
    acc = heldout.get("acceptance_model")
    if acc:
        lines.append(f"tokens per decode step: model {_f(acc.get('model_tokens_per_step'), 3)}, real "
                     f"{_f(acc.get('real_tokens_per_step'), 3)} ({_signed(acc.get('err_pct'))})")
    ov = heldout.get("step_overhead")
    if ov:
        lines.append(f"per-step time outside the latency model (real − model): median "
                     f"{_f(ov.get('median_residual_ms'), 2)} ms over {ov.get('n_steps')} decode steps")
        if ov.get("decode_real_over_model_median") is not None:
            lines.append(f"real / model step time, median: decode {_f(ov.get('decode_real_over_model_median'), 3)}, "
                         f"prefill {_f(ov.get('prefill_real_over_model_median'), 3)} (a prefill's LM head: last "
                         f"prompt position only, in the model as in the runner)")
    return "\n".join(lines)


def plot_scatter(pr: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """PNG: simulated vs real per-request latency (ms), with the y = x line and ±5% band (skipped
    where matplotlib is not installed, e.g. on a bare GPU machine: the tables carry the numbers)."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = pr["latency_ms_real"].to_numpy() / 1e3
    sim = pr["latency_ms_sim"].to_numpy() / 1e3
    hi = float(max(real.max(), sim.max())) * 1.05
    lo = float(min(real.min(), sim.min())) * 0.95
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=110)
    xs = np.linspace(lo, hi, 50)
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="0.85", label="±5%")
    ax.plot(xs, xs, color="k", lw=1, label="y = x")
    ax.scatter(real, sim, s=18, color="tab:blue", zorder=3, label="request")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("real end-to-end latency (s)")
    ax.set_ylabel("simulated end-to-end latency (s)")
    import textwrap

    ax.set_title(textwrap.fill(title, 64), fontsize=9)  # long method strings wrap instead of clipping
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from simspec.atomic import write_png

    write_png(path, fig, metadata={"Software": None})
    plt.close(fig)


def write_report(out_dir: str | Path, real: pd.DataFrame, sim: pd.DataFrame, *, meta: dict[str, Any] | None = None,
                 heldout: dict[str, Any] | None = None, title: str = "") -> dict[str, Any]:
    """Write ``validation.json`` (meta, errors, held-out checks, per-request rows), ``per_request.csv``,
    ``latency_scatter.png`` and ``report.txt`` into ``out_dir``; return the JSON document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    errors = compare(real, sim)
    pr = per_request(real, sim)
    doc = {"format": "simspec-validation", "version": 1, "meta": meta or {}, "errors": errors,
           "latency_mape_pct": errors["latency_mape_pct"], "heldout": heldout or {},
           "per_request": pr.to_dict(orient="records")}
    from simspec.atomic import json_safe

    doc = json_safe(doc)
    write_json(out / "validation.json", doc)
    write_text(out / "per_request.csv", pr.to_csv(index=False, float_format="%.3f"))
    text = format_table(errors, title)
    if heldout:
        text += "\n" + format_heldout(heldout)
    write_text(out / "report.txt", text + "\n")
    plot_scatter(pr, out / "latency_scatter.png", title)
    return doc
