"""Fit a tree method's per-token acceptance to a published or logged mean accepted length τ
(standard library + numpy; no torch).

A Spec-Bench-style figure — "#mean accepted tokens" τ (tokens committed per verification, the bonus
token included) of a method at its settings — does not say which per-token rate produced it; the
tree model (:mod:`simspec.simulator.acceptance_tree`) does, given the settings (depth, top-k, tokens
verified), the rank hazard h and, for n-gram lookup, the hit probability π. :func:`fit_beta_mean`
finds the mean m of a per-request Beta(m·c, (1−m)·c) spread (concentration c) whose average τ over
requests equals the target, by bisection (τ is increasing in α):

    E_{α ~ Beta}[1 + π · E[accepted | α]] = τ_target.

It fits the level only; the per-step distribution follows from the model. Used by
``benchmarks/study_tree_methods.py`` to turn Spec-Bench's per-method τ into acceptance entries.
"""

from __future__ import annotations

import numpy as np

from simspec.errors import SimspecError
from simspec.simulator.acceptance_tree import TreeAcceptance, max_nodes

GRID = 201  # quadrature points over α in (0, 1)


def tau_curve(depth: int, topk: int, tokens: int, rank_hazard: float, frontier: bool = True,
              hit: float = 1.0, position_conditional: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(α grid, τ(α)) for one tree configuration: 1 + π·E[accepted] of a tokens−1 node tree."""
    if tokens - 1 > max_nodes(depth, topk, frontier):
        raise SimspecError(f"tokens {tokens}: a depth-{depth}, top-{topk} tree has at most "
                           f"{max_nodes(depth, topk, frontier)} draft nodes")
    entry = {"alpha": {"kind": "fixed", "value": 0.5}, "rank_hazard": rank_hazard}
    if position_conditional:
        entry["position_conditional"] = position_conditional
    acc = TreeAcceptance([entry], depth, topk, tokens - 1, frontier, ["fit"])
    a = np.linspace(0.0, 1.0, GRID + 2)[1:-1]
    tau = np.array([1.0 + hit * acc.expected_accepted(float(x), 0, tokens - 1) for x in a])
    return a, tau


def beta_weights(a: np.ndarray, mean: float, concentration: float) -> np.ndarray:
    w = a ** (mean * concentration - 1.0) * (1.0 - a) ** ((1.0 - mean) * concentration - 1.0)
    return w / w.sum()


def fit_beta_mean(tau_target: float, curve: tuple[np.ndarray, np.ndarray], concentration: float = 10.0) -> float:
    """The Beta mean m (concentration c) whose request-averaged τ is ``tau_target``."""
    a, tau = curve
    lo_tau = float((beta_weights(a, 0.02, concentration) * tau).sum())
    hi_tau = float((beta_weights(a, 0.98, concentration) * tau).sum())
    if not lo_tau <= tau_target <= hi_tau:
        raise SimspecError(f"tau {tau_target}: outside what this configuration reaches "
                           f"({lo_tau:.3f}..{hi_tau:.3f})")
    lo, hi = 0.02, 0.98
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float((beta_weights(a, mid, concentration) * tau).sum()) < tau_target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
