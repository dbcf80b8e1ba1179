"""LAPS-SD: least-attained / perceived-service scheduling for speculative decoding (algorithms.md §4.3).

Semi-clairvoyant and preemptive at step boundaries. Builds on the multi-level queues of
:mod:`simspec.policies.las` (same ``queues``, ``q``, ``q_ms``, ``service``, ``within`` parameters
and the same demotion rule: a request sits in queue ``j = #{thresholds q·2^j ≤ attained service}``,
for every request, perceptible or not), and adds acceptance awareness:

**Stability test.** Only decode steps in which the request drafted (k > 0) count. After each such
step the request's running acceptance estimate ``Â = Σaccepted / Σdrafted`` (its observed mean
acceptance per draft) is appended to a ring of its last ``w`` values. Once it has ``≥ m`` such
steps and ``max − min`` of the estimates in the ring (the last ``min(w, steps)`` of them) is below
``eps``, the request becomes *perceptible*, for good (``perceptible_at_s`` = end of that step).
Under plain decoding (no drafts) no request ever becomes perceptible and LAPS-SD is LAS.

**Remaining-time estimate** of a perceptible request::

    T̃ = L̂ · (n·T_draft + T_verify) / (n·Â + 1)

``L̂`` = predicted total output − tokens generated so far, floored at 1 (predictor as SRPT:
``oracle`` | ``lognormal`` with ``sigma`` | ``class-mean``); ``n`` = the drafts it got in its last
decode step (its speculation length); ``n·Â + 1`` = expected tokens committed per step.
``T_draft`` (per draft token) and ``T_verify`` come from ``method.stage_estimates_ms(B, kv, n)`` at
the replica's current batch shape: ``B`` = the requests of ``active`` that were in the replica's
last batch (when none, the first ``min(len(active), max_batch_size)`` of ``active``), ``kv`` = their
context tokens (prompt + generated). The shape is common to every request of one ``order`` call.

**Order.** Strict priority across queues (queue 0 first). Within a queue (``merge=fit``, default;
our choice, the paper leaves it open):

1. perceptible requests predicted to *finish within the queue's remaining quantum* — remaining
   tokens ``L̂ ≤ threshold_j − attained`` (``service=tokens``) or ``T̃ ≤ threshold_j − attained``
   in ms (``service=time``); always true in the last queue — by ``T̃`` ascending;
2. then non-perceptible requests by least attained service (or arrival with ``within=arrival``);
3. then the other perceptible requests (known to outlast the queue) by ``T̃`` ascending.

So a perceptible request moves ahead of the non-perceptible ones in its queue exactly when it will
finish before it would be demoted; a known-long one yields to requests whose length is still
unknown, as LAS would have it. ``merge=ahead`` puts every perceptible request of a queue before its
non-perceptible ones (groups 1 and 3 merged, by ``T̃``). Ties by arrival. With ``queues=1`` every
perceptible request is in group 1, so once all are perceptible the order is shortest remaining
*time* first (SRPT on tokens when all share n and Â).

Parameters (defaults): ``queues=4``, ``q=32`` tokens, ``q_ms=500`` ms (``service=time``),
``service=tokens|time``, ``within=arrival|attained``, ``m=5`` steps, ``w=8`` steps, ``eps=0.05``,
``predictor=oracle|lognormal|class-mean``, ``sigma=0.5``, ``merge=fit|ahead``.

Per-request output columns: ``perceptible_at_s`` (NaN if never), ``queue_changes`` (queues moved
down), ``final_queue``, ``predicted_output_tokens``.
"""

from __future__ import annotations

import math

import numpy as np

from simspec.errors import ConfigError
from simspec.policies.base import PolicyContext, Scheduler, StepRecord, register_scheduler
from simspec.policies.las import MultiLevelQueues, _positive_int
from simspec.policies.predictors import predict_output_tokens

MERGES = ("fit", "ahead")


@register_scheduler("laps-sd")
class LAPSSD(MultiLevelQueues):
    param_defaults = {**MultiLevelQueues.param_defaults, "m": 5, "w": 8, "eps": 0.05, "predictor": "oracle",
                      "sigma": 0.5, "merge": "fit"}

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        p = self.params
        flag = "--policy laps-sd"
        self.m = _positive_int(flag, "m", p["m"])
        self.w = _positive_int(flag, "w", p["w"])
        eps = p["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"{flag}: eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        if p["merge"] not in MERGES:
            raise ConfigError(f"{flag}: merge must be one of {', '.join(MERGES)}, got {p['merge']!r}")
        self.merge_ahead = p["merge"] == "ahead"
        self.predicted = predict_output_tokens(p["predictor"], self.table, ctx.seed, float(p["sigma"]), flag)
        n = len(self.table)
        self.drafted_sum = np.zeros(n, dtype=np.int64)
        self.accepted_sum = np.zeros(n, dtype=np.int64)
        self.acc_steps = np.zeros(n, dtype=np.int64)  # decode steps with drafts > 0
        self.history = np.full((n, self.w), np.nan, dtype=np.float32)  # ring of running estimates
        self.spec_len = np.zeros(n, dtype=np.int64)  # drafts in its last decode step
        self.perceptible = np.zeros(n, dtype=bool)
        self.perceptible_at_s = np.full(n, np.nan)

    # --- learning from steps -------------------------------------------------------------------
    def observe_window(self, record) -> None:
        """Several decode-only steps at once, member by member: the same running estimates, ring
        contents and perceptibility decisions (step of detection included) as :meth:`observe` on
        each step in turn."""
        MultiLevelQueues.observe_window(self, record)
        idx = record.idx
        if idx.size == 0:
            return
        act = record.active
        dr, ac = record.drafted, record.accepted
        n_s = record.n_steps
        # the drafts of each member's last step in the window
        if act is None:
            self.spec_len[idx] = dr[-1]
            has = dr > 0
        else:
            ran = act.any(axis=0)
            last = n_s - 1 - np.argmax(act[::-1], axis=0)
            self.spec_len[idx[ran]] = dr[last[ran], np.flatnonzero(ran)]
            has = act & (dr > 0)
        cols = np.flatnonzero(has.any(axis=0))
        if cols.size == 0:
            return
        w = self.w
        for b in cols.tolist():
            i = int(idx[b])
            steps_b = np.flatnonzero(has[:, b])
            d_sum = self.drafted_sum[i] + np.cumsum(dr[steps_b, b])
            a_sum = self.accepted_sum[i] + np.cumsum(ac[steps_b, b])
            est = (a_sum / d_sum).astype(self.history.dtype)  # as stored in the ring, step by step
            c0 = int(self.acc_steps[i])
            n_new = steps_b.size
            if not self.perceptible[i] and c0 + n_new >= self.m:
                # the ring after each new estimate: the last w values of (ring before, estimates)
                seq = np.concatenate([self.history[i][np.arange(c0 - w, c0) % w], est])
                win = np.lib.stride_tricks.sliding_window_view(seq, w)[1:]
                first = max(self.m - c0 - 1, 0)  # estimates from the m-th on are checked
                h = win[first:]
                moved = np.nanmax(h, axis=1) - np.nanmin(h, axis=1)
                hit = np.flatnonzero(moved < self.eps)
                if hit.size:
                    self.perceptible[i] = True
                    self.perceptible_at_s[i] = record.end_s[steps_b[first + int(hit[0])]]
            tail = min(n_new, w)
            self.history[i, np.arange(c0 + n_new - tail, c0 + n_new) % w] = est[n_new - tail:]
            self.drafted_sum[i] = d_sum[-1]
            self.accepted_sum[i] = a_sum[-1]
            self.acc_steps[i] = c0 + n_new

    def observe(self, record: StepRecord) -> None:
        super().observe(record)
        idx = record.idx
        if idx.size == 0:
            return
        dec = ~record.prefill
        self.spec_len[idx[dec]] = record.drafted[dec]
        has = dec & (record.drafted > 0)
        if not has.any():
            return
        i = idx[has]
        self.drafted_sum[i] += record.drafted[has]
        self.accepted_sum[i] += record.accepted[has]
        c = self.acc_steps[i]
        self.history[i, c % self.w] = self.accepted_sum[i] / self.drafted_sum[i]
        c = c + 1
        self.acc_steps[i] = c
        cand = (c >= self.m) & ~self.perceptible[i]
        if cand.any():
            j = i[cand]
            h = self.history[j]
            moved = np.nanmax(h, axis=1) - np.nanmin(h, axis=1)
            newly = j[moved < self.eps]
            if newly.size:
                self.perceptible[newly] = True
                self.perceptible_at_s[newly] = record.end_s

    # --- estimates -----------------------------------------------------------------------------
    def acceptance_estimate(self, idx: np.ndarray) -> np.ndarray:
        """Â: observed accepted / drafted per request (0 before any draft)."""
        d = self.drafted_sum[idx]
        return np.where(d > 0, self.accepted_sum[idx] / np.maximum(d, 1), 0.0)

    def remaining_tokens_estimate(self, idx: np.ndarray) -> np.ndarray:
        """L̂: predicted remaining output tokens, floored at 1."""
        return np.maximum(self.predicted[idx] - self.served_tokens[idx], 1.0)

    def batch_shape(self, active: np.ndarray) -> tuple[int, float]:
        """(batch size, total context tokens) of the replica's current batch (see module doc)."""
        t = self.table
        members = active[t.in_batch[active]]
        if members.size == 0:
            members = active[: max(1, min(active.size, self.ctx.max_batch_size))]
        kv = float((t.prompt_tokens[members] + self.served_tokens[members]).sum())
        return int(members.size), kv

    def remaining_time_ms(self, idx: np.ndarray, batch_size: int, kv_tokens: float,
                          remaining: np.ndarray | None = None) -> np.ndarray:
        """T̃ (ms) for requests ``idx`` at batch shape (``batch_size``, ``kv_tokens``)."""
        n = self.spec_len[idx]
        method = self.ctx.method
        nmax = int(n.max()) if n.size else 0
        cost = np.zeros(nmax + 1)
        for nv in np.flatnonzero(np.bincount(n, minlength=nmax + 1)):
            draft_ms, verify_ms = method.stage_estimates_ms(batch_size, kv_tokens, int(nv))
            cost[nv] = nv * draft_ms + verify_ms
        if remaining is None:
            remaining = self.remaining_tokens_estimate(idx)
        return remaining * cost[n] / (n * self.acceptance_estimate(idx) + 1.0)

    # --- ordering ------------------------------------------------------------------------------
    def order(self, active: np.ndarray, now_s: float) -> np.ndarray:
        perc = self.perceptible[active]
        if not perc.any():
            return super().order(active, now_s)
        queue = self.queue[active]
        pa = active[perc]
        rem = self.remaining_tokens_estimate(pa)
        t_est = self.remaining_time_ms(pa, *self.batch_shape(active), remaining=rem)
        key = np.zeros(active.shape[0]) if self.by_arrival else self.attained[active]
        key[perc] = t_est
        # one integer key: 3·queue + group (0: perceptible finishing in the queue, 1: non-perceptible,
        # 2: perceptible outlasting the queue); both sorts are stable and ``active`` is in arrival
        # order, so ties go by arrival
        qg = 3 * queue + 1
        if self.merge_ahead:
            qg[perc] -= 1
        else:
            left = self.queue_end[queue[perc]] - self.attained[pa]
            need = t_est if self.time_service else rem
            qg[perc] += np.where(need <= left, -1, 1)
        o = np.argsort(key, kind="stable")  # two stable passes: faster than np.lexsort here
        return active[o[np.argsort(qg[o], kind="stable")]]

    def extra_columns(self) -> dict[str, np.ndarray]:
        return {**super().extra_columns(), "perceptible_at_s": self.perceptible_at_s.copy(),
                "predicted_output_tokens": self.predicted}
