"""Reports: comparison tables and PNG plots from run directories and sweeps.

Inputs are run directories (``config.json``, ``summary.json``, ``requests.parquet``,
``steps.parquet``), directories whose subdirectories are runs (``simspec compare --out``), and sweep
directories (``sweep.parquet``, ``sweep.json``, ``runs/<id>/``). For each group of inputs (the runs
given directly form one group, each sweep another) :func:`write_report` writes:

- ``summary.csv`` / ``summary.md``: one row per run (group, label, axes, status, metrics);
- ``latency_cdf.png``: CDFs of end-to-end latency and TTFT per policy/method (one row of panels
  per request rate for a sweep with a rate axis);
- ``latency_vs_rate.png``, ``goodput_vs_rate.png``: mean/p99 latency, SLO goodput, SLO attainment
  and throughput against the offered request rate (sweeps with a ``rate``/``rate_scale`` axis;
  the mean over seeds, bars from the lowest to the highest seed);
- ``timeline_<label>.png``: batch size and chosen k (``steps.parquet`` ``batch_size``, ``k_max``)
  per replica over simulated time, for each run given (for a sweep: one run per series, at its
  highest rate and lowest seed);
- ``accepted_per_step.png``: histogram of tokens committed per decode step (accepted drafts + 1)
  per request, per policy/method;
- ``report.md``: the tables and the figures together.

With several groups the files of each group are prefixed with the group's name. Plots use
matplotlib's Agg backend through :class:`matplotlib.figure.Figure` (no pyplot state, no display).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simspec.errors import SimspecError

RATE_AXES = ("rate", "rate_scale")
SEED_AXES = ("seed",)

# (summary key, column header, digits) shown in tables, in this order
KEY_METRICS: list[tuple[str, str, int]] = [
    ("n_requests", "requests", 0),
    ("latency_ms_mean", "mean latency (ms)", 1),
    ("latency_ms_p99", "p99 latency (ms)", 1),
    ("ttft_ms_mean", "mean TTFT (ms)", 1),
    ("ttft_ms_p99", "p99 TTFT (ms)", 1),
    ("tpot_ms_mean", "mean TPOT (ms)", 2),
    ("tpot_ms_p99", "p99 TPOT (ms)", 2),
    ("throughput_tokens_per_s", "throughput (tok/s)", 1),
    ("slo_goodput_requests_per_s", "SLO goodput (req/s)", 3),
    ("slo_attainment", "SLO attainment", 3),
    ("request_goodput", "vLLM request_goodput (req/s)", 3),
    ("draft_acceptance_rate", "draft acceptance rate", 3),
    ("mean_tokens_per_decode_step", "tokens/decode step (mean over steps)", 2),
    ("mean_batch_size", "mean batch", 1),
    ("preemptions", "preemptions", 0),
]
COMPACT_METRICS = ("latency_ms_mean", "latency_ms_p99", "ttft_ms_p99", "tpot_ms_mean", "throughput_tokens_per_s",
                   "slo_attainment", "mean_tokens_per_decode_step")
MAX_TIMELINES = 6
MAX_CDF_RATES = 4
MAX_TIMELINE_REPLICAS = 8  # one panel row per replica, up to this many
# summary keys of older runs → their current names (runs and sweeps written before the rename)
LEGACY_KEYS = {"goodput_requests_per_s": "slo_goodput_requests_per_s",
               "goodput_tokens_per_busy_s": "smartspec_goodput_tokens_per_busy_s",
               "acceptance_rate": "draft_acceptance_rate"}
# names of run facts, as the labels show them
FACT_NAMES = {"scheduler": "policy", "method": "spec", "spec_len": "spec-len", "replicas": "replicas",
              "router": "router", "seed": "seed", "max_batch_size": "max-batch", "kv_budget_tokens": "kv-budget",
              "preempt_mode": "preempt", "profile": "profile", "trace": "trace", "rate": "rate"}


def upgrade_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A summary (or table row) with legacy metric names renamed to the current ones."""
    out = dict(d)
    for old, new in LEGACY_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def read_parquet(path: Path, **kw) -> pd.DataFrame:
    """``pd.read_parquet`` with a one-line :class:`SimspecError` for a missing or corrupt file."""
    try:
        return pd.read_parquet(path, **kw)
    except FileNotFoundError:
        raise SimspecError(f"{path}: no such file") from None
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        msg = " ".join(str(exc).split())[:120]
        raise SimspecError(f"{path}: not a readable parquet file ({type(exc).__name__}: {msg})") from None


def read_json_file(path: Path) -> Any:
    """A JSON document, with a one-line :class:`SimspecError` for a missing or corrupt file."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimspecError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise SimspecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); not a JSON file "
                           f"simspec wrote") from None
    except ValueError as exc:
        raise SimspecError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    except OSError as exc:
        raise SimspecError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class RunInput:
    """One run directory: its config, summary and (loaded on demand) request and step tables."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    label: str = ""
    _requests: pd.DataFrame | None = None
    _steps: pd.DataFrame | None = None

    @property
    def requests(self) -> pd.DataFrame:
        if self._requests is None:
            self._requests = read_parquet(self.path / "requests.parquet")
        return self._requests

    @property
    def steps(self) -> pd.DataFrame:
        if self._steps is None:
            self._steps = read_parquet(self.path / "steps.parquet")
        return self._steps

    @property
    def steps_log(self) -> tuple[str, int]:
        """(mode, period) of the run's step log (``--steps-log``; runs written before it: full)."""
        run = self.config.get("run") if isinstance(self.config.get("run"), dict) else {}
        mode = run.get("steps_log", "full")
        every = run.get("steps_log_every", 1) if mode == "sampled" else 1
        return str(mode), int(every) if isinstance(every, int) and every >= 1 else 1


@dataclass
class SweepInput:
    """A sweep directory: ``table`` (``sweep.parquet``), its axis names, and a label per row."""

    path: Path
    name: str
    table: pd.DataFrame
    axes: list[str]
    series_axes: list[str] = field(default_factory=list)
    rate_axis: str | None = None

    def run(self, run_id: str) -> RunInput:
        row = self.table.loc[self.table["run_id"] == run_id].iloc[0]
        return load_run(self.path / str(row["run_dir"]), label=str(row["label"]))


def _is_run_dir(p: Path) -> bool:
    return p.is_dir() and all((p / n).is_file() for n in ("config.json", "summary.json", "requests.parquet",
                                                           "steps.parquet"))


def load_run(path: str | Path, label: str = "") -> RunInput:
    path = Path(path)
    if not _is_run_dir(path):
        raise SimspecError(f"{path}: not a complete run directory (needs config.json, summary.json, "
                           f"requests.parquet, steps.parquet)")
    config, summary = read_json_file(path / "config.json"), read_json_file(path / "summary.json")
    for name, doc in (("config.json", config), ("summary.json", summary)):
        if not isinstance(doc, dict):
            raise SimspecError(f"{path / name}: expected a JSON object, got {type(doc).__name__}")
    return RunInput(path=path, config=config, summary=upgrade_keys(summary), label=label)


def load_sweep(path: str | Path) -> SweepInput:
    """A sweep directory, with ``label`` (the non-rate, non-seed axes) added to its table."""
    from simspec.sweep import read_manifest, read_sweep

    path = Path(path)
    table = read_sweep(path)
    table = table.rename(columns={o: n for o, n in LEGACY_KEYS.items() if o in table.columns and n not in table.columns})
    manifest = read_manifest(path)
    axes = [a for a in manifest.get("axes", []) if a in table.columns]
    if not manifest:
        known = {"run_id", "status"}
        axes = list(table.columns[: list(table.columns).index("run_id")]) if "run_id" in table.columns else []
        axes = [a for a in axes if a not in known]
    rate_axis = next((a for a in RATE_AXES if a in axes), None)
    series = [a for a in axes if a not in RATE_AXES and a not in SEED_AXES]
    varying = [a for a in series if table[a].astype(str).nunique() > 1]
    series = varying or series
    table = table.copy()
    table.insert(0, "label", _labels(table, series))
    name = (manifest.get("grid") or {}).get("name") or path.name
    return SweepInput(path=path, name=str(name), table=table, axes=axes, series_axes=series, rate_axis=rate_axis)


def _labels(table: pd.DataFrame, series: list[str]) -> list[str]:
    """One axis: its value (the legend title names it); several: ``name value, name value``."""
    if not series:
        return ["all"] * len(table)
    if len(series) == 1:
        return [_fmt_value(v) for v in table[series[0]]]
    return [", ".join(f"{FACT_NAMES.get(a, a)} {_fmt_value(v)}" for a, v in zip(series, vals))
            for vals in table[series].itertuples(index=False)]


def _fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "default"
    if isinstance(v, float) and v == int(v):
        return f"{v:g}"
    return str(v)


def load_inputs(paths: list[str | Path]) -> tuple[list[RunInput], list[SweepInput]]:
    """Classify each path as a sweep, a run, or a directory of runs; label the runs by what
    differs between them (scheduler, method, ...)."""
    runs: list[RunInput] = []
    sweeps: list[SweepInput] = []
    for raw in paths:
        p = Path(raw)
        if (p / "sweep.parquet").is_file() or (p.is_file() and p.name == "sweep.parquet"):
            sweeps.append(load_sweep(p if p.is_dir() else p.parent))
        elif _is_run_dir(p):
            runs.append(load_run(p))
        elif p.is_dir() and any(_is_run_dir(c) for c in p.iterdir()):
            runs.extend(load_run(c) for c in sorted(p.iterdir()) if _is_run_dir(c))
        elif not p.exists():
            raise SimspecError(f"{p}: no such run or sweep directory")
        else:
            raise SimspecError(f"{p}: neither a run directory (config.json, summary.json, requests.parquet, "
                               f"steps.parquet) nor a sweep (sweep.parquet)")
    _label_runs(runs)
    return runs, sweeps


def _label_runs(runs: list[RunInput]) -> None:
    def facts(r: RunInput) -> dict[str, str]:
        run = r.config.get("run", {})
        d = {k: str(run.get(k)) for k in ("scheduler", "method", "spec_len", "replicas", "router", "seed",
                                         "max_batch_size", "kv_budget_tokens", "preempt_mode")}
        d["profile"] = str(r.config.get("profile", {}).get("name"))
        d["trace"] = str(r.config.get("trace", {}).get("source"))
        sw = r.config.get("sweep") or {}
        if sw.get("offered_rate_rps") is not None:
            d["rate"] = f"{sw['offered_rate_rps']:.3g} req/s"
        return d

    all_facts = [facts(r) for r in runs]
    varying = [k for k in (all_facts[0] if all_facts else {}) if len({f[k] for f in all_facts}) > 1]
    if not varying and all_facts:
        varying = ["scheduler", "method"]
    for r, f in zip(runs, all_facts):
        r.label = r.label or ", ".join(f"{FACT_NAMES.get(k, k)} {f[k]}" for k in varying)
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def runs_table(runs: list[RunInput]) -> pd.DataFrame:
    """One row per run: label, path, scheduler, method, spec_len, then every scalar metric."""
    rows = []
    for r in runs:
        run = r.config.get("run", {})
        row: dict[str, Any] = {"label": r.label, "run_dir": str(r.path), "status": "ok",
                               "policy": run.get("scheduler"), "spec": run.get("method"),
                               "spec_len": run.get("spec_len"), "replicas": run.get("replicas"),
                               "seed": run.get("seed")}
        for k, v in r.summary.items():
            if isinstance(v, list):
                vals = [x for x in v if x is not None]
                row[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            else:
                row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_cell(v: Any, digits: int | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (float, np.floating)):
        if digits is None:
            return f"{v:.4g}"
        return f"{v:,.{digits}f}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return f"{int(v):,}" if digits is not None else str(v)
    return str(v)


def display_frame(df: pd.DataFrame, leading: list[str], compact: bool = False) -> pd.DataFrame:
    """The columns a person reads: ``leading`` columns, then the key metrics (``compact``: the few
    that fit a terminal), formatted as text."""
    cols = [c for c in leading if c in df.columns]
    out = pd.DataFrame({c: [_fmt_cell(v) for v in df[c]] for c in cols})
    for key, header, digits in KEY_METRICS:
        if compact and key not in COMPACT_METRICS:
            continue
        if key in df.columns and df[key].notna().any():
            out[header] = [_fmt_cell(v, digits) for v in df[key]]
    return out


def text_table(df: pd.DataFrame, max_rows: int | None = None) -> str:
    """Aligned plain-text table (text columns left, numbers right)."""
    shown = df if max_rows is None or len(df) <= max_rows else df.head(max_rows)
    header = [str(c) for c in shown.columns]
    body = [[str(x) for x in row] for row in shown.itertuples(index=False)]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(header)]
    numeric = [all(_looks_numeric(r[i]) for r in body) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    lines = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    if len(shown) < len(df):
        lines.append(f"... {len(df) - len(shown)} more row(s) in the CSV")
    return "\n".join(lines)


def _looks_numeric(s: str) -> bool:
    return s == "-" or re.fullmatch(r"-?[\d,]*\.?\d+(e[-+]?\d+)?", s) is not None


def markdown_table(df: pd.DataFrame) -> str:
    """GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    cols = [esc(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(esc(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (each returns a matplotlib Figure)
# ---------------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _ecdf(ax, values: np.ndarray, label: str, **kw) -> None:
    x = np.sort(values[~np.isnan(values)])
    if x.size == 0:
        return
    y = np.arange(1, x.size + 1) / x.size
    ax.step(np.concatenate([[x[0]], x]), np.concatenate([[0.0], y]), where="post", label=label, **kw)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width=width, break_long_words=True)) or text


def plot_latency_cdf(panels: list[tuple[str, dict[str, pd.DataFrame]]], title: str, legend_title: str | None = None):
    """``panels``: (panel title, {series label: requests frame}); one row of two panels
    (end-to-end latency, TTFT) per entry. One legend for the figure, below the panels (never over
    an axis or its label)."""
    n = len(panels)
    n_series = max((len(series) for _, series in panels), default=1)
    legend_rows = math.ceil(n_series / 2)
    fig = _figure(11, 3.4 * n + 0.9 + 0.22 * legend_rows)
    axes = fig.subplots(n, 2, squeeze=False)
    for i, (ptitle, series) in enumerate(panels):
        for label, req in series.items():
            _ecdf(axes[i][0], req["latency_s"].to_numpy(float), label)
            _ecdf(axes[i][1], req["ttft_s"].to_numpy(float), label)
        for j, what in enumerate(("end-to-end latency", "time to first token")):
            ax = axes[i][j]
            ax.set_xlabel(f"{what} (s)")
            ax.set_ylabel("fraction of requests")
            ax.set_ylim(0, 1.01)
            ax.grid(alpha=0.3)
            ax.set_title(f"{what.capitalize()}" + (f" — {ptitle}" if ptitle else ""), fontsize=10)
            ax.axhline(0.99, color="grey", lw=0.7, ls=":")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, [_wrap(lb, 60) for lb in labels], loc="outside lower center", ncols=min(2, len(handles)),
                   fontsize=8, title=legend_title, title_fontsize=8, frameon=False)
    fig.suptitle(_wrap(title, 100))
    return fig


def _agg_by_rate(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, min and max of ``metric`` over seeds for each (label, offered rate)."""
    g = df.groupby(["label", "x"], sort=True)[metric]
    return pd.DataFrame({"mean": g.mean(), "lo": g.min(), "hi": g.max()}).reset_index()


def plot_vs_rate(sweep: SweepInput, metrics: list[tuple[str, str, float]], title: str):
    """One panel per (metric, y label, scale) against the offered request rate; one line per series."""
    ok = sweep.table[sweep.table["status"] == "ok"].copy()
    ok["x"] = ok["offered_rate_rps"]
    metrics = [m for m in metrics if m[0] in ok.columns and ok[m[0]].notna().any()]
    fig = _figure(5.2 * len(metrics), 4.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (metric, ylabel, scale) in zip(axes, metrics):
        agg = _agg_by_rate(ok.dropna(subset=[metric]), metric)
        for label in dict.fromkeys(ok["label"]):
            a = agg[agg["label"] == label]
            if a.empty:
                continue
            y = a["mean"].to_numpy(float) * scale
            err = np.vstack([y - a["lo"].to_numpy(float) * scale, a["hi"].to_numpy(float) * scale - y])
            ax.errorbar(a["x"], y, yerr=err if np.any(err > 0) else None, marker="o", ms=4, capsize=3,
                        label=label)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0], fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, [_wrap(lb, 60) for lb in labels], loc="outside lower center",
                   ncols=min(len(handles), len(metrics)), fontsize=8, title=", ".join(sweep.series_axes) or None,
                   title_fontsize=8, frameon=False)
    fig.suptitle(_wrap(title, 100))
    return fig


def _with_idle(s: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step start times, batch sizes and k of one replica, with a zero wherever the replica sat
    idle between the end of a step and the start of the next (so idle time is not drawn as the
    last step's value)."""
    start, end = s["start_s"].to_numpy(float), s["end_s"].to_numpy(float)
    b, k = s["batch_size"].to_numpy(float), s["k_max"].to_numpy(float)
    idle = np.append(end[:-1] < start[1:] - 1e-9, True)
    t = np.empty(start.size + int(idle.sum()))
    pos = np.arange(start.size) + np.concatenate([[0], np.cumsum(idle)[:-1]])
    t[pos], t[pos[idle] + 1] = start, end[idle]
    bb, kk = np.zeros_like(t), np.zeros_like(t)
    bb[pos], kk[pos] = b, k
    return t, bb, kk


def plot_timeline(run: RunInput, title: str):
    """Batch size and chosen k (``k_max``) over simulated time: one row of two panels (batch size,
    k) per replica, up to :data:`MAX_TIMELINE_REPLICAS` replicas (the rest are named in the title),
    so that replicas never draw over each other."""
    steps = run.steps
    mode, every = run.steps_log
    if mode == "sampled":  # rows are every Nth step: points, no idle gaps inferred between them
        title += f" (every {every}th step of each replica: --steps-log sampled)"
    reps = sorted(steps["replica"].unique().tolist()) if len(steps) else [0]
    shown = reps[:MAX_TIMELINE_REPLICAS]
    n = len(shown)
    fig = _figure(12, 1.9 * n + 1.6)
    axes = fig.subplots(n, 2, squeeze=False, sharex=True)
    kmax = float(steps["k_max"].max()) if len(steps) else 0.0
    bmax = float(steps["batch_size"].max()) if len(steps) else 1.0
    for i, rep in enumerate(shown):
        s = steps[steps["replica"] == rep]
        ax_b, ax_k = axes[i]
        if len(s) and mode == "sampled":
            t = s["start_s"].to_numpy(float)
            ax_b.plot(t, s["batch_size"].to_numpy(float), ".", ms=2, color="C0")
            ax_k.plot(t, s["k_max"].to_numpy(float), ".", ms=2, color="C1")
        elif len(s):
            t, b, k = _with_idle(s)
            ax_b.step(t, b, where="post", lw=0.7, color="C0")
            ax_k.step(t, k, where="post", lw=0.7, color="C1")
        ax_b.set_ylabel(f"replica {rep}\nrequests", fontsize=9)
        ax_k.set_ylabel("k (drafts)", fontsize=9)
        ax_b.set_ylim(0, bmax * 1.08 + 0.5)
        ax_k.set_ylim(0, max(kmax, 1.0) * 1.08 + 0.2)
        for ax in (ax_b, ax_k):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
    axes[0][0].set_title("Requests in each step (0: replica idle)", fontsize=10)
    axes[0][1].set_title("Speculation length of each step (largest k in the batch)", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("simulated time (s)")
    more = f" (first {n} of {len(reps)} replicas shown)" if len(reps) > n else ""
    fig.suptitle(_wrap(title + more, 110), fontsize=11)
    return fig


def plot_accepted_hist(series: dict[str, pd.DataFrame], title: str):
    """Histogram of per-request tokens committed per decode step (accepted drafts + 1), one panel
    per series (a run without speculation is a single bar at 1)."""
    vals = {k: v["mean_accepted_len"].to_numpy(float) for k, v in series.items()}
    vals = {k: v[~np.isnan(v)] for k, v in vals.items()}
    hi = max([float(v.max()) for v in vals.values() if v.size] + [2.0])
    bins = np.arange(1.0, math.ceil(hi) + 0.125, 0.125)
    n = max(len(vals), 1)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = _figure(5.6 * cols, 2.9 * rows + 1.0)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    colors = [f"C{i % 10}" for i in range(n)]
    for i, (label, v) in enumerate(vals.items()):
        ax = axes[i // cols][i % cols]
        if v.size:
            ax.hist(v, bins=bins, color=colors[i], weights=np.full(v.size, 1.0 / v.size))
            ax.axvline(v.mean(), color="black", lw=1, ls="--")
        ax.set_title(_wrap(f"{label}  (mean {v.mean():.2f})" if v.size else f"{label} (no decode steps)", 55),
                     fontsize=9)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    for j in range(len(vals), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    xlabel = "per-request mean tokens per decode step"
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    if rows > 1 and len(vals) % cols:
        axes[-2][-1].set_xlabel(xlabel)
        axes[-2][-1].xaxis.set_tick_params(labelbottom=True)
    fig.suptitle(_wrap(title, 90) + "\n(each request's mean of accepted drafts + 1; dashed line: mean over requests)",
                 fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    """A file-name-safe form of a label: letters, digits, ``.``, ``-`` and ``_`` only (no ``=``)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("=", "")).strip("_")
    return s[:80] or "run"


@dataclass
class ReportFiles:
    """Files written (name → bytes) and the text printed."""

    files: dict[str, bytes] = field(default_factory=dict)
    terminal: list[str] = field(default_factory=list)
    markdown: list[str] = field(default_factory=list)
    pbar: Any = None  # a tqdm bar advanced once per plot (None: no progress)

    def add_png(self, name: str, fig, caption: str) -> None:
        self.files[name] = _png(fig)
        self.markdown.append(f"![{caption}]({name})\n")
        if self.pbar is not None:
            self.pbar.update(1)


def _add_timeline(out: ReportFiles, name: str, run: RunInput, title: str, label: str) -> None:
    """The run's timeline figure, or a line saying why there is none (``--steps-log none``)."""
    if run.steps_log[0] == "none":
        line = (f"(no timeline for {label}: the run was replayed with --steps-log none, so {run.path.name}/"
                f"steps.parquet has no rows; replay with --steps-log full or sampled for one)")
        out.terminal.append(line)
        out.markdown.append(line + "\n")
        return
    out.add_png(name, plot_timeline(run, title), f"timeline {label}")


def _report_runs(runs: list[RunInput], prefix: str, out: ReportFiles, table_rows: list[pd.DataFrame]) -> None:
    df = runs_table(runs)
    df.insert(0, "group", prefix.rstrip("_") or "runs")
    table_rows.append(df)
    disp = display_frame(df, ["label", "policy", "spec"])
    out.terminal += [f"runs ({len(runs)}):", text_table(display_frame(df, ["label"], compact=True)), ""]
    out.markdown += [f"## Runs ({len(runs)})\n", markdown_table(disp)]
    series = {r.label: r.requests for r in runs}
    out.add_png(f"{prefix}latency_cdf.png", plot_latency_cdf([("", series)], "Latency CDF per run"),
                "latency CDF per run")
    out.add_png(f"{prefix}accepted_per_step.png",
                plot_accepted_hist(series, "Tokens committed per decode step"), "tokens per decode step")
    for r in runs[:MAX_TIMELINES]:
        _add_timeline(out, f"{prefix}timeline_{_slug(r.label)}.png", r,
                      f"Batch size and speculation length over time — {r.label}", r.label)
    if len(runs) > MAX_TIMELINES:
        out.markdown.append(f"(timelines of the first {MAX_TIMELINES} of {len(runs)} runs)\n")


def _pick_rates(values: list[float], n: int) -> list[float]:
    values = sorted(set(values))
    if len(values) <= n:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in idx]


def _report_sweep(sw: SweepInput, prefix: str, out: ReportFiles, table_rows: list[pd.DataFrame]) -> None:
    t = sw.table
    df = t.copy()
    df.insert(0, "group", prefix.rstrip("_") or sw.name)
    table_rows.append(df)
    n_failed = int((t["status"] != "ok").sum())
    disp = display_frame(t, sw.axes + ["status"])
    head = f"sweep {sw.name} ({sw.path}): {len(t)} runs, {n_failed} failed"
    out.terminal += [head + ":", text_table(display_frame(t, sw.axes + ["status"], compact=True), max_rows=40), ""]
    out.markdown += [f"## Sweep {sw.name}\n", f"{len(t)} runs from `{sw.path}`, {n_failed} failed.\n",
                     markdown_table(disp)]
    if n_failed:
        failed = t[t["status"] != "ok"][sw.axes + ["error"]]
        out.markdown += ["### Failed runs\n", markdown_table(failed.astype(str))]
    ok = t[t["status"] == "ok"]
    if ok.empty:
        out.terminal.append(f"sweep {sw.name}: no finished runs to plot")
        return
    seed_min = ok["seed"].min() if "seed" in ok.columns else None

    def runs_for(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Requests of ``rows``, pooled over seeds, per series label."""
        series: dict[str, list[pd.DataFrame]] = {}
        for row in rows.itertuples(index=False):
            req = read_parquet(sw.path / row.run_dir / "requests.parquet",
                                  columns=["latency_s", "ttft_s", "mean_accepted_len"])
            series.setdefault(row.label, []).append(req)
        return {k: pd.concat(v, ignore_index=True) for k, v in series.items()}

    if sw.rate_axis is not None:
        rates = _pick_rates(ok["offered_rate_rps"].dropna().tolist(), MAX_CDF_RATES)
        panels = [(f"{r:.3g} req/s", runs_for(ok[np.isclose(ok["offered_rate_rps"], r)])) for r in rates]
        out.add_png(f"{prefix}latency_cdf.png",
                    plot_latency_cdf(panels, f"Latency CDF per policy/method — {sw.name} (seeds pooled)",
                                     ", ".join(sw.series_axes) or None),
                    "latency CDFs")
        out.add_png(f"{prefix}latency_vs_rate.png",
                    plot_vs_rate(sw, [("latency_ms_mean", "mean latency (s)", 1e-3),
                                      ("latency_ms_p99", "p99 latency (s)", 1e-3),
                                      ("ttft_ms_p99", "p99 TTFT (s)", 1e-3)],
                                 f"Latency vs request rate — {sw.name}"), "latency vs rate")
        out.add_png(f"{prefix}goodput_vs_rate.png",
                    plot_vs_rate(sw, [("slo_goodput_requests_per_s", "SLO goodput (req/s)", 1.0),
                                      ("slo_attainment", "SLO attainment (fraction)", 1.0),
                                      ("throughput_tokens_per_s", "throughput (output tok/s)", 1.0)],
                                 f"Goodput vs request rate — {sw.name}"), "goodput vs rate")
        mid = rates[len(rates) // 2]
        hist_rows = ok[np.isclose(ok["offered_rate_rps"], mid)]
        hist_title = f"Tokens committed per decode step — {sw.name} at {mid:.3g} req/s"
        top = ok[np.isclose(ok["offered_rate_rps"], ok["offered_rate_rps"].max())]
    else:
        out.add_png(f"{prefix}latency_cdf.png",
                    plot_latency_cdf([("", runs_for(ok))], f"Latency CDF per policy/method — {sw.name}",
                                     ", ".join(sw.series_axes) or None),
                    "latency CDFs")
        hist_rows = ok
        hist_title = f"Tokens committed per decode step — {sw.name}"
        top = ok
    out.add_png(f"{prefix}accepted_per_step.png", plot_accepted_hist(runs_for(hist_rows), hist_title),
                "tokens per decode step")
    if seed_min is not None:
        top = top[top["seed"] == top["seed"].min()]
    labels = top.drop_duplicates("label")
    picked = labels.head(MAX_TIMELINES)
    if len(labels) > MAX_TIMELINES:
        out.markdown.append(f"(timelines of the first {MAX_TIMELINES} of {len(labels)} series)\n")
    for row in picked.itertuples(index=False):
        run = sw.run(row.run_id)
        where = f" at {row.offered_rate_rps:.3g} req/s" if sw.rate_axis else ""
        _add_timeline(out, f"{prefix}timeline_{_slug(row.label)}.png", run,
                      f"Batch size and speculation length over time — {row.label}{where}", row.label)


def build_report(paths: list[str | Path], progress: bool = False) -> ReportFiles:
    """Tables and figures for ``paths`` (runs, directories of runs, sweeps), in memory
    (``progress``: a bar on stderr, counting plots, shown when the report takes over a second)."""
    if not paths:
        raise SimspecError("report: give at least one run or sweep directory")
    runs, sweeps = load_inputs(paths)
    out = ReportFiles()
    if progress:
        from tqdm import tqdm

        n_plots = (2 + min(len(runs), MAX_TIMELINES) if runs else 0) + sum(
            (4 if sw.rate_axis else 2) + min(sw.table["label"].nunique(), MAX_TIMELINES) for sw in sweeps)
        out.pbar = tqdm(total=n_plots, unit="plot", desc="report", delay=1.0, leave=False)
    out.markdown.append("# simspec report\n")
    out.markdown.append("Inputs: " + ", ".join(f"`{p}`" for p in paths) + "\n")
    groups = (1 if runs else 0) + len(sweeps)
    rows: list[pd.DataFrame] = []
    if runs:
        _report_runs(runs, "runs_" if groups > 1 else "", out, rows)
    used: set[str] = set()
    for sw in sweeps:
        pre = _slug(sw.name)
        while pre in used or pre == "runs":
            pre += "_"
        used.add(pre)
        _report_sweep(sw, f"{pre}_" if groups > 1 else "", out, rows)
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    out.files["summary.csv"] = table.to_csv(index=False).encode()
    lead = [c for c in ["group", "label"] + [a for sw in sweeps for a in sw.axes] + ["status"] if c in table]
    out.files["summary.md"] = markdown_table(display_frame(table, list(dict.fromkeys(lead)))).encode()
    out.files["report.md"] = "\n".join(out.markdown).encode()
    if out.pbar is not None:
        out.pbar.close()
        out.pbar = None
    return out


def write_report(paths: list[str | Path], out_dir: str | Path, force: bool = False,
                 progress: bool = False) -> ReportFiles:
    """Build the report and write its files into ``out_dir`` atomically (the directory appears
    complete or not at all; ``force`` replaces an existing simspec output). ``out_dir`` is checked
    before anything is read."""
    from simspec.atomic import atomic_dir, check_output_dir

    check_output_dir(out_dir, "report", force=force)
    rep = build_report(paths, progress=progress)
    with atomic_dir(out_dir, overwrite=force, kind="report") as tmp:
        for name, data in rep.files.items():
            (tmp / name).write_bytes(data)
    return rep
