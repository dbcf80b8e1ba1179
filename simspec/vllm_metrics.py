"""The metrics ``vllm bench serve`` reports, under vLLM's names, computed from a run's requests.

``vllm bench serve`` (vLLM's serving benchmark) reports, for the requests of one benchmark:

- ``completed``, ``duration`` (s, first send to last completion), ``total_input_tokens``,
  ``total_output_tokens``;
- ``request_throughput`` (completed requests / duration), ``output_throughput`` (output tokens /
  duration), ``total_token_throughput`` ((input + output tokens) / duration);
- for each of ``ttft`` (time to first token), ``tpot`` (time per output token after the first:
  (e2el - ttft) / (output tokens - 1), requests with more than one output token), ``itl``
  (inter-token latency: the gaps between successive streamed chunks of a request) and ``e2el``
  (end-to-end latency): ``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms`` and ``p<P>_<m>_ms``
  for P in 90, 95, 99;
- ``request_goodput`` with ``--goodput ttft:X tpot:Y e2el:Z`` (ms, any subset): completed requests
  per second of duration that meet *every* given bound (a request with one output token counts
  TPOT 0, as vLLM does).

simspec's run has one arrival-time origin (the first arrival, like vLLM's first send), so
``duration`` is the run's makespan.

ITL is ``vllm bench serve``'s: one sample per streamed chunk after a request's first, the time
since its previous chunk, pooled over all requests. vLLM streams all tokens one engine step
commits for a request as one chunk, so with speculative decoding a step committing several tokens
gives one sample (vLLM's client does not add zero gaps for the extra tokens). The engine records
every gap (:mod:`simspec.simulator.itl`); mean, median, std and percentiles are exact over them
(numpy's default linear percentile, as vLLM). TPOT differs: a per-request mean over output
tokens, so it falls with speculation where ITL does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from simspec.errors import ConfigError
from simspec.simulator.itl import ItlSamples

VLLM_PERCENTILES = (90, 95, 99)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class GoodputSLO:
    """``--goodput`` bounds in ms (None: not part of the criterion), as ``vllm bench serve``."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items) -> "GoodputSLO | None":
        """``["ttft:500 tpot:50", "e2el:2000"]`` (space or comma separated KEY:MS pairs) → bounds."""
        pairs = [p for item in (items or ()) for p in str(item).replace(",", " ").split()]
        if not pairs:
            return None
        out: dict[str, float] = {}
        for p in pairs:
            key, colon, val = p.partition(":")
            key = key.strip().lower()
            if not colon or key not in GOODPUT_METRICS:
                raise ConfigError(f"--goodput {p[:80]!r}: expected KEY:MS with KEY one of "
                                  f"{', '.join(GOODPUT_METRICS)} (e.g. --goodput 'ttft:500 tpot:50')")
            if key in out:
                raise ConfigError(f"--goodput: {key} given twice")
            try:
                ms = float(val)
            except ValueError:
                raise ConfigError(f"--goodput {p[:80]!r}: {val[:40]!r} is not a number of ms") from None
            if not (math.isfinite(ms) and ms > 0):
                raise ConfigError(f"--goodput {p[:80]!r}: must be a finite number of ms > 0")
            out[key] = ms
        return cls(ttft_ms=out.get("ttft"), tpot_ms=out.get("tpot"), e2el_ms=out.get("e2el"))

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms))
                if v is not None}

    def describe(self) -> str:
        return " ".join(f"{k}:{v:g}" for k, v in self.to_dict().items())


def _dist(prefix: str, x: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float | None]:
    keys = [f"mean_{prefix}_ms", f"median_{prefix}_ms", f"std_{prefix}_ms"] + \
           [f"p{p}_{prefix}_ms" for p in VLLM_PERCENTILES]
    if x.size == 0:
        return dict.fromkeys(keys)
    if weights is None:
        vals = [float(np.mean(x)), float(np.median(x)), float(np.std(x))] + \
               [float(np.percentile(x, p)) for p in VLLM_PERCENTILES]
    else:  # each value repeated `weights` times, without building the repeated array
        order = np.argsort(x, kind="stable")
        xs, ws = x[order], weights[order].astype(np.float64)
        mean = float(np.sum(xs * ws) / ws.sum())
        std = float(math.sqrt(max(float(np.sum(ws * (xs - mean) ** 2) / ws.sum()), 0.0)))
        cum = np.cumsum(ws)
        n = cum[-1]

        def pct(p: float) -> float:  # numpy's linear method on the expanded sample
            pos = (p / 100.0) * (n - 1)
            lo, hi = math.floor(pos), math.ceil(pos)
            a = xs[np.searchsorted(cum, lo + 1)]
            b = xs[np.searchsorted(cum, hi + 1)]
            return float(a + (b - a) * (pos - lo))

        vals = [mean, pct(50), std] + [pct(p) for p in VLLM_PERCENTILES]
    return dict(zip(keys, vals))


def vllm_bench_metrics(req: pd.DataFrame, duration_s: float, itl: ItlSamples) -> dict[str, Any]:
    """``vllm bench serve``'s metrics (names as in its result JSON) for a requests frame and the
    run's ITL samples."""
    n = int(len(req))
    out_tok = int(req["output_tokens"].sum())
    in_tok = int(req["prompt_tokens"].sum())
    ok = duration_s > 0
    s: dict[str, Any] = {"completed": n, "duration": float(duration_s), "total_input_tokens": in_tok,
                         "total_output_tokens": out_tok,
                         "request_throughput": n / duration_s if ok else None,
                         "output_throughput": out_tok / duration_s if ok else None,
                         "total_token_throughput": (in_tok + out_tok) / duration_s if ok else None}
    ttft = req["ttft_s"].to_numpy(float) * 1000.0
    e2el = req["latency_s"].to_numpy(float) * 1000.0
    out = req["output_tokens"].to_numpy()
    tpot = np.where(out > 1, (e2el - ttft) / np.maximum(out - 1, 1), np.nan)
    s.update(_dist("ttft", ttft[~np.isnan(ttft)]))
    s.update(_dist("tpot", tpot[~np.isnan(tpot)]))
    s.update(_dist("itl", itl.values_ms, itl.counts))
    s.update(_dist("e2el", e2el[~np.isnan(e2el)]))
    return s


def vllm_goodput(req: pd.DataFrame, duration_s: float, slo: GoodputSLO) -> dict[str, Any]:
    """``request_goodput`` (req/s meeting every bound of ``slo``) and the bounds used."""
    ttft = req["ttft_s"].to_numpy(float) * 1000.0
    e2el = req["latency_s"].to_numpy(float) * 1000.0
    out = req["output_tokens"].to_numpy()
    tpot = np.where(out > 1, (e2el - ttft) / np.maximum(out - 1, 1), 0.0)
    good = np.ones(len(req), dtype=bool)
    for bound, x in ((slo.ttft_ms, ttft), (slo.tpot_ms, tpot), (slo.e2el_ms, e2el)):
        if bound is not None:
            good &= x <= bound
    return {"request_goodput": float(good.sum()) / duration_s if duration_s > 0 else None,
            "goodput_slo_ms": slo.to_dict()}
