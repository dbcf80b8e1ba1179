"""The early-exit methods compiled for the fast lane (:mod:`simspec.simulator.fastlane`):
``kangaroo`` and ``hispec`` (single-level and two-level), each step's sampling and cost, and
their ``stage_estimates_ms`` for LAPS-SD.

Each step is the method's own :meth:`~simspec.simulator.methods.base.Method.step` on the engine's
counter-based draws: the sampling uses the engine's kernels (``kernels.kangaroo_member_draws``,
``kernels.hispec_step``, ``kernels.early_exit_step_sums``) and the cost repeats
``kangaroo.early_exit_step_ms`` / ``HiSpec._step_kernel`` arithmetic on numbers, in the same
order (:mod:`simspec.simulator.lane_cost`), so every duration is the engine's bit for bit
(``tests/test_fastlane.py``).

:func:`method_pack` describes a bound method for the lane as one int array (``mi``, fields
``MI_*``), one float array (``mf``: HiSpec's expected inner iterations and buffer per k, which
its estimates use) and its per-request acceptance tables, computed once with the arithmetic the
method applies to a batch (elementwise, so a row equals what a step computes for that request).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simspec.simulator.kernels import _uniform, early_exit_step_sums, hispec_step, jit, kangaroo_member_draws
from simspec.simulator.lane_cost import head_ms, slice_ms, stage_compute, ADAPTER

#: method kinds of the lane
M_NONE, M_DRAFT, M_KANGAROO, M_HISPEC1, M_HISPEC2 = range(5)
#: fields of the method's int array
(MI_KIND, MI_DRAFT_LAYERS, MI_PER_STEP, MI_EXIT, MI_INTER, MI_LAYERS, MI_WIDTH, MI_NI, MI_EARLY, MI_KMAX,
 MI_DRAWS) = range(11)


@dataclass
class MethodPack:
    """A bound method for the lane: ``ints`` (``MI_*`` fields), ``floats`` (HiSpec: E[inner
    iterations] at k = 0..k_max, then E[buffer] at the same k), and per-request tables:
    ``probs`` (draft / kangaroo: acceptance per draft position; hispec: the full model's
    acceptance per buffer position), ``probs_d`` (hispec: draft-vs-intermediate agreement per
    inner-block position), ``conf_acc``/``conf_rej`` (kangaroo: the confidence-stop rows per
    class); one-element placeholders where a method has none."""

    ints: np.ndarray
    floats: np.ndarray
    probs: np.ndarray
    has_probs: bool
    probs_d: np.ndarray
    conf_acc: np.ndarray
    conf_rej: np.ndarray


def lane_method_reason(method) -> str | None:
    """Why a bound method cannot run in the lane (a short phrase), or None."""
    from simspec.simulator.acceptance_early_exit import HiSpecAcceptance, KangarooAcceptance

    name = method.name
    if name in ("none", "draft"):
        return None
    acc = method.acceptance
    if name == "kangaroo":
        if type(acc) is not KangarooAcceptance:
            return "method kangaroo with a substituted acceptance model"
        if acc.shape.shape[1] < method.gamma or acc.conf_acc.shape[1] < method.gamma:
            return "method kangaroo with gamma beyond the acceptance positions"
        return None
    if name == "hispec":
        if type(acc) is not HiSpecAcceptance:
            return "method hispec with a substituted acceptance model"
        if acc.shape_d.shape[1] < method.nd or acc.shape.shape[1] < method.k_max:
            return "method hispec with a buffer beyond the acceptance positions"
        return None
    return f"method {name}"


def method_pack(method, table) -> MethodPack:
    """:class:`MethodPack` of a bound method (one the lane takes: :func:`lane_method_reason`)
    for the requests of ``table``."""
    one = np.zeros((1, 1))
    ints = np.zeros(11, dtype=np.int64)
    floats = np.zeros(1)
    probs, has_probs, probs_d, conf_a, conf_r = one, False, one, one, one
    ints[MI_KMAX] = int(method.k_max)
    ints[MI_DRAWS] = int(method.draws_per_step or 0)
    name = method.name
    if name == "none":
        ints[MI_KIND] = M_NONE
    elif name == "draft":
        ints[MI_KIND] = M_DRAFT
        ints[MI_DRAFT_LAYERS] = int(getattr(method, "draft_layers", 0) or 0)
        ints[MI_PER_STEP] = 1 if getattr(method, "per_step", False) else 0
        p = getattr(method, "_probs", None)
        if p is not None:
            probs, has_probs = p, True
    elif name == "kangaroo":
        acc = method.acceptance
        ints[MI_KIND] = M_KANGAROO
        ints[MI_EXIT] = method.exit_layer
        ints[MI_LAYERS] = method.num_layers
        ints[MI_WIDTH] = method.gamma
        ints[MI_EARLY] = 1 if acc.stops_early else 0
        probs = np.ascontiguousarray(acc.position_probs(table.alpha, table.class_idx, method.gamma))
        has_probs = True
        conf_a, conf_r = np.ascontiguousarray(acc.conf_acc), np.ascontiguousarray(acc.conf_rej)
    elif name == "hispec":
        acc = method.acceptance
        ints[MI_KIND] = M_HISPEC1 if method.single_level else M_HISPEC2
        ints[MI_EXIT] = method.draft_exit
        ints[MI_INTER] = method.inter_exit
        ints[MI_LAYERS] = method.num_layers
        ints[MI_WIDTH] = method.nd
        ints[MI_NI] = method.ni
        alpha_d = acc.alpha_draft(table.alpha, table.class_idx)
        probs_d = np.ascontiguousarray(acc.draft_probs(alpha_d, table.class_idx, method.nd))
        probs = np.ascontiguousarray(acc.position_probs(table.alpha, table.class_idx, max(method.k_max, 1)))
        has_probs = True
        kmax = int(method.k_max)
        alpha = method._alpha()
        ex = [method._expect(alpha, k) for k in range(kmax + 1)]
        floats = np.array([e[1] for e in ex] + [e[2] for e in ex], dtype=np.float64)
    else:  # pragma: no cover - lane_method_reason refuses it first
        raise ValueError(f"method {name} is not in the lane")
    return MethodPack(ints=ints, floats=floats, probs=probs, has_probs=has_probs, probs_d=probs_d, conf_acc=conf_a,
                      conf_rej=conf_r)


# ------------------------------------------------------------------------------ cost of a step
@jit
def rounds_ms(cpi, cpf, dmax, cnt_ge, ctx_ge, exit_layer, adapter, prefill_b, prefill_tokens):
    """:func:`simspec.simulator.methods.kangaroo.rounds_ms` on numbers: drafting rounds j =
    0..``dmax`` at the exit, ``cnt_ge[j]`` requests with drafts ≥ j holding ``ctx_ge[j]`` context
    tokens at round 0; prefill members join round 0's shallow layers (and adapter)."""
    ms = 0.0
    for j in range(dmax + 1):
        b = cnt_ge[j]
        kv = float(ctx_ge[j]) + j * b
        if j < dmax:
            bh = cnt_ge[j + 1]
            kvh = float(ctx_ge[j + 1]) + j * bh
        else:
            bh = 0
            kvh = 0.0
        sb = b
        st = float(b)
        ab = bh
        at = float(bh)
        if j == 0 and prefill_b != 0:
            sb = sb + prefill_b
            st = st + prefill_tokens
            ab = ab + prefill_b
            at = at + prefill_tokens
        ms += slice_ms(cpi, cpf, 0, exit_layer, float(sb), st, kv, True, False, False, st)
        if adapter:
            ms += stage_compute(cpi, cpf, ADAPTER, float(ab), at, kvh, False)
        ms += head_ms(cpi, cpf, float(bh), float(bh), kvh)
    return ms


@jit
def early_exit_ms(cpi, cpf, n, drafts, pre, fed, ctx, exit_layer, num_layers, adapter):
    """:func:`simspec.simulator.methods.kangaroo.early_exit_step_ms` on numbers for the first
    ``n`` members: the drafting rounds, then layers exit..N−1 over the drafts + 1 of each decode
    member and each prompt chunk, the LM head over the decode tokens and each prompt's last
    position (ms, no overhead)."""
    n_pre, pre_tok, dmax, cnt_ge, ctx_ge, deep_dec, ctx_all = early_exit_step_sums(drafts[:n], pre[:n], fed[:n],
                                                                                  ctx[:n])
    pre_tokens = float(pre_tok) if n_pre != 0 else 0.0
    ms = rounds_ms(cpi, cpf, dmax, cnt_ge, ctx_ge, exit_layer, adapter, n_pre, pre_tokens)
    if n_pre == n:
        deep = pre_tokens
    elif n_pre != 0:
        deep = pre_tokens + float(deep_dec)
    else:
        deep = float(deep_dec)
    logits = deep - pre_tokens + n_pre
    ms += slice_ms(cpi, cpf, exit_layer, num_layers, float(n), deep, float(ctx_all), False, True, False, logits)
    return ms


@jit
def method_step_ms(mi, cpi, cpf, n, idx, pre, fed, ctx, k, base, dr, class_idx, probs, probs_d, conf_a, conf_r,
                   drafts, accepted, p_d, p_f):
    """One step of an early-exit method (``kangaroo``, ``hispec``) for the first ``n`` members:
    samples each decode member's drafts (``drafts``: Kangaroo's D_i, HiSpec's buffer m) and
    accepted prefix (``accepted``) on the counter-based draws (stream ``base``, first draw ``dr``)
    as the method's ``step`` does, and returns the step's compute time (ms, no overhead).
    ``p_d``/``p_f``: scratch rows for HiSpec's two-level kernel."""
    kind = mi[MI_KIND]
    width = mi[MI_WIDTH]
    n_layers = mi[MI_LAYERS]
    if kind == M_KANGAROO:
        capmax = 0
        for m in range(n):
            c = k[m] if k[m] < width else width
            if c > capmax:
                capmax = c
        early = mi[MI_EARLY] != 0
        for m in range(n):
            drafts[m] = 0
            accepted[m] = 0
            if capmax > 0:
                i = idx[m]
                c = k[m] if k[m] < width else width
                cl = class_idx[i]
                d, a = kangaroo_member_draws(probs[i], conf_a[cl], conf_r[cl], early, base[m], dr[m], c, width)
                drafts[m] = d
                accepted[m] = a
        return early_exit_ms(cpi, cpf, n, drafts, pre, fed, ctx, mi[MI_EXIT], n_layers, True)
    if kind == M_HISPEC1:
        # d = min(k, N_d) drafts; the accepted prefix of the N_d uniforms per member
        dm = 0
        for m in range(n):
            d = k[m] if k[m] < width else width
            drafts[m] = d
            if d > dm:
                dm = d
        for m in range(n):
            a = 0
            if dm > 0:
                i = idx[m]
                while a < drafts[m] and _uniform(base[m], dr[m] + np.uint64(a)) < probs_d[i, a]:
                    a += 1
            accepted[m] = a
        return early_exit_ms(cpi, cpf, n, drafts, pre, fed, ctx, mi[MI_EXIT], n_layers, False)
    # two-level HiSpec (HiSpec._step_kernel)
    nd = width
    ni = mi[MI_NI]
    kw = p_f.shape[1]
    for m in range(n):
        i = idx[m]
        for j in range(nd):
            p_d[m, j] = probs_d[i, j]
        for j in range(kw):
            p_f[m, j] = probs[i, j]
    (buf, acc, inner, n_iter, it_b, it_tok, it_ctx, it_dmax, r_cnt, r_ctx, n_pre, fed_pre, fed_last, fed_full,
     ctx_all, buf_all) = hispec_step(p_d[:n], p_f[:n], base[:n], dr[:n], k[:n], pre[:n], fed[:n], ctx[:n], nd, ni)
    for m in range(n):
        drafts[m] = buf[m]
        accepted[m] = acc[m]
    ld = mi[MI_EXIT]
    li = mi[MI_INTER]
    ms = 0.0
    for t in range(n_iter):
        r = 0.0
        for j in range(it_dmax[t]):
            b = r_cnt[t, j]
            bf = float(b)
            r += slice_ms(cpi, cpf, 0, ld, bf, bf, float(r_ctx[t, j]) + j * b, True, True, False, bf)
        ms += r
        tok = float(it_tok[t])
        ms += slice_ms(cpi, cpf, ld, li, float(it_b[t]), tok, float(it_ctx[t]), False, True, False, tok)
    ctx_sum = float(ctx_all)
    last = float(fed_last)
    ms += slice_ms(cpi, cpf, 0, li, float(n), last, ctx_sum + float(buf_all), True, False, False, last)
    logits = float(fed_full) - float(fed_pre) + float(n_pre)
    ms += slice_ms(cpi, cpf, li, n_layers, float(n), float(fed_full), ctx_sum, False, True, False, logits)
    return ms


# ------------------------------------------------------------------------------ estimates (LAPS-SD)
@jit
def early_exit_estimates(cpi, cpf, mi, mf, batch_size, kv_tokens, k):
    """``stage_estimates_ms(B, kv, k)`` of ``kangaroo`` and ``hispec`` (no overhead):
    Kangaroo (one drafting round over the batch, verification at k drafts with the last draft's
    shallow layers); HiSpec (inner-loop time per buffered token, full verification at a buffer of
    k tokens; single-level: 0), from the expected inner iterations and buffer at k in ``mf``."""
    b = batch_size
    kv = kv_tokens
    n_layers = mi[MI_LAYERS]
    ex = mi[MI_EXIT]
    if mi[MI_KIND] == M_KANGAROO:
        draft = slice_ms(cpi, cpf, 0, ex, b, b, kv, True, True, True, b)
        verify = slice_ms(cpi, cpf, 0, ex, b, b, kv, True, False, False, b)
        t = b * (k + 1)
        verify += slice_ms(cpi, cpf, ex, n_layers, b, t, kv, False, True, False, t)
        return draft, verify
    kmax = mi[MI_KMAX]
    iters = mf[k]
    buf = mf[kmax + 1 + k]
    nd = mi[MI_WIDTH]
    li = mi[MI_INTER]
    single = mi[MI_KIND] == M_HISPEC1
    # HiSpec._iteration_ms
    it = nd * slice_ms(cpi, cpf, 0, ex, b, b, kv, True, True, False, b)
    if single:
        it += slice_ms(cpi, cpf, 0, ex, b, b, kv, True, False, False, b)
        t = b * (nd + 1)
        it = it + slice_ms(cpi, cpf, ex, n_layers, b, t, kv, False, True, False, t)
    else:
        t = b * nd
        it = it + slice_ms(cpi, cpf, ex, li, b, t, kv, False, True, False, t)
    inner = iters * it
    per_token = inner / buf if buf > 0 else 0.0
    if single:
        return per_token, 0.0
    t = b * (k + 1)
    full = (slice_ms(cpi, cpf, 0, li, b, b, kv, True, False, False, b)
            + slice_ms(cpi, cpf, li, n_layers, b, t, kv, False, True, False, t))
    return per_token, full
