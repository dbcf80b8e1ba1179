"""The acceptance model: how many drafted tokens each request gets accepted, per step.

From the profile's ``acceptance[method][class]`` entries (see :mod:`simspec.profile`): each request
draws its own per-token level α_r from its class's distribution; its conditional acceptance at draft
position i is ``min(1, α_r * s_i)`` with the class's position shape ``s_i``. Sampling the accepted
prefix is vectorised over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_sum = np.add.reduce  # skips ndarray.sum's Python wrapper: cheaper on small arrays

from simspec.errors import ProfileError
from simspec.profile import Profile, alpha_mean

MAX_POSITIONS = 64


@dataclass
class ClassAcceptance:
    """Acceptance of one class: the α distribution and a position shape of length MAX_POSITIONS."""

    alpha: dict[str, Any]
    shape: np.ndarray

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> "ClassAcceptance":
        return cls(alpha=entry["alpha"], shape=position_shape(entry.get("position_conditional")))

    def draw_alpha(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Per-request acceptance levels for ``n`` requests."""
        kind = self.alpha["kind"]
        if kind == "beta":
            return rng.beta(float(self.alpha["a"]), float(self.alpha["b"]), size=n)
        if kind == "fixed":
            return np.full(n, float(self.alpha["value"]))
        values = np.asarray(self.alpha["values"], dtype=np.float64)
        return values[rng.integers(0, values.size, size=n)]

    def alpha_from_uniform(self, u: np.ndarray) -> np.ndarray:
        """Per-request levels by inverse CDF of uniforms ``u`` (one per request): a request's level
        then depends only on its own draw, not on the other requests of the trace."""
        kind = self.alpha["kind"]
        if kind == "beta":
            from scipy.special import betaincinv

            return betaincinv(float(self.alpha["a"]), float(self.alpha["b"]), u)
        if kind == "fixed":
            return np.full(u.shape[0], float(self.alpha["value"]))
        values = np.asarray(self.alpha["values"], dtype=np.float64)
        return values[np.minimum((u * values.size).astype(np.int64), values.size - 1)]


def position_shape(position_conditional: list[float] | None) -> np.ndarray:
    """Shape factors s_i (mean 1 over the given positions), padded with the last value."""
    if not position_conditional:
        return np.ones(MAX_POSITIONS)
    pc = np.asarray(position_conditional, dtype=np.float64)
    mean = float(pc.mean())
    s = pc / mean if mean > 0 else np.zeros_like(pc)
    out = np.empty(MAX_POSITIONS)
    m = min(s.size, MAX_POSITIONS)
    out[:m] = s[:m]
    out[m:] = s[m - 1]
    return out


def resolve_classes(profile: Profile, method: str, class_names: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """The profile entry for each trace class of ``method``, and notes on classes mapped to ``default``.

    A trace class missing from the profile uses the profile's ``default`` class (reported); with no
    ``default`` either, it is an error.
    """
    section = profile.acceptance.get(method)
    if section is None:
        have = ", ".join(sorted(profile.acceptance)) or "none"
        raise ProfileError(f"profile {profile.path}: no acceptance for method {method!r} "
                           f"(it has: {have}); calibrate it or choose another --spec")
    entries, mapped = [], []
    for c in class_names:
        if c in section:
            entries.append(section[c])
        elif "default" in section:
            entries.append(section["default"])
            mapped.append(c)
        else:
            raise ProfileError(f"profile {profile.path}: acceptance.{method} has no class {c!r} and no 'default' "
                               f"(it has: {', '.join(sorted(section))})")
    notes = [f"acceptance classes not in the profile, using 'default': {', '.join(mapped)}"] if mapped else []
    return entries, notes


class AcceptanceModel:
    """Per-request levels and per-step accepted-prefix sampling for one method."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.classes = [ClassAcceptance.from_entry(e) for e in entries]
        self.shape = np.stack([c.shape for c in self.classes])  # (n_classes, MAX_POSITIONS)
        self.mean_alpha = np.array([alpha_mean(c.alpha) for c in self.classes])

    def draw_alphas(self, rng: np.random.Generator, class_idx: np.ndarray) -> np.ndarray:
        """One α per request, drawn from its class (class by class, in class order: deterministic)."""
        out = np.empty(class_idx.shape[0])
        for ci, cls in enumerate(self.classes):
            sel = np.flatnonzero(class_idx == ci)
            if sel.size:
                out[sel] = cls.draw_alpha(rng, sel.size)
        return out

    def alphas_from_uniforms(self, u: np.ndarray, class_idx: np.ndarray) -> np.ndarray:
        """One α per request from its own uniform ``u`` (inverse CDF of its class's distribution)."""
        out = np.empty(class_idx.shape[0])
        for ci, cls in enumerate(self.classes):
            sel = np.flatnonzero(class_idx == ci)
            if sel.size:
                out[sel] = cls.alpha_from_uniform(u[sel])
        return out

    def position_probs(self, alpha: np.ndarray, class_idx: np.ndarray, kmax: int) -> np.ndarray:
        """(B, kmax) conditional acceptance probabilities for the batch."""
        return np.minimum(1.0, alpha[:, None] * self.shape[class_idx, :kmax])

    def sample_accepted(self, rng: np.random.Generator, alpha: np.ndarray, class_idx: np.ndarray,
                        k: np.ndarray) -> np.ndarray:
        """Accepted prefix length (0..k_i) for each request given ``k_i`` drafts."""
        kmax = int(k.max()) if k.size else 0
        if kmax == 0:
            return np.zeros(k.shape[0], dtype=np.int64)
        return self.sample_accepted_positions(rng, alpha, class_idx, k)[0]

    def sample_accepted_positions(self, rng, alpha: np.ndarray, class_idx: np.ndarray,
                                  k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(accepted prefix length, accepted positions) for each request given ``k_i`` drafts: the
        second counts every drafted position whose own draw was accepted, prefix or not (an
        unbiased count for a per-token acceptance estimate)."""
        kmax = int(k.max()) if k.size else 0
        if kmax == 0:
            z = np.zeros(k.shape[0], dtype=np.int64)
            return z, z.copy()
        p = self.position_probs(alpha, class_idx, kmax)
        ok = rng.random(p.shape) < p
        ok &= np.arange(kmax)[None, :] < k[:, None]
        return np.cumprod(ok, axis=1).sum(axis=1), ok.sum(axis=1)


def expected_tokens_iid(alpha: float, k: int) -> float:
    """E[tokens committed per step] with i.i.d. acceptance α and k drafts: (1−α^(k+1))/(1−α)."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
