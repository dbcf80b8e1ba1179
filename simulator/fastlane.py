"""The fast lane: a whole replica's run as one compiled loop, for the most common configuration.

What it covers (:func:`eligible`): ``--batching vllm`` or ``preemptive``
(:mod:`simspec.simulator.lane_preemptive`), the ``fcfs``, ``srpt``, ``las`` and
``laps-sd`` schedulers (their ordering and, for LAS / LAPS-SD, their observations: attained
service, queues, the stability test), the ``fixed`` or ``smartspec`` (global) speculation length,
the ``none`` and ``draft`` methods (and ``kangaroo`` and ``hispec`` with a fixed speculation
length: :mod:`simspec.simulator.lane_methods`), open-loop arrivals, round-robin routing (or one replica) —
there every replica sees a known list of arrivals and runs independently of the others, and every
decision of a step (vLLM's running and waiting passes, k, the step's cost, acceptance,
bookkeeping) is a function of the replica's own state. :func:`run` then simulates each replica in
one call of a compiled kernel (numba; :mod:`simspec.simulator.kernels`) instead of
a SimPy process with one event per step or window: no Python per step, arrival or completion.

It is the same model, not an approximation: the loop is one step per iteration, exactly the
engine's one-step semantics (``window_steps=1``), written with the engine's own kernels where they
exist (the running pass and its block grants, draft acceptance draws, the step's table
bookkeeping: their ``_into`` forms), vLLM's preemption loop (recompute) as
:meth:`BatchFormer._grant_preempting` runs it, the member gather, k clipping and step sums of
``kernels.mixed_prepare`` / ``clip_k`` / ``mixed_k_fed`` / ``draft_step_sums`` inline, and a
compiled copy of the cost model's scalar arithmetic (stage evaluation, ``target_ms``, the draft
passes, ``finish``) in the same operation order. Outputs are byte-identical to the SimPy engine's
(requests, steps, summary, ITL samples) — ``tests/test_fastlane.py`` checks that on many
configurations.

Where the engine would do something the lane does not model, the lane stops and the run falls
back to the SimPy engine from the start (the request table is restored first), so the answer never
depends on the lane: swap preemption, a whole prompt over the token budget without chunked
prefill (vLLM's one-at-a-time pass), an empty batch (the engine raises its own error), an
arrival within a few ulps of a step's end (which side of the step it lands on depends on SimPy's
event order), or a SmartSpec decision between two goodputs within 1e-12 of each other (the policy
computes α̂^j with numpy's power, whose SIMD kernels differ from the C library's ``pow`` in the
last bit on ~2 % of inputs on this machine's AVX-512 CPU). ``SIMSPEC_FASTLANE=0`` turns the lane off,
``1`` uses it even with the plain (uncompiled) kernels; the default uses it when the kernels are
compiled.

Arrival times: the SimPy arrival process wakes at ``now + (arrival − now)`` after the previous
arrival, which can differ from ``arrival_s`` by an ulp; an idle replica's clock starts from that
time, so the lane computes the same values (:func:`fire_times`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from simspec.memory import release_free_memory
from simspec.simulator import kernels
from simspec.simulator.kernels import (blocks_needed, draft_accept_into, gather_members_into, grant_blocks, grant_one,
                                       jit, mixed_step_progress_into, preempt_kv, preemption_plan,
                                       vllm_running_asks_into)
from simspec.simulator.lane_cost import (F_FIXED, F_FRAC, CostPack, draft_pass_ms, pack_cost,  # noqa: F401
                                         target_ms)
from simspec.simulator.lane_methods import (M_DRAFT, M_KANGAROO, MI_DRAFT_LAYERS, MI_DRAWS, MI_KIND, MI_KMAX,
                                            MI_PER_STEP, MI_WIDTH, lane_method_reason, method_pack, method_step_ms)
from simspec.simulator.lane_preemptive import PLAN_OK, preemptive_plan, request_ask
from simspec.simulator.lane_policies import (_SCHED_ARRAYS, _scheduler_state, mlq_observe, mlq_order,
                                             smartspec_decide)

# return codes of lane_replica
OK, BAIL_PREEMPT, BAIL_NO_CHUNK, BAIL_EMPTY, BAIL_TIE, BAIL_TIE_GOODPUT = range(6)
BAIL_WHY = {BAIL_PREEMPT: "a KV allocation failed (preemption) under --preempt-mode swap",
            BAIL_NO_CHUNK: "a whole prompt over the token budget without chunked prefill",
            BAIL_EMPTY: "no request could be scheduled",
            BAIL_TIE: "an arrival within a few ulps of a step's end",
            BAIL_TIE_GOODPUT: "a SmartSpec decision between goodputs within 1e-12 of each other"}

#: log modes (StepLog's ``full``, ``sampled``, ``none``)
_LOG_MODE = {"full": 0, "sampled": 1, "none": 2}

_FLOAT_COLS = ("start_s", "end_s", "step_ms", "policy_value")
_INT_COLS = ("step", "batch_size", "prefills", "k_max", "drafted", "accepted", "committed", "fed_tokens",
             "kv_tokens_used", "queue_len")


# ------------------------------------------------------------------------------ eligibility
def eligible(config, method, n_replicas: int) -> str | None:
    """Why ``config`` cannot run in the fast lane (a short phrase), or None when it can."""
    env = os.environ.get("SIMSPEC_FASTLANE", "auto").strip().lower()
    if env in ("0", "false", "no", "off"):
        return "SIMSPEC_FASTLANE=0"
    if env not in ("1", "true", "yes", "on") and kernels.MODE != "compiled":
        return "kernels not compiled"
    if config.batching not in ("vllm", "preemptive"):
        return f"batching {config.batching}"
    if config.scheduler.name not in ("fcfs", "las", "laps-sd", "srpt"):
        return f"scheduler {config.scheduler.name}"
    if config.spec_len.name not in ("fixed", "smartspec"):
        return f"spec-len {config.spec_len.name}"
    why = lane_method_reason(method) if method.name in ("none", "draft", "kangaroo", "hispec") else None
    if method.name not in ("none", "draft", "kangaroo", "hispec"):
        return f"method {method.name}"
    if why is not None:
        return why
    if method.name in ("kangaroo", "hispec") and config.spec_len.name == "smartspec":
        return f"spec-len smartspec with method {method.name}"
    if config.max_concurrency is not None:
        return "closed loop (--max-concurrency)"
    if n_replicas > 1 and config.router != "round-robin":
        return f"router {config.router}"
    return None


# ------------------------------------------------------------------------------ arrivals
@jit
def fire_times(arrival_s):
    """When SimPy's arrival process handles each request: it sleeps ``arrival − now`` after the
    previous one (no sleep for an arrival not later than now), so it wakes at ``now + (arrival −
    now)`` — ``arrival_s`` itself up to rounding."""
    n = arrival_s.shape[0]
    out = np.empty(n, dtype=np.float64)
    now = 0.0
    for i in range(n):
        a = arrival_s[i]
        if a > now:
            now = now + (a - now)
        out[i] = now
    return out


# ------------------------------------------------------------------------------ growable buffers
@jit
def _grow_cols(a, n):
    """``a`` (rows × columns) with room for at least ``n`` columns (doubling), its contents kept."""
    b = np.empty((a.shape[0], max(2 * a.shape[1], n)), dtype=a.dtype)
    b[:, : a.shape[1]] = a
    return b


@jit
def _grow(a, n):
    """``a`` with room for at least ``n`` entries (doubling), its contents kept."""
    b = np.empty(max(2 * a.shape[0], n), dtype=a.dtype)
    b[: a.shape[0]] = a
    return b


@jit
def _waiting_room(wb, wh, wt):
    """Room for one more entry at the end of the waiting list ``wb[wh:wt]``: when the buffer is
    full, the list moves to its start. Returns the new ``(wh, wt)``."""
    if wt == wb.shape[0]:
        for q in range(wt - wh):
            wb[q] = wb[wh + q]
        wt -= wh
        wh = 0
    return wh, wt


# ------------------------------------------------------------------------------ the replica loop
@jit
def lane_replica(reqs, fire_s, rid, max_batch, total_blocks, watermark_blocks, block_size, budget0, threshold,
                 chunked, swap, preemptive, k_fixed, smartspec, ss, mi, mf, probs, has_probs, probs_d, conf_a, conf_r,
                 cpi, cpf, log_mode, log_every,
                 sched_kind, by_arrival, time_service, merge_ahead, thresholds, queue_end, m_steps, eps32, attained,
                 served, queue, queue_changes, spec_len, lp_drafted, lp_accepted, acc_steps, history, perceptible,
                 perceptible_at_s, predicted, in_batch, mark, rank,
                 computed, prefill_target, generated, output_tokens, prompt_tokens, kv_blocks, kv_tokens, kv_resident,
                 start_s, first_token_s, completion_s, steps_col, decode_steps, drafted_col, accepted_col,
                 positions_col, draws_col, rng_base, alpha, class_idx, pauses, preemptions, recomputes,
                 recomputed_tokens, last_token_s):
    """Replay one replica's requests ``reqs`` (table rows in arrival order; ``fire_s`` their SimPy
    arrival times) one step per iteration, exactly as :class:`~simspec.simulator.engine.Replica`
    does under the lane's configuration (see the module docstring), updating the table columns in
    place. Returns ``(status, busy_s, n_steps, batch_size_sum, fcols, icols, n_rows, itl_values,
    itl_counts, n_itl)``: ``status`` :data:`OK` or a ``BAIL_*`` code; the step log's kept rows
    (float columns start, end, step_ms; int columns as :data:`_INT_COLS`); the ITL samples
    (seconds, with counts). Per-member work uses buffers allocated once (FCFS with fixed k allocates
    nothing per step; a priority scheduler's order allocates its sort keys)."""
    nreq = reqs.shape[0]
    # the method (simulator/lane_methods.py: MethodPack)
    kind = mi[MI_KIND]
    method_k = mi[MI_KMAX]
    method_draft = kind == M_DRAFT
    draws_per_step = mi[MI_DRAWS]
    draft_layers = mi[MI_DRAFT_LAYERS]
    per_step_draft = mi[MI_PER_STEP] != 0
    fcols = np.empty((4, 1024), dtype=np.float64)
    icols = np.empty((10, 1024), dtype=np.int64)
    n_rows = 0
    itl_v = np.empty(1024, dtype=np.float64)
    itl_c = np.empty(1024, dtype=np.int64)
    n_itl = 0
    mb = max_batch + 1
    # admitted requests holding KV, in admission order (vllm) / every resident, in row order
    # (preemptive: residents paused out of the batch keep their KV, so there can be more than a batch)
    running = np.empty(nreq + mb if preemptive else mb, dtype=np.int64)
    n_run = 0
    # the waiting list: wb[wh:wt], in row (= arrival) order — new arrivals appended, preempted
    # requests inserted in place; FCFS admits a prefix, the other schedulers any subset
    wcap = nreq + mb + 1
    wb = np.empty(wcap, dtype=np.int64)
    wh = 0
    wt = 0
    nxt = 0  # reqs[nxt:] have not arrived (been handled by the arrival process) yet
    last_batch = np.empty(mb, dtype=np.int64)  # unfinished members of the latest step (in_batch)
    n_last = 0
    # the running pass' outputs (vllm_running_asks_into), and the step's members
    order = np.empty(mb, dtype=np.int64)
    fed_r = np.empty(mb, dtype=np.int64)
    k_r = np.empty(mb, dtype=np.int64)
    slots_r = np.empty(mb, dtype=np.int64)
    pre_r = np.empty(mb, dtype=np.bool_)
    need_r = np.empty(mb, dtype=np.int64)
    idx = np.empty(mb, dtype=np.int64)
    pre = np.empty(mb, dtype=np.bool_)
    plan_fed = np.empty(mb, dtype=np.int64)
    k_resv = np.empty(mb, dtype=np.int64)
    gen = np.empty(mb, dtype=np.int64)
    rem = np.empty(mb, dtype=np.int64)
    ctx = np.empty(mb, dtype=np.int64)
    base = np.empty(mb, dtype=np.uint64)
    dr = np.empty(mb, dtype=np.uint64)
    k = np.empty(mb, dtype=np.int64)
    fed = np.empty(mb, dtype=np.int64)
    out_acc = np.zeros(mb, dtype=np.int64)
    out_pos = np.zeros(mb, dtype=np.int64)
    drafted = np.empty(mb, dtype=np.int64)
    accepted = np.empty(mb, dtype=np.int64)
    pos_acc = np.empty(mb, dtype=np.int64)
    committed = np.empty(mb, dtype=np.int64)
    finished = np.empty(mb, dtype=np.bool_)
    m_drafts = np.zeros(mb, dtype=np.int64)  # an early-exit method's drafts (HiSpec: buffer) and accepted prefix
    m_acc = np.zeros(mb, dtype=np.int64)
    p_d = np.empty((mb, max(mi[MI_WIDTH], 1)), dtype=np.float64)  # two-level HiSpec's per-member rows
    p_f = np.empty((mb, probs.shape[1]), dtype=np.float64)
    kcap = method_k + 1
    pass_count = np.zeros(kcap, dtype=np.int64)
    pass_ctx = np.zeros(kcap, dtype=np.int64)
    # SmartSpec (global) state, as policies/smartspec.py keeps it: its k (k_max until the first
    # decision), the window of its latest decision, α̂ and the cumulative counters behind it
    ss_interval = int(ss[0])
    ss_bonus = ss[1]
    ss_kmax = int(ss[2])
    ss_probe = int(ss[3])
    ss_ema = ss[4] != 0.0
    ss_decay = ss[5]
    alpha_hat = ss[6]
    ss_k = ss_kmax
    ss_window = -1
    ss_drafted = 0
    ss_accepted = 0
    kpol = np.empty(mb, dtype=np.int64)
    res_m = np.empty(mb, dtype=np.int64)
    left_m = np.empty(mb, dtype=np.int64)
    good = np.empty(kcap, dtype=np.float64)
    no_used = np.zeros(1, dtype=np.uint64)
    # preemptive batching's scratch (simulator/lane_preemptive.py): the active requests, their
    # order (residents only for the retry), the batch's candidates and residents, paused residents
    pcap = nreq + 1 if preemptive else 1
    act = np.empty(pcap, dtype=np.int64)
    act_res = np.empty(pcap, dtype=np.int64)
    paused_b = np.empty(pcap, dtype=np.int64)
    sel_b = np.empty(mb, dtype=np.int64)
    resident_b = np.empty(mb, dtype=np.bool_)
    live_b = np.empty((mb, 5), dtype=np.int64)
    free = total_blocks
    clock = 0.0
    busy = 0.0
    step_index = 0
    bsum = 0
    frac = cpf[F_FRAC]
    fixed_ms = cpf[F_FIXED]
    while True:
        if n_run == 0 and wh == wt:
            if nxt == nreq:
                break
            # idle: woken by the next arrival; every arrival handled at that instant is pending
            clock = fire_s[nxt]
            while nxt < nreq and fire_s[nxt] <= clock:
                wb[wt] = reqs[nxt]
                wt += 1
                nxt += 1
        now = clock
        preempted = False
        k_res = ss_k if smartspec else k_fixed  # SpecLenPolicy.k_reserve()
        # ---- schedule: vLLM's running pass (FCFS order = admission order), then the waiting pass;
        # or (preemptive) the top of the scheduler's order over every active request
        budget = budget0
        n_sched = 0
        live_end = n_run  # order[:live_end] still running (victims come off the end)
        if preemptive:
            # BatchFormer.schedule_preemptive: active = running ∪ waiting, in row order
            na = 0
            a = 0
            b = wh
            while a < n_run or b < wt:
                if b >= wt or (a < n_run and running[a] < wb[b]):
                    act[na] = running[a]
                    a += 1
                else:
                    act[na] = wb[b]
                    b += 1
                na += 1
            for attempt in range(2):
                if sched_kind != 0 and na > 1:
                    p_order = mlq_order(act[:na], sched_kind, by_arrival, time_service, merge_ahead, max_batch,
                                        queue, attained, queue_end, served, perceptible, spec_len, lp_drafted,
                                        lp_accepted, predicted, in_batch, prompt_tokens, cpi, cpf, mi, mf, generated)
                else:
                    p_order = act[:na]
                if attempt == 1:  # nothing could run: the highest-priority requests that hold KV
                    nr = 0
                    for q in range(p_order.shape[0]):
                        if kv_blocks[p_order[q]] > 0:
                            act_res[nr] = p_order[q]
                            nr += 1
                    p_order = act_res[:nr]
                status, n_sched, budget, free, pre_flag = preemptive_plan(
                    p_order, max_batch, budget0, k_res, threshold, chunked, block_size, free, total_blocks,
                    watermark_blocks, swap, computed, prefill_target, generated, output_tokens, prompt_tokens,
                    kv_blocks, kv_tokens, kv_resident, preemptions, recomputes, recomputed_tokens, rank, mark, idx, pre,
                    plan_fed, k_resv, sel_b, resident_b, live_b, paused_b)
                if pre_flag:
                    preempted = True
                if status != PLAN_OK:
                    return BAIL_PREEMPT, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
                if n_sched > 0 or attempt == 1:
                    break
                any_kv = False
                for q in range(na):
                    if kv_blocks[act[q]] > 0:
                        any_kv = True
                        break
                if not any_kv:
                    break
            # residents = the requests holding KV; everyone else waits (both in row order)
            n_run = 0
            wh = 0
            wt = 0
            for q in range(na):
                i = act[q]
                if kv_blocks[i] > 0:
                    running[n_run] = i
                    n_run += 1
                else:
                    wb[wt] = i
                    wt += 1
            # pauses: residents left out of the batch (Replica._count_pauses)
            if n_run > n_sched:
                for m in range(n_sched):
                    mark[idx[m]] = True
                for q in range(n_run):
                    if not mark[running[q]]:
                        pauses[running[q]] += 1
                for m in range(n_sched):
                    mark[idx[m]] = False
            live_end = 0
        elif n_run > 0:
            if sched_kind != 0 and n_run > 1:
                run_order = mlq_order(running[:n_run], sched_kind, by_arrival, time_service, merge_ahead, max_batch,
                                      queue, attained, queue_end, served, perceptible, spec_len, lp_drafted,
                                      lp_accepted, predicted, in_batch, prompt_tokens, cpi, cpf, mi, mf,
                                      generated)
            else:
                run_order = running[:n_run].copy()
            cut, granted, fed_cut = vllm_running_asks_into(
                run_order, n_run, computed, prefill_target, generated, output_tokens, prompt_tokens, kv_blocks, k_res,
                threshold, budget, chunked, block_size, free, kv_tokens, kv_resident, order, fed_r, k_r, slots_r, pre_r,
                need_r)
            if granted >= 0:
                free -= granted
                budget -= fed_cut
                n_sched = cut
            elif cut < 0:
                return BAIL_NO_CHUNK, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
            elif swap:
                return BAIL_PREEMPT, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
            else:
                # KV short: vLLM's preemption loop (BatchFormer._grant_preempting), recompute mode
                pos, new_end = preemption_plan(order, need_r, cut, live_end, free, kv_blocks)
                for q in range(live_end - 1, new_end - 1, -1):  # the victims, lowest priority first
                    v = order[q]
                    preempted = True
                    free += preempt_kv(v, False, kv_blocks, kv_tokens, kv_resident, preemptions, recomputes,
                                       recomputed_tokens, prefill_target, computed, prompt_tokens, generated)
                    w = 0
                    for r in range(n_run):
                        if running[r] != v:
                            running[w] = running[r]
                            w += 1
                    n_run = w
                    # back to the waiting list, in arrival (row) order
                    wh, wt = _waiting_room(wb, wh, wt)
                    r = wt
                    while r > wh and wb[r - 1] > v:
                        wb[r] = wb[r - 1]
                        r -= 1
                    wb[r] = v
                    wt += 1
                live_end = new_end
                n_sched = pos
                free -= grant_blocks(order[:pos], slots_r, need_r, kv_blocks, kv_tokens, kv_resident)
                for m in range(pos):
                    budget -= fed_r[m]
        if not preemptive:
            for m in range(n_sched):
                idx[m] = order[m]
                pre[m] = pre_r[m]
                plan_fed[m] = fed_r[m]
                k_resv[m] = k_r[m]
        # waiting pass (skipped in a step that preempted): preempted requests first (they arrived
        # before anything never admitted), then new arrivals, in arrival order
        n_adm = 0
        if not preemptive and not preempted and wh < wt and n_run < max_batch and budget > 0:
            slots_left = max_batch - n_run
            if sched_kind != 0 and wt - wh > 1:
                worder = mlq_order(wb[wh:wt], sched_kind, by_arrival, time_service, merge_ahead, max_batch, queue,
                                   attained, queue_end, served, perceptible, spec_len, lp_drafted, lp_accepted,
                                   predicted, in_batch, prompt_tokens, cpi, cpf, mi, mf, generated)
            else:
                worder = wb[wh:wt]
            while n_adm < wt - wh:
                if slots_left == 0 or budget <= 0:
                    break
                i = worder[n_adm]
                ok, fed_i, k_i, slots, pre_i = request_ask(i, k_res, budget, threshold, chunked, computed,
                                                           prefill_target, generated, output_tokens, prompt_tokens)
                if not ok:
                    break
                need = blocks_needed(i, slots, block_size, kv_blocks)
                floor = watermark_blocks if free < total_blocks else 0
                if free - need < floor:
                    break
                grant_one(i, slots, need, kv_blocks, kv_tokens, kv_resident)
                free -= need
                running[n_run] = i
                m = n_sched + n_adm
                idx[m] = i
                pre[m] = pre_i
                plan_fed[m] = fed_i
                k_resv[m] = k_i
                n_run += 1
                n_adm += 1
                budget -= fed_i
                slots_left -= 1
        n = n_sched + n_adm
        if n == 0:
            return BAIL_EMPTY, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
        # the admitted leave the waiting list (FCFS: a prefix; otherwise kept in arrival order)
        if n_adm > 0:
            if sched_kind == 0 or wt - wh == 1:
                wh += n_adm
            else:
                for a in range(n_adm):
                    mark[running[n_run - n_adm + a]] = True
                w = wh
                for q in range(wh, wt):
                    if not mark[wb[q]]:
                        wb[w] = wb[q]
                        w += 1
                wt = w
                for a in range(n_adm):
                    mark[running[n_run - n_adm + a]] = False
        # pauses: running requests left out of the step (token budget, or after a preemption)
        for q in range(n_sched, live_end):
            pauses[order[q]] += 1
        # ---- the step (Replica._mixed_step; a decode-only step books the same): the members' state
        # (kernels.gather_members_into, mixed_prepare's gather), k (Replica._choose_k: the policy's
        # k within 0..left-1, and within the reservation unless the extra drafts fit the budget
        # left and free KV), tokens fed (kernels.mixed_k_fed) and the sums the step is costed on
        # (kernels.draft_step_sums)
        any_extra = False
        n_dec, dec_ctx_sum = gather_members_into(idx, pre, n, generated, output_tokens, prompt_tokens, computed,
                                                 rng_base, draws_col, gen, rem, ctx, base, dr)
        for m in range(n):
            kpol[m] = k_fixed
        if smartspec and n_dec > 0:
            # SmartSpec.choose_k over the decode members: a decision at a new window of
            # `interval` steps, the probe, and the KV clip to the free KV
            kfree = free * block_size
            for m in range(n):
                if not pre[m]:
                    lm = rem[m] if rem[m] > 1 else 1
                    left_m[m] = lm - 1
                    res_m[m] = min(k_res, lm - 1)  # the reservation (SmartSpec._reservation)
            window = step_index // ss_interval
            if window != ss_window:
                ss_window = window
                if ss_kmax == 0:
                    ss_k = 0
                else:
                    ss_k = smartspec_decide(cpi, cpf, draft_layers, per_step_draft, float(n_dec), float(dec_ctx_sum),
                                            kfree, alpha_hat, ss_kmax, ss_bonus, n, pre, res_m, left_m, good)
                    if ss_k < 0:
                        return BAIL_TIE_GOODPUT, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
            kp = ss_k
            if ss_k == 0 and ss_probe > 0 and step_index % ss_probe == ss_probe - 1:
                kp = min(1, ss_kmax)
            tot = 0
            for m in range(n):
                if not pre[m]:
                    e = min(kp, left_m[m]) - res_m[m]
                    tot += e if e > 0 else 0
            cum = 0
            for m in range(n):
                if not pre[m]:
                    kpol[m] = kp
                    if tot > kfree:
                        e = min(kp, left_m[m]) - res_m[m]
                        cum += e if e > 0 else 0
                        if cum > kfree:
                            kpol[m] = min(kp, res_m[m])
        for m in range(n):
            if pre[m]:
                k[m] = 0
            else:
                km = kpol[m] if kpol[m] > 0 else 0
                if km > rem[m] - 1:
                    km = rem[m] - 1
                k[m] = km
                if km > k_resv[m]:
                    any_extra = True
        if any_extra:
            cum_e = 0
            cum_b = 0
            for m in range(n):
                if pre[m]:
                    continue
                i = idx[m]
                e = k[m] - k_resv[m]
                cum_e += e if e > 0 else 0
                cum_b += blocks_needed(i, ctx[m] + 1 + k[m], block_size, kv_blocks)
                if cum_e > budget or cum_b > free:
                    finished[m] = True  # (scratch: this member keeps its reservation)
                else:
                    finished[m] = False
            for m in range(n):
                if pre[m]:
                    continue
                if finished[m]:
                    k[m] = min(k[m], k_resv[m])
                elif k[m] > k_resv[m]:
                    i = idx[m]
                    sl = ctx[m] + 1 + k[m]
                    need = blocks_needed(i, sl, block_size, kv_blocks)
                    grant_one(i, sl, need, kv_blocks, kv_tokens, kv_resident)
                    free -= need
        kmax = 0
        kmin = 0
        n_pre = 0
        fed_all_i = 0
        fed_pre_i = 0
        ctx_all_i = 0
        sel_count = 0
        sel_ctx = 0
        for m in range(n):
            km = k[m]
            fm = plan_fed[m] if pre[m] else km + 1
            fed[m] = fm
            if m == 0 or km > kmax:
                kmax = km
            if m == 0 or km < kmin:
                kmin = km
            fed_all_i += fm
            ctx_all_i += ctx[m]
            if pre[m]:
                n_pre += 1
                fed_pre_i += fm
            if km > 0:
                sel_count += 1
                sel_ctx += ctx[m]
        if method_draft and kmax > 0 and not per_step_draft:
            for j in range(kmax):
                pass_count[j] = 0
                pass_ctx[j] = 0
            for m in range(n):
                for j in range(k[m]):
                    pass_count[j] += 1
                    pass_ctx[j] += ctx[m]
        # cost (the method's step(); the same arithmetic as on Python numbers)
        fed_all = float(fed_all_i)
        if n_pre > 0:
            fed_pre = float(fed_pre_i)
            logits = fed_all - fed_pre + float(n_pre)
        else:
            fed_pre = 0.0
            logits = fed_all
        speculating = method_draft and kmax > 0
        out_dr = k
        if kind >= M_KANGAROO:
            # an early-exit method's step: its sampling and cost (simulator/lane_methods.py)
            ms = method_step_ms(mi, cpi, cpf, n, idx, pre, fed, ctx, k, base, dr, class_idx, probs, probs_d, conf_a,
                                conf_r, m_drafts, m_acc, p_d, p_f)
            out_dr = m_drafts
            for m in range(n):
                out_acc[m] = m_acc[m]
                out_pos[m] = m_acc[m]
        else:
            ms = target_ms(cpi, cpf, float(n), fed_all, float(ctx_all_i), speculating, logits)
        if method_draft:
            if n_pre > 0:
                ms += draft_pass_ms(cpi, cpf, draft_layers, float(n_pre), fed_pre, 0.0, float(n_pre))
            if speculating and per_step_draft:
                ms += draft_pass_ms(cpi, cpf, draft_layers, float(sel_count), float(sel_count), float(sel_ctx),
                                    float(sel_count))
            elif speculating:
                for j in range(kmax):
                    b = pass_count[j]
                    ms += draft_pass_ms(cpi, cpf, draft_layers, float(b), float(b), float(pass_ctx[j]) + j * b,
                                        float(b))
        if speculating and has_probs:
            draft_accept_into(probs, idx, base, dr, k, kmax, n, out_acc, out_pos)
        elif kind < M_KANGAROO:
            for m in range(n):
                out_acc[m] = 0
                out_pos[m] = 0
        step_ms = ms * (1.0 + frac) + fixed_ms
        step_s = step_ms / 1000.0
        end = now + step_s
        n_committed, first_prompt, k_max, drafted_sum, accepted_sum, fed_sum = mixed_step_progress_into(
            idx, pre, plan_fed, out_dr, out_acc, out_pos, rem, gen, now, end, computed, prefill_target, generated,
            output_tokens, prompt_tokens, steps_col, decode_steps, drafted_col, accepted_col, positions_col, start_s,
            first_token_s, k, fed, draws_col, draws_per_step, no_used, n, drafted, accepted, pos_acc, committed,
            finished)
        busy += step_s
        kv_used = (total_blocks - free) * block_size
        # the speculation-length policy observes the step (SmartSpec.observe: α̂ from the decode
        # members' drafted and accepted positions)
        if smartspec and drafted_sum > 0:
            pa = 0
            for m in range(n):
                if not pre[m]:
                    pa += pos_acc[m]
            if ss_ema:
                alpha_hat = ss_decay * alpha_hat + (1.0 - ss_decay) * (pa / drafted_sum)
            else:
                ss_drafted += drafted_sum
                ss_accepted += pa
                alpha_hat = ss_accepted / ss_drafted
        # completions: free their blocks, drop them from the running list (order kept)
        any_done = False
        for m in range(n):
            if finished[m]:
                i = idx[m]
                any_done = True
                completion_s[i] = end
                computed[i] = prefill_target[i]
                free += kv_blocks[i]
                kv_blocks[i] = 0
                kv_resident[i] = False
        if any_done:
            w = 0
            for q in range(n_run):
                i = running[q]
                if np.isnan(completion_s[i]):
                    running[w] = i
                    w += 1
            n_run = w
        # the scheduler observes the step (LAS / LAPS-SD), and the replica marks its batch
        # (Replica._mark_batch: in_batch = the unfinished members of this step; LAPS-SD reads it)
        if sched_kind == 1 or sched_kind == 2:
            mlq_observe(sched_kind, time_service, idx, pre, plan_fed, committed, drafted, accepted, n, step_ms, end,
                        thresholds, attained, served, queue, queue_changes, spec_len, lp_drafted, lp_accepted,
                        acc_steps, history, perceptible, perceptible_at_s, m_steps, eps32)
            for q in range(n_last):
                in_batch[last_batch[q]] = False
            n_last = 0
            for m in range(n):
                i = idx[m]
                if np.isnan(completion_s[i]):
                    in_batch[i] = True
                    last_batch[n_last] = i
                    n_last += 1
        # ITL: every member that committed tokens got a chunk at the step's end
        for m in range(n):
            if committed[m] > 0:
                i = idx[m]
                prev = last_token_s[i]
                if not np.isnan(prev):
                    g = end - prev
                    if n_itl > 0 and itl_v[n_itl - 1] == g:
                        itl_c[n_itl - 1] += 1
                    else:
                        if n_itl == itl_v.shape[0]:
                            itl_v = _grow(itl_v, n_itl + 1)
                            itl_c = _grow(itl_c, n_itl + 1)
                        itl_v[n_itl] = g
                        itl_c[n_itl] = 1
                        n_itl += 1
                last_token_s[i] = end
        # the step log
        bsum += n
        if log_mode == 0 or (log_mode == 1 and step_index % log_every == 0):
            if n_rows == fcols.shape[1]:
                fcols = _grow_cols(fcols, n_rows + 1)
                icols = _grow_cols(icols, n_rows + 1)
            fcols[0, n_rows] = now
            fcols[1, n_rows] = end
            fcols[2, n_rows] = step_ms
            fcols[3, n_rows] = alpha_hat if smartspec else np.nan
            icols[0, n_rows] = step_index
            icols[1, n_rows] = n
            icols[2, n_rows] = n_pre
            icols[3, n_rows] = k_max
            icols[4, n_rows] = drafted_sum
            icols[5, n_rows] = accepted_sum
            icols[6, n_rows] = n_committed
            icols[7, n_rows] = fed_sum
            icols[8, n_rows] = kv_used
            icols[9, n_rows] = wt - wh
            n_rows += 1
        step_index += 1
        clock = end
        # arrivals handled before the replica wakes at the step's end join at the next iteration
        tol = 1e-14 * (end if end > 1.0 else 1.0)
        while nxt < nreq:
            f = fire_s[nxt]
            if f < end - tol:
                wh, wt = _waiting_room(wb, wh, wt)
                wb[wt] = reqs[nxt]
                wt += 1
                nxt += 1
            elif f <= end + tol:
                return BAIL_TIE, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl
            else:
                break
    return OK, busy, step_index, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl


# ------------------------------------------------------------------------------ driver
@dataclass
class LaneResult:
    """What the engine's cluster would have left behind: per replica its step log and busy time,
    and the ITL samples of all requests."""

    logs: list
    busy_s: list[float]
    itl: object


_MUTABLE = ("generated", "kv_resident", "in_batch", "start_s", "first_token_s", "completion_s", "steps",
            "decode_steps", "drafted", "accepted", "preemptions", "recomputes", "replica", "position_accepts",
            "prefill_target", "computed", "kv_tokens", "kv_blocks", "pauses", "recomputed_tokens", "draws")


def run(config, table, method, capacity, spec_len, cost, n_replicas: int, scheduler=None):
    """Run every replica in the lane. Returns ``(LaneResult, None)``, or ``(None, why)`` when a
    replica bailed out (the table is then as it was before the call: its mutable columns are
    saved first and written back)."""
    from simspec.simulator.itl import ItlLog
    from simspec.simulator.steplog import StepLog

    saved = {c: getattr(table, c).copy() for c in _MUTABLE}
    saved_sched = {a: getattr(scheduler, a).copy() for a in _SCHED_ARRAYS if hasattr(scheduler, a)}
    sched_state = _scheduler_state(config, scheduler)
    mark = np.zeros(len(table), dtype=np.bool_)
    rank = np.zeros(len(table), dtype=np.int64)  # preemptive batching: each request's place in the order
    pack = pack_cost(cost)
    n = len(table)
    fire = fire_times(np.ascontiguousarray(table.arrival_s, dtype=np.float64))
    bs = capacity.block_size
    total_blocks = capacity.kv_budget_tokens // bs
    watermark_blocks = int(capacity.watermark * total_blocks)
    budget0 = capacity.max_batched_tokens if capacity.max_batched_tokens is not None else 1 << 62
    threshold = capacity.long_prefill_token_threshold or (1 << 62)
    mp = method_pack(method, table)
    log_mode = _LOG_MODE[config.steps_log]
    every = int(config.steps_log_every) if config.steps_log == "sampled" else 1
    last_token = np.full(n, np.nan)
    impl = kernels.compiled() if kernels.MODE == "compiled" else kernels.plain()
    smartspec = config.spec_len.name == "smartspec"
    if smartspec:  # a fresh policy per replica, as the engine builds them: its parameters
        ss = np.array([spec_len.interval, spec_len.bonus, spec_len.k_max, spec_len.probe, 1.0 if spec_len.ema else 0.0,
                       spec_len.decay, spec_len.alpha0], dtype=np.float64)
        k_fixed = 0
    else:
        ss = np.zeros(7)
        k_fixed = int(spec_len.k_reserve())
    t = table
    logs, busy = [], []
    itl = ItlLog(0)  # each replica's samples are added (and consolidated) as it finishes
    for r in range(n_replicas):
        reqs = np.arange(r, n, n_replicas, dtype=np.int64)
        t.replica[reqs] = r
        res = impl["lane_replica"](
            reqs, fire[reqs], r, int(capacity.max_batch_size), int(total_blocks), int(watermark_blocks), int(bs),
            int(budget0), int(threshold), bool(capacity.chunked_prefill), config.preempt_mode == "swap",
            config.batching == "preemptive", k_fixed, smartspec, ss, mp.ints, mp.floats, mp.probs, mp.has_probs,
            mp.probs_d, mp.conf_acc, mp.conf_rej, pack.ints, pack.floats, log_mode, every, *sched_state, t.in_batch,
            mark, rank,
            t.computed, t.prefill_target, t.generated, t.output_tokens, t.prompt_tokens, t.kv_blocks, t.kv_tokens,
            t.kv_resident, t.start_s, t.first_token_s, t.completion_s, t.steps, t.decode_steps, t.drafted,
            t.accepted, t.position_accepts, t.draws, t.rng_base, t.alpha, t.class_idx, t.pauses, t.preemptions,
            t.recomputes, t.recomputed_tokens, last_token)
        status, busy_s, n_steps, bsum, fcols, icols, n_rows, itl_v, itl_c, n_itl = res
        if status != OK:
            for c, a in saved.items():
                getattr(table, c)[:] = a
            for c, a in saved_sched.items():
                getattr(scheduler, c)[...] = a
            return None, f"replica {r}: {BAIL_WHY[int(status)]} at step {int(n_steps)}"
        log = StepLog(mode=config.steps_log, every=every)
        m = int(n_rows)
        cols = {"replica": np.full(m, r, dtype=np.int64)}
        for j, c in enumerate(_FLOAT_COLS):
            cols[c] = fcols[j, :m].copy()
        for j, c in enumerate(_INT_COLS):
            cols[c] = icols[j, :m].copy()
        log.cols = {c: cols[c] for c in log.cols}
        log.n = m
        log.n_steps = int(n_steps)
        log.batch_size_sum = int(bsum)
        logs.append(log)
        busy.append(float(busy_s))
        itl._add(itl_v[: int(n_itl)].copy(), itl_c[: int(n_itl)].copy())
        del res, fcols, icols, itl_v, itl_c  # the replica's growable buffers
        release_free_memory()  # ... and their pages (simspec/memory.py)
    return LaneResult(logs=logs, busy_s=busy, itl=itl), None
