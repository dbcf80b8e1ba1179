"""Acceptance models of the early-exit methods: Kangaroo (confidence-stopped drafting) and HiSpec
(two agreement levels). See :mod:`simspec.profile` for the entry keys and
``docs/methods.md`` for the semantics.

Kangaroo. The entry's ``alpha``/``position_conditional`` give draft-vs-full acceptance, exactly as for
``draft``. Its optional ``confidence`` histograms give, per draft position i,
``P(top-1 ≥ η | draft i accepted)`` and ``P(top-1 ≥ η | draft i not accepted)``; here "accepted"
means *in the accepted prefix* (every draft up to i accepted), the other row holds every other draft
made. Per step and request, drafting stops at the first draft whose confidence is below η (that draft
is still verified) or at the cap ``min(γ, k)``; the number of drafts is sampled jointly with the
accepted prefix. Conventions for η (documented in docs/methods.md):

- ``η ≤ 0``: every draft is confident (drafting stops only at the cap);
- ``η ≥ 1``: no draft is confident (a top-1 probability is < 1): exactly one draft per step;
- ``0 < η < 1``: from the class's histograms, with counts assumed uniform inside a bin; a class
  without ``confidence`` never stops early (only at the cap), as profile.py specifies.

HiSpec. The entry's ``alpha``/``position_conditional`` give intermediate-vs-full agreement (per
buffer position); ``draft_vs_inter`` gives draft-vs-intermediate agreement (per position inside one
inner draft block of N_d tokens). A request's draft-vs-intermediate level is its own level α_r scaled
by the ratio of the class means, ``min(1, α_r · mean(α_d) / mean(α))`` — the two levels are taken as
fully correlated (an easy request is easy at both levels); the schema holds no per-request pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simspec.errors import ProfileError
from simspec.profile import alpha_mean
from simspec.simulator.acceptance import MAX_POSITIONS, AcceptanceModel, position_shape


# ----------------------------------------------------------------------------------- Kangaroo


def confidence_at_least(confidence: dict[str, Any], eta: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(P(conf ≥ η | accepted, i), P(conf ≥ η | rejected, i))`` for i < MAX_POSITIONS from one
    ``confidence`` entry (counts per top-1 probability bin, one row per draft position).

    Counts are taken as uniform inside a bin. Positions past the rows reuse the last row; a row
    with no counts uses the pooled counts of all rows of that kind, and with none at all the draft
    is taken as confident (probability 1: no early stop)."""
    if not isinstance(confidence, dict):
        raise ProfileError(f"{where}: expected an object with bin_edges, accepted, rejected")
    edges = confidence.get("bin_edges")
    if not isinstance(edges, list) or len(edges) < 2:
        raise ProfileError(f"{where}.bin_edges: expected a list of at least 2 numbers")
    try:
        e = np.asarray(edges, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProfileError(f"{where}.bin_edges: expected numbers") from None
    if not np.all(np.isfinite(e)) or np.any(np.diff(e) <= 0) or e[0] < 0 or e[-1] > 1:
        raise ProfileError(f"{where}.bin_edges: must increase strictly within [0, 1]")
    lo, hi = e[:-1], e[1:]
    frac = np.clip((hi - eta) / (hi - lo), 0.0, 1.0)  # share of each bin at or above eta
    out = []
    for kind in ("accepted", "rejected"):
        rows = confidence.get(kind)
        if not isinstance(rows, list) or not rows:
            raise ProfileError(f"{where}.{kind}: expected a list of rows (one per draft position)")
        try:
            counts = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise ProfileError(f"{where}.{kind}: rows must be lists of {e.size - 1} counts") from None
        if counts.ndim != 2 or counts.shape[1] != e.size - 1:
            raise ProfileError(f"{where}.{kind}: rows must be lists of {e.size - 1} counts (one per bin)")
        if not np.all(np.isfinite(counts)) or np.any(counts < 0):
            raise ProfileError(f"{where}.{kind}: counts must be finite and >= 0")
        tot = counts.sum(axis=1)
        pooled = counts.sum(axis=0)
        pooled_p = float(pooled @ frac / pooled.sum()) if pooled.sum() > 0 else 1.0
        p = np.where(tot > 0, (counts @ frac) / np.maximum(tot, 1e-300), pooled_p)
        full = np.empty(MAX_POSITIONS)
        m = min(p.size, MAX_POSITIONS)
        full[:m] = p[:m]
        full[m:] = p[m - 1]
        out.append(full)
    return out[0], out[1]


class KangarooAcceptance(AcceptanceModel):
    """Draft-vs-full acceptance plus the confidence stop at threshold ``eta``."""

    def __init__(self, entries: list[dict[str, Any]], eta: float, names: list[str] | None = None):
        super().__init__(entries)
        self.eta = float(eta)
        n = len(entries)
        self.conf_acc = np.ones((n, MAX_POSITIONS))
        self.conf_rej = np.ones((n, MAX_POSITIONS))
        for ci, entry in enumerate(entries):
            if self.eta >= 1.0:
                self.conf_acc[ci] = 0.0
                self.conf_rej[ci] = 0.0
            elif self.eta > 0.0 and entry.get("confidence") is not None:
                where = names[ci] if names else f"acceptance.kangaroo[class {ci}]"
                self.conf_acc[ci], self.conf_rej[ci] = confidence_at_least(entry["confidence"], self.eta,
                                                                         f"{where}.confidence")
        #: False when no draft can ever stop early (η ≤ 0 or no histograms): sampling then equals
        #: plain acceptance sampling at k = the cap, draw for draw.
        self.stops_early = bool((self.conf_acc < 1.0).any() or (self.conf_rej < 1.0).any())

    def sample_drafts(self, rng: np.random.Generator, alpha: np.ndarray, class_idx: np.ndarray,
                      cap: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per request: ``(drafts made, accepted prefix)`` with at most ``cap`` drafts each.

        ``width``: draw that many acceptance (and confidence-stop) uniforms per request, whatever
        the caps in the batch (≥ every cap; default: the largest cap). With a fixed width a
        request's draws do not depend on the other requests of its batch."""
        b = cap.shape[0]
        kmax = int(cap.max()) if b else 0
        if kmax == 0:
            z = np.zeros(b, dtype=np.int64)
            return z, z.copy()
        if width is not None:
            if width < kmax:
                raise ValueError(f"sample_drafts: width {width} < largest cap {kmax}")
            kmax = int(width)
        pos = np.arange(kmax)[None, :]
        p = self.position_probs(alpha, class_idx, kmax)
        prefix = np.cumprod(rng.random(p.shape) < p, axis=1).astype(bool)
        if not self.stops_early:
            drafts = cap.astype(np.int64)
        else:
            pc = np.where(prefix, self.conf_acc[class_idx, :kmax], self.conf_rej[class_idx, :kmax])
            low = rng.random(pc.shape) >= pc
            first_low = np.where(low.any(axis=1), low.argmax(axis=1) + 1, kmax)
            drafts = np.minimum(first_low, cap).astype(np.int64)
        accepted = (prefix & (pos < drafts[:, None])).sum(axis=1).astype(np.int64)
        return drafts, accepted

    def mean_confidence(self) -> tuple[np.ndarray, np.ndarray]:
        """Class-averaged ``(P(conf ≥ η | accepted, i), P(conf ≥ η | rejected, i))``."""
        return self.conf_acc.mean(axis=0), self.conf_rej.mean(axis=0)


def kangaroo_expectations(alpha: float, cap: int, conf_acc: np.ndarray, conf_rej: np.ndarray,
                          shape: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Exact ``(E[accepted prefix], P(drafts ≥ d) for d = 1..cap)`` for one request with per-position
    acceptance ``min(1, alpha * shape_i)`` and the confidence-stop probabilities given."""
    if cap <= 0:
        return 0.0, np.zeros(0)
    s = np.ones(cap) if shape is None else shape[:cap]
    a = np.minimum(1.0, alpha * s)
    mass_in, mass_out = 1.0, 0.0  # drafting reached position i, all before accepted / not
    e_acc = 0.0
    reach = np.empty(cap)
    for i in range(cap):
        reach[i] = mass_in + mass_out
        acc = mass_in * a[i]
        e_acc += acc
        out = mass_in * (1.0 - a[i]) + mass_out
        mass_in, mass_out = acc * conf_acc[i], out * conf_rej[i]
    return e_acc, reach


# ----------------------------------------------------------------------------------- HiSpec


class HiSpecAcceptance(AcceptanceModel):
    """Intermediate-vs-full agreement (the base model) plus draft-vs-intermediate agreement."""

    def __init__(self, entries: list[dict[str, Any]], names: list[str] | None = None):
        super().__init__(entries)
        shapes, ratios = [], []
        for ci, entry in enumerate(entries):
            where = names[ci] if names else f"acceptance.hispec[class {ci}]"
            dvi = entry.get("draft_vs_inter")
            if not isinstance(dvi, dict) or not isinstance(dvi.get("alpha"), dict):
                raise ProfileError(f"{where}.draft_vs_inter: missing (needs an 'alpha' distribution and "
                                   f"optionally 'position_conditional')")
            try:
                m_d = alpha_mean(dvi["alpha"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError):
                raise ProfileError(f"{where}.draft_vs_inter.alpha: malformed") from None
            pc = dvi.get("position_conditional")
            if pc is not None and (not isinstance(pc, list) or not pc or
                                   not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in pc)):
                raise ProfileError(f"{where}.draft_vs_inter.position_conditional: expected a list of "
                                   f"probabilities")
            if not 0.0 <= m_d <= 1.0:
                raise ProfileError(f"{where}.draft_vs_inter.alpha: mean must be in [0, 1], got {m_d}")
            shapes.append(position_shape(pc))
            m_f = float(self.mean_alpha[ci])
            ratios.append(m_d / m_f if m_f > 0 else 0.0)
        self.shape_d = np.stack(shapes)
        self.ratio_d = np.asarray(ratios)
        self.mean_alpha_d = self.mean_alpha * self.ratio_d

    def alpha_draft(self, alpha: np.ndarray, class_idx: np.ndarray) -> np.ndarray:
        """Per-request draft-vs-intermediate level (see the module docstring)."""
        return np.minimum(1.0, alpha * self.ratio_d[class_idx])

    def draft_probs(self, alpha_d: np.ndarray, class_idx: np.ndarray, n: int) -> np.ndarray:
        """(B, n) conditional draft-vs-intermediate agreement per position in an inner block."""
        return np.minimum(1.0, alpha_d[:, None] * self.shape_d[class_idx, :n])


def hispec_buffer_expectations(alpha_d: float, alpha: float, nd: int, ni: int, cap: int,
                               shape_d: np.ndarray | None = None,
                               shape: np.ndarray | None = None) -> tuple[float, float, float]:
    """Exact ``(E[tokens committed per full verification], E[inner iterations], E[buffer size])``
    for one request (buffer target ``min(ni, cap)``; an inner iteration drafts ``min(nd, cap − m)``
    and appends the agreed prefix plus the intermediate's token, or all drafts when all agree), by
    dynamic programming over the buffer size. Used for policy estimates and documented defaults,
    not for sampling."""
    target = min(ni, cap)
    sd = np.ones(nd) if shape_d is None else shape_d[:nd]
    s = np.ones(max(cap, 1)) if shape is None else shape[:max(cap, 1)]
    dist = np.zeros(cap + 1)
    dist[0] = 1.0
    final = np.zeros(cap + 1)
    iters = 0.0
    for _ in range(max(target, 0) + 1):
        live = dist.copy()
        live[target:] = 0.0
        final += dist - live
        if live.sum() <= 0:
            break
        iters += live.sum()
        nxt = np.zeros(cap + 1)
        for m in np.flatnonzero(live):
            d = min(nd, cap - m)
            a = np.minimum(1.0, alpha_d * sd[:d])
            p_prefix = np.concatenate([[1.0], np.cumprod(a)])  # P(agreed prefix ≥ j), j = 0..d
            for j in range(d + 1):
                pj = p_prefix[j] - (p_prefix[j + 1] if j < d else 0.0)
                nxt[m + min(j + 1, d)] += live[m] * pj  # agreed drafts + L_i's token; all d if all agree
        dist = nxt
    a_f = np.minimum(1.0, alpha * s)
    tokens = 0.0
    for m in np.flatnonzero(final):
        tokens += final[m] * (1.0 + (float(np.cumprod(a_f[:m]).sum()) if m else 0.0))
    return tokens, iters, float((np.arange(cap + 1) * final).sum())
