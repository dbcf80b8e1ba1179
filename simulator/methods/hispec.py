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
from simspec.simulator.methods.base import draw_random, BatchStep, Method, StepOutcome, register_method
from simspec.simulator.methods.kangaroo import (DEFAULT_ALPHA, class_entry_names, early_exit_step_ms,
                                                int_param, profile_setting, require_layer_level,
                                                setting_notes)


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
        """Single-level: N_d uniforms per decode member and step (a request's draws do not depend on
        its batch, as Kangaroo's); two-level: what each step actually drew."""
        return self.nd if self.single_level else None

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

        c = self.cost
        nd, ld, li = self.nd, self.draft_exit, self.inter_exit
        ctx = batch.ctx_tokens
        target = np.minimum(self.ni, k)  # 0 for prefill members
        m = np.zeros(n, dtype=np.int64)
        ms = 0.0
        if n and int(target.max()) > 0:
            p_d = acc.draft_probs(alpha_d, batch.class_idx, nd)
            pos = np.arange(nd)[None, :]
            while True:
                ai = np.flatnonzero(m < target)
                if ai.size == 0:
                    break
                mi = m[ai]
                d = np.minimum(nd, k[ai] - mi)
                ok = (draw_random(rng, (ai.size, nd), ai) < p_d[ai]) & (pos < d[:, None])
                agreed = np.cumprod(ok, axis=1).sum(axis=1)
                c_ai = ctx[ai] + mi
                ms += self._draft_rounds_ms(d, c_ai)
                ms += c.slice_ms(ld, li, ai.size, float(d.sum()), float(c_ai.sum()), lm_head=True)
                m[ai] = mi + np.minimum(agreed + 1, d)
        # full verification of the buffer (and the prefill members' prompts)
        kmax = int(m.max()) if n else 0
        if kmax:
            p_f = acc.position_probs(batch.alpha, batch.class_idx, kmax)
            ok = (rng.random(p_f.shape) < p_f) & (np.arange(kmax)[None, :] < m[:, None])
            accepted = np.cumprod(ok, axis=1).sum(axis=1).astype(np.int64)
        else:
            accepted = np.zeros(n, dtype=np.int64)
        pre = batch.prefill
        fed_last = np.where(pre, batch.fed_tokens, 1)
        fed_full = np.where(pre, batch.fed_tokens, m + 1)
        ctx_sum = float(ctx.sum())
        ms += c.slice_ms(0, li, n, float(fed_last.sum()), ctx_sum + float(m.sum()), embed=True)
        logits = float(fed_full.sum()) - float(batch.fed_tokens[pre].sum()) + float(np.count_nonzero(pre))
        ms += c.slice_ms(li, self.num_layers, n, float(fed_full.sum()), ctx_sum, lm_head=True, logits_tokens=logits)
        return StepOutcome(step_ms=c.finish(ms), drafted=m, accepted=accepted)

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
