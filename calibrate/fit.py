"""Turn measured points into profile latency models and score them on held-out points
(numpy only; no torch).

A stage is measured on a full grid ``batch_size × tokens_per_request × context_tokens`` (the training
points) and, separately, on off-grid shapes (the held-out points). Two candidate models are built
from the training points:

- ``grid``: the table of measured medians, made non-decreasing along the context axis (attending
  over more cached tokens is never cheaper, so a dip there is measurement noise; an isotonic fit
  removes it) and interpolated multilinearly by
  :func:`simspec.simulator.latency_models.compile_stage`. Along batch and tokens the medians are
  kept as measured: real kernels are not monotone there (on a CPU, MKL's GEMM for 4-15 rows is
  slower than for 16), and the profile should say so;
- ``linear``: ``c0 + c_b*B + c_t*batched_tokens + c_kv*kv_tokens`` by non-negative least squares
  on relative error (every point weighs the same in percent; no coefficient below zero).

Each candidate is scored on the held-out points with the very function the simulator uses
(``compile_stage``), as the mean absolute percentage error; the stage keeps the candidate with the
lower held-out error and records it in ``fit`` (``heldout_mape_pct``, ``heldout_max_ape_pct``,
``n_train``, ``n_heldout``, the rival's error). Without held-out points, a share of grid points is
not usable (a grid needs every node), so the error is reported as ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from simspec.simulator.latency_models import compile_stage


@dataclass(frozen=True)
class Point:
    """One measured shape: per-request ``tokens_per_request`` and ``context_tokens``; ``median_ms``
    and ``spread_ms`` (interquartile range) over ``n`` timed repeats."""

    batch_size: int
    tokens_per_request: int
    context_tokens: int
    median_ms: float
    spread_ms: float
    n: int = 0

    @property
    def batched_tokens(self) -> int:
        return self.batch_size * self.tokens_per_request

    @property
    def kv_tokens(self) -> int:
        return self.batch_size * self.context_tokens

    def sample_row(self) -> list[float]:
        """``[B, batched_tokens, kv_tokens, median_ms, spread_ms]`` as stored in ``samples``."""
        return [self.batch_size, self.batched_tokens, self.kv_tokens, round(self.median_ms, 6),
                round(self.spread_ms, 6)]


def isotonic_1d(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit of a sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: list[float] = []
    for s, c in blocks:
        out.extend([s / c] * int(c))
    return out


def monotone_table(table: np.ndarray, axes: Sequence[int] = (2, 1, 0)) -> np.ndarray:
    """Make a 3-D table non-decreasing along the given axes: isotonic fit along each in turn. An
    average of non-decreasing sequences is non-decreasing, so each pass keeps the monotonicity the
    earlier passes produced."""
    t = np.array(table, dtype=float)
    for axis in axes:
        t = np.apply_along_axis(lambda v: np.asarray(isotonic_1d(v)), axis, t)
    return t


def grid_model(points: Iterable[Point], batch_sizes: Sequence[int], tokens: Sequence[int],
               contexts: Sequence[int], *, monotone: bool = True,
               fill: Any = None) -> dict[str, Any]:
    """A ``grid`` latency model from measured grid points. Every node must be present, unless
    ``fill(B, T, C) -> ms`` is given: it supplies the nodes that were not measured (listed in the
    result's ``filled_nodes``)."""
    idx = {(p.batch_size, p.tokens_per_request, p.context_tokens): p.median_ms for p in points}
    table = np.empty((len(batch_sizes), len(tokens), len(contexts)))
    filled: list[list[int]] = []
    for i, b in enumerate(batch_sizes):
        for j, t in enumerate(tokens):
            for k, c in enumerate(contexts):
                if (b, t, c) not in idx:
                    if fill is None:
                        raise ValueError(f"grid point B={b} T={t} C={c} was not measured")
                    table[i, j, k] = float(fill(b, t, c))
                    filled.append([int(b), int(t), int(c)])
                else:
                    table[i, j, k] = idx[(b, t, c)]
    if monotone:
        table = monotone_table(table, axes=(2,))
    return {"kind": "grid",
            "axes": {"batch_size": [int(b) for b in batch_sizes],
                     "tokens_per_request": [int(t) for t in tokens],
                     "context_tokens": [int(c) for c in contexts]},
            "ms": [[[round(float(v), 6) for v in row] for row in plane] for plane in table],
            **({"filled_nodes": filled} if filled else {})}


def linear_model(points: Sequence[Point], *, use_kv: bool = True) -> dict[str, Any]:
    """A ``linear`` model by non-negative least squares on relative error (rows scaled by
    1/median): every coefficient >= 0, so predicted cost never falls when a step has more requests,
    tokens or context, and never goes negative."""
    try:
        from scipy.optimize import nnls
    except ImportError:  # a bare GPU machine: numpy only (exact for these few columns)
        nnls = _nnls_small

    x = np.array([[1.0, p.batch_size, p.batched_tokens, p.kv_tokens if use_kv else 0.0] for p in points])
    y = np.array([p.median_ms for p in points])
    w = 1.0 / np.maximum(y, 1e-9)
    cols = [0, 1, 2, 3] if use_kv else [0, 1, 2]
    coef_sub, _ = nnls(x[:, cols] * w[:, None], y * w)
    coef = np.zeros(4)
    coef[cols] = coef_sub
    return {"kind": "linear",
            "coef": {"c0": float(coef[0]), "c_b": float(coef[1]), "c_t": float(coef[2]),
                     "c_kv": float(coef[3])}}


def _nnls_small(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares for a few columns by enumerating the active sets (numpy only):
    the unconstrained least squares on every subset of columns, keeping the best feasible one."""
    import itertools

    n = a.shape[1]
    best, best_res = np.zeros(n), float(np.linalg.norm(y))
    for r in range(1, n + 1):
        for cols in itertools.combinations(range(n), r):
            sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if np.all(sol >= 0):
                x = np.zeros(n)
                x[list(cols)] = sol
                res = float(np.linalg.norm(a @ x - y))
                if res < best_res - 1e-12:
                    best, best_res = x, res
    return best, best_res


def heldout_errors(model: dict[str, Any], points: Sequence[Point]) -> list[float]:
    """Absolute percentage error of ``model`` (evaluated by the simulator's ``compile_stage``) at
    each held-out point."""
    fn = compile_stage(model, {})
    return [abs(fn(p.batch_size, p.batched_tokens, p.kv_tokens) - p.median_ms) / p.median_ms * 100.0
            for p in points]


def _summary(errors: Sequence[float]) -> tuple[float | None, float | None]:
    if not errors:
        return None, None
    return round(float(np.mean(errors)), 3), round(float(np.max(errors)), 3)


def fit_stage(train: Sequence[Point], heldout: Sequence[Point], batch_sizes: Sequence[int],
              tokens: Sequence[int], contexts: Sequence[int], *,
              candidates: Sequence[str] = ("grid", "linear"), fill_missing: bool = False) -> dict[str, Any]:
    """Fit one stage: build the candidate models, score them on ``heldout``, keep the better one.

    With ``fill_missing``, grid nodes that were not measured (shapes skipped for memory, window or
    token budget) are filled with the linear model's prediction and listed in
    ``fit.filled_nodes``; without it every node must be present.

    Returns the stage document (``kind`` and its parameters, ``fit``, ``valid``, ``samples``,
    ``heldout_samples``).
    """
    built: dict[str, dict[str, Any]] = {}
    lin = linear_model(train, use_kv=len(set(contexts)) > 1)
    fill = None
    if fill_missing:
        co = lin["coef"]

        def fill(b: int, t: int, c: int) -> float:
            return max(co["c0"] + co["c_b"] * b + co["c_t"] * b * t + co["c_kv"] * b * c, 1e-6)
    filled: list[list[int]] = []
    if "grid" in candidates:
        built["grid"] = grid_model(train, batch_sizes, tokens, contexts, fill=fill)
        filled = built["grid"].pop("filled_nodes", [])
    if "linear" in candidates:
        built["linear"] = lin
    scores = {kind: _summary(heldout_errors(m, heldout)) for kind, m in built.items()}
    if heldout:
        best = min(built, key=lambda k: scores[k][0])
    else:
        best = "grid" if "grid" in built else next(iter(built))
    doc = dict(built[best])
    mape, max_ape = scores[best]
    doc["fit"] = {
        "method": ("measured medians, isotonic (non-decreasing) along context; multilinear "
                   "interpolation over per-request means" if best == "grid" else
                   "non-negative least squares on relative error over the grid points"),
        "heldout_mape_pct": mape, "heldout_max_ape_pct": max_ape,
        "n_train": len(train), "n_heldout": len(heldout),
        **({"filled_nodes": filled, "filled_with": "the linear candidate's prediction (node not measured)"}
           if filled else {}),
        "candidates": {k: {"heldout_mape_pct": s[0], "heldout_max_ape_pct": s[1]} for k, s in scores.items()},
    }
    doc["valid"] = {"batch_size": [int(min(batch_sizes)), int(max(batch_sizes))],
                    "tokens_per_request": [int(min(tokens)), int(max(tokens))],
                    "context_tokens": [int(min(contexts)), int(max(contexts))]}
    doc["samples"] = [p.sample_row() for p in train]
    doc["heldout_samples"] = [p.sample_row() for p in heldout]
    return doc


def fit_forward_overhead(measured_ms: Sequence[float], composed_ms: Sequence[float]) -> dict[str, Any]:
    """The per-forward overhead of a layer-level profile: the intercept ``a`` of
    ``measured whole forward = a + 1 · (embed + N·layer + lm_head composed from the fitted stages)``,
    the slope fixed at 1 (the stages already carry the shape dependence; the intercept is what a
    forward pays once, outside its parts: the model's own prelude, Python module dispatch,
    allocator work). Fitted as the median of ``measured − composed`` (robust to one disturbed
    point), clipped at 0 (a negative intercept means the parts overstate the whole, not a negative
    cost). Returns ``{"target_ms", "n", "residuals_ms", "composed_mape_pct",
    "with_overhead_mape_pct"}`` (the last two: the composition error without and with it)."""
    m = np.asarray(measured_ms, dtype=float)
    c = np.asarray(composed_ms, dtype=float)
    if m.shape != c.shape or m.size == 0:
        raise ValueError("fit_forward_overhead: need as many composed as measured points, at least one")
    diff = m - c
    a = max(float(np.median(diff)), 0.0)
    err0 = np.abs(c - m) / m * 100.0
    err1 = np.abs(c + a - m) / m * 100.0
    return {"target_ms": round(a, 6), "n": int(m.size), "residuals_ms": [round(float(d - a), 6) for d in diff],
            "composed_mape_pct": round(float(err0.mean()), 3),
            "with_overhead_mape_pct": round(float(err1.mean()), 3)}
