"""Summary statistics of a trace (what ``simspec trace stats`` prints).

Definitions (all computed on the canonical trace, arrival-sorted):
  * ``span_s`` = last arrival − first arrival (seconds).
  * ``mean_rate_rps`` = (n − 1) / span_s = 1 / mean interarrival gap (requests/s); ``None`` when
    n < 2 or span_s = 0.
  * ``interarrival_cv`` = std / mean of the n − 1 gaps (population std, ddof = 0); 1 for Poisson,
    > 1 bursty; ``None`` when n < 2 or the mean gap is 0.
  * length percentiles: ``numpy.percentile`` with linear interpolation (p50, p90, p99), plus mean,
    min and max, in tokens.
  * class counts: requests per ``acceptance_class`` and per ``slo_class`` (sorted by name).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from simspec.trace import Trace


def mean_rate_rps(arrival_s: np.ndarray) -> float | None:
    """(n − 1) / span, requests per second; ``None`` if undefined."""
    a = np.asarray(arrival_s, dtype=np.float64)
    if a.size < 2:
        return None
    span = float(a.max() - a.min())
    return (a.size - 1) / span if span > 0 else None


def interarrival_cv(arrival_s: np.ndarray) -> float | None:
    """Coefficient of variation of the gaps between consecutive (sorted) arrivals."""
    a = np.sort(np.asarray(arrival_s, dtype=np.float64))
    if a.size < 2:
        return None
    gaps = np.diff(a)
    m = float(gaps.mean())
    return float(gaps.std() / m) if m > 0 else None


def length_summary(x: np.ndarray) -> dict[str, float]:
    """mean, p50, p90, p99, min, max of a length column (tokens)."""
    x = np.asarray(x, dtype=np.float64)
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": float(x.min()), "max": float(x.max())}


def trace_stats(trace: Trace) -> dict:
    """The statistics above as a JSON-ready dict."""
    a = trace.arrival_s
    return {
        "source": trace.source,
        "requests": len(trace),
        "first_arrival_s": float(a.min()),
        "last_arrival_s": float(a.max()),
        "span_s": float(a.max() - a.min()),
        "mean_rate_rps": mean_rate_rps(a),
        "interarrival_cv": interarrival_cv(a),
        "prompt_tokens": length_summary(trace.prompt_tokens),
        "output_tokens": length_summary(trace.output_tokens),
        "acceptance_classes": dict(sorted(Counter(str(c) for c in trace.acceptance_class).items())),
        "slo_classes": dict(sorted(Counter(str(c) for c in trace.slo_class).items())),
        "notes": list(trace.notes),
    }


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_stats(st: dict) -> str:
    """Human-readable multi-line rendering of :func:`trace_stats`."""
    lines = [
        f"trace            {st['source']}",
        f"requests         {st['requests']}",
        f"span_s           {st['span_s']:.3f}  (first {st['first_arrival_s']:.3f}, last {st['last_arrival_s']:.3f})",
        f"mean_rate_rps    {_num(st['mean_rate_rps'])}",
        f"interarrival_cv  {_num(st['interarrival_cv'])}",
    ]
    for col in ("prompt_tokens", "output_tokens"):
        s = st[col]
        lines.append(f"{col:<16} mean {s['mean']:.1f}  p50 {s['p50']:g}  p90 {s['p90']:g}  p99 {s['p99']:g}  "
                     f"min {s['min']:g}  max {s['max']:g}")
    lines.append("acceptance_class " + ", ".join(f"{k}={v}" for k, v in st["acceptance_classes"].items()))
    slo = {k: v for k, v in st["slo_classes"].items()}
    lines.append("slo_class        " + ", ".join(f"{k or '(none)'}={v}" for k, v in slo.items()))
    for n in st["notes"]:
        lines.append(f"note             {n}")
    return "\n".join(lines)
