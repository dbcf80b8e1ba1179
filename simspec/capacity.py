"""Capacity search: the highest request rate at which an SLO holds, by bisection over the rate.

The trace's arrival times are rescaled to each candidate mean rate (``(n-1)/span`` req/s, as
:func:`simspec.traces.transforms.rescale_rate` does, so the shape of the arrivals is kept) and the
run is simulated. The SLO holds when

- ``p99`` (default): p99 TTFT ≤ ``ttft_ms`` and p99 TPOT ≤ ``tpot_ms`` (each if given), or
- ``attainment``: the fraction of requests meeting both thresholds ≥ the target (e.g. 0.9).

Bisection keeps ``lo`` (SLO holds) and ``hi`` (SLO fails) and stops when ``hi - lo <= tol``; the
capacity is ``lo``, so it is within ``tol`` below the boundary. It assumes the SLO holds below some
rate and fails above it (true in expectation; a random stream can make a single seed's curve
slightly non-monotone, in which case the result is *a* boundary within the bracket). If the SLO
already fails at ``rate_lo`` the capacity is reported as below the range; if it holds at
``rate_hi``, as at least ``rate_hi``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from simspec.errors import ConfigError

STATUS_OK = "ok"
STATUS_BELOW = "below-range"   # fails already at rate_lo
STATUS_ABOVE = "above-range"   # holds even at rate_hi


@dataclass(frozen=True)
class SLO:
    """Latency thresholds (ms) and the criterion: ``attainment`` None → p99 of each ≤ threshold."""

    ttft_ms: float | None
    tpot_ms: float | None
    attainment: float | None = None

    def __post_init__(self) -> None:
        if self.ttft_ms is None and self.tpot_ms is None:
            raise ConfigError("capacity: give --slo-ttft-ms and/or --slo-tpot-ms")
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"--slo-{name.replace('_', '-')}: must be > 0, got {v}")
        if self.attainment is not None and not (0 < self.attainment <= 1):
            raise ConfigError(f"--attainment: must be in (0, 1], got {self.attainment}")

    @property
    def criterion(self) -> str:
        return "p99" if self.attainment is None else "attainment"

    def holds(self, summary: dict[str, Any]) -> bool:
        """Whether a run's summary (computed with these thresholds) meets the SLO."""
        if self.attainment is not None:
            att = summary.get("slo_attainment")
            return att is not None and att >= self.attainment
        if self.ttft_ms is not None and not (summary["ttft_ms_p99"] <= self.ttft_ms):
            return False
        tpot = summary.get("tpot_ms_p99")
        if self.tpot_ms is not None and tpot is not None and not (tpot <= self.tpot_ms):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.ttft_ms is not None:
            parts.append(f"TTFT <= {self.ttft_ms:g} ms")
        if self.tpot_ms is not None:
            parts.append(f"TPOT <= {self.tpot_ms:g} ms")
        if self.attainment is None:
            return "p99 " + " and p99 ".join(parts)
        return f">= {self.attainment:.0%} of requests with " + " and ".join(parts)


@dataclass
class Evaluation:
    """One simulated point of the search."""

    rate_rps: float
    holds: bool
    ttft_ms_p99: float | None
    tpot_ms_p99: float | None
    slo_attainment: float | None
    latency_ms_p99: float | None


@dataclass
class CapacityResult:
    """The search for one policy/method: ``capacity_rps`` (None when below the range)."""

    policy: str
    spec: str
    spec_len: str
    capacity_rps: float | None
    status: str
    bracket_rps: tuple[float, float] | None
    evaluations: list[Evaluation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bracket_rps"] = list(self.bracket_rps) if self.bracket_rps else None
        return d

    @property
    def at_capacity(self) -> Evaluation | None:
        if self.capacity_rps is None:
            return None
        return next((e for e in self.evaluations if e.rate_rps == self.capacity_rps), None)


def evaluate_rate(config, trace, profile, rate_rps: float, slo: SLO) -> Evaluation:
    """Simulate ``trace`` rescaled to ``rate_rps`` under ``config`` and check ``slo``."""
    from simspec.simulator.run import simulate
    from simspec.traces.transforms import rescale_rate

    # only the summary is read: no step log (the summary counts every step whatever the log keeps)
    cfg = dataclasses.replace(config, slo_ttft_ms=slo.ttft_ms, slo_tpot_ms=slo.tpot_ms, steps_log="none")
    summ = simulate(cfg, rescale_rate(trace, rate=rate_rps), profile).summary
    return Evaluation(rate_rps=float(rate_rps), holds=slo.holds(summ), ttft_ms_p99=summ.get("ttft_ms_p99"),
                      tpot_ms_p99=summ.get("tpot_ms_p99"), slo_attainment=summ.get("slo_attainment"),
                      latency_ms_p99=summ.get("latency_ms_p99"))


def check_range(rate_lo: float, rate_hi: float, tol_rps: float) -> None:
    for name, v in (("--rate-lo", rate_lo), ("--rate-hi", rate_hi), ("--tol", tol_rps)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name}: must be a finite number > 0, got {v!r}")
    if rate_hi <= rate_lo:
        raise ConfigError(f"--rate-hi ({rate_hi:g}) must be greater than --rate-lo ({rate_lo:g})")


def max_evaluations(rate_lo: float, rate_hi: float, tol_rps: float) -> int:
    """Most simulations one search takes: both ends, then one per halving of the bracket."""
    import math

    return 2 + max(0, math.ceil(math.log2((rate_hi - rate_lo) / tol_rps))) if tol_rps > 0 else 2


def search_capacity(config, trace, profile, slo: SLO, rate_lo: float, rate_hi: float,
                    tol_rps: float, on_eval=None) -> CapacityResult:
    """Bisection over the request rate in [``rate_lo``, ``rate_hi``] req/s to within ``tol_rps``
    (``on_eval()`` is called after each simulation, for progress)."""
    check_range(rate_lo, rate_hi, tol_rps)
    evals: list[Evaluation] = []

    def ev(rate: float) -> bool:
        e = evaluate_rate(config, trace, profile, rate, slo)
        evals.append(e)
        if on_eval is not None:
            on_eval()
        return e.holds

    names = (str(config.scheduler), str(config.method), str(config.spec_len))
    if not ev(rate_lo):
        return CapacityResult(*names, capacity_rps=None, status=STATUS_BELOW, bracket_rps=None, evaluations=evals)
    if ev(rate_hi):
        return CapacityResult(*names, capacity_rps=float(rate_hi), status=STATUS_ABOVE, bracket_rps=None,
                              evaluations=evals)
    lo, hi = float(rate_lo), float(rate_hi)
    while hi - lo > tol_rps:
        mid = 0.5 * (lo + hi)
        if ev(mid):
            lo = mid
        else:
            hi = mid
    return CapacityResult(*names, capacity_rps=lo, status=STATUS_OK, bracket_rps=(lo, hi), evaluations=evals)


def split_components(text: str) -> list[str]:
    """Split a comma list of ``NAME[:k=v,...]`` specs: an item with ``=`` and no ``:`` is a
    parameter of the previous spec (``none,draft:k=4,kangaroo:exit=2,gamma=6`` → three specs)."""
    out: list[str] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def capacity_task(task: dict[str, Any], on_eval=None) -> dict[str, Any]:
    """Worker entry point (plain data in and out): search one policy/method combination."""
    from simspec.simulator.config import RunConfig
    from simspec.sweep import _load_run_profile, load_run_trace

    trace = load_run_trace(task["trace"], task["format"], task["trace_sha256"], task["transforms"], task["seed"])
    profile = _load_run_profile(task["profile"], task["profile_sha256"])
    slo = SLO(**task["slo"])
    res = search_capacity(RunConfig.from_dict(task["run_config"]), trace, profile, slo, task["rate_lo"],
                          task["rate_hi"], task["tol_rps"], on_eval=on_eval)
    return res.to_dict()


def result_from_dict(d: dict[str, Any]) -> CapacityResult:
    evals = [Evaluation(**e) for e in d["evaluations"]]
    return CapacityResult(policy=d["policy"], spec=d["spec"], spec_len=d["spec_len"], capacity_rps=d["capacity_rps"],
                          status=d["status"], bracket_rps=tuple(d["bracket_rps"]) if d["bracket_rps"] else None,
                          evaluations=evals)
