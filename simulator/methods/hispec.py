"""``hispec``: hierarchical speculative decoding with an intermediate verifier (Kumar, Sanghavi, Das
2025, "HiSpec: Hierarchical Speculative Decoding for LLMs", arXiv:2510.01336).

Three exits of one early-exit model: the draft exit L_d, the intermediate verifier L_i and the full
model (N layers); each level computes only its own slice of layers and reuses the KV and hidden
states of the levels below. One simulated step is one *full* verification; per decode request (k = the policy's cap):

1. Inner loop, until the tentative buffer holds ``min(N_i, k)`` tokens: draft ``d = min(N_d, k − m)``
   tokens at L_d — d rounds of layers 0..L_d−1 (+ embedding) + LM head over one token (the frontier
   token, then each draft but the last) — then layers L_d..L_i−1 + LM head over those d tokens in
   one pass; append the prefix L_i agrees with plus L_i's own token at the first disagreement (all d
   drafts when it agrees with all: there is no intermediate bonus, the last draft becomes the next
   frontier token). ``m`` = buffer size; it never exceeds ``k``, so with ``k ≥ N_i + N_d − 1`` (the
   default, ``k_max``) it is never cut.
2. Full verification: layers 0..L_i−1 over the frontier token (the buffer's last token, not yet run
   through any layer), then layers L_i..N−1 + LM head over the m + 1 tokens (the previous step's
   bonus token and the buffer) in one pass. The full model's agreed prefix plus its
   correction/bonus token is committed; the rest is flushed.

This is the accounting of ``simspec.calibrate.runners.HiSpecRunner`` (the real runner whose logs
calibrate the ``hispec`` acceptance entries), so measured profiles and the simulator agree.

Batched: every inner iteration runs its passes over the requests whose buffer is still short; the
others idle. Prefill members run all N layers on their prompt in the full-verification pass (the LM
head over the prompt's last position only).
Progress: ``drafted`` = m (buffer tokens the full model verified), ``accepted`` = its agreed prefix.

``inter_exit = N`` (the intermediate verifier *is* the full model): each step is one draft-and-verify
round — single-level early-exit self-speculation with ``min(N_d, k)`` drafts at L_d verified by
layers L_d..N−1 over the drafts + 1 tokens with the usual bonus token, and the ``draft_vs_inter``
acceptance; ``ni`` is then unused.
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.simulator.acceptance_early_exit import HiSpecAcceptance, hispec_buffer_expectations
from simspec.simulator import kernels
from simspec.simulator.methods.base import (BatchStep, DecodeWindow, Method, StepOutcome, StepRandom, WindowOutcome,
                                            draw_random, register_method)
from simspec.simulator.methods.kangaroo import (DEFAULT_ALPHA, class_entry_names, early_exit_step_ms,
                                                int_param, profile_setting, require_layer_level,
                                                setting_notes, slices_ms)


@register_method("hispec")
class HiSpec(Method):
    """Parameters: ``draft_exit`` L_d and ``inter_exit`` L_i (defaults: the profile's hispec
    ``settings``, else N/8 and N/4), ``nd`` drafts per inner iteration (2), ``ni`` buffer size that
    triggers full verification (4)."""

    param_defaults = {"draft_exit": -1, "inter_exit": -1, "nd": 2, "ni": 4}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        n_layers = require_layer_level("hispec", profile, cost, ("layer", "lm_head"))
        ld, li = self.params["draft_exit"], self.params["inter_exit"]
        if ld == -1:
            ld = profile_setting(profile, "hispec", "draft_exit") or max(1, round(n_layers / 8))
        if li == -1:
            li = profile_setting(profile, "hispec", "inter_exit") or max(2, round(n_layers / 4))
        self.draft_exit = int_param("hispec", "draft_exit", ld, 1, n_layers - 1,
                                    f" (the target has {n_layers} layers)")
        self.inter_exit = int_param("hispec", "inter_exit", li, 1, n_layers,
                                    f" (the target has {n_layers} layers)")
        if self.inter_exit <= self.draft_exit:
            raise ConfigError(f"--spec hispec: inter_exit ({self.inter_exit}) must be deeper than draft_exit "
                              f"({self.draft_exit}): need 1 <= draft_exit < inter_exit <= {n_layers}")
        #: remarks for the run's notes (``simulate`` shows them to the user)
        self.notes: list[str] = setting_notes("hispec", profile, {"draft_exit": self.draft_exit,
                                                                  "inter_exit": self.inter_exit})
        self.nd = int_param("hispec", "nd", self.params["nd"], 1)
        self.ni = int_param("hispec", "ni", self.params["ni"], 1)
        self.num_layers = n_layers
        self.single_level = self.inter_exit == n_layers
        self._cache: dict[tuple[float, int], tuple[float, float, float]] = {}

    @property
    def k_max(self) -> int:
        """Largest buffer: at most N_i − 1 tokens before the last inner iteration, which adds at
        most N_d (N_d drafts in the single-level case)."""
        return self.nd if self.single_level else self.ni + self.nd - 1

    def _draft_rounds_ms(self, d: np.ndarray, ctx: np.ndarray) -> float:
        """``d_i`` drafting rounds per request at the draft exit, batched: round j runs layers
        0..L_d−1 (+ embedding) and the LM head over one token for each request with ``d_i > j``
        (the batch waits for its longest drafter)."""
        c = self.cost
        dmax = int(d.max())
        if int(d.min()) == dmax:
            cnt, csum = [d.size] * dmax, [float(ctx.sum())] * dmax
        else:
            cnt = np.bincount(d, minlength=dmax + 1)[::-1].cumsum()[::-1][1:].tolist()
            csum = np.bincount(d, weights=ctx, minlength=dmax + 1)[::-1].cumsum()[::-1][1:].tolist()
        ms = 0.0
        for j in range(dmax):
            b = cnt[j]
            ms += c.slice_ms(0, self.draft_exit, b, b, csum[j] + j * b, embed=True, lm_head=True)
        return ms

    def build_acceptance(self, entries):
        return HiSpecAcceptance(entries, class_entry_names(self.profile, "hispec", entries))

    # --- per step ------------------------------------------------------------------------------
    @property
    def draws_per_step(self) -> int | None:  # type: ignore[override]
        """Uniforms per decode member and step, whatever its batch (as Kangaroo's γ): single-level
        N_d; two-level :attr:`draw_width` (N_i·N_d for the inner iterations + ``k_max`` for the full
        verification). So what a request draws depends only on its own decode steps, and a
        pre-sampled per-request pattern (:mod:`simspec.forced_acceptance`) is what the simulator
        samples."""
        return self.nd if self.single_level else self.draw_width

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        acc: HiSpecAcceptance = self.acceptance  # type: ignore[assignment]
        n = batch.idx.shape[0]
        k = batch.k
        alpha_d = acc.alpha_draft(batch.alpha, batch.class_idx)
        if self.single_level:
            drafts = np.minimum(k, self.nd).astype(np.int64)
            # N_d uniforms per member whatever the batch's caps (draws_per_step), as Kangaroo draws γ
            kmax = self.nd if n and int(drafts.max()) > 0 else 0
            if kmax:
                p = acc.draft_probs(alpha_d, batch.class_idx, kmax)
                prefix = np.cumprod(rng.random(p.shape) < p, axis=1).astype(bool)
                accepted = (prefix & (np.arange(kmax)[None, :] < drafts[:, None])).sum(axis=1).astype(np.int64)
            else:
                accepted = np.zeros(n, dtype=np.int64)
            ms = early_exit_step_ms(self.cost, batch, drafts, self.draft_exit, self.num_layers, adapter=False)
            return StepOutcome(step_ms=self.cost.finish(ms), drafted=drafts, accepted=accepted)

        if type(rng) is StepRandom:
            out = self._step_kernel(rng, batch, alpha_d)
            if out is not None:
                return out
        nd, ni = self.nd, self.ni
        target = np.minimum(ni, k)  # 0 for prefill members
        m = np.zeros(n, dtype=np.int64)
        inner = np.zeros((n, ni), dtype=np.int64)
        iters: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        accepted = np.zeros(n, dtype=np.int64)
        if n and int(target.max()) > 0:
            # a fixed width per member (draws_per_step): inner iteration t reads uniforms t·N_d ..
            # t·N_d + N_d − 1, the full verification N_i·N_d .. N_i·N_d + m − 1
            u = draw_random(rng, (n, self.draw_width))
            p_d = acc.draft_probs(alpha_d, batch.class_idx, nd)
            pos = np.arange(nd)[None, :]
            t = 0
            while True:
                ai = np.flatnonzero(m < target)
                if ai.size == 0:
                    break
                mi = m[ai]
                d = np.minimum(nd, k[ai] - mi)
                ok = (u[ai, t * nd:(t + 1) * nd] < p_d[ai]) & (pos < d[:, None])
                agreed = np.cumprod(ok, axis=1).sum(axis=1)
                iters.append((ai, d, batch.ctx_tokens[ai] + mi))
                add = np.minimum(agreed + 1, d)
                inner[ai, t] = add
                m[ai] = mi + add
                t += 1
            kmax = int(m.max())
            p_f = acc.position_probs(batch.alpha, batch.class_idx, kmax)
            ok = (u[:, ni * nd:ni * nd + kmax] < p_f) & (np.arange(kmax)[None, :] < m[:, None])
            accepted = np.cumprod(ok, axis=1).sum(axis=1).astype(np.int64)
        ms = self.compute_ms(batch, m, iters)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=m, accepted=accepted, inner=inner)

    def _step_kernel(self, rng: StepRandom, batch: BatchStep, alpha_d: np.ndarray) -> StepOutcome | None:
        """:meth:`step`'s two-level case on the engine's counter-based draws: the sampling and the
        step's shape in one pass (:func:`simspec.simulator.kernels.hispec_step`), then
        :meth:`compute_ms`'s arithmetic on its sums, in the same order. None where the
        acceptance positions are narrower than the largest buffer (numpy's path, as before)."""
        acc: HiSpecAcceptance = self.acceptance  # type: ignore[assignment]
        n, k, nd, ni = batch.idx.shape[0], batch.k, self.nd, self.ni
        drew = n > 0 and min(ni, int(k.max())) > 0
        if drew:
            p_d = acc.draft_probs(alpha_d, batch.class_idx, nd)
            p_f = acc.position_probs(batch.alpha, batch.class_idx, self.k_max)
            if p_d.shape[1] < nd or p_f.shape[1] < self.k_max:
                return None
        else:
            p_d, p_f = np.zeros((n, nd)), np.zeros((n, 1))
        (m, accepted, inner, n_iter, it_b, it_tok, it_ctx, it_dmax, r_cnt, r_ctx, n_pre, fed_pre, fed_last, fed_full,
         ctx_all, buf_all) = kernels.hispec_step(p_d, p_f, rng.base, rng.start + rng.used, k, batch.prefill,
                                                 batch.fed_tokens, batch.ctx_tokens, nd, ni)
        if drew:
            rng.used += np.uint64(self.draw_width)
        c = self.cost
        ld, li = self.draft_exit, self.inter_exit
        ms = 0.0
        if n_iter:
            it_b, it_tok, it_ctx, it_dmax = it_b.tolist(), it_tok.tolist(), it_ctx.tolist(), it_dmax.tolist()
            r_cnt, r_ctx = r_cnt.tolist(), r_ctx.tolist()
            for t in range(int(n_iter)):
                # drafting rounds at L_d (:meth:`_draft_rounds_ms`), then L_d..L_i−1 over the drafts
                r = 0.0
                cnt, csum = r_cnt[t], r_ctx[t]
                for j in range(it_dmax[t]):
                    b = cnt[j]
                    r += c.slice_ms(0, ld, b, b, float(csum[j]) + j * b, embed=True, lm_head=True)
                ms += r
                ms += c.slice_ms(ld, li, it_b[t], float(it_tok[t]), float(it_ctx[t]), lm_head=True)
        ctx_sum = float(ctx_all)
        ms += c.slice_ms(0, li, n, float(fed_last), ctx_sum + float(buf_all), embed=True)
        logits = float(fed_full) - float(fed_pre) + float(n_pre)
        ms += c.slice_ms(li, self.num_layers, n, float(fed_full), ctx_sum, lm_head=True, logits_tokens=logits)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=m, accepted=accepted, inner=inner)

    @property
    def draw_width(self) -> int:
        """Uniforms a decode member consumes per two-level step: N_d for each of at most N_i inner
        iterations, then ``k_max`` for the full verification (what a step reads of them depends on
        its own outcomes only)."""
        return self.ni * self.nd + self.k_max

    def compute_ms(self, batch: BatchStep, m: np.ndarray,
                   iters: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
        """Compute time (ms, no overhead) of a two-level step of ``batch`` whose decode members
        ended with buffers of ``m`` tokens (0 for prefill members) after the inner iterations
        ``iters``, in order: per iteration (the batch rows taking part, their drafts d, their context
        tokens then: ``ctx_tokens`` plus what their earlier iterations appended). Drafting rounds at
        L_d (round j: the rows with d > j), layers L_d..L_i−1 + LM head over the drafts, then the full
        verification (layers 0..L_i−1 over each frontier token and the prompts, L_i..N−1 + LM head
        over the buffers + 1 and the prompts)."""
        c = self.cost
        ld, li = self.draft_exit, self.inter_exit
        ms = 0.0
        for ai, d, c_ai in iters:
            ms += self._draft_rounds_ms(d, c_ai)
            ms += c.slice_ms(ld, li, ai.size, float(d.sum()), float(c_ai.sum()), lm_head=True)
        n = batch.idx.shape[0]
        ctx = batch.ctx_tokens
        pre = batch.prefill
        fed_last = np.where(pre, batch.fed_tokens, 1)
        fed_full = np.where(pre, batch.fed_tokens, m + 1)
        ctx_sum = float(ctx.sum())
        ms += c.slice_ms(0, li, n, float(fed_last.sum()), ctx_sum + float(m.sum()), embed=True)
        logits = float(fed_full.sum()) - float(batch.fed_tokens[pre].sum()) + float(np.count_nonzero(pre))
        ms += c.slice_ms(li, self.num_layers, n, float(fed_full.sum()), ctx_sum, lm_head=True, logits_tokens=logits)
        return ms

    def plan_ms(self, batch: BatchStep, inner_d: np.ndarray, inner_a: np.ndarray) -> float:
        """:meth:`compute_ms` of a step whose inner iterations are given per member: ``inner_d``
        and ``inner_a`` (members, iterations), the drafts made and tokens appended by each of a
        member's iterations, 0 past its last one (a real run's log)."""
        m = inner_a.sum(axis=1).astype(np.int64)
        before = np.cumsum(inner_a, axis=1) - inner_a
        iters = []
        for t in range(inner_d.shape[1]):
            ai = np.flatnonzero(inner_d[:, t] > 0)
            if ai.size:
                iters.append((ai, inner_d[ai, t].astype(np.int64), batch.ctx_tokens[ai] + before[ai, t]))
        return self.compute_ms(batch, m, iters)

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """The window's steps, equal to :meth:`step` one step at a time: the sampling runs step by
        step on each member's counter-based uniforms, with each step's shape, in one pass
        (:func:`simspec.simulator.kernels.hispec_window`), and the cost of every step is evaluated
        at the end as arrays.

        Every member consumes :attr:`draw_width` uniforms per step (inner iteration t reads
        t·N_d.., the full verification N_i·N_d..), but how many inner iterations a step runs
        depends on its outcomes, so the sampling stays a loop over steps. The costs depend only on
        each step's shape: the drafting rounds, intermediate passes and full verification of all
        steps are costed as (steps, iterations, rounds) arrays, summed in :meth:`step`'s order, so
        each step's duration (ms) is bit-identical to it. The single-level case (``inter_exit = N``)
        uses the generic loop over :meth:`step`."""
        if self.single_level:
            return super().decode_window(w)
        acc: HiSpecAcceptance = self.acceptance  # type: ignore[assignment]
        n, steps, nd, ni = w.idx.shape[0], w.n_steps, self.nd, self.ni
        kk = int(w.k.max()) if n else 0
        p_d = acc.draft_probs(acc.alpha_draft(w.alpha, w.class_idx), w.class_idx, nd)
        p_f = acc.position_probs(w.alpha, w.class_idx, max(kk, 1))
        if p_d.shape[1] < nd or p_f.shape[1] < min(max(kk, 1), self.k_max):
            return super().decode_window(w)  # beyond the acceptance positions: step by step
        # the sampling and each step's shape, step by step in one pass (simulator/kernels.py)
        (s_n, act, k_out, drafted, accepted, committed, fed, draws, n_it, it_b, it_tok, it_ctx, r_cnt, r_ctx,
         full_b, full_m, full_ctx) = kernels.hispec_window(p_d, p_f, w.rng_base, w.draws, w.k, w.remaining,
                                                          w.ctx_tokens, steps, bool(w.through), nd, ni,
                                                          self.draw_width)
        all_act = bool(act.all())
        ms = self._window_ms(s_n, n_it, it_b, it_tok, it_ctx, r_cnt, r_ctx, full_b, full_m, full_ctx)
        return WindowOutcome(step_ms=self.cost.finish(ms), k=k_out, drafted=drafted, accepted=accepted,
                             position_accepts=accepted, committed=committed, fed_tokens=fed, draws=draws,
                             active=None if all_act else act)

    def _window_ms(self, s_n: int, n_it: int, it_b: np.ndarray, it_tok: np.ndarray, it_ctx: np.ndarray,
                   r_cnt: np.ndarray, r_ctx: np.ndarray, full_b: np.ndarray, full_m: np.ndarray,
                   full_ctx: np.ndarray) -> np.ndarray:
        """Compute time (ms, no overhead) of each of ``s_n`` decode-only steps from the shapes of
        their inner iterations (``n_it`` in all; per (step, iteration) the members, their drafts
        and their context; per (step, iteration, drafting round j) the members with d > j and
        their context) and their full verifications (batch size, buffer tokens, context tokens),
        as :func:`simspec.simulator.kernels.hispec_window` returns them: :meth:`step`'s
        arithmetic with all steps' passes evaluated as arrays per stage; a pass a step does not
        run costs 0."""
        c, nd, ni = self.cost, self.nd, self.ni
        ld, li = self.draft_exit, self.inter_exit
        b = full_b.astype(np.float64)
        m_sum = full_m.astype(np.float64)
        ctx_sum = full_ctx.astype(np.float64)
        fed = m_sum + b
        parts = [(0, li, b, b, ctx_sum + m_sum, True, False, False, None),
                 (li, self.num_layers, b, fed, ctx_sum, False, False, True, fed)]
        ms = np.zeros(s_n)
        if n_it:
            b_i = it_b.ravel().astype(np.float64)
            tok_i = it_tok.ravel().astype(np.float64)
            kv_i = it_ctx.ravel().astype(np.float64)
            # drafting round j runs the members with d > j
            b_r = r_cnt.astype(np.float64)
            kv_r = np.where(r_cnt > 0, r_ctx + np.arange(nd)[None, None, :] * r_cnt, 0).astype(np.float64)
            full_1, full_2, inter, rounds = slices_ms(c, parts + [
                (ld, li, b_i, tok_i, kv_i, False, False, True, None),
                (0, ld, b_r, b_r, kv_r, True, False, True, None)])
            inter = inter.reshape(s_n, ni)
            for t in range(ni):
                r = np.zeros(s_n)
                for j in range(nd):
                    r = r + rounds[:, t, j]
                ms = ms + r
                ms = ms + inter[:, t]
        else:
            full_1, full_2 = slices_ms(c, parts)
        ms = ms + full_1
        return ms + full_2

    # --- estimates for policies ------------------------------------------------------------------
    def _expect(self, alpha: float, k: int) -> tuple[float, float, float]:
        """(E[tokens per step], E[inner iterations], E[buffer]) at the request level ``alpha``."""
        key = (round(float(alpha), 3), int(k))
        hit = self._cache.get(key)
        if hit is None:
            acc = self.acceptance
            ratio = float(acc.ratio_d.mean()) if isinstance(acc, HiSpecAcceptance) else 1.0
            a_d = min(1.0, key[0] * ratio)
            if self.single_level:
                from simspec.simulator.acceptance import expected_tokens_iid

                kk = min(k, self.nd)
                hit = (expected_tokens_iid(a_d, kk), 1.0 if kk else 0.0, float(kk))
            else:
                hit = hispec_buffer_expectations(a_d, key[0], self.nd, self.ni, max(int(k), 0))
            self._cache[key] = hit
        return hit

    def _alpha(self) -> float:
        acc = self.acceptance
        return float(acc.mean_alpha.mean()) if acc is not None else DEFAULT_ALPHA

    def _iteration_ms(self, b: int, kv: float) -> float:
        """One inner iteration over ``b`` requests: N_d drafting rounds + the intermediate pass (in
        the single-level case: + the last draft's shallow round, verification over N_d + 1)."""
        c = self.cost
        ms = self.nd * c.slice_ms(0, self.draft_exit, b, b, kv, embed=True, lm_head=True)
        if self.single_level:
            ms += c.slice_ms(0, self.draft_exit, b, b, kv, embed=True)
            return ms + c.slice_ms(self.draft_exit, self.num_layers, b, b * (self.nd + 1), kv, lm_head=True)
        return ms + c.slice_ms(self.draft_exit, self.inter_exit, b, b * self.nd, kv, lm_head=True)

    def _full_ms(self, b: int, kv: float, buffer: float) -> float:
        c = self.cost
        return (c.slice_ms(0, self.inter_exit, b, b, kv, embed=True)
                + c.slice_ms(self.inter_exit, self.num_layers, b, b * (buffer + 1), kv, lm_head=True))

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        """(inner-loop time per buffered token, full-verification time at a buffer of k tokens)."""
        _, iters, buf = self._expect(self._alpha(), k)
        inner = iters * self._iteration_ms(batch_size, kv_tokens)
        per_token = inner / buf if buf > 0 else 0.0
        if self.single_level:
            return per_token, 0.0
        return per_token, self._full_ms(batch_size, kv_tokens, k)

    def expected_step_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        if k <= 0:
            return self.cost.finish(self.cost.target_ms(batch_size, batch_size, kv_tokens))
        _, iters, buf = self._expect(self._alpha(), k)
        ms = iters * self._iteration_ms(batch_size, kv_tokens)
        if not self.single_level:
            ms += self._full_ms(batch_size, kv_tokens, buf)
        return self.cost.finish(ms)

    def expected_tokens(self, alpha: float, k: int) -> float:
        return self._expect(alpha, k)[0]
