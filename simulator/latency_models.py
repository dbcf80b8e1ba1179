"""Evaluate one profile latency model (``linear``, ``scaled`` or ``grid``) at a batch shape.

No torch: :func:`compile_stage` turns a stage's JSON document into a plain closure
``fn(batch_size, batched_tokens, kv_tokens) -> ms`` that costs a few microseconds per call on
Python numbers, because the simulator calls it once per stage per simulated step. The same closure
takes numpy arrays (any of the three arguments; they broadcast) and returns an array, elementwise,
with the same arithmetic in the same order (so an element equals the scalar call bit for bit): the
cost of many steps in one call. Calibration
(``simspec.calibrate.fit``) computes its held-out error with this same function, so the error
recorded in a profile is exactly the error the simulator sees.

Inputs, as everywhere in simspec: ``batch_size`` requests in the step, ``batched_tokens`` tokens fed
this step summed over the batch, ``kv_tokens`` context tokens already in the KV cache summed over
the batch. Output: milliseconds, never negative.

- ``linear``: ``c0 + c_b*B + c_t*batched_tokens + c_kv*kv_tokens`` (``c_spec`` is left to the
  caller, which knows whether the step speculates).
- ``scaled``: ``factor *`` the stage named in ``of``.
- ``grid``: a table ``ms[b][t][c]`` over ``batch_size`` × ``tokens_per_request`` ×
  ``context_tokens`` (per-request means: ``batched_tokens / B`` and ``kv_tokens / B``),
  interpolated multilinearly; beyond an axis' edges the outermost segment is extended linearly
  (an axis with one value is constant along it). ``strict=True`` raises instead of extrapolating.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from simspec.errors import ProfileError

_ND = np.ndarray


def _is_array(a, b, c) -> bool:
    return isinstance(a, _ND) or isinstance(b, _ND) or isinstance(c, _ND)

StageFn = Callable[[float, float, float], float]

__all__ = ["StageFn", "compile_stage", "compile_stages", "grid_axis_weights"]


def compile_stages(stages: Mapping[str, Any], *, strict: bool = False) -> dict[str, StageFn]:
    """Compile every stage of a profile's ``latency.stages``."""
    return {name: compile_stage(doc, stages, strict=strict, name=name) for name, doc in stages.items()}


def compile_stage(stage_doc: Mapping[str, Any], stages: Mapping[str, Any] | None = None, *,
                  strict: bool = False, name: str = "?") -> StageFn:
    """A closure ``(batch_size, batched_tokens, kv_tokens) -> ms`` for one latency model.

    ``stages`` (the profile's whole ``latency.stages``) resolves ``scaled`` models. With
    ``strict=True`` a ``grid`` lookup outside its axes raises :class:`ProfileError` instead of
    extrapolating linearly.
    """
    kind = stage_doc.get("kind")
    if kind == "linear":
        coef = stage_doc["coef"]
        c0, cb, ct, ckv = (float(coef[k]) for k in ("c0", "c_b", "c_t", "c_kv"))

        def linear(batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
            ms = c0 + cb * batch_size + ct * batched_tokens + ckv * kv_tokens
            if isinstance(ms, _ND):
                return np.where(ms > 0.0, ms, 0.0)
            return ms if ms > 0.0 else 0.0

        return linear
    if kind == "scaled":
        of = stage_doc.get("of")
        if stages is None or of not in stages:
            raise ProfileError(f"latency stage {name}: field of: names no stage ({of!r})")
        if stages[of].get("kind") == "scaled":
            raise ProfileError(f"latency stage {name}: field of: cannot scale a scaled stage")
        base = compile_stage(stages[of], stages, strict=strict, name=str(of))
        factor = float(stage_doc["factor"])

        def scaled(batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
            return factor * base(batch_size, batched_tokens, kv_tokens)

        return scaled
    if kind == "grid":
        return _compile_grid(stage_doc, strict=strict, name=name)
    raise ProfileError(f"latency stage {name}: field kind: expected linear, scaled or grid, got {kind!r}")


def grid_axis_weights(axis: Sequence[float], x: float) -> tuple[int, int, float]:
    """Bracket ``x`` on a strictly increasing ``axis``: ``(i, j, w)`` with value
    ``(1-w)*v[i] + w*v[j]``. ``w`` falls outside [0, 1] beyond the edges (linear extrapolation of the
    outermost segment); a one-value axis gives ``(0, 0, 0.0)``."""
    n = len(axis)
    if n == 1:
        return 0, 0, 0.0
    i = bisect_right(axis, x) - 1
    if i < 0:
        i = 0
    elif i > n - 2:
        i = n - 2
    a0 = axis[i]
    return i, i + 1, (x - a0) / (axis[i + 1] - a0)


def _compile_grid(doc: Mapping[str, Any], *, strict: bool, name: str) -> StageFn:
    axes = doc["axes"]
    ab = [float(v) for v in axes["batch_size"]]
    at = [float(v) for v in axes["tokens_per_request"]]
    ac = [float(v) for v in axes["context_tokens"]]
    table = tuple(tuple(tuple(float(v) for v in row) for row in plane) for plane in doc["ms"])
    if len(table) != len(ab) or any(len(p) != len(at) for p in table) or \
            any(len(r) != len(ac) for p in table for r in p):
        raise ProfileError(f"latency stage {name}: field ms: shape does not match the axes")
    weights = grid_axis_weights
    lo = (ab[0], at[0], ac[0])
    hi = (ab[-1], at[-1], ac[-1])
    arr = np.asarray(table, dtype=np.float64)
    axes_np = (np.asarray(ab), np.asarray(at), np.asarray(ac))

    flat = arr.ravel()
    n_t, n_c = len(at), len(ac)
    # the last segment index each axis may bracket with (0 for a one-value axis)
    last_seg = tuple(np.intp(max(len(a) - 2, 0)) for a in (ab, at, ac))

    def weights_np(axis: np.ndarray, x: np.ndarray, top: np.intp):
        """Array version of :func:`grid_axis_weights` (same arithmetic, elementwise)."""
        if axis.shape[0] == 1:
            z = np.zeros(x.shape, dtype=np.intp)
            return z, z, np.zeros(x.shape)
        i = axis.searchsorted(x, side="right") - 1
        i = np.minimum(np.maximum(i, 0), top)
        a0 = axis[i]
        return i, i + 1, (x - a0) / (axis[i + 1] - a0)

    def grid_array(batch_size, batched_tokens, kv_tokens):
        B = np.asarray(batch_size, dtype=np.float64)
        T = np.asarray(batched_tokens, dtype=np.float64)
        KV = np.asarray(kv_tokens, dtype=np.float64)
        if not (B.shape == T.shape == KV.shape):
            B, T, KV = np.broadcast_arrays(B, T, KV)
        run = B > 0
        Bs = np.where(run, B, 1.0)
        t = T / Bs
        c = KV / Bs
        if strict:
            out = run & ~((lo[0] <= B) & (B <= hi[0]) & (lo[1] <= t) & (t <= hi[1]) & (lo[2] <= c) & (c <= hi[2]))
            if out.any():
                j = int(np.flatnonzero(out.ravel())[0])
                grid(float(B.ravel()[j]), float(T.ravel()[j]), float(KV.ravel()[j]))  # raises, same message
        b0, b1, wb = weights_np(axes_np[0], Bs, last_seg[0])
        t0, t1, wt = weights_np(axes_np[1], t, last_seg[1])
        c0, c1, wc = weights_np(axes_np[2], c, last_seg[2])
        # the eight corners as flat indices into the (b, t, c) table
        rb0, rb1 = b0 * n_t, b1 * n_t
        p00, p01, p10, p11 = (rb0 + t0) * n_c, (rb0 + t1) * n_c, (rb1 + t0) * n_c, (rb1 + t1) * n_c
        r00c0, r00c1 = flat[p00 + c0], flat[p00 + c1]
        r01c0, r01c1 = flat[p01 + c0], flat[p01 + c1]
        r10c0, r10c1 = flat[p10 + c0], flat[p10 + c1]
        r11c0, r11c1 = flat[p11 + c0], flat[p11 + c1]
        v00 = r00c0 + wc * (r00c1 - r00c0)
        v01 = r01c0 + wc * (r01c1 - r01c0)
        v10 = r10c0 + wc * (r10c1 - r10c0)
        v11 = r11c0 + wc * (r11c1 - r11c0)
        v0 = v00 + wt * (v01 - v00)
        v1 = v10 + wt * (v11 - v10)
        ms = v0 + wb * (v1 - v0)
        return np.where(run & (ms > 0.0), ms, 0.0)

    def grid(batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
        if isinstance(batch_size, _ND) or isinstance(batched_tokens, _ND) or isinstance(kv_tokens, _ND):
            return grid_array(batch_size, batched_tokens, kv_tokens)
        if batch_size <= 0:
            return 0.0
        t = batched_tokens / batch_size
        c = kv_tokens / batch_size
        if strict and not (lo[0] <= batch_size <= hi[0] and lo[1] <= t <= hi[1] and lo[2] <= c <= hi[2]):
            raise ProfileError(
                f"latency stage {name}: shape B={batch_size:g}, tokens/request={t:g}, context={c:g} is "
                f"outside the profiled grid (B {lo[0]:g}..{hi[0]:g}, tokens {lo[1]:g}..{hi[1]:g}, "
                f"context {lo[2]:g}..{hi[2]:g})")
        b0, b1, wb = weights(ab, batch_size)
        t0, t1, wt = weights(at, t)
        c0, c1, wc = weights(ac, c)
        p0, p1 = table[b0], table[b1]
        r00, r01, r10, r11 = p0[t0], p0[t1], p1[t0], p1[t1]
        v00 = r00[c0] + wc * (r00[c1] - r00[c0])
        v01 = r01[c0] + wc * (r01[c1] - r01[c0])
        v10 = r10[c0] + wc * (r10[c1] - r10[c0])
        v11 = r11[c0] + wc * (r11[c1] - r11[c0])
        v0 = v00 + wt * (v01 - v00)
        v1 = v10 + wt * (v11 - v10)
        ms = v0 + wb * (v1 - v0)
        return ms if ms > 0.0 else 0.0

    return grid
