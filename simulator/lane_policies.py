"""Speculation-length policies and schedulers compiled for the fast lane
(:mod:`simspec.simulator.fastlane`): SmartSpec's decision (``policies/smartspec.py``), and the
``order`` / ``observe`` of LAS, LAPS-SD (``policies/las.py``, ``policies/laps_sd.py``) and SRPT
(``policies/srpt.py``), with the same arithmetic, the same stable sorts and LAPS-SD's float32
stability ring compared in float32 as numpy compares a float32 array with a Python float. The
lane mutates the scheduler object's own state arrays, so its ``extra_columns`` are the run's.
"""

from __future__ import annotations

import numpy as np

from simspec.simulator.kernels import jit
from simspec.simulator.lane_cost import F_FIXED, F_FRAC, draft_pass_ms, target_ms
from simspec.simulator.lane_methods import (M_DRAFT, M_KANGAROO, MI_DRAFT_LAYERS, MI_KIND, MI_PER_STEP,
                                            early_exit_estimates)


@jit
def expected_step_ms(cpi, cpf, draft_layers, per_step_draft, batch_size, kv_tokens, k):
    """:meth:`Method.expected_step_ms` of ``draft`` (:meth:`DraftModel.stage_estimates_ms`): a
    decode step of ``batch_size`` requests at uniform ``k``, overhead included (ms)."""
    draft = draft_pass_ms(cpi, cpf, draft_layers, batch_size, batch_size, kv_tokens, batch_size)
    if per_step_draft:
        draft = draft / k if k > 0 else 0.0
    t = batch_size * (k + 1)
    verify = target_ms(cpi, cpf, batch_size, t, kv_tokens, k > 0, t)
    return (k * draft + verify) * (1.0 + cpf[F_FRAC]) + cpf[F_FIXED]


@jit
def smartspec_decide(cpi, cpf, draft_layers, per_step_draft, batch_size, kv_tokens, kv_free_tokens, alpha, k_max,
                     bonus, n, pre, res, left, good):
    """SmartSpec's decision (``SmartSpec._decide`` and ``choose_by_goodput``) for the decode
    members (``pre`` False among the first ``n``; ``res``: drafts reserved, ``left``: tokens left
    − 1): the end of the leading run of k = 1..k_max whose goodput (expected tokens ``B·Σ_{j≤k}
    α̂^j`` per expected step ms, 0 where the extra drafts exceed the free KV; goodput(0) ×
    ``bonus``) strictly improves. Returns −1 when two compared goodputs are within 1e-12 of each
    other (relative): the engine computes α̂^j with numpy's power, which on some CPUs differs from
    the C library's in the last bit, so such a comparison is left to the engine."""
    a = alpha
    if a < 0.0:
        a = 0.0
    elif a > 1.0:
        a = 1.0
    tok = 0.0
    for j in range(k_max + 1):
        tok += a ** float(j)
        extra = 0
        for m in range(n):
            if not pre[m]:
                e = min(j, left[m]) - res[m]
                extra += e if e > 0 else 0
        if extra <= kv_free_tokens:
            good[j] = (batch_size * tok) / expected_step_ms(cpi, cpf, draft_layers, per_step_draft, batch_size,
                                                              kv_tokens, j)
        else:
            good[j] = 0.0
    good[0] *= bonus
    k = 0
    for j in range(1, k_max + 1):
        x = good[j]
        y = good[j - 1]
        if x != 0.0 and y != 0.0 and abs(x - y) <= 1e-12 * max(abs(x), abs(y)):
            return -1
        if x > y:
            k = j
        else:
            break
    return k


# ------------------------------------------------------------------------------ schedulers (LAS, LAPS-SD)
#: scheduler kinds of the lane
SCHED_FCFS, SCHED_LAS, SCHED_LAPS, SCHED_SRPT = 0, 1, 2, 3


@jit
def stage_estimates(cpi, cpf, mi, mf, batch_size, kv_tokens, k):
    """``method.stage_estimates_ms(B, kv, k)`` (no overhead): ``none`` and ``draft`` (draft ms per
    draft token, verify ms), the early-exit methods by :func:`lane_methods.early_exit_estimates`."""
    if mi[MI_KIND] >= M_KANGAROO:
        return early_exit_estimates(cpi, cpf, mi, mf, batch_size, kv_tokens, k)
    draft = 0.0
    if mi[MI_KIND] == M_DRAFT:
        draft = draft_pass_ms(cpi, cpf, mi[MI_DRAFT_LAYERS], batch_size, batch_size, kv_tokens, batch_size)
        if mi[MI_PER_STEP] != 0:
            draft = draft / k if k > 0 else 0.0
    t = batch_size * (k + 1)
    verify = target_ms(cpi, cpf, batch_size, t, kv_tokens, k > 0, t)
    return draft, verify


@jit
def mlq_order(active, sched_kind, by_arrival, time_service, merge_ahead, max_batch, queue, attained, queue_end,
              served, perceptible, spec_len, drafted_sum, accepted_sum, predicted, in_batch, prompt_tokens, cpi, cpf,
              mi, mf, generated):
    """``MultiLevelQueues.order`` / ``LAPSSD.order`` / ``SRPT.order`` of ``active`` (the scheduler's
    priority order; stable sorts, so ties keep ``active``'s order — SRPT's by request row)."""
    na = active.shape[0]
    if sched_kind == 3:
        # SRPT: lexsort((active, max(predicted − generated, 1))): by key, ties by row
        o = np.argsort(active, kind="mergesort")
        kk = np.empty(na, dtype=np.float64)
        for a in range(na):
            i = active[o[a]]
            r = predicted[i] - generated[i]
            kk[a] = r if r > 1.0 else 1.0
        o2 = np.argsort(kk, kind="mergesort")
        out = np.empty(na, dtype=np.int64)
        for a in range(na):
            out[a] = active[o[o2[a]]]
        return out
    any_perc = False
    if sched_kind == 2:
        for a in range(na):
            if perceptible[active[a]]:
                any_perc = True
                break
    if not any_perc:
        if by_arrival:
            qk = np.empty(na, dtype=np.int64)
            for a in range(na):
                qk[a] = queue[active[a]]
            return active[np.argsort(qk, kind="mergesort")]
        ak = np.empty(na, dtype=np.float64)
        for a in range(na):
            ak[a] = attained[active[a]]
        return active[np.argsort(ak, kind="mergesort")]
    # LAPSSD.batch_shape: the active requests of the replica's last batch (else the first ones)
    bn = 0
    kv_i = 0
    for a in range(na):
        i = active[a]
        if in_batch[i]:
            bn += 1
            kv_i += prompt_tokens[i] + served[i]
    if bn == 0:
        bn = max(1, min(na, max_batch))
        for a in range(bn):
            i = active[a]
            kv_i += prompt_tokens[i] + served[i]
    bsz = float(bn)
    kv = float(kv_i)
    nmax = 0
    for a in range(na):
        i = active[a]
        if perceptible[i] and spec_len[i] > nmax:
            nmax = spec_len[i]
    cost = np.zeros(nmax + 1)
    seen = np.zeros(nmax + 1, dtype=np.bool_)
    for a in range(na):
        i = active[a]
        if perceptible[i]:
            seen[spec_len[i]] = True
    for nv in range(nmax + 1):
        if seen[nv]:
            d, v = stage_estimates(cpi, cpf, mi, mf, bsz, kv, nv)
            cost[nv] = nv * d + v
    key = np.empty(na, dtype=np.float64)
    qg = np.empty(na, dtype=np.int64)
    for a in range(na):
        i = active[a]
        key[a] = 0.0 if by_arrival else attained[i]
        qg[a] = 3 * queue[i] + 1
        if perceptible[i]:
            rem = predicted[i] - served[i]
            if rem < 1.0:
                rem = 1.0
            dsum = drafted_sum[i]
            acc = accepted_sum[i] / dsum if dsum > 0 else 0.0
            n = spec_len[i]
            t_est = rem * cost[n] / (n * acc + 1.0)
            key[a] = t_est
            if merge_ahead:
                qg[a] -= 1
            else:
                left = queue_end[queue[i]] - attained[i]
                need = t_est if time_service else rem
                qg[a] += -1 if need <= left else 1
    o = np.argsort(key, kind="mergesort")
    qo = np.empty(na, dtype=np.int64)
    for a in range(na):
        qo[a] = qg[o[a]]
    o2 = np.argsort(qo, kind="mergesort")
    out = np.empty(na, dtype=np.int64)
    for a in range(na):
        out[a] = active[o[o2[a]]]
    return out


@jit
def mlq_observe(sched_kind, time_service, idx, pre, plan_fed, committed, drafted, accepted, n, step_ms, end_s,
                thresholds, attained, served, queue, queue_changes, spec_len, drafted_sum, accepted_sum, acc_steps,
                history, perceptible, perceptible_at_s, m_steps, eps32):
    """``MultiLevelQueues.observe`` (+ ``LAPSSD.observe``) of one step's first ``n`` members."""
    nthr = thresholds.shape[0]
    w = history.shape[1]
    for m in range(n):
        i = idx[m]
        served[i] += committed[m]
        if time_service:
            attained[i] += step_ms
        else:
            attained[i] += plan_fed[m] if pre[m] else committed[m]
        # searchsorted(thresholds, attained, side="right")
        a = attained[i]
        q = 0
        while q < nthr and thresholds[q] <= a:
            q += 1
        queue_changes[i] += q - queue[i]
        queue[i] = q
    if sched_kind != 2:
        return
    for m in range(n):
        if pre[m]:
            continue
        i = idx[m]
        spec_len[i] = drafted[m]
        if drafted[m] <= 0:
            continue
        drafted_sum[i] += drafted[m]
        accepted_sum[i] += accepted[m]
        c = acc_steps[i]
        history[i, c % w] = np.float32(accepted_sum[i] / drafted_sum[i])
        c += 1
        acc_steps[i] = c
        if c >= m_steps and not perceptible[i]:
            hi = np.float32(-np.inf)
            lo = np.float32(np.inf)
            seen = False
            for j in range(w):
                x = history[i, j]
                if not np.isnan(x):
                    seen = True
                    if x > hi:
                        hi = x
                    if x < lo:
                        lo = x
            if seen and np.float32(hi - lo) < eps32:
                perceptible[i] = True
                perceptible_at_s[i] = end_s


def _scheduler_state(config, scheduler) -> tuple:
    """The scheduler's kind, parameters and state arrays for the lane, in ``lane_replica``'s
    argument order (its own arrays, mutated in place, so its ``extra_columns`` are the run's);
    one-element placeholders where a scheduler has no such state (FCFS has none)."""
    f, i, b = np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.bool_)
    st = dict(kind=SCHED_FCFS, by_arrival=True, time_service=False, merge_ahead=False, thresholds=f, queue_end=f,
              m=1, eps=np.float32(0.0), attained=f, served=i, queue=i, queue_changes=i, spec_len=i, drafted_sum=i,
              accepted_sum=i, acc_steps=i, history=np.zeros((1, 1), dtype=np.float32), perceptible=b,
              perceptible_at_s=f, predicted=f)
    name, sc = config.scheduler.name, scheduler
    if name == "srpt":
        st.update(kind=SCHED_SRPT, predicted=np.asarray(sc.predicted, dtype=np.float64))
    elif name in ("las", "laps-sd"):  # the multi-level queues
        st.update(kind=SCHED_LAS, by_arrival=bool(sc.by_arrival), time_service=bool(sc.time_service),
                  thresholds=np.asarray(sc.thresholds, dtype=np.float64),
                  queue_end=np.asarray(sc.queue_end, dtype=np.float64), attained=sc.attained, served=sc.served_tokens,
                  queue=sc.queue, queue_changes=sc.queue_changes)
        if name == "laps-sd":  # and the stability test, the remaining-time estimate
            st.update(kind=SCHED_LAPS, merge_ahead=bool(sc.merge_ahead), m=int(sc.m), eps=np.float32(sc.eps),
                      spec_len=sc.spec_len, drafted_sum=sc.drafted_sum, accepted_sum=sc.accepted_sum,
                      acc_steps=sc.acc_steps, history=sc.history, perceptible=sc.perceptible,
                      perceptible_at_s=sc.perceptible_at_s, predicted=sc.predicted)
    return tuple(st.values())


_SCHED_ARRAYS = ("attained", "served_tokens", "queue", "queue_changes", "spec_len", "drafted_sum", "accepted_sum",
                 "acc_steps", "history", "perceptible", "perceptible_at_s")
