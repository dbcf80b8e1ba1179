"""Fit profile acceptance entries from per-step speculative-decoding logs (numpy + scipy; no torch).

Input: per request, its steps ``(offered k, accepted m)`` — ``m`` is the accepted prefix of the ``k``
tokens the final verifier checked — plus, where the method has them, each draft's top-1 probability
(Kangaroo) or HiSpec's inner rounds ``(drafts N_d, accepted by the intermediate exit j)``.

What an entry holds and how it is fitted (``simspec.profile`` defines the simulator's semantics: a
request draws ``α_r ~ alpha`` and accepts draft ``i`` given drafts ``< i`` with probability
``min(1, α_r * s_i)``, ``s_i = a_i / mean(a)``):

1. ``position_conditional`` ``a_i``: pooled over all steps, accepted at ``i`` / offered at ``i`` with
   ``i - 1`` accepted; trailing positions offered fewer than ``min_exposure`` (default 10) times are
   dropped (the simulator reuses the last value past the list).
2. Per request, the maximum-likelihood ``α_r`` under that shape (raw values kept in
   ``per_request.alpha_mle``, with the plain per-request accepted/offered rates).
3. ``alpha``: a Beta by the method of moments over the ``α_r``; then its mean is moved (concentration
   kept) until the model's pooled tokens per step equals the measured ``mean_tokens_per_step``
   (``fit`` records both). Pooled over steps means ``1 / E_α[1 / τ(α)]`` — each request makes the same
   number of tokens, so slow requests contribute more steps.
4. ``τ(α)`` (expected tokens per verification at level ``α``) per method: draft — ``1 + Σ_i Π_{j≤i} p_j``
   averaged over the offered-``k`` distribution; Kangaroo — drafting continues past draft ``i`` only if
   it is confident (``P(conf ≥ η | accepted, i)`` from ``confidence``), so
   ``τ = 1 + Σ_i p_i Π_{j<i} p_j c_j``; HiSpec — over the buffer-length distribution that the
   ``draft_vs_inter`` model implies.
5. ``heldout``: the entry fitted on the other prompts predicts the held-out prompts' pooled tokens per
   step; ``abs_error_pct`` = |predicted − measured| / measured · 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

CONF_BIN_EDGES = [round(0.05 * i, 2) for i in range(21)]
QUAD_POINTS = 128


@dataclass
class RequestLog:
    """One request's steps. ``offered[s]``, ``accepted[s]`` per step; ``drafts[s]`` drafts made;
    ``confidences[s]`` per draft (optional); ``inner[s]`` HiSpec rounds as ``(n_draft, inter_accepted)``
    pairs (optional). ``tokens``: tokens generated in all."""

    cls: str
    offered: list[int]
    accepted: list[int]
    drafts: list[int] = field(default_factory=list)
    confidences: list[list[float]] | None = None
    inner: list[list[tuple[int, int]]] | None = None
    tokens: int = 0
    request_id: Any = None

    @property
    def n_steps(self) -> int:
        return len(self.accepted)


def from_run(cls: str, result: Any, request_id: Any = None) -> RequestLog:
    """A :class:`RequestLog` from a runner's ``RunResult``."""
    steps = result.steps
    inner = None
    if steps and steps[0].inner is not None:
        inner = [[(r["drafts"], r["inter_accepted"]) for r in s.inner] for s in steps]
    return RequestLog(cls=cls, offered=[s.offered for s in steps], accepted=[s.accepted for s in steps],
                      drafts=[s.drafts for s in steps], confidences=[list(s.confidences) for s in steps],
                      inner=inner, tokens=len(result.tokens), request_id=request_id)


# ------------------------------------------------------------------------------------ statistics


def position_counts(offered: Iterable[int], accepted: Iterable[int], k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position ``i = 1..k_max``: (times offered with ``i - 1`` accepted, times accepted)."""
    exposed = np.zeros(k_max)
    success = np.zeros(k_max)
    for k, m in zip(offered, accepted):
        if k > k_max or m > k or m < 0:
            raise ValueError(f"step with {m} accepted of {k} offered (max {k_max})")
        exposed[:min(k, m + 1)] += 1
        success[:m] += 1
    return exposed, success


MIN_EXPOSURE = 10


def position_conditional(offered: Iterable[int], accepted: Iterable[int], k_max: int,
                         min_exposure: int = 1) -> list[float]:
    """Pooled ``a_i`` for the leading positions offered at least ``min_exposure`` times (at least the
    first position when it was offered at all). The simulator reuses the last value for positions
    past the list, so a rarely reached deep position does not turn a handful of observations into a
    hard 0 or 1."""
    exposed, success = position_counts(offered, accepted, k_max)
    n = int(np.count_nonzero(exposed >= max(1, min_exposure)))
    if n == 0 and exposed.size and exposed[0] > 0:
        n = 1
    return [float(success[i] / exposed[i]) for i in range(n)]


def shape_of(pc: list[float]) -> np.ndarray | None:
    """``s_i = a_i / mean(a)`` (None when every ``a_i`` is 0)."""
    a = np.asarray(pc, dtype=float)
    if a.size == 0 or a.mean() <= 0:
        return None
    return a / a.mean()


def _probs(alpha: np.ndarray | float, shape: np.ndarray, n: int) -> np.ndarray:
    """``min(1, α s_i)`` for ``i = 1..n`` (positions past the shape reuse its last value);
    shape ``[len(alpha), n]``."""
    s = np.concatenate([shape, np.repeat(shape[-1], max(0, n - len(shape)))])[:n]
    return np.minimum(1.0, np.outer(np.atleast_1d(alpha), s))


def alpha_mle(offered: list[int], accepted: list[int], shape: np.ndarray) -> float:
    """Maximum-likelihood ``α`` in [0, 1] of one request's steps under per-position acceptance
    ``min(1, α s_i)``."""
    k_max = max(max(offered), 1)
    exposed, success = position_counts(offered, accepted, k_max)
    rejected = exposed - success
    grid = np.linspace(0.0, 1.0, 2001)
    p = np.clip(_probs(grid, shape, k_max), 1e-12, 1 - 1e-12)
    ll = (np.log(p) * success).sum(1) + (np.log1p(-p) * rejected).sum(1)
    i = int(np.argmax(ll))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = np.linspace(lo, hi, 201)
    p = np.clip(_probs(fine, shape, k_max), 1e-12, 1 - 1e-12)
    ll = (np.log(p) * success).sum(1) + (np.log1p(-p) * rejected).sum(1)
    return float(fine[int(np.argmax(ll))])


def beta_mom(values: list[float]) -> dict[str, Any]:
    """Method-of-moments Beta over ``values`` in [0, 1]; ``fixed`` when they do not spread."""
    x = np.asarray(values, dtype=float)
    mu = float(x.mean())
    var = float(x.var(ddof=1)) if x.size > 1 else 0.0
    if mu <= 1e-6 or mu >= 1 - 1e-6 or var <= 1e-9:
        return {"kind": "fixed", "value": min(max(mu, 0.0), 1.0)}
    kappa = mu * (1 - mu) / var - 1
    kappa = max(kappa, 0.5)  # a U-shaped spread wider than Beta(μκ, (1-μ)κ) allows
    return {"kind": "beta", "a": mu * kappa, "b": (1 - mu) * kappa}


def alpha_points(alpha: dict[str, Any], n: int = QUAD_POINTS) -> np.ndarray:
    """Equal-weight quadrature points of an ``alpha`` distribution (midpoint quantiles for a Beta)."""
    kind = alpha["kind"]
    if kind == "fixed":
        return np.array([float(alpha["value"])])
    if kind == "empirical":
        return np.asarray(alpha["values"], dtype=float)
    from scipy.stats import beta as beta_dist

    q = (np.arange(n) + 0.5) / n
    return np.asarray(beta_dist.ppf(q, float(alpha["a"]), float(alpha["b"])), dtype=float)


# ------------------------------------------------------------------------------------ τ models
#
# The closed forms are the simulator's own (simspec.simulator.acceptance*), so an entry fitted here
# reproduces, in simulation, the tokens per step it was measured at.


def tau_linear(alpha: np.ndarray, shape: np.ndarray, k_dist: dict[int, float]) -> np.ndarray:
    """Expected tokens per step at each ``α`` when ``k`` tokens are offered with probability
    ``k_dist[k]`` (draft model; imported logs)."""
    k_max = max(k_dist)
    p = _probs(alpha, shape, k_max)
    surv = np.cumprod(p, axis=1)  # P(accepted >= i)
    tau = np.ones(len(np.atleast_1d(alpha)))
    for k, w in k_dist.items():
        tau = tau + w * surv[:, :k].sum(1)
    return tau


def pooled_tau(tau_of_alpha: np.ndarray) -> float:
    """Tokens per step pooled over steps when every request makes the same number of tokens."""
    return float(1.0 / np.mean(1.0 / tau_of_alpha))


@dataclass
class TauModel:
    """Pooled tokens per step of one method as a function of the ``alpha`` distribution and the
    position-conditional list (``kind``: ``draft`` | ``kangaroo`` | ``hispec``)."""

    kind: str
    k_dist: dict[int, float] | None = None  # draft: distribution of offered k
    gamma: int = 0  # kangaroo: cap
    conf_acc: np.ndarray | None = None  # kangaroo: P(conf >= eta | accepted, i) (simulator layout)
    conf_rej: np.ndarray | None = None
    nd: int = 2  # hispec
    ni: int = 4
    pc_inter: list[float] | None = None
    mean_inter: float = 0.0  # hispec: mean draft-vs-intermediate level

    def tau_alpha(self, alpha: dict[str, Any], pc: list[float] | None) -> np.ndarray:
        """Expected tokens per step at each quadrature point of ``alpha``."""
        from simspec.profile import alpha_mean
        from simspec.simulator.acceptance import position_shape
        from simspec.simulator.acceptance_early_exit import hispec_buffer_expectations, kangaroo_expectations

        pts = alpha_points(alpha)
        if not pc or max(pc) <= 0:
            return np.ones(len(pts))
        shape = position_shape(pc)
        if self.kind == "kangaroo":
            return np.array([1.0 + kangaroo_expectations(float(a), self.gamma, self.conf_acc, self.conf_rej,
                                                         shape)[0] for a in pts])
        if self.kind == "hispec":
            mu = alpha_mean(alpha)
            ratio = self.mean_inter / mu if mu > 0 else 0.0
            shape_d = position_shape(self.pc_inter)
            cap = self.ni + self.nd - 1
            return np.array([hispec_buffer_expectations(min(1.0, float(a) * ratio), float(a), self.nd, self.ni,
                                                        cap, shape_d, shape)[0] for a in pts])
        return tau_linear(pts, np.asarray(pc, float) / np.mean(pc), self.k_dist or {1: 1.0})

    def pooled(self, alpha: dict[str, Any], pc: list[float] | None) -> float:
        return pooled_tau(self.tau_alpha(alpha, pc))

    def drafts_per_step(self, alpha: dict[str, Any], pc: list[float] | None) -> float | None:
        """Model mean drafts per step (Kangaroo and HiSpec; None otherwise), pooled like τ."""
        from simspec.profile import alpha_mean
        from simspec.simulator.acceptance import position_shape
        from simspec.simulator.acceptance_early_exit import hispec_buffer_expectations, kangaroo_expectations

        if not pc or max(pc) <= 0 or self.kind not in ("kangaroo", "hispec"):
            return None
        pts = alpha_points(alpha)
        shape = position_shape(pc)
        tau = self.tau_alpha(alpha, pc)
        if self.kind == "kangaroo":
            d = np.array([kangaroo_expectations(float(a), self.gamma, self.conf_acc, self.conf_rej, shape)[1].sum()
                          for a in pts])
        else:
            mu = alpha_mean(alpha)
            ratio = self.mean_inter / mu if mu > 0 else 0.0
            shape_d = position_shape(self.pc_inter)
            cap = self.ni + self.nd - 1
            d = np.array([self.nd * hispec_buffer_expectations(min(1.0, float(a) * ratio), float(a), self.nd,
                                                               self.ni, cap, shape_d, shape)[1] for a in pts])
        # per step, pooled over steps (requests weighted by their step counts ∝ 1/τ)
        w = 1.0 / tau
        return float((d * w).sum() / w.sum())


def calibrate_mean(alpha: dict[str, Any], pc: list[float] | None, model: TauModel,
                   target_tau: float) -> dict[str, Any]:
    """Move ``alpha``'s mean (Beta concentration kept; a fixed value moved) until the model's pooled
    tokens per step equals ``target_tau`` (clipped to what the model can reach)."""
    if not pc or max(pc) <= 0:
        return alpha
    from scipy.optimize import brentq

    if alpha["kind"] == "beta":
        kappa = float(alpha["a"]) + float(alpha["b"])

        def make(mu: float) -> dict[str, Any]:
            return {"kind": "beta", "a": mu * kappa, "b": (1 - mu) * kappa}
    else:
        def make(mu: float) -> dict[str, Any]:
            return {"kind": "fixed", "value": mu}
    lo, hi = 1e-4, 1 - 1e-4
    f_lo = model.pooled(make(lo), pc) - target_tau
    f_hi = model.pooled(make(hi), pc) - target_tau
    if f_lo >= 0:
        return make(lo)
    if f_hi <= 0:
        return make(hi)
    mu = brentq(lambda m: model.pooled(make(m), pc) - target_tau, lo, hi, xtol=1e-7)
    return make(float(mu))


# ------------------------------------------------------------------------------------ entries


def measured_tau(reqs: list[RequestLog]) -> float:
    """Pooled over steps: (accepted + 1 summed over steps) / steps (uncapped)."""
    steps = sum(r.n_steps for r in reqs)
    return (sum(sum(r.accepted) for r in reqs) + steps) / steps if steps else float("nan")


def _round(x: float, nd: int = 6) -> float:
    return float(round(float(x), nd))


def confidence_hist(reqs: list[RequestLog], gamma: int) -> dict[str, Any] | None:
    """Counts of drafts per (position, top-1-probability bin): ``accepted`` rows count drafts in the
    accepted prefix, ``rejected`` rows every other draft made (the simulator's convention)."""
    if not any(r.confidences for r in reqs):
        return None
    nb = len(CONF_BIN_EDGES) - 1
    acc = np.zeros((gamma, nb), dtype=int)
    rej = np.zeros((gamma, nb), dtype=int)
    for r in reqs:
        for m, confs in zip(r.accepted, r.confidences or []):
            for i, c in enumerate(confs[:gamma]):
                b = min(int(c * nb), nb - 1)
                (acc if i < m else rej)[i, b] += 1
    return {"bin_edges": CONF_BIN_EDGES, "accepted": acc.tolist(), "rejected": rej.tolist()}


def _k_dist(reqs: list[RequestLog]) -> dict[int, float]:
    counts: dict[int, int] = {}
    for r in reqs:
        for k in r.offered:
            counts[k] = counts.get(k, 0) + 1
    tot = sum(counts.values())
    return {k: c / tot for k, c in counts.items()} if tot else {1: 1.0}


def fit_level(offered: list[list[int]], accepted: list[list[int]], k_max: int, min_exposure: int = 1) -> tuple[
        list[float], list[float], dict[str, Any]]:
    """Position-conditional list, per-request α MLE and the moment-fitted Beta for one level (before
    mean calibration)."""
    pc = position_conditional([k for o in offered for k in o], [m for a in accepted for m in a], k_max,
                              min_exposure)
    shape = shape_of(pc)
    if shape is None:
        return pc, [0.0] * len(offered), {"kind": "fixed", "value": 0.0}
    mle = [alpha_mle(o, a, shape) if o else 0.0 for o, a in zip(offered, accepted)]
    return pc, mle, beta_mom(mle)


def _alpha_json(alpha: dict[str, Any]) -> dict[str, Any]:
    if alpha["kind"] == "beta":
        return {"kind": "beta", "a": _round(alpha["a"]), "b": _round(alpha["b"])}
    if alpha["kind"] == "fixed":
        return {"kind": "fixed", "value": _round(alpha["value"])}
    return alpha


FIT_METHOD = ("position_conditional pooled over steps; per-request MLE of alpha under its shape; Beta by "
              "moments over those; Beta mean moved (concentration kept) until the simulator's pooled "
              "tokens/step equals the measured")


def fit_entry(method: str, reqs: list[RequestLog], settings: dict[str, Any] | None = None,
              heldout: list[RequestLog] | None = None, min_exposure: int = MIN_EXPOSURE) -> dict[str, Any]:
    """One acceptance entry (``acceptance[method][class]``) fitted on ``reqs``; see the module
    docstring. ``settings`` is stored as is and read for ``gamma``/``eta`` (Kangaroo) and ``nd``/``ni``
    (HiSpec)."""
    from simspec.simulator.acceptance_early_exit import confidence_at_least

    settings = dict(settings or {})
    reqs = [r for r in reqs if r.n_steps > 0]
    if not reqs:
        raise ValueError("no steps to fit")
    k_max = max(max(r.offered) for r in reqs)
    offered = [r.offered for r in reqs]
    accepted = [r.accepted for r in reqs]
    pc, mle, alpha0 = fit_level(offered, accepted, k_max, min_exposure)
    entry: dict[str, Any] = {}
    if method == "kangaroo":
        gamma = int(settings.setdefault("gamma", k_max))
        eta = float(settings.setdefault("eta", 0.0))
        hist = confidence_hist(reqs, gamma)
        if hist is not None:
            entry["confidence"] = hist
        if hist is not None and eta > 0:
            ca, cr = confidence_at_least(hist, eta, "confidence")
        else:
            ca = cr = np.ones(64)
        model = TauModel("kangaroo", gamma=gamma, conf_acc=ca, conf_rej=cr)
    elif method == "draft" and confidence_hist(reqs, k_max) is not None:
        # the draft model's top-1 confidences, for ``draft-dynamic``'s confidence stop (the chain
        # fit itself is unchanged)
        entry["confidence"] = confidence_hist(reqs, k_max)
        model = TauModel("draft", k_dist=_k_dist(reqs))
    elif method == "hispec" and reqs[0].inner is not None:
        i_off = [[nd for s in r.inner or [] for nd, _ in s] for r in reqs]
        i_acc = [[j for s in r.inner or [] for _, j in s] for r in reqs]
        nd = int(settings.setdefault("nd", max(max(o) for o in i_off)))
        ni = int(settings.setdefault("ni", min(min(r.offered) for r in reqs)))
        pc_i, mle_i, beta_i = fit_level(i_off, i_acc, nd, min_exposure)
        n_rounds, n_acc = sum(len(o) for o in i_off), sum(sum(a) for a in i_acc)
        beta_i = calibrate_mean(beta_i, pc_i, TauModel("draft", k_dist={nd: 1.0}), 1.0 + n_acc / n_rounds)
        dvi: dict[str, Any] = {"alpha": _alpha_json(beta_i), "acceptance_rate": _round(n_acc / (nd * n_rounds)),
                               "mean_accepted_per_round": _round(n_acc / n_rounds), "n_rounds": int(n_rounds),
                               "per_request": {"alpha_mle": [_round(x, 4) for x in mle_i]}}
        if pc_i and max(pc_i) > 0:
            dvi["position_conditional"] = [_round(x) for x in pc_i]
        entry["draft_vs_inter"] = dvi
        from simspec.profile import alpha_mean
        model = TauModel("hispec", nd=nd, ni=ni, pc_inter=dvi.get("position_conditional"),
                         mean_inter=alpha_mean(beta_i))
    else:
        model = TauModel("draft", k_dist=_k_dist(reqs))
    tau = measured_tau(reqs)
    alpha = calibrate_mean(alpha0, pc, model, tau)
    n_steps = sum(r.n_steps for r in reqs)
    offered_tot = sum(sum(o) for o in offered)
    drafts_tot = sum(sum(r.drafts) for r in reqs) if any(r.drafts for r in reqs) else offered_tot
    entry.update({
        "alpha": _alpha_json(alpha),
        "mean_tokens_per_step": _round(tau),
        "acceptance_rate": _round(sum(sum(a) for a in accepted) / offered_tot) if offered_tot else 0.0,
        "drafts_per_step": _round(drafts_tot / n_steps),
        "offered_per_step": _round(offered_tot / n_steps),
        "n_requests": len(reqs), "n_steps": n_steps, "n_tokens": int(sum(r.tokens for r in reqs)),
        "per_request": {
            "alpha_mle": [_round(x, 4) for x in mle],
            "accept_rate": [_round(sum(a) / sum(o), 4) if sum(o) else 0.0 for o, a in zip(offered, accepted)],
            "tokens_per_step": [_round((sum(a) + len(a)) / len(a), 4) for a in accepted]},
        "fit": {"method": FIT_METHOD, "min_exposure": min_exposure, "alpha_moments": _alpha_json(alpha0),
                "tau_measured": _round(tau),
                "tau_model": _round(model.pooled(alpha, pc))},
    })
    if pc and max(pc) > 0:
        entry["position_conditional"] = [_round(x) for x in pc]
    dps = model.drafts_per_step(alpha, pc)
    if dps is not None:
        entry["fit"]["drafts_per_step_model"] = _round(dps)
    if method == "hispec" and reqs[0].inner is not None:
        entry["inner_rounds_per_step"] = _round(sum(len(s) for r in reqs for s in r.inner or []) / n_steps)
    if heldout:
        held = [r for r in heldout if r.n_steps > 0]
        if held:
            meas = measured_tau(held)
            pred = model.pooled(alpha, pc)
            entry["heldout"] = {"n_requests": len(held), "n_steps": sum(r.n_steps for r in held),
                                "predicted": _round(pred), "measured": _round(meas),
                                "abs_error_pct": _round(abs(pred - meas) / meas * 100, 3)}
    entry["settings"] = settings
    return entry


def fit_section(method: str, by_cls: dict[str, list[RequestLog]], settings: dict[str, Any] | None = None,
                heldout: dict[str, list[RequestLog]] | None = None,
                min_exposure: int = MIN_EXPOSURE) -> dict[str, dict[str, Any]]:
    """``{class: entry}`` for every class with steps, plus ``default`` pooling all classes."""
    heldout = heldout or {}
    out: dict[str, dict[str, Any]] = {}
    for cls in sorted(by_cls):
        if any(r.n_steps for r in by_cls[cls]):
            out[cls] = fit_entry(method, by_cls[cls], settings, heldout.get(cls), min_exposure)
    pooled = [r for cls in sorted(by_cls) for r in by_cls[cls]]
    pooled_held = [r for cls in sorted(heldout) for r in heldout[cls]]
    if any(r.n_steps for r in pooled):
        out["default"] = fit_entry(method, pooled, settings, pooled_held or None, min_exposure)
    return out


def split_heldout(items: list[Any], share: float) -> tuple[list[Any], list[Any]]:
    """Deterministic split: every ``round(1/share)``-th item (the last of each group) is held out;
    nothing is held out when ``share`` is 0 or fewer than 2 items."""
    if share <= 0 or len(items) < 2:
        return list(items), []
    every = max(2, int(round(1.0 / share)))
    fit = [x for i, x in enumerate(items) if i % every != every - 1]
    held = [x for i, x in enumerate(items) if i % every == every - 1]
    if not held:  # fewer items than one group: hold out the last one
        fit, held = list(items[:-1]), [items[-1]]
    return fit, held


def summary_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The numbers the CLI prints per class."""
    row = {"tau": entry.get("mean_tokens_per_step"), "accept_rate": entry.get("acceptance_rate"),
           "drafts_per_step": entry.get("drafts_per_step"), "n_requests": entry.get("n_requests"),
           "n_steps": entry.get("n_steps")}
    h = entry.get("heldout")
    row["heldout_pred"] = h["predicted"] if h else None
    row["heldout_meas"] = h["measured"] if h else None
    row["heldout_err_pct"] = h["abs_error_pct"] if h else None
    if "draft_vs_inter" in entry:
        row["inter_accept_rate"] = entry["draft_vs_inter"]["acceptance_rate"]
    return row
