"""``draft``: classic speculative decoding with a separate draft model.

A step: ``max(k_i)`` sequential draft-model decode passes (pass j runs the requests with k_i ≥ j),
then one target pass over k_i + 1 tokens per request. Prefill members also prefill the draft model.
The accepted prefix is sampled from the acceptance model; +1 correction/bonus token.

Draft cost: the profile's ``draft_step`` stage; on a layer-level profile without one, the draft is
the target's first ``draft_layers`` layers + LM head (an early-exit draft, no adapter).
"""

from __future__ import annotations

import numpy as np

# ufunc reductions skip ndarray-method dispatch: measurably cheaper on the small arrays of a step
_sum = np.add.reduce
_any = np.logical_or.reduce
_max = np.maximum.reduce
_min = np.minimum.reduce

from simspec.errors import ConfigError
from simspec.rng import counter_uniforms
from simspec.simulator import kernels

from simspec.simulator.methods.base import (BatchStep, DecodeWindow, Method, StepOutcome, StepRandom,
                                            WindowOutcome, register_method)


@register_method("draft")
class DraftModel(Method):
    """Parameters: ``k`` drafts per step (default 4); ``draft_layers`` for layer-level profiles."""

    param_defaults = {"k": 4, "draft_layers": 0}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        k = self.params["k"]
        if not isinstance(k, int) or k < 0:
            raise ConfigError(f"--spec draft: k must be an integer >= 0, got {k!r}")
        self._k = k
        self.draft_layers, self.per_step = draft_model_setup("draft", self.params["draft_layers"], profile, cost)

    @property
    def k_max(self) -> int:
        return self._k

    def bind_requests(self, alpha: np.ndarray, class_idx: np.ndarray) -> None:
        # every request's conditional acceptance probability at each draft position (the same
        # arithmetic as position_probs on a batch, done once): steps gather rows instead
        self._probs = self.acceptance.position_probs(alpha, class_idx, self._k) if self._k > 0 else None
        self._pos_u64 = np.arange(max(self._k, 1), dtype=np.uint64)

    def _sample(self, rng, batch: BatchStep, k: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
        """(accepted prefix, accepted positions) per member given ``k`` drafts (``kmax`` = max k):
        :meth:`AcceptanceModel.sample_accepted_positions`, gathering precomputed probabilities and
        drawing the counter-based uniforms directly when ``rng`` is the engine's."""
        probs = getattr(self, "_probs", None)
        if probs is None or type(rng) is not StepRandom:
            return self.acceptance.sample_accepted_positions(rng, batch.alpha, batch.class_idx, k)
        accepted, positions = kernels.draft_accept(probs, batch.idx, rng.base, rng.start + rng.used, k, kmax)
        rng.used += np.uint64(kmax)
        return accepted, positions

    def stages_used(self) -> set[str]:
        used = super().stages_used()
        if self.cost.has("draft_step"):
            return used | {"draft_step"}
        return used | {"layer", "lm_head", "embed"}

    def draft_pass_ms(self, batch_size: float, batched_tokens: float, kv_tokens: float,
                      logits_tokens: float | None = None) -> float:
        """One draft-model forward over the batch (LM head over ``logits_tokens``, default all).
        Arrays (one entry per step) are costed entry by entry."""
        return draft_model_pass_ms(self.cost, self.draft_layers, batch_size, batched_tokens, kv_tokens,
                                   logits_tokens)

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        k = batch.k
        n = batch.idx.shape[0]
        (kmax, kmin, n_pre, fed_all_i, fed_pre_i, ctx_all_i, sel_count, sel_ctx, pass_count,
         pass_ctx) = kernels.draft_step_sums(k, batch.prefill, batch.fed_tokens, batch.ctx_tokens)
        speculating = kmax > 0
        fed_all = float(fed_all_i)
        if n_pre:
            fed_pre = float(fed_pre_i)
            logits = fed_all - fed_pre + float(n_pre)  # = batch.logits_tokens()
        else:
            logits = fed_all
        ms = self.cost.target_ms(n, fed_all, float(ctx_all_i), speculating, logits_tokens=logits)
        if n_pre:  # the draft model prefills the same context
            ms += self.draft_pass_ms(n_pre, fed_pre, 0.0, logits_tokens=n_pre)
        if speculating and self.per_step:
            ms += self.draft_pass_ms(sel_count, sel_count, float(sel_ctx))
            accepted, positions = self._sample(rng, batch, k, kmax)
        elif speculating:
            if kmin == kmax:  # uniform k: every pass has the same shape except growing context
                ctx_sum = float(ctx_all_i)
                for j in range(kmax):
                    ms += self.draft_pass_ms(n, n, ctx_sum + j * n)
            else:
                for j in range(kmax):
                    b = int(pass_count[j])
                    ms += self.draft_pass_ms(b, b, float(pass_ctx[j]) + j * b)
            accepted, positions = self._sample(rng, batch, k, kmax)
        else:
            accepted = np.zeros(n, dtype=np.int64)
            positions = accepted
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=k, accepted=accepted, position_accepts=positions)

    lead_step = True

    @property
    def draws_per_step(self) -> int:  # type: ignore[override]
        """Every decode step consumes k_max uniforms per member (the first k are used)."""
        return self._k

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """All the window's acceptance draws at once; step s of member i uses draws
        ``draws_i + s·k_max + j``. Capping k at remaining − 1 never changes how many tokens a step
        commits (``min(accepted + 1, remaining)`` either way), so the completion step and every
        step's context follow from cumulative sums; cost is evaluated over all steps as arrays."""
        n, steps = w.idx.shape[0], w.n_steps
        kk = int(w.k.max()) if n else 0
        rem0 = w.remaining
        lead = w.lead
        pre = lead.prefill if lead is not None else np.zeros(n, dtype=np.bool_)
        probs = getattr(self, "_probs", None)
        if kk > 0 and probs is not None:
            rows = w.idx
        elif kk > 0:
            probs, rows = self.acceptance.position_probs(w.alpha, w.class_idx, kk), np.arange(n)
        else:
            probs, rows = np.zeros((1, 1)), np.zeros(n, dtype=np.int64)
        acc_full, positions, done_step = kernels.draft_window_accept(probs, rows, w.rng_base, w.draws, w.k, self._k,
                                                             steps, kk, pre, rem0)
        if w.through:
            last = min(steps, int(done_step.max()) + 1)
        else:
            last = min(steps, int(done_step.min()) + 1)
        if last < steps:
            acc_full, positions = acc_full[:last], positions[:last]
        s_eff = acc_full.shape[0]
        if lead is not None:
            lead_fed, lead_ctx = lead.fed_tokens, lead.ctx_tokens
        else:
            lead_fed = lead_ctx = np.zeros(n, dtype=np.int64)
        (act, all_act, k_eff, accepted, positions, committed, fed, draws, fed_sum, b, kmax_s, ctx_sum,
         sel_count, sel_ctx, pass_batch, pass_kv) = kernels.draft_window_shape(acc_full, positions, done_step, w.k, rem0,
                                                                       w.ctx_tokens, pre, lead_fed, lead_ctx, self._k)
        logits = fed_sum
        if lead is not None:  # a prompt chunk needs the LM head at its last position only
            n_pre = int(_sum(pre))
            fed_pre = float(_sum(lead.fed_tokens))
            logits = fed_sum.copy()
            logits[0] = fed_sum[0] - fed_pre + float(n_pre)
        ms = self.cost.target_ms(b, fed_sum, ctx_sum, kmax_s > 0, logits_tokens=logits)
        if lead is not None:  # the draft model prefills the same chunks (as in :meth:`step`)
            pre_pass = np.zeros(s_eff)
            pre_pass[0] = self.draft_pass_ms(n_pre, fed_pre, 0.0, logits_tokens=n_pre)
            ms = ms + pre_pass
        kk_all = int(kmax_s.max()) if s_eff else 0
        if kk_all and self.per_step:
            ms = ms + self.draft_pass_ms(sel_count, sel_count, sel_ctx)
        elif kk_all:
            # draft pass j runs the members with k > j over their context + j: all passes of all
            # steps in one (steps, passes) evaluation, added pass by pass
            passes = self.draft_pass_ms(pass_batch[:, :kk_all], pass_batch[:, :kk_all], pass_kv[:, :kk_all])
            for j in range(kk_all):
                ms = ms + passes[:, j]
        return WindowOutcome(step_ms=self.cost.finish(ms), k=k_eff, drafted=k_eff, accepted=accepted,
                             position_accepts=positions, committed=committed, fed_tokens=fed,
                             draws=draws, active=None if all_act else act)

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        draft = self.draft_pass_ms(batch_size, batch_size, kv_tokens)
        if self.per_step:  # one figure per step: per draft token, spread over the k drafts
            draft = draft / k if k > 0 else 0.0
        verify = self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0)
        return draft, verify


def draft_model_setup(method: str, draft_layers, profile, cost) -> tuple[int, bool]:
    """Check that ``profile`` can price a separate draft model (its ``draft_step`` stage, or the
    target's first ``draft_layers`` layers + LM head on a layer-level profile). Returns
    (draft_layers, per_step): ``per_step`` when ``draft_step`` is one figure per speculative step
    (``"per": "step"``) rather than per pass. One-line ConfigError otherwise."""
    draft_layers = int(draft_layers)
    if cost.has("draft_step") and draft_layers > 0:
        raise ConfigError(f"--spec {method}: draft_layers={draft_layers} would be ignored: profile {profile.name} "
                          f"has a 'draft_step' stage (a separate draft model); drop draft_layers")
    per_step = cost.has("draft_step") and profile.stages["draft_step"].get("per") == "step"
    if not cost.has("draft_step"):
        if cost.whole_model or draft_layers <= 0:
            raise ConfigError(f"--spec {method}: profile {profile.name} has no 'draft_step' stage"
                              + ("" if cost.whole_model else "; give draft_layers=L to draft with the "
                                 "target's first L layers"))
        if draft_layers >= (cost.num_layers or 0):
            raise ConfigError(f"--spec {method}: draft_layers must be < the target's {cost.num_layers} layers")
    return draft_layers, per_step


def draft_model_pass_ms(cost, draft_layers: int, batch_size, batched_tokens, kv_tokens, logits_tokens=None):
    """One draft-model forward (ms): the profile's ``draft_step``, else the target's first
    ``draft_layers`` layers + LM head (over ``logits_tokens``, default all) + embedding. Scalars or
    arrays (elementwise, as :class:`~simspec.simulator.cost.CostModel`)."""
    if type(batch_size) is not np.ndarray and batch_size <= 0:
        return 0.0
    c = cost
    if c.has("draft_step"):
        return c.stage_ms("draft_step", batch_size, batched_tokens, kv_tokens)
    ms = c.layers_ms(draft_layers, batch_size, batched_tokens, kv_tokens)
    ms += c.stage_ms("lm_head", batch_size, batched_tokens if logits_tokens is None else logits_tokens, kv_tokens)
    if c.has("embed"):
        ms += c.stage_ms("embed", batch_size, batched_tokens, kv_tokens)
    return ms
