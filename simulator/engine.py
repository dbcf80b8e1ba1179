"""The SimPy cluster: an arrival process, a router, and one process per replica.

Each replica is one SimPy process woken by an event when work arrives; each batch step is one SimPy
timeout. A step is four pure phases: order (scheduler) → form batch (batch-size and KV limits) →
choose k (speculation-length policy) → cost and progress (method, vectorised over the batch).
State the hot path touches lives in :class:`~simspec.simulator.state.RequestTable` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# ufunc reductions skip ndarray-method dispatch: measurably cheaper on the small arrays of a step
_sum = np.add.reduce
_any = np.logical_or.reduce
_max = np.maximum.reduce
_min = np.minimum.reduce
import simpy

from simspec.policies.base import PolicyContext, Scheduler, SpecLenPolicy, StepRecord
from simspec.rng import stream
from simspec.simulator.methods.base import BatchStep, Method
from simspec.simulator.state import RequestTable

STEP_COLUMNS = ("replica", "step", "start_s", "end_s", "step_ms", "batch_size", "prefills", "k_max",
                "drafted", "accepted", "committed", "fed_tokens", "kv_tokens_used", "queue_len",
                "policy_value")


@dataclass
class Capacity:
    """Per-replica limits: requests per step and KV-cache tokens."""

    max_batch_size: int
    kv_budget_tokens: int
    max_batched_tokens: int | None = None  # tokens fed per step (vLLM's max_num_batched_tokens)


class Replica:
    """One model replica: continuous batching at iteration granularity."""

    def __init__(self, cluster: "Cluster", rid: int, spec_len: SpecLenPolicy):
        self.cluster = cluster
        self.rid = rid
        self.spec_len = spec_len
        self.active = np.empty(0, dtype=np.int64)  # unfinished requests here, in arrival order
        self.pending: list[int] = []
        self.wake: simpy.Event | None = None
        self.last_batch = np.empty(0, dtype=np.int64)
        self.rng = stream(cluster.seed, f"acceptance-step/{rid}")
        self.step_index = 0
        self.busy_s = 0.0
        self.outstanding_tokens = 0
        self.steps_log: list[tuple] = []

    def enqueue(self, i: int) -> None:
        t = self.cluster.table
        self.pending.append(i)
        self.outstanding_tokens += int(t.prompt_tokens[i] + t.output_tokens[i])
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def process(self):
        env = self.cluster.env
        t = self.cluster.table
        cap = self.cluster.capacity
        sched = self.cluster.scheduler
        method = self.cluster.method
        keep_mode = self.cluster.preempt_mode == "keep"
        budget = cap.kv_budget_tokens
        while True:
            if self.pending:
                self.active = np.concatenate([self.active, np.asarray(self.pending, dtype=np.int64)])
                self.pending.clear()
            if self.active.size == 0:
                self.wake = env.event()
                yield self.wake
                self.wake = None
                continue
            now = env.now
            # 1. order
            order = sched.order(self.active, now)
            # 2. form the batch: the longest prefix of the order within both limits
            cand = order[: cap.max_batch_size]
            resident = t.kv_resident[cand]
            ctx = t.prompt_tokens[cand] + t.generated[cand]
            remaining = t.output_tokens[cand] - t.generated[cand]
            k_res = np.where(resident, np.minimum(self.spec_len.k_reserve(), remaining - 1), 0)
            need = ctx + 1 + k_res
            cum = np.cumsum(need)
            nb = int(np.searchsorted(cum, budget, side="right"))
            if cap.max_batched_tokens is not None and nb > 1:
                fed_need = np.where(resident[:nb], k_res[:nb] + 1, ctx[:nb])
                nb = max(1, min(nb, int(np.searchsorted(np.cumsum(fed_need), cap.max_batched_tokens, side="right"))))
            if nb == 0:  # cannot happen after the up-front check; guard against silent stalls
                raise RuntimeError(f"replica {self.rid}: top request {t.request_id[cand[0]]} cannot fit the KV budget")
            batch = cand[:nb]
            prefill = ~resident[:nb]
            used = int(cum[nb - 1])
            # residents pushed out of the batch keep their KV while it fits (keep mode)
            rest = order[nb:]
            rest_res = rest[t.kv_resident[rest]]
            if rest_res.size:
                if keep_mode:
                    kept_cum = used + np.cumsum(t.prompt_tokens[rest_res] + t.generated[rest_res])
                    n_keep = int(np.searchsorted(kept_cum, budget, side="right"))
                    if n_keep:
                        used = int(kept_cum[n_keep - 1])
                    evict = rest_res[n_keep:]
                else:
                    evict = rest_res
                if evict.size:
                    t.kv_resident[evict] = False
                    t.recomputes[evict] += 1
            # preemptions: in the last batch, unfinished, not in this one
            last = self.last_batch
            if last.size and not (last.size == nb and (last == batch).all()):
                t.in_batch[last] = False
                t.in_batch[batch] = True
                pushed = last[~t.in_batch[last]]
                if pushed.size:
                    t.preemptions[pushed] += 1
            else:
                t.in_batch[batch] = True
            self.last_batch = batch
            any_prefill = bool(_any(prefill))
            if any_prefill:
                new_start = np.isnan(t.start_s[batch])
                if _any(new_start):
                    t.start_s[batch[new_start]] = now
            # 3. choose k for decode members
            rem_b = remaining[:nb]
            ctx_b = ctx[:nb]
            k = np.zeros(nb, dtype=np.int64)
            dec = ~prefill
            if _any(dec):
                dec_idx = batch[dec]
                kv_free = budget - used
                k_dec = np.asarray(self.spec_len.choose_k(dec_idx, float(_sum(ctx_b[dec])), kv_free,
                                                          self.step_index), dtype=np.int64)
                k_dec = np.minimum(np.maximum(k_dec, 0), rem_b[dec] - 1)
                # drafts beyond those reserved at batch formation must fit the KV room and the
                # per-step token budget; members later in priority order lose theirs first
                k_base = k_res[:nb][dec]
                if _any(k_dec > k_base):
                    extra_i = np.maximum(k_dec - k_base, 0)
                    room = kv_free
                    if cap.max_batched_tokens is not None:
                        planned = int(_sum(np.where(prefill, ctx_b, k_res[:nb] + 1)))
                        room = min(room, max(cap.max_batched_tokens - planned, 0))
                    cum_extra = np.cumsum(extra_i)
                    if int(cum_extra[-1]) > room:
                        over = cum_extra > room
                        k_dec = np.where(over, np.minimum(k_dec, k_base), k_dec)
                        extra_i = np.where(over, 0, extra_i)
                    used += int(_sum(extra_i))
                k[dec] = k_dec
            fed = np.where(prefill, ctx_b, k + 1)
            step = BatchStep(idx=batch, prefill=prefill, fed_tokens=fed, ctx_tokens=np.where(prefill, 0, ctx_b),
                             k=k, remaining=rem_b, alpha=t.alpha[batch], class_idx=t.class_idx[batch])
            # 4. cost and progress
            out = method.step(self.rng, step)
            step_s = out.step_ms / 1000.0
            yield env.timeout(step_s)
            end = env.now
            self.busy_s += step_s
            committed = np.where(prefill, 1, np.minimum(out.accepted + 1, rem_b))
            gen = t.generated[batch] + committed
            t.generated[batch] = gen
            t.steps[batch] += 1
            t.drafted[batch] += out.drafted
            t.accepted[batch] += out.accepted
            self.outstanding_tokens -= int(_sum(committed))
            if any_prefill:
                t.kv_resident[batch] = True
                t.decode_steps[batch[dec]] += 1
                newly = np.isnan(t.first_token_s[batch])
                if _any(newly):
                    t.first_token_s[batch[newly]] = end
                    self.outstanding_tokens -= int(t.prompt_tokens[batch[newly]].sum())
            else:
                t.decode_steps[batch] += 1
            done = gen >= t.output_tokens[batch]
            if _any(done):
                fin = batch[done]
                t.completion_s[fin] = end
                t.kv_resident[fin] = False
                t.in_batch[fin] = False
                self.last_batch = batch[~done]
                self.active = self.active[np.isnan(t.completion_s[self.active])]
                self.cluster.on_complete(int(fin.size))
            record = StepRecord(idx=batch, prefill=prefill, drafted=out.drafted, accepted=out.accepted,
                                committed=committed, step_ms=out.step_ms, end_s=end)
            sched.observe(record)
            self.spec_len.observe(record)
            self.steps_log.append((self.rid, self.step_index, now, end, out.step_ms, nb, int(_sum(prefill)),
                                   int(_max(k)), int(_sum(out.drafted)), int(_sum(out.accepted)),
                                   int(_sum(committed)), int(_sum(fed)), used, int(self.active.size),
                                   self.spec_len.log_value()))
            self.step_index += 1


class Cluster:
    """Router + replicas over one request table."""

    def __init__(self, table: RequestTable, method: Method, scheduler: Scheduler,
                 spec_len_factory: Callable[[PolicyContext], SpecLenPolicy], capacity: Capacity,
                 replicas: int, router: str, preempt_mode: str, seed: int,
                 on_complete: Callable[[int], None] | None = None):
        self.env = simpy.Environment()
        self.table = table
        self.method = method
        self.scheduler = scheduler
        self.capacity = capacity
        self.router = router
        self.preempt_mode = preempt_mode
        self.seed = seed
        self._on_complete = on_complete
        self.completed = 0
        self.replicas = []
        for r in range(replicas):
            ctx = PolicyContext(table=table, method=method, max_batch_size=capacity.max_batch_size,
                                kv_budget_tokens=capacity.kv_budget_tokens, seed=seed, replica=r)
            self.replicas.append(Replica(self, r, spec_len_factory(ctx)))
        self._rr = 0

    def on_complete(self, n: int) -> None:
        self.completed += n
        if self._on_complete is not None:
            self._on_complete(n)

    def route(self, i: int) -> Replica:
        if self.router == "round-robin":
            rep = self.replicas[self._rr % len(self.replicas)]
            self._rr += 1
            return rep
        # least outstanding tokens; ties to the lowest replica id
        return min(self.replicas, key=lambda rp: (rp.outstanding_tokens, rp.rid))

    def arrivals(self):
        env = self.env
        t = self.table
        arrival = t.arrival_s
        for i in range(len(t)):
            a = float(arrival[i])
            if a > env.now:
                yield env.timeout(a - env.now)
            rep = self.route(i)
            t.replica[i] = rep.rid
            rep.enqueue(i)

    def run(self) -> None:
        for rep in self.replicas:
            self.env.process(rep.process())
        self.env.process(self.arrivals())
        self.env.run()
