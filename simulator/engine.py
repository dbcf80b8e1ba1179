"""The SimPy cluster: an arrival process, a router, and one process per replica.

Each replica is one SimPy process woken by an event when work arrives. An iteration of its loop
reads like vLLM's engine step:

1. **schedule** — form the batch (:mod:`simspec.simulator.batching`: running pass, then waiting /
   admission pass, in the scheduler's priority order; or the ``preemptive`` mode);
2. **choose k** — the speculation-length policy picks each decode member's drafts;
3. **cost and progress** — the method prices the step and samples acceptance;
4. **bookkeeping** — tokens, first-token and completion times, KV, policy observations, step log.

**Fast path.** When the batch is *stable* (every member decoding, nothing admitted or preempted,
whatever waits blocked by a limit that decode-only steps cannot loosen), its membership and k stay
fixed until a member completes, a KV allocation would fail, a request arrives, or the
speculation-length policy's decision horizon ends. The replica then advances up to
``window_steps`` steps in one SimPy timeout (:meth:`Method.decode_window`). Acceptance draws are
counter-based per request (:func:`simspec.rng.counter_uniforms`), every step's cost is computed
with the same arithmetic as a single step, and the replica's clock adds step times one by one, so
``window_steps=1`` (one step per event) gives byte-identical outputs — tested for every scheduler ×
method × speculation-length policy × batching mode. A window may also start with the step that
completes newcomers' prompts when everything after it is stable (:meth:`Replica._can_lead`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

_sum = np.add.reduce  # ufunc reductions skip ndarray methods' Python wrappers: cheaper on small arrays
_any = np.logical_or.reduce
_max = np.maximum.reduce
import simpy

from simspec.policies.base import PolicyContext, Scheduler, SpecLenPolicy, StepRecord, WindowRecord
from simspec.simulator.batching import BatchFormer, StepPlan, blocks_for
from simspec.simulator.itl import ItlLog
from simspec.simulator import kernels
from simspec.simulator.methods.base import BatchStep, DecodeWindow, LeadStep, Method, StepRandom
from simspec.simulator.state import RequestTable
from simspec.simulator.steplog import StepLog

STEP_COLUMNS = ("replica", "step", "start_s", "end_s", "step_ms", "batch_size", "prefills", "k_max",
                "drafted", "accepted", "committed", "fed_tokens", "kv_tokens_used", "queue_len",
                "policy_value")


@dataclass
class Capacity:
    """Per-replica limits and engine settings.

    ``max_batch_size``: requests per step (vLLM's ``max_num_seqs``); ``kv_budget_tokens``: KV-cache
    capacity in tokens (allocated in blocks of ``block_size``); ``max_batched_tokens``: tokens fed
    per step (``max_num_batched_tokens``; None: unlimited); ``chunked_prefill``: split prompts over
    steps within that budget; ``long_prefill_token_threshold``: most prompt tokens one request
    feeds in a step (None: no cap); ``watermark``: share of KV blocks kept free when admitting.
    """

    max_batch_size: int
    kv_budget_tokens: int
    max_batched_tokens: int | None = None
    block_size: int = 16
    chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    watermark: float = 0.01

    @property
    def kv_blocks(self) -> int:
        return self.kv_budget_tokens // self.block_size


class Replica:
    """One model replica: continuous batching at iteration granularity."""

    def __init__(self, cluster: "Cluster", rid: int, spec_len: SpecLenPolicy):
        self.cluster = cluster
        self.rid = rid
        self.spec_len = spec_len
        self.former = BatchFormer(self)
        self.pending: list[int] = []
        self.wake: simpy.Event | None = None
        self.step_index = 0
        self.busy_s = 0.0
        self.clock_s = 0.0
        self.outstanding_tokens = 0
        self.log = StepLog()
        self.last_batch = np.empty(0, dtype=np.int64)
        # a window in flight: its step end times and cumulative committed tokens (router's view)
        self._inflight_end_s: np.ndarray | None = None
        self._inflight_committed: np.ndarray | None = None
        #: largest KV use (tokens) recounted from the request table after each step (audit mode)
        self.audit_max_kv_tokens = 0
        self._k_reserve = 0
        self._completed_pending = 0  # completions of the step in flight, reported when it ends
        self._last_step_s = 0.0  # duration of the latest step (window sizing)
        self._decode_step_s = 0.0  # duration of the latest decode-only step (window sizing)
        # a window may start with the step that completes newcomers' prompts (see _can_lead)
        cl = cluster
        self._lead_ok = (cl.window_steps > 1 and cl.batching == "vllm" and cl.max_concurrency is None
                         and getattr(cl.method, "lead_step", False) and spec_len.constant_k)

    # ------------------------------------------------------------------------------ routing
    def enqueue(self, i: int) -> None:
        t = self.cluster.table
        self.pending.append(i)
        self.outstanding_tokens += int(t.prompt_tokens[i] + t.output_tokens[i])
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def outstanding_at(self, now_s: float) -> int:
        """Outstanding tokens as a one-step engine would know them at ``now_s``: it counts a step's
        tokens as done when it computes the step, at the step's start, so with a window in flight
        the steps started by ``now_s`` count (``outstanding_tokens`` already has the whole window
        taken off)."""
        if self._inflight_end_s is None:
            return self.outstanding_tokens
        ends = self._inflight_end_s
        n = int(np.searchsorted(ends, now_s, side="left"))  # the step in flight at now_s
        done = self._inflight_committed
        return self.outstanding_tokens + int(done[-1]) - int(done[min(n, ends.shape[0] - 1)])

    # ------------------------------------------------------------------------------ main loop
    def process(self):
        env = self.cluster.env
        former = self.former
        cl = self.cluster
        max_batch = cl.capacity.max_batch_size
        schedule = former.schedule_vllm if cl.batching == "vllm" else former.schedule_preemptive
        while True:
            if self.pending:
                former.add_waiting(np.asarray(self.pending, dtype=np.int64))
                self.pending.clear()
            if former.running.size == 0 and former.waiting.size == 0:
                self.wake = env.event()
                yield self.wake
                self.wake = None
                self.clock_s = env.now
                continue
            now = self.clock_s
            self._k_reserve = self.spec_len.k_reserve()
            plan = schedule(now, self._k_reserve, max_batch)
            self._count_pauses(plan)
            if plan.idx.size == 0:
                # nothing fits (e.g. KV held by requests that cannot grow): cannot happen after the
                # up-front capacity check; fail loudly rather than stall
                raise RuntimeError(f"replica {self.rid}: no request could be scheduled at t={now:.6f}s "
                                   f"({former.running.size} running, {former.waiting.size} waiting)")
            if bool(plan.prefill.any()):
                if self._lead_ok and self._can_lead(plan):
                    end = self._decode_steps(plan, now, lead=True)
                else:
                    end = self._mixed_step(plan, now)
            else:
                end = self._decode_steps(plan, now)
            yield env.timeout(max(end - env.now, 0.0))
            self._inflight_end_s = self._inflight_committed = None
            if self._completed_pending:  # told when the step ends, not when it was computed
                n_done, self._completed_pending = self._completed_pending, 0
                cl.on_complete(n_done)
            self._after_steps()

    # ------------------------------------------------------------------------------ phases
    def _count_pauses(self, plan: StepPlan) -> None:
        """A request holding KV that is not in this step's batch sits the step out (a pause)."""
        t = self.cluster.table
        run = self.former.running
        if run.size > plan.idx.size:
            mark = self.cluster.scratch
            mark[plan.idx] = True
            out = run[~mark[run]]
            mark[plan.idx] = False
            t.pauses[out] += 1

    def _can_lead(self, plan: StepPlan) -> bool:
        """Whether a step with prompt chunks can start a window: every prompt chunk in it completes
        its prompt (from the next step on, every member decodes), every running request is in it,
        nothing waits for admission, nothing was preempted, and every member's largest decode ask
        fits the token budget — so, as long as KV allows and no request arrives, the steps after it
        are the stable decode-only steps a window advances (the policy's k never changes)."""
        former = self.former
        if plan.preempted or former.waiting.size or plan.idx.size != former.running.size:
            return False
        if plan.idx.size * (self._k_reserve + 1) > former.budget:
            return False
        t = self.cluster.table
        pre = plan.prefill
        pre_idx = plan.idx[pre]
        return bool((t.computed[pre_idx] + plan.fed_tokens[pre] >= t.prefill_target[pre_idx]).all())

    def _choose_k(self, plan: StepPlan, idx: np.ndarray, k_res: np.ndarray, ctx: np.ndarray, rem: np.ndarray,
                  ctx_sum: int) -> np.ndarray:
        """k for decode members ``idx`` of ``plan`` (``k_res``: drafts reserved for them; ``ctx``/
        ``rem``: their context and remaining output tokens; ``ctx_sum``: the contexts' total):
        the policy's choice, within what was reserved unless the extra drafts fit the token budget
        and free KV (lower-priority members lose them first)."""
        former = self.former
        k_pol = np.asarray(self.spec_len.choose_k(idx, float(ctx_sum), former.free_blocks * former.bs,
                                                  self.step_index), dtype=np.int64)
        if k_pol.ndim == 0:
            k_pol = np.full(idx.shape[0], int(k_pol), dtype=np.int64)
        k, any_extra = kernels.clip_k(k_pol, rem, k_res)
        if any_extra:
            t = self.cluster.table
            extra = np.maximum(k - k_res, 0)
            slots = ctx + 1 + k
            blocks = np.maximum(blocks_for(slots, former.bs) - t.kv_blocks[idx], 0)
            over = (np.cumsum(extra) > plan.budget_left_tokens) | (np.cumsum(blocks) > former.free_blocks)
            k = np.where(over, np.minimum(k, k_res), k)
            grow = (k > k_res)
            for i, s_ in zip(idx[grow].tolist(), slots[grow].tolist()):
                former._grant(i, s_, former._allocate(i, s_))
        return k

    def _mixed_step(self, plan: StepPlan, now: float) -> float:
        """One step with prefill chunks in it (the method's :meth:`~Method.step`)."""
        cl = self.cluster
        t = cl.table
        idx = plan.idx
        n = idx.size
        pre = plan.prefill
        # the members' state in one compiled pass (simulator/kernels.py)
        (gen, rem, ctx, base, draws, alpha, class_idx, dec_pos, dec_idx, dec_kres, dec_ctx, dec_rem,
         dec_ctx_sum) = kernels.mixed_prepare(idx, pre, plan.k_reserved, t.generated, t.output_tokens,
                                              t.prompt_tokens, t.computed, t.rng_base, t.draws, t.alpha,
                                              t.class_idx)
        n_pre = n - dec_pos.size
        k_dec = (self._choose_k(plan, dec_idx, dec_kres, dec_ctx, dec_rem, dec_ctx_sum) if dec_pos.size
                 else dec_pos)
        k, fed = kernels.mixed_k_fed(pre, plan.fed_tokens, dec_pos, k_dec)
        batch = BatchStep(idx=idx, prefill=pre, fed_tokens=fed, ctx_tokens=ctx, k=k, remaining=rem,
                          alpha=alpha, class_idx=class_idx)
        rnd = StepRandom(base, draws)
        out = cl.method.step(rnd, batch)
        fixed = cl.method.draws_per_step
        step_s = out.step_ms / 1000.0
        end = now + step_s
        # progress: a chunk that completes its prompt samples one token; decodes commit accepted + 1
        # (one compiled pass over the members: simulator/kernels.py)
        out_acc = np.asarray(out.accepted, dtype=np.int64)
        out_pos = out_acc if out.position_accepts is None else np.asarray(out.position_accepts, dtype=np.int64)
        (drafted, accepted, pos_acc, committed, finished, n_committed, first_prompt, k_max, drafted_sum,
         accepted_sum, fed_sum) = kernels.mixed_step_progress(
            idx, pre, plan.fed_tokens, np.asarray(out.drafted, dtype=np.int64), out_acc, out_pos, rem, gen,
            now, end, t.computed, t.prefill_target, t.generated, t.output_tokens, t.prompt_tokens, t.steps,
            t.decode_steps, t.drafted, t.accepted, t.position_accepts, t.start_s, t.first_token_s, k, fed, t.draws,
            -1 if fixed is None else int(fixed), rnd.used)
        n_committed = int(n_committed)
        self.outstanding_tokens -= int(first_prompt) + n_committed
        self.busy_s += step_s
        kv_used = self._kv_used_tokens()  # during the step, before completions free their blocks
        self._finish(idx, finished, end)
        record = StepRecord(idx=idx, prefill=pre, drafted=drafted, accepted=accepted, committed=committed,
                            step_ms=out.step_ms, end_s=end, fed_tokens=fed, position_accepts=pos_acc)
        cl.scheduler.observe(record)
        cl.itl.observe(record)
        self.spec_len.observe(record)
        self.log.append_one(self.rid, self.step_index, now, end, out.step_ms, n, n_pre, int(k_max),
                            int(drafted_sum), int(accepted_sum), n_committed, int(fed_sum), kv_used,
                            int(self.former.waiting.size), self.spec_len.log_value())
        self.step_index += 1
        self._last_step_s = step_s
        self.clock_s = end
        self._mark_batch(idx)
        return end

    def _decode_steps(self, plan: StepPlan, now: float, lead: bool = False) -> float:
        """One or more decode-only steps of the planned batch (the fast path when it is stable).
        ``lead``: the first step also completes newcomers' prompts (see :meth:`_can_lead`); they
        commit their first token in it and decode from the next step on."""
        cl = self.cluster
        t = cl.table
        former = self.former
        idx = plan.idx
        gen0 = t.generated[idx]
        ctx0 = t.prompt_tokens[idx] + gen0
        rem0 = t.output_tokens[idx] - gen0
        lead_step = None
        if lead:
            pre = plan.prefill
            pre_idx = idx[pre]
            dec = ~pre
            k = np.empty(idx.size, dtype=np.int64)
            ctx_d = ctx0[dec]
            k[dec] = self._choose_k(plan, idx[dec], plan.k_reserved[dec], ctx_d, rem0[dec], int(_sum(ctx_d)))
            # newcomers decode from the next step with the policy's (constant) k
            k[pre] = np.asarray(self.spec_len.choose_k(pre_idx, 0.0, 0, self.step_index + 1), dtype=np.int64)
            computed_pre = t.computed[pre_idx]
            lead_fed = np.zeros(idx.size, dtype=np.int64)
            lead_fed[pre] = plan.fed_tokens[pre]
            lead_ctx = np.zeros(idx.size, dtype=np.int64)
            lead_ctx[pre] = computed_pre
            lead_step = LeadStep(prefill=pre, fed_tokens=lead_fed, ctx_tokens=lead_ctx)
        else:
            k = self._choose_k(plan, idx, plan.k_reserved, ctx0, rem0, int(_sum(ctx0)))
        n_max = 1
        through = False
        # (a known gap: swap preemption with a batch-dependent policy — smartspec-per-request — once
        # diverged from one step per event on a kangaroo run; it runs one step per event for now)
        if (plan.stable or lead) and cl.window_steps > 1 and (self.spec_len.batch_independent
                                                              or cl.preempt_mode != "swap"):
            # past completions too when nothing waits for admission (a completion then only
            # shrinks the batch) and the policy's k does not depend on the batch's membership
            through = (former.waiting.size == 0 and self.spec_len.batch_independent
                       and cl.max_concurrency is None)  # closed loop: a completion releases an arrival
            # how far to look ahead: the policy's horizon; no further than the requests' remaining
            # tokens (each commits at least one per step); about as far as the next arrival at the
            # last step's pace (a guess: too short only costs another window)
            n_max = min(cl.window_steps, self.spec_len.horizon_steps(self.step_index),
                        int(rem0.max() if through else rem0.min()))
            # (the pace of the latest decode-only step: a step with a prompt chunk in it is slower,
            # and a guess from it cut windows short of the arrival — another window each time)
            gap = cl.next_arrival_for(self.rid) - now
            pace_s = self._decode_step_s or self._last_step_s
            if gap < float("inf") and pace_s > 0:
                n_max = min(n_max, int(1.25 * gap / pace_s) + 4)
            n_max = max(n_max, 1)
        win = DecodeWindow(idx=idx, ctx_tokens=ctx0, k=k, remaining=rem0, alpha=t.alpha[idx],
                           class_idx=t.class_idx[idx], rng_base=t.rng_base[idx], draws=t.draws[idx], n_steps=n_max,
                           through=through, lead=lead_step, start_s=now,
                           stop_at_s=cl.next_arrival_for(self.rid) if n_max > 1 else float("inf"))
        out = cl.method.decode_window(win)
        s_n = out.n_steps
        starts, ends, busy_after = kernels.window_clock(now, self.busy_s, np.asarray(out.step_ms, dtype=np.float64))
        lead_pre = pre if lead else np.zeros(idx.size, dtype=bool)  # newcomers' step 0 is a prompt chunk
        # KV: blocks each member holds after each step (step 0 was allocated by the scheduler)
        held0 = t.kv_blocks[idx]
        held = None
        if s_n > 1:
            # blocks held after each step, where KV or the next arrival ends the window, and each
            # member's largest reservation (one compiled pass: simulator/kernels.py)
            act0 = out.active
            s_kv, held, slots_max = kernels.window_kv(
                out.committed, out.k, act0 if act0 is not None else kernels.NO_MASK, act0 is not None, rem0, ctx0,
                held0, self._k_reserve, self.spec_len.k_reserve(), former.bs, former.free_blocks,
                lead_pre, ends, cl.next_arrival_for(self.rid))
            s_n = int(s_kv)
            if s_n < out.n_steps:
                out = _trim(out, s_n)
                starts, ends = starts[:s_n], ends[:s_n]
            held = held[:s_n]
            held_end = held[-1]
        else:
            held_end = held0
            slots_max = None
        act = out.active
        # bookkeeping: the table, and the window's per-step sums (one compiled pass)
        i64 = np.int64
        (steps_run, done, per_step_committed, batch_sizes, k_max_s, drafted_s, accepted_s, fed_s, live_blocks,
         committed_all) = kernels.window_book(
            idx, np.asarray(out.committed, dtype=i64), np.asarray(out.drafted, dtype=i64),
            np.asarray(out.accepted, dtype=i64), np.asarray(out.position_accepts, dtype=i64),
            np.asarray(out.draws, dtype=np.uint64), np.asarray(out.fed_tokens, dtype=i64),
            np.asarray(out.k, dtype=i64), act if act is not None else kernels.NO_MASK, act is not None,
            held if held is not None else _NO_HELD, held is not None, lead_pre,
            t.generated, t.steps, t.decode_steps, t.drafted, t.accepted, t.position_accepts, t.draws,
            t.output_tokens)
        if lead:  # the prompt chunks of the first step, as _mixed_step books them
            first_end = float(ends[0])
            start_pre = t.start_s[pre_idx]
            new_start = np.isnan(start_pre)
            if _any(new_start):
                t.start_s[pre_idx[new_start]] = now
            t.computed[pre_idx] = computed_pre + plan.fed_tokens[pre]
            first = np.isnan(t.first_token_s[pre_idx])
            if _any(first):
                t.first_token_s[pre_idx[first]] = first_end
                self.outstanding_tokens -= int(_sum(t.prompt_tokens[pre_idx[first]]))
        if slots_max is not None:
            former.free_blocks -= int(_sum(held_end) - _sum(held0))
            t.kv_blocks[idx] = held_end
            t.kv_tokens[idx] = np.maximum(t.kv_tokens[idx], slots_max)
        if s_n > 1:
            self._inflight_end_s = ends
            self._inflight_committed = np.cumsum(per_step_committed)
        self.outstanding_tokens -= int(committed_all)
        self.busy_s = float(busy_after[s_n - 1])
        end = float(ends[-1])
        used_end = self._kv_used_tokens()  # after the last step's allocation, before completions
        # each member completes at the end of its last step in the window
        self._finish(idx, done, end if act is None else ends[np.maximum(steps_run - 1, 0)])
        first_value = None
        w0 = 0
        if lead:  # the first step is a mixed step: policies see it as one
            rec0 = StepRecord(idx=idx, prefill=pre, drafted=out.drafted[0], accepted=out.accepted[0],
                              committed=out.committed[0], step_ms=float(out.step_ms[0]), end_s=float(ends[0]),
                              fed_tokens=out.fed_tokens[0], position_accepts=out.position_accepts[0])
            cl.scheduler.observe(rec0)
            cl.itl.observe(rec0)
            self.spec_len.observe(rec0)
            first_value = self.spec_len.log_value()
            w0 = 1
        if s_n > w0:
            a_w = act[w0:] if act is not None else None
            rec = WindowRecord(idx=idx, drafted=out.drafted[w0:], accepted=out.accepted[w0:],
                               position_accepts=out.position_accepts[w0:], committed=out.committed[w0:],
                               fed_tokens=out.fed_tokens[w0:], step_ms=out.step_ms[w0:], end_s=ends[w0:],
                               active=a_w if a_w is None or not bool(a_w.all()) else None)
            cl.scheduler.observe_window(rec)
            cl.itl.observe_window(rec)
            values = self.spec_len.observe_window(rec)
        else:
            values = np.empty(0)
        if held is not None:
            # as a one-step engine logs it: blocks of the members still running (a finished member's
            # are freed at its completion) plus those of requests outside the batch
            other = used_end - int(_sum(held_end)) * former.bs
            kv_used = other + live_blocks * former.bs
        else:
            kv_used = np.array([used_end])
        queue = int(self.former.waiting.size)
        if lead:
            self.log.append_one(self.rid, self.step_index, now, first_end, float(out.step_ms[0]), int(batch_sizes[0]),
                                int(_sum(pre)), int(k_max_s[0]), int(drafted_s[0]), int(accepted_s[0]),
                                int(per_step_committed[0]), int(fed_s[0]), int(kv_used[0]), queue, first_value)
        if s_n > w0:
            self.log.append_window(self.rid, self.step_index + w0, starts[w0:], ends[w0:], out.step_ms[w0:],
                                   batch_sizes[w0:], k_max_s[w0:], drafted_s[w0:], accepted_s[w0:],
                                   per_step_committed[w0:], fed_s[w0:], kv_used[w0:], queue, values)
        self.step_index += s_n
        self._last_step_s = float(out.step_ms[-1]) / 1000.0
        if s_n > w0:
            self._decode_step_s = self._last_step_s
        self.clock_s = end
        self._mark_batch(idx)
        return end

    def _mark_batch(self, idx: np.ndarray) -> None:
        """``in_batch``: unfinished members of the replica's last step (LAPS-SD reads the shape)."""
        t = self.cluster.table
        t.in_batch[self.last_batch] = False
        live = idx[np.isnan(t.completion_s[idx])]
        t.in_batch[live] = True
        self.last_batch = live

    def _finish(self, idx: np.ndarray, done: np.ndarray, end) -> None:
        """Members ``done`` completed at ``end`` (seconds; one time, or one per member)."""
        t = self.cluster.table
        if bool(done.any()):
            fin = idx[done]
            t.completion_s[fin] = end if np.ndim(end) == 0 else end[done]
            t.computed[fin] = t.prefill_target[fin]
            t.in_batch[fin] = False
            self.former.release(fin)
            self._completed_pending += int(fin.size)

    def _kv_used_tokens(self) -> int:
        return (self.former.total_blocks - self.former.free_blocks) * self.former.bs

    def _after_steps(self) -> None:
        """Audit mode: recount KV from the request table (not the allocator's counter)."""
        if self.cluster.audit:
            t = self.cluster.table
            mine = np.flatnonzero((t.replica == self.rid) & np.isnan(t.completion_s))
            used = int(blocks_for(t.kv_tokens[mine][t.kv_blocks[mine] > 0], self.former.bs).sum()) * self.former.bs
            self.audit_max_kv_tokens = max(self.audit_max_kv_tokens, used)


_NO_HELD = np.zeros((1, 1), dtype=np.int64)


def _trim(out, n: int):
    """The first ``n`` steps of a window outcome."""
    from simspec.simulator.methods.base import WindowOutcome

    act = out.active[:n] if out.active is not None else None
    return WindowOutcome(step_ms=out.step_ms[:n], k=out.k[:n], drafted=out.drafted[:n], accepted=out.accepted[:n],
                         position_accepts=out.position_accepts[:n], committed=out.committed[:n],
                         fed_tokens=out.fed_tokens[:n], draws=out.draws[:n],
                         active=act if act is not None and not bool(act.all()) else None)


class Cluster:
    """Router + replicas over one request table."""

    def __init__(self, table: RequestTable, method: Method, scheduler: Scheduler,
                 spec_len_factory: Callable[[PolicyContext], SpecLenPolicy], capacity: Capacity,
                 replicas: int, router: str, preempt_mode: str, seed: int,
                 on_complete: Callable[[int], None] | None = None, batching: str = "vllm",
                 window_steps: int = 256, audit: bool = False, max_concurrency: int | None = None):
        self.env = simpy.Environment()
        self.table = table
        self.method = method
        self.scheduler = scheduler
        self.capacity = capacity
        self.router = router
        self.preempt_mode = preempt_mode
        self.batching = batching
        self.window_steps = int(window_steps)
        #: most requests in flight (sent, not completed); None: open loop (the trace's arrivals)
        self.max_concurrency = max_concurrency
        self._sent = 0
        self._slot: simpy.Event | None = None
        self.audit = audit
        self.seed = seed
        self.itl = ItlLog(len(table))  # every request's token-chunk gaps (vllm bench serve's ITL)
        self._on_complete = on_complete
        self.completed = 0
        self.next_arrival_s = float(table.arrival_s[0]) if len(table) else float("inf")
        #: all-False flags over requests, for set operations without np.isin (reset after each use)
        self.scratch = np.zeros(len(table), dtype=bool)
        self.replicas = []
        for r in range(replicas):
            ctx = PolicyContext(table=table, method=method, max_batch_size=capacity.max_batch_size,
                                kv_budget_tokens=capacity.kv_budget_tokens, seed=seed, replica=r)
            self.replicas.append(Replica(self, r, spec_len_factory(ctx)))
        self._rr = 0
        self._next_index = 0  # the next request the arrival process will route

    def next_arrival_for(self, rid: int) -> float:
        """Arrival time of the next request that may be routed to replica ``rid``: under round-robin
        routing the next one whose turn it is, otherwise the next arrival of all."""
        if self.router != "round-robin":
            return self.next_arrival_s
        n = len(self.table)
        r = len(self.replicas)
        j = self._next_index + ((rid - self._rr) % r)  # arrivals are routed in turn from _rr on
        return float(self.table.arrival_s[j]) if j < n else float("inf")

    def on_complete(self, n: int) -> None:
        self.completed += n
        if self._slot is not None and not self._slot.triggered:
            self._slot.succeed()
        if self._on_complete is not None:
            self._on_complete(n)

    def route(self, i: int) -> Replica:
        if self.router == "round-robin":
            rep = self.replicas[self._rr % len(self.replicas)]
            self._rr += 1
            return rep
        # least outstanding tokens; ties to the lowest replica id
        now = self.env.now
        return min(self.replicas, key=lambda rp: (rp.outstanding_at(now), rp.rid))

    def arrivals(self):
        env = self.env
        t = self.table
        arrival = t.arrival_s
        n = len(t)
        cap = self.max_concurrency
        for i in range(n):
            a = float(arrival[i])
            if a > env.now:
                yield env.timeout(a - env.now)
            if cap is not None:
                # vllm bench serve's --max-concurrency: a request due while `cap` are in flight is
                # held until one completes, then sent (its arrival_s becomes the send time)
                while self._sent - self.completed >= cap:
                    self._slot = env.event()
                    yield self._slot
                    self._slot = None
                arrival[i] = env.now
                self._sent += 1
            self.next_arrival_s = float(arrival[i + 1]) if i + 1 < n else float("inf")
            self._next_index = i + 1
            rep = self.route(i)
            t.replica[i] = rep.rid
            rep.enqueue(i)

    def run(self) -> None:
        for rep in self.replicas:
            self.env.process(rep.process())
        self.env.process(self.arrivals())
        self.env.run()
