"""Batch formation: which requests run in a replica's next step, with how many new tokens each.

Two modes (``--batching``):

``vllm`` (default) follows vLLM V1's ``Scheduler.schedule()``:

1. **Running pass.** Requests already admitted (they hold KV) are scheduled first, in the
   scheduler's priority order (for FCFS: admission order), decodes before prompt chunks (so a
   running decode is never starved behind a prefill; with FCFS this is vLLM's order anyway, since
   a request still prefilling is the latest admitted). A decoding request asks for ``1 + k``
   tokens (k = the drafts the speculation-length policy reserves, capped at remaining − 1); a
   request still prefilling asks for its next chunk (chunked prefill: up to the step's token budget
   and ``long_prefill_token_threshold``). Its KV blocks are allocated; when the allocation fails,
   the lowest-priority running request is preempted (its KV freed: recomputed on resume, or
   swapped) and the allocation retried — if the victim is the request itself, it waits.
2. **Waiting pass** (skipped in a step that preempted, as vLLM does). Waiting requests (new
   arrivals and preempted ones) are admitted in the scheduler's priority order into the room left:
   batch slots (``max_num_seqs``), the token budget (``max_num_batched_tokens``) and free KV
   blocks above a watermark. The first request that does not fit stops admission (vLLM breaks
   too). A resident is never evicted to admit a newcomer.

``preemptive`` is for the paper-style schedulers that re-rank every iteration (SRPT, LAS, LAPS-SD
as their papers define them): the batch is the top ``max_batch_size`` of the scheduler's order over
every unfinished request; decodes get the token budget before prefills (decodes are never starved
behind prompts); a resident pushed out of the batch *pauses*, keeping its KV, and is preempted
(KV freed) only when a scheduled request's KV allocation fails — lowest-priority paused residents
first; a newcomer is admitted only into free KV (above the watermark), never by evicting.

KV is allocated in blocks of ``block_size`` tokens. A decode step needs slots for context + 1 + k
tokens; a prefill chunk for the tokens computed so far plus the chunk (plus one slot when it
completes the prompt and samples a token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simspec.simulator import kernels

_sum = np.add.reduce  # skips ndarray.sum's Python wrapper: cheaper on small arrays

BATCHING_MODES = ("vllm", "preemptive")


@dataclass
class StepPlan:
    """One step's batch, in priority order.

    ``idx`` members; ``prefill`` whether each runs a prefill chunk; ``fed_tokens`` its chunk (or
    1 + k reserved); ``k_reserved`` drafts reserved for decode members (0 for prefills);
    ``budget_left_tokens`` the step's token budget left; ``preempted``: the step preempted someone;
    ``stable``: nothing changes the batch's membership until a member completes, a KV allocation
    fails or a request arrives (every request holding KV runs, nothing was admitted or preempted,
    and whatever waits is blocked by a limit that decode-only steps cannot loosen) — the engine
    may then advance several decode-only steps at once.
    """

    idx: np.ndarray
    prefill: np.ndarray
    fed_tokens: np.ndarray
    k_reserved: np.ndarray
    budget_left_tokens: int
    preempted: bool
    stable: bool


def blocks_for(tokens, block_size: int):
    """KV blocks holding ``tokens`` slots (ceil division; arrays or ints)."""
    return -(-tokens // block_size)


class BatchFormer:
    """Forms each step's batch for one replica; owns its running/waiting lists and free blocks."""

    def __init__(self, replica):
        self.rep = replica
        cl = replica.cluster
        self.t = cl.table
        self.cap = cl.capacity
        self.sched = cl.scheduler
        self.swap = cl.preempt_mode == "swap"
        self.bs = self.cap.block_size
        self.total_blocks = self.cap.kv_budget_tokens // self.bs
        self.free_blocks = self.total_blocks
        self.watermark_blocks = int(self.cap.watermark * self.total_blocks)
        self.budget = self.cap.max_batched_tokens if self.cap.max_batched_tokens is not None else 1 << 62
        self.threshold = self.cap.long_prefill_token_threshold or (1 << 62)
        self.chunked = self.cap.chunked_prefill
        #: admitted requests holding KV, in admission order (vllm) / residents (preemptive)
        self.running = np.empty(0, dtype=np.int64)
        #: requests without KV waiting to be (re)admitted, in arrival order
        self.waiting = np.empty(0, dtype=np.int64)

    # ------------------------------------------------------------------------------ helpers
    def add_waiting(self, idx: np.ndarray) -> None:
        """Add requests ``idx`` to the waiting list (kept in arrival order: ascending row)."""
        w = self.waiting
        if idx.size == 1 and (w.size == 0 or int(idx[0]) > int(w[-1])):
            self.waiting = np.append(w, idx)  # an arrival: later than everyone waiting
        else:
            self.waiting = np.sort(np.concatenate([w, idx]))

    def _ask(self, i: int, k_res: int, budget: int) -> tuple[int, int, int, bool] | None:
        """What request ``i`` would run within ``budget`` tokens: ``(fed tokens, drafts, KV slots
        needed, prefill?)`` — its next prompt chunk (shrunk to the budget when chunking) or a
        decode with up to ``k_res`` drafts (fewer when the budget is short) — or None if nothing
        fits (no budget left, or a whole prompt larger than the budget without chunking)."""
        if budget <= 0:
            return None
        t = self.t
        computed, target = int(t.computed[i]), int(t.prefill_target[i])
        if computed < target:
            left = target - computed
            chunk = min(left, self.threshold)
            if chunk > budget:
                if not self.chunked:
                    return None
                chunk = budget
            return chunk, 0, computed + chunk + (1 if chunk == left else 0), True
        k_i = min(k_res, int(t.output_tokens[i] - t.generated[i]) - 1, budget - 1)
        return k_i + 1, k_i, int(t.prompt_tokens[i] + t.generated[i]) + 1 + k_i, False

    def _allocate(self, i: int, slots: int) -> int:
        """Blocks request ``i`` still needs to hold ``slots`` tokens."""
        return max(int(blocks_for(slots, self.bs)) - int(self.t.kv_blocks[i]), 0)

    def _grant(self, i: int, slots: int, need: int) -> None:
        t = self.t
        t.kv_blocks[i] += need
        self.free_blocks -= need
        if slots > t.kv_tokens[i]:
            t.kv_tokens[i] = slots
        t.kv_resident[i] = True

    def preempt(self, v: int) -> None:
        """Free request ``v``'s KV (vLLM's preemption): recompute on resume, or swap it out."""
        t = self.t
        self.free_blocks += int(kernels.preempt_kv(int(v), self.swap, t.kv_blocks, t.kv_tokens, t.kv_resident,
                                                   t.preemptions, t.recomputes, t.recomputed_tokens,
                                                   t.prefill_target, t.computed, t.prompt_tokens, t.generated))
        self.running = self.running[self.running != v]
        self.add_waiting(np.array([v], dtype=np.int64))

    def release(self, done: np.ndarray) -> None:
        """Requests ``done`` finished: free their blocks and drop them from the running list."""
        t = self.t
        self.free_blocks += int(_sum(t.kv_blocks[done]))
        t.kv_blocks[done] = 0
        t.kv_resident[done] = False
        self.running = self.running[np.isnan(t.completion_s[self.running])]

    def _floor(self) -> int:
        """Blocks an admission must leave free: the watermark, unless nothing else holds KV (so a
        request that fits the whole cache can always run)."""
        return self.watermark_blocks if self.free_blocks < self.total_blocks else 0

    def _admissible(self, i: int, budget: int, k_res: int) -> bool:
        """Whether request ``i`` (holding no KV) could be admitted into the free KV now."""
        t = self.t
        computed, target = int(t.computed[i]), int(t.prefill_target[i])
        if computed < target:
            left = target - computed
            chunk = min(left, self.threshold, budget if self.chunked else left)
            slots = computed + chunk + (1 if chunk == left else 0)
        else:  # swapped out in decode: comes back with its KV and its drafts' slots
            rem = int(t.output_tokens[i] - t.generated[i])
            slots = int(t.prompt_tokens[i] + t.generated[i]) + 1 + max(min(k_res, rem - 1, budget - 1), 0)
        return self.free_blocks - self._allocate(i, slots) >= self._floor()

    # ------------------------------------------------------------------------------ vllm
    def schedule_vllm(self, now_s: float, k_res: int, max_batch: int) -> StepPlan:
        t = self.t
        running = self.running
        order = self.sched.order(running, now_s) if running.size > 1 else running
        budget = self.budget
        preempted = False
        if order.size:
            # the asks, the budget cut and the blocks still needed, in one compiled pass
            # (granted in the same pass when the free KV suffices)
            order, fed, k, slots, pre, need, cut, granted, fed_cut = kernels.vllm_running_asks(
                order, t.computed, t.prefill_target, t.generated, t.output_tokens, t.prompt_tokens, t.kv_blocks,
                k_res, self.threshold, budget, self.chunked, self.bs, self.free_blocks, t.kv_tokens, t.kv_resident)
            if granted >= 0:
                sched_idx, sched_fed, sched_k, sched_pre = order[:cut], fed[:cut], k[:cut], pre[:cut]
                self.free_blocks -= int(granted)
                budget -= int(fed_cut)
            elif cut >= 0:
                # KV short: grant in priority order, preempting from the end of the order (the same
                # sequence as the one-at-a-time loop, on precomputed asks)
                n_ok, preempted = self._grant_preempting(order, need)
                sched_idx, sched_fed, sched_k, sched_pre = order[:n_ok], fed[:n_ok], k[:n_ok], pre[:n_ok]
                self.free_blocks -= kernels.grant_blocks(sched_idx, slots, need, t.kv_blocks, t.kv_tokens, t.kv_resident)
                budget -= int(_sum(sched_fed))
            else:
                sched_idx, sched_fed, sched_k, sched_pre, budget, preempted = self._running_pass(order, k_res, budget)
        else:
            sched_idx = sched_fed = sched_k = np.empty(0, dtype=np.int64)
            sched_pre = np.empty(0, dtype=bool)
        all_running = sched_idx.size == self.running.size
        # waiting pass
        adm: list[tuple[int, int, int]] = []
        if not preempted and self.waiting.size and self.running.size < max_batch and budget > 0:
            worder = self.sched.order(self.waiting, now_s) if self.waiting.size > 1 else self.waiting
            slots_left = max_batch - self.running.size
            for i in worder.tolist():
                if slots_left == 0 or budget <= 0:
                    break
                # a prompt (chunk), or a request swapped out in decode coming back with its KV
                ask = self._ask(i, k_res, budget)
                if ask is None:
                    break
                fed_i, k_i, slots, _ = ask
                need = self._allocate(i, slots)
                if self.free_blocks - need < self._floor():
                    break
                self._grant(i, slots, need)
                adm.append((i, fed_i, k_i))
                budget -= fed_i
                slots_left -= 1
            if adm:
                a_idx = np.array([a[0] for a in adm], dtype=np.int64)
                if worder is self.waiting:  # admitted in waiting order: a prefix
                    self.waiting = self.waiting[a_idx.size:]
                else:
                    mark = self.rep.cluster.scratch
                    mark[a_idx] = True
                    self.waiting = self.waiting[~mark[self.waiting]]
                    mark[a_idx] = False
                self.running = np.concatenate([self.running, a_idx])
                sched_idx = np.concatenate([sched_idx, a_idx])
                sched_fed = np.concatenate([sched_fed, np.array([a[1] for a in adm], dtype=np.int64)])
                sched_k = np.concatenate([sched_k, np.array([a[2] for a in adm], dtype=np.int64)])
                sched_pre = np.concatenate([sched_pre, t.computed[a_idx] < t.prefill_target[a_idx]])
        # a waiting request that could not be admitted stays blocked while the batch is unchanged:
        # slots, token budget and free KV only shrink during decode-only steps
        return StepPlan(idx=sched_idx, prefill=sched_pre, fed_tokens=sched_fed, k_reserved=sched_k,
                        budget_left_tokens=budget, preempted=preempted,
                        stable=all_running and not adm and not preempted)

    def _grant_preempting(self, order: np.ndarray, need: np.ndarray) -> tuple[int, bool]:
        """How many of ``order``'s first ``need.size`` members (their asks precomputed within the
        token budget, needing ``need`` more blocks each) get their blocks when a failed allocation
        preempts the lowest-priority running request (the end of ``order``) and retries — vLLM's
        loop. Victims are preempted here; the first members returned are granted by the caller.
        A victim is never a member granted before it (victims come off the end), so the asks of the
        members before the failure do not change; a member that preempts itself stops the pass."""
        n = order.shape[0]
        granted, live_end = kernels.preemption_plan(order, need, need.shape[0], n, self.free_blocks, self.t.kv_blocks)
        for v in order[live_end:][::-1].tolist():  # the lowest priority first, as the loop preempts them
            self.preempt(v)
        return granted, live_end < n

    def _running_pass(self, order: np.ndarray, k_res: int, budget: int):
        """The running pass one request at a time (token budget or KV short): chunks shrink to the
        budget, failed allocations preempt the lowest-priority running request."""
        t = self.t
        live = order.tolist()  # priority order; victims come off the end
        out: list[tuple[int, int, int, bool]] = []
        preempted = False
        pos = 0
        while pos < len(live):
            i = live[pos]
            ask = self._ask(i, k_res, budget)
            if ask is None:
                pos += 1
                continue
            fed_i, k_i, slots, pre = ask
            need = self._allocate(i, slots)
            self_preempted = False
            while need > self.free_blocks:
                v = live.pop()
                preempted = True
                for j, rec in enumerate(out):
                    if rec[0] == v:  # give back what the victim was granted this step
                        budget += rec[1]
                        out.pop(j)
                        break
                self.preempt(v)
                if v == i:
                    self_preempted = True
                    break
            if self_preempted:
                break
            self._grant(i, slots, need)
            out.append((i, fed_i, k_i, pre))
            budget -= fed_i
            pos += 1
        idx = np.array([o[0] for o in out], dtype=np.int64)
        return (idx, np.array([o[1] for o in out], dtype=np.int64), np.array([o[2] for o in out], dtype=np.int64),
                np.array([o[3] for o in out], dtype=bool), budget, preempted)

    # ------------------------------------------------------------------------------ preemptive
    def schedule_preemptive(self, now_s: float, k_res: int, max_batch: int,
                            residents_only: bool = False) -> StepPlan:
        t = self.t
        active = np.sort(np.concatenate([self.running, self.waiting]))
        order = self.sched.order(active, now_s) if active.size > 1 else active
        if residents_only:  # nothing could run: the highest-priority requests that hold KV
            order = order[t.kv_blocks[order] > 0]
        budget = self.budget
        # the batch: the top max_batch_size of the order among requests that can run now —
        # residents always; a request without KV only if its next chunk fits free KV
        if order.size > max_batch:
            picked: list[int] = []
            for i in order.tolist():
                if t.kv_blocks[i] > 0 or self._admissible(i, budget, k_res):
                    picked.append(i)
                    if len(picked) == max_batch:
                        break
            sel = np.array(picked, dtype=np.int64)
        else:
            sel = order
        preempted = False
        resident = t.kv_blocks[sel] > 0
        pre_all = t.computed[sel] < t.prefill_target[sel]
        # residents of the batch, decodes first (the token budget goes to decodes before prompts),
        # each in priority order
        res_dec = sel[resident & ~pre_all]
        res_pre = sel[resident & pre_all]
        live: list[list] = []  # [i, slots, fed, k, prefill?]
        for i in np.concatenate([res_dec, res_pre]).tolist():
            if budget <= 0:
                break
            ask = self._ask(i, k_res, budget)
            if ask is None:  # a whole prompt over the budget without chunking
                continue
            fed_i, k_i, slots, pre_i = ask
            live.append([i, slots, fed_i, k_i, pre_i])
            budget -= fed_i
        members: list[tuple[int, int, int, bool]] = []
        in_batch = {rec[0] for rec in live}
        # residents outside the batch, lowest priority first: evicted before any member is
        paused_res = [int(i) for i in order[::-1].tolist() if t.kv_blocks[i] > 0 and int(i) not in in_batch]
        pos = 0
        while pos < len(live):
            i, slots, fed_i, k_i, pre_i = live[pos]
            need = self._allocate(i, slots)
            gone = False
            while need > self.free_blocks:
                preempted = True
                if paused_res:
                    self.preempt(paused_res.pop(0))
                    continue
                v, _, f_v, _, _ = live.pop()
                budget += f_v
                members = [m for m in members if m[0] != v]
                self.preempt(v)
                if v == i:
                    gone = True
                    break
            if gone:
                break
            self._grant(i, slots, need)
            members.append((i, fed_i, k_i, pre_i))
            pos += 1
        # requests without KV (newcomers, preempted ones) in priority order, only into free KV
        for i in sel[~resident].tolist():
            if budget <= 0:
                break
            # a prompt (chunk), or a request swapped out in decode coming back with its KV
            ask = self._ask(i, k_res, budget)
            if ask is None:
                continue
            fed_i, k_i, slots, pre_i = ask
            need = self._allocate(i, slots)
            if self.free_blocks - need < self._floor():
                continue
            self._grant(i, slots, need)
            members.append((i, fed_i, k_i, pre_i))
            budget -= fed_i
        if not members and not residents_only and bool((t.kv_blocks[active] > 0).any()):
            return self.schedule_preemptive(now_s, k_res, max_batch, residents_only=True)
        # residents = requests holding KV; everyone else waits
        holding = t.kv_blocks[active] > 0
        self.running = active[holding]
        self.waiting = active[~holding]
        if members:
            pos_in_order = {int(i): r for r, i in enumerate(order.tolist())} if len(members) > 1 else None
            if pos_in_order is not None:
                members.sort(key=lambda m: pos_in_order[m[0]])
        idx = np.array([m[0] for m in members], dtype=np.int64)
        return StepPlan(idx=idx, prefill=np.array([m[3] for m in members], dtype=bool),
                        fed_tokens=np.array([m[1] for m in members], dtype=np.int64),
                        k_reserved=np.array([m[2] for m in members], dtype=np.int64),
                        budget_left_tokens=budget, preempted=preempted,
                        stable=(not preempted) and idx.size == active.size)
