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
from simspec.simulator.methods.base import BatchStep, Method, StepOutcome, register_method


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
        self.draft_layers = int(self.params["draft_layers"])
        if cost.has("draft_step") and self.draft_layers > 0:
            raise ConfigError(f"--spec draft: draft_layers={self.draft_layers} would be ignored: profile {profile.name} "
                              f"has a 'draft_step' stage (a separate draft model); drop draft_layers")
        if not cost.has("draft_step"):
            if cost.whole_model or self.draft_layers <= 0:
                raise ConfigError(f"--spec draft: profile {profile.name} has no 'draft_step' stage"
                                  + ("" if cost.whole_model else "; give draft_layers=L to draft with the "
                                     "target's first L layers"))
            if self.draft_layers >= (cost.num_layers or 0):
                raise ConfigError(f"--spec draft: draft_layers must be < the target's {cost.num_layers} layers")

    @property
    def k_max(self) -> int:
        return self._k

    def draft_pass_ms(self, batch_size: float, batched_tokens: float, kv_tokens: float,
                      logits_tokens: float | None = None) -> float:
        """One draft-model forward over the batch (LM head over ``logits_tokens``, default all)."""
        if batch_size <= 0:
            return 0.0
        c = self.cost
        if c.has("draft_step"):
            return c.stage_ms("draft_step", batch_size, batched_tokens, kv_tokens)
        ms = c.layers_ms(self.draft_layers, batch_size, batched_tokens, kv_tokens)
        ms += c.stage_ms("lm_head", batch_size, batched_tokens if logits_tokens is None else logits_tokens,
                         kv_tokens)
        if c.has("embed"):
            ms += c.stage_ms("embed", batch_size, batched_tokens, kv_tokens)
        return ms

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        k = batch.k
        n = batch.idx.shape[0]
        speculating = bool(k.size and _max(k) > 0)
        ms = self.cost.target_ms(n, float(_sum(batch.fed_tokens)), float(_sum(batch.ctx_tokens)), speculating,
                                 logits_tokens=batch.logits_tokens())
        pre = batch.prefill
        if _any(pre):  # the draft model prefills the same context
            n_pre = int(_sum(pre))
            ms += self.draft_pass_ms(n_pre, float(_sum(batch.fed_tokens[pre])), 0.0, logits_tokens=n_pre)
        if speculating:
            kmax = int(_max(k))
            if int(_min(k)) == kmax:  # uniform k: every pass has the same shape except growing context
                ctx_sum = float(_sum(batch.ctx_tokens))
                for j in range(kmax):
                    ms += self.draft_pass_ms(n, n, ctx_sum + j * n)
            else:
                for j in range(kmax):
                    sel = k > j
                    b = int(_sum(sel))
                    ms += self.draft_pass_ms(b, b, float(_sum(batch.ctx_tokens[sel])) + j * b)
            accepted = self.acceptance.sample_accepted(rng, batch.alpha, batch.class_idx, k)
        else:
            accepted = np.zeros(n, dtype=np.int64)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=k.astype(np.int64), accepted=accepted)

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        draft = self.draft_pass_ms(batch_size, batch_size, kv_tokens)
        verify = self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0)
        return draft, verify
