"""Fit a tree method's per-token acceptance to a published or logged mean accepted length τ
(standard library + numpy; no torch).

A Spec-Bench-style figure — "#mean accepted tokens" τ (tokens committed per verification, the bonus
token included) of a method at its settings — does not say which per-token rate produced it; the
tree model (:mod:`simspec.simulator.acceptance_tree`) does, given the settings (depth, top-k, tokens
verified), the rank hazard h and, for n-gram lookup, the hit probability π. :func:`fit_beta_mean`
finds the mean m of a per-request Beta(m·c, (1−m)·c) spread (concentration c) whose τ over the
population equals the target, by bisection (τ is increasing in α); τ(α) = 1 + π·E[accepted | α],
averaged per step (1 / E_α[1/τ(α)], as Spec-Bench averages accept lengths over steps) by default.

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


def mean_tau(curve: tuple[np.ndarray, np.ndarray], mean: float, concentration: float, per_step: bool = True) -> float:
    """τ over a Beta(mean, concentration) population of requests: per step (tokens over steps, the
    way Spec-Bench averages accept lengths — for equal output lengths the harmonic mean of the
    requests' τ) or, with ``per_step=False``, the plain mean over requests."""
    a, tau = curve
    w = beta_weights(a, mean, concentration)
    return float(1.0 / (w / tau).sum()) if per_step else float((w * tau).sum())


def fit_beta_mean(tau_target: float, curve: tuple[np.ndarray, np.ndarray], concentration: float = 10.0,
                  per_step: bool = True) -> float:
    """The Beta mean m (concentration c) whose population τ (:func:`mean_tau`) is ``tau_target``."""
    lo_tau = mean_tau(curve, 0.02, concentration, per_step)
    hi_tau = mean_tau(curve, 0.98, concentration, per_step)
    if not lo_tau <= tau_target <= hi_tau:
        raise SimspecError(f"tau {tau_target}: outside what this configuration reaches "
                           f"({lo_tau:.3f}..{hi_tau:.3f})")
    lo, hi = 0.02, 0.98
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if mean_tau(curve, mid, concentration, per_step) < tau_target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


TREE_METHODS = ("tree", "eagle", "eagle3", "mtp", "medusa", "ngram")


def alpha_for_tau(tau: float, curve: tuple[np.ndarray, np.ndarray]) -> float:
    """The per-token level whose τ(α) (the curve, increasing) equals ``tau``, clipped to the grid."""
    a, t = curve
    return float(np.interp(tau, t, a, left=a[0], right=a[-1]))


def _beta_moments(x: np.ndarray) -> dict:
    m, v = float(x.mean()), float(x.var())
    if x.size < 2 or v <= 0 or v >= m * (1 - m):
        c = 10.0  # too few or too spread requests for moments: the default concentration
    else:
        c = m * (1 - m) / v - 1.0
    return {"kind": "beta", "a": round(max(m * c, 1e-3), 5), "b": round(max((1 - m) * c, 1e-3), 5)}


def import_spec_bench_tree(path, method: str, depth: int, topk: int, tokens: int, rank_hazard: float | None,
                           hit: float | None = None) -> dict:
    """The acceptance section (``{class: entry}`` plus ``default``) a Spec-Bench answer file of a tree
    method encodes: each request's mean accept length is inverted through the tree model's τ(α) at
    the given settings (``rank_hazard`` needed when ``topk`` > 1; ``hit`` the n-gram hit probability)
    into its own level α_r, and each class's levels get a Beta by moments. Each entry records the
    settings, the observed τ and the τ its fitted Beta implies (``fit.tau_model``)."""
    from simspec.calibrate.importer import read_spec_bench

    if method not in TREE_METHODS:
        raise SimspecError(f"--method {method}: not a tree method ({', '.join(TREE_METHODS)})")
    if topk > 1 and rank_hazard is None:
        raise SimspecError("--rank-hazard: needed for a tree with --topk > 1")
    if method == "ngram" and hit is None:
        raise SimspecError("--hit-probability: needed for ngram (the log's τ mixes hits and misses)")
    h = 0.0 if rank_hazard is None else float(rank_hazard)
    curve = tau_curve(depth, topk, tokens, h, frontier=method != "medusa", hit=1.0 if hit is None else hit)
    rows = read_spec_bench(path)
    longest = max(max(al) for _, _, al in rows)
    if longest > depth + 1:
        raise SimspecError(f"acceptance log {path}: an accept length of {longest} needs --depth >= {longest - 1}")
    by_cls: dict[str, list[tuple[float, int, int]]] = {}
    for cls, _qid, al in rows:
        by_cls.setdefault(cls, []).append((alpha_for_tau(sum(al) / len(al), curve), sum(al), len(al)))
    settings = {"depth": depth, "topk": topk, "tokens": tokens, "source": f"imported from {path} (Spec-Bench "
                f"accept_lengths, tree model inverted per request)"}
    out: dict = {}
    groups = {**by_cls, "default": [r for v in by_cls.values() for r in v]}
    for cls, reqs in groups.items():
        lv = np.array([r[0] for r in reqs])
        alpha = _beta_moments(lv)
        m, c = alpha["a"] / (alpha["a"] + alpha["b"]), alpha["a"] + alpha["b"]
        tau_model = float((beta_weights(curve[0], m, c) * curve[1]).sum())
        entry = {"alpha": alpha, "mean_tokens_per_step": round(sum(r[1] for r in reqs) / sum(r[2] for r in reqs), 4),
                 "n_requests": len(reqs), "n_steps": int(sum(r[2] for r in reqs)), "settings": settings,
                 "fit": {"tau_model": round(tau_model, 4), "alpha_levels_mean": round(float(lv.mean()), 4)}}
        if rank_hazard is not None:
            entry["rank_hazard"] = h
        if hit is not None:
            entry["hit_probability"] = float(hit)
        out[cls] = entry
    return out
