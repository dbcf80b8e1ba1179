"""``--batching preemptive`` compiled for the fast lane (:mod:`simspec.simulator.fastlane`):
:meth:`BatchFormer.schedule_preemptive <simspec.simulator.batching.BatchFormer.schedule_preemptive>`
on numbers, with the same order of decisions — the batch is the top ``max_batch_size`` of the
scheduler's order among the requests that can run now, residents' decodes get the token budget
before residents' prompt chunks, a paused resident (lowest priority first) and then the batch's
own tail are preempted (recompute) when a member's KV allocation fails, newcomers are admitted
only into free KV above the watermark, and the members run in the scheduler's order.
"""

from __future__ import annotations

import numpy as np

from simspec.simulator.kernels import blocks_needed, grant_one, jit, preempt_kv

#: return codes of :func:`preemptive_plan`
PLAN_OK, PLAN_SWAP = 0, 1


@jit
def request_ask(i, k_res, budget, threshold, chunked, computed, prefill_target, generated, output_tokens,
                prompt_tokens):
    """``BatchFormer._ask``: ``(ok, fed, drafts, slots, prefill)`` — request ``i``'s next prompt
    chunk (shrunk to the budget when chunking) or a decode with up to ``k_res`` drafts; ``ok``
    False when nothing fits."""
    if budget <= 0:
        return False, 0, 0, 0, False
    c = computed[i]
    tgt = prefill_target[i]
    if c < tgt:
        left = tgt - c
        chunk = min(left, threshold)
        if chunk > budget:
            if not chunked:
                return False, 0, 0, 0, False
            chunk = budget
        return True, chunk, 0, c + chunk + (1 if chunk == left else 0), True
    k_i = min(k_res, output_tokens[i] - generated[i] - 1, budget - 1)
    return True, k_i + 1, k_i, prompt_tokens[i] + generated[i] + 1 + k_i, False


@jit
def preemptive_plan(order, max_batch, budget0, k_res, threshold, chunked, block_size, free, total_blocks,
                    watermark_blocks, swap, computed, prefill_target, generated, output_tokens, prompt_tokens,
                    kv_blocks, kv_tokens, kv_resident, preemptions, recomputes, recomputed_tokens, rank, in_live,
                    idx, pre, plan_fed, k_resv, sel, resident, live, paused):
    """One ``schedule_preemptive`` pass over the scheduler's ``order`` of the active requests
    (already restricted to residents for the engine's residents-only retry). Writes the members,
    in the scheduler's order, into ``idx``/``pre``/``plan_fed``/``k_resv`` and grants their KV (and
    preempts, recompute mode) in the table columns. ``rank``, ``in_live``: per-request scratch,
    left as found; ``sel``, ``resident``, ``live`` (rows: request, slots, fed, drafts, prefill),
    ``paused``: scratch buffers. Returns ``(status, n_members, budget_left, free_blocks,
    preempted)``; status :data:`PLAN_SWAP` when a preemption would swap (not in the lane)."""
    na = order.shape[0]
    budget = budget0
    floor = watermark_blocks if free < total_blocks else 0
    # the batch: the top max_batch of the order among requests that can run now — residents
    # always; a request without KV only if its next chunk fits free KV (BatchFormer._admissible)
    n_sel = 0
    if na > max_batch:
        for r in range(na):
            i = order[r]
            ok = kv_blocks[i] > 0
            if not ok:
                c = computed[i]
                tgt = prefill_target[i]
                if c < tgt:
                    left = tgt - c
                    chunk = min(left, threshold, budget if chunked else left)
                    slots = c + chunk + (1 if chunk == left else 0)
                else:  # swapped out in decode: back with its KV and its drafts' slots
                    rem = output_tokens[i] - generated[i]
                    e = min(k_res, rem - 1, budget - 1)
                    slots = prompt_tokens[i] + generated[i] + 1 + (e if e > 0 else 0)
                ok = free - blocks_needed(i, slots, block_size, kv_blocks) >= floor
            if ok:
                sel[n_sel] = i
                n_sel += 1
                if n_sel == max_batch:
                    break
    else:
        for r in range(na):
            sel[r] = order[r]
        n_sel = na
    for s in range(n_sel):
        resident[s] = kv_blocks[sel[s]] > 0
    # residents of the batch, decodes first, then prompt chunks, each in priority order
    n_live = 0
    for phase in range(2):
        for s in range(n_sel):
            if not resident[s]:
                continue
            i = sel[s]
            is_pre = computed[i] < prefill_target[i]
            if is_pre != (phase == 1):
                continue
            if budget <= 0:
                break
            ok, fed_i, k_i, slots, pre_i = request_ask(i, k_res, budget, threshold, chunked, computed,
                                                       prefill_target, generated, output_tokens, prompt_tokens)
            if not ok:
                continue
            live[n_live, 0] = i
            live[n_live, 1] = slots
            live[n_live, 2] = fed_i
            live[n_live, 3] = k_i
            live[n_live, 4] = 1 if pre_i else 0
            n_live += 1
            budget -= fed_i
        if budget <= 0:
            break
    for q in range(n_live):
        in_live[live[q, 0]] = True
    # residents outside the batch, lowest priority first: preempted before any member is
    n_paused = 0
    for r in range(na - 1, -1, -1):
        i = order[r]
        if kv_blocks[i] > 0 and not in_live[i]:
            paused[n_paused] = i
            n_paused += 1
    for q in range(n_live):
        in_live[live[q, 0]] = False
    ph = 0  # paused[ph:n_paused] not preempted yet
    preempted = False
    n_mem = 0
    pos = 0
    while pos < n_live:
        i = live[pos, 0]
        slots = live[pos, 1]
        need = blocks_needed(i, slots, block_size, kv_blocks)
        gone = False
        while need > free:
            preempted = True
            if swap:
                return PLAN_SWAP, 0, budget, free, preempted
            if ph < n_paused:
                free += preempt_kv(paused[ph], False, kv_blocks, kv_tokens, kv_resident, preemptions, recomputes,
                                   recomputed_tokens, prefill_target, computed, prompt_tokens, generated)
                ph += 1
                continue
            n_live -= 1
            v = live[n_live, 0]
            budget += live[n_live, 2]
            w = 0
            for q in range(n_mem):
                if idx[q] != v:
                    idx[w] = idx[q]
                    pre[w] = pre[q]
                    plan_fed[w] = plan_fed[q]
                    k_resv[w] = k_resv[q]
                    w += 1
            n_mem = w
            free += preempt_kv(v, False, kv_blocks, kv_tokens, kv_resident, preemptions, recomputes,
                               recomputed_tokens, prefill_target, computed, prompt_tokens, generated)
            if v == i:
                gone = True
                break
        if gone:
            break
        grant_one(i, slots, need, kv_blocks, kv_tokens, kv_resident)
        free -= need
        idx[n_mem] = i
        pre[n_mem] = live[pos, 4] != 0
        plan_fed[n_mem] = live[pos, 2]
        k_resv[n_mem] = live[pos, 3]
        n_mem += 1
        pos += 1
    # requests without KV (newcomers, preempted ones) in priority order, only into free KV
    for s in range(n_sel):
        if resident[s]:
            continue
        if budget <= 0:
            break
        i = sel[s]
        ok, fed_i, k_i, slots, pre_i = request_ask(i, k_res, budget, threshold, chunked, computed, prefill_target,
                                                   generated, output_tokens, prompt_tokens)
        if not ok:
            continue
        need = blocks_needed(i, slots, block_size, kv_blocks)
        floor = watermark_blocks if free < total_blocks else 0
        if free - need < floor:
            continue
        grant_one(i, slots, need, kv_blocks, kv_tokens, kv_resident)
        free -= need
        idx[n_mem] = i
        pre[n_mem] = pre_i
        plan_fed[n_mem] = fed_i
        k_resv[n_mem] = k_i
        n_mem += 1
        budget -= fed_i
    # the members in the scheduler's order (each request's rank in it)
    if n_mem > 1:
        for r in range(na):
            rank[order[r]] = r
        for a in range(1, n_mem):  # insertion sort by rank (ranks are distinct)
            i = idx[a]
            p_ = pre[a]
            f_ = plan_fed[a]
            k_ = k_resv[a]
            b = a - 1
            while b >= 0 and rank[idx[b]] > rank[i]:
                idx[b + 1] = idx[b]
                pre[b + 1] = pre[b]
                plan_fed[b + 1] = plan_fed[b]
                k_resv[b + 1] = k_resv[b]
                b -= 1
            idx[b + 1] = i
            pre[b + 1] = p_
            plan_fed[b + 1] = f_
            k_resv[b + 1] = k_
    return PLAN_OK, n_mem, budget, free, preempted
