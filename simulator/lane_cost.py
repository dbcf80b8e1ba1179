"""The cost model compiled for the fast lane (:mod:`simspec.simulator.fastlane`).

:func:`pack_cost` flattens a :class:`~simspec.simulator.cost.CostModel` into two arrays (a tuple
of per-stage arrays is passed by value to every compiled call and cost more than the arithmetic);
the kernels here evaluate it with the scalar arithmetic of ``latency_models.compile_stage`` and
``CostModel`` in the same order of operations, so every step costs what the engine computes, bit
for bit (``tests/test_fastlane.py`` compares them on 1,200 random shapes). Shapes are passed as
floats (one compiled signature each; the engine's ints convert exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simspec.simulator.kernels import jit

# stage slots of the compiled cost model
LAYER, LM_HEAD, EMBED, TARGET_STEP, DRAFT_STEP, ADAPTER = range(6)
_STAGE_NAMES = ("layer", "lm_head", "embed", "target_step", "draft_step", "adapter")
_KIND_LINEAR, _KIND_GRID = 0, 1


# ------------------------------------------------------------------------------ cost model pack
#: per-stage fields of :attr:`CostPack.ints` (stride 10) and :attr:`CostPack.floats` (stride 8)
_I_STRIDE, _F_STRIDE = 10, 8
#: where the global fields sit: ints — whole_model, num_layers; floats — forward overheads
#: (target, draft, early_exit), then the overhead fraction and fixed ms; grid data from _F_DATA on
_I_WHOLE, _I_LAYERS = 60, 61
_F_FWD, _F_OVERHEAD, _F_DATA = 48, 51, 56
#: the same as the compiled code reads them (numba freezes module globals at compile time)
F_FWD_TARGET, F_FWD_DRAFT, F_FWD_EARLY = _F_FWD, _F_FWD + 1, _F_FWD + 2
F_FRAC, F_FIXED = _F_OVERHEAD, _F_OVERHEAD + 1


@dataclass
class CostPack:
    """The cost model of one profile as two flat arrays for the compiled loop (two array
    arguments per call: a tuple of per-stage arrays, passed by value, cost more than the
    arithmetic). Stage slots :data:`LAYER` .. :data:`ADAPTER`; per stage s, ``ints[10 s ..]``:
    kind (0 linear, 1 grid, −1 absent), scaled, the grid's three axis lengths, the offsets of its
    axes and table in ``floats``; ``floats[8 s ..]``: the scaled stage's factor, c0, c_b, c_t,
    c_kv, c_spec."""

    ints: np.ndarray
    floats: np.ndarray


def pack_cost(cost) -> CostPack:
    """Flatten :class:`~simspec.simulator.cost.CostModel`'s stages for the lane."""
    stages = cost.profile.stages
    ints = np.zeros(_I_LAYERS + 1, dtype=np.int64)
    head = np.zeros(_F_DATA)
    data: list[float] = []
    for s, name in enumerate(_STAGE_NAMES):
        io, fo = s * _I_STRIDE, s * _F_STRIDE
        ints[io] = -1
        head[fo] = 1.0
        doc = stages.get(name)
        if doc is None:
            continue
        base = doc
        if doc.get("kind") == "scaled":
            ints[io + 1] = 1
            head[fo] = float(doc["factor"])
            base = stages[doc["of"]]
        if base.get("kind") == "linear":
            ints[io] = _KIND_LINEAR
            head[fo + 1: fo + 5] = [float(base["coef"][k]) for k in ("c0", "c_b", "c_t", "c_kv")]
        elif base.get("kind") == "grid":
            ints[io] = _KIND_GRID
            ax = base["axes"]
            for j, axis in enumerate(("batch_size", "tokens_per_request", "context_tokens")):
                vals = [float(v) for v in ax[axis]]
                ints[io + 2 + j] = len(vals)
                ints[io + 5 + j] = _F_DATA + len(data)
                data.extend(vals)
            ints[io + 8] = _F_DATA + len(data)
            data.extend(np.asarray(base["ms"], dtype=np.float64).ravel().tolist())
        else:  # pragma: no cover - CostModel rejects other kinds first
            raise ValueError(f"stage {name}: kind {base.get('kind')!r}")
        head[fo + 5] = cost.c_spec.get(name, 0.0)
    fo = cost.forward_overhead
    head[_F_FWD: _F_FWD + 3] = [fo["target"], fo["draft"], fo["early_exit"]]
    head[_F_OVERHEAD: _F_OVERHEAD + 2] = [cost.overhead_fraction, cost.overhead_fixed_ms]
    ints[_I_WHOLE] = 1 if cost.whole_model else 0
    ints[_I_LAYERS] = int(cost.num_layers or 0)
    return CostPack(ints=ints, floats=np.concatenate([head, np.asarray(data, dtype=np.float64)]))


# ------------------------------------------------------------------------------ compiled cost
@jit
def _axis_weights(cpf, off, n, x):
    """:func:`simspec.simulator.latency_models.grid_axis_weights` on the axis ``cpf[off:off+n]``
    (bisect_right, clamped to the outermost segments)."""
    if n == 1:
        return 0, 0, 0.0
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if x < cpf[off + mid]:
            hi = mid
        else:
            lo = mid + 1
    i = lo - 1
    if i < 0:
        i = 0
    elif i > n - 2:
        i = n - 2
    a0 = cpf[off + i]
    return i, i + 1, (x - a0) / (cpf[off + i + 1] - a0)


@jit
def stage_fn(cpi, cpf, s, batch_size, batched_tokens, kv_tokens):
    """Stage ``s``'s latency model at one shape (ms), as the closure of
    :func:`~simspec.simulator.latency_models.compile_stage` computes it on Python numbers."""
    io = s * 10
    fo = s * 8
    if cpi[io] == 0:
        ms = cpf[fo + 1] + cpf[fo + 2] * batch_size + cpf[fo + 3] * batched_tokens + cpf[fo + 4] * kv_tokens
        ms = ms if ms > 0.0 else 0.0
    elif batch_size <= 0:
        ms = 0.0
    else:
        n_t = cpi[io + 3]
        n_c = cpi[io + 4]
        tab = cpi[io + 8]
        t = batched_tokens / batch_size
        cx = kv_tokens / batch_size
        b0, b1, wb = _axis_weights(cpf, cpi[io + 5], cpi[io + 2], batch_size)
        t0, t1, wt = _axis_weights(cpf, cpi[io + 6], n_t, t)
        c0, c1, wc = _axis_weights(cpf, cpi[io + 7], n_c, cx)
        r00 = tab + (b0 * n_t + t0) * n_c
        r01 = tab + (b0 * n_t + t1) * n_c
        r10 = tab + (b1 * n_t + t0) * n_c
        r11 = tab + (b1 * n_t + t1) * n_c
        v00 = cpf[r00 + c0] + wc * (cpf[r00 + c1] - cpf[r00 + c0])
        v01 = cpf[r01 + c0] + wc * (cpf[r01 + c1] - cpf[r01 + c0])
        v10 = cpf[r10 + c0] + wc * (cpf[r10 + c1] - cpf[r10 + c0])
        v11 = cpf[r11 + c0] + wc * (cpf[r11 + c1] - cpf[r11 + c0])
        v0 = v00 + wt * (v01 - v00)
        v1 = v10 + wt * (v11 - v10)
        ms = v0 + wb * (v1 - v0)
        ms = ms if ms > 0.0 else 0.0
    if cpi[io + 1] != 0:
        ms = cpf[fo] * ms
    return ms


@jit
def stage_compute(cpi, cpf, s, batch_size, batched_tokens, kv_tokens, speculating):
    """:meth:`CostModel.stage_compute_ms` on numbers: 0 for an empty batch, the speculation term,
    never negative (``max(ms, 0.0)``)."""
    if batch_size <= 0:
        return 0.0
    ms = stage_fn(cpi, cpf, s, batch_size, batched_tokens, kv_tokens)
    if speculating:
        ms += cpf[s * 8 + 5]
    return 0.0 if 0.0 > ms else ms


@jit
def target_ms(cpi, cpf, batch_size, batched_tokens, kv_tokens, speculating, logits_tokens):
    """:meth:`CostModel.target_ms` on numbers (one full target forward, its per-forward overhead
    included). The lane passes every shape as a float (one compiled signature): the engine's ints
    convert exactly, and Python's int-float arithmetic converts them the same way."""
    if batch_size <= 0:
        return 0.0
    if cpi[_I_WHOLE] != 0:  # a whole-model profile: target_step
        ms = stage_fn(cpi, cpf, 3, batch_size, batched_tokens, kv_tokens)
        if speculating:
            ms += cpf[3 * 8 + 5]
        return (0.0 if 0.0 > ms else ms) + cpf[F_FWD_TARGET]
    ms = stage_fn(cpi, cpf, 0, batch_size, batched_tokens, kv_tokens)
    ms = cpi[_I_LAYERS] * (ms if ms > 0.0 else 0.0)
    head = stage_fn(cpi, cpf, 1, batch_size, logits_tokens, kv_tokens)
    ms += head if head > 0.0 else 0.0
    if cpi[2 * 10] >= 0:
        e = stage_fn(cpi, cpf, 2, batch_size, batched_tokens, kv_tokens)
        ms += e if e > 0.0 else 0.0
    return ms + cpf[F_FWD_TARGET]


@jit
def draft_pass_ms(cpi, cpf, draft_layers, batch_size, batched_tokens, kv_tokens, logits_tokens):
    """:func:`simspec.simulator.methods.draft.draft_model_pass_ms` on numbers: the profile's
    ``draft_step`` (with the draft per-forward overhead), else the target's first ``draft_layers``
    layers + LM head over ``logits_tokens`` (an early-exit head: its overhead) + embedding."""
    if batch_size <= 0:
        return 0.0
    if cpi[4 * 10] >= 0:
        ms = stage_compute(cpi, cpf, 4, batch_size, batched_tokens, kv_tokens, False)
        if cpf[F_FWD_DRAFT] != 0.0:
            ms = ms + cpf[F_FWD_DRAFT]
        return ms
    if draft_layers <= 0:
        ms = 0.0
    else:
        ms = draft_layers * stage_compute(cpi, cpf, 0, batch_size, batched_tokens, kv_tokens, False)
    head = stage_compute(cpi, cpf, 1, batch_size, logits_tokens, kv_tokens, False)
    if cpf[F_FWD_EARLY] != 0.0:
        head = head + cpf[F_FWD_EARLY]
    ms += head
    if cpi[2 * 10] >= 0:
        ms += stage_compute(cpi, cpf, 2, batch_size, batched_tokens, kv_tokens, False)
    return ms


@jit
def slice_ms(cpi, cpf, first_layer, end_layer, batch_size, batched_tokens, kv_tokens, embed, lm_head, adapter,
             logits_tokens):
    """:meth:`CostModel.slice_ms` on numbers: layers ``first_layer .. end_layer−1`` (+ embedding,
    adapter, LM head over ``logits_tokens`` with its per-forward overhead: ``target`` after the
    last layer, else ``early_exit``), in its order of operations (layer-level profiles)."""
    if batch_size <= 0:
        return 0.0
    n_layers = end_layer - first_layer
    if n_layers <= 0:
        ms = 0.0
    else:
        ms = n_layers * stage_compute(cpi, cpf, LAYER, batch_size, batched_tokens, kv_tokens, False)
    if embed and cpi[EMBED * 10] >= 0:
        ms = ms + stage_compute(cpi, cpf, EMBED, batch_size, batched_tokens, kv_tokens, False)
    if adapter:
        ms = ms + stage_compute(cpi, cpf, ADAPTER, batch_size, batched_tokens, kv_tokens, False)
    if lm_head:
        ms = ms + stage_compute(cpi, cpf, LM_HEAD, batch_size, logits_tokens, kv_tokens, False)
        ov = cpf[F_FWD_TARGET] if end_layer >= cpi[_I_LAYERS] else cpf[F_FWD_EARLY]
        if ov != 0.0:
            ms = ms + ov
    return ms


@jit
def head_ms(cpi, cpf, batch_size, batched_tokens, kv_tokens):
    """``CostModel.stage_ms("lm_head", ...)`` on numbers: a direct LM-head call is an early-exit
    head (its per-forward overhead when the batch is not empty)."""
    ms = stage_compute(cpi, cpf, LM_HEAD, batch_size, batched_tokens, kv_tokens, False)
    if cpf[F_FWD_EARLY] != 0.0:
        ms = ms + (cpf[F_FWD_EARLY] if batch_size > 0 else 0.0)
    return ms
