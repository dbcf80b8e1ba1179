"""``none``: plain decoding, one target forward over one token per request (τ = 1)."""

from __future__ import annotations

import numpy as np

from simspec.simulator.methods.base import BatchStep, Method, StepOutcome, register_method


@register_method("none")
class NoSpeculation(Method):
    """One target pass per step over the batch; prefills feed their whole context."""

    param_defaults = {}
    uses_acceptance = False

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        n = batch.idx.shape[0]
        kv = float(batch.ctx_tokens.sum())
        ms = self.cost.target_ms(n, float(batch.fed_tokens.sum()), kv, logits_tokens=batch.logits_tokens())
        zeros = np.zeros(n, dtype=np.int64)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=zeros, accepted=zeros.copy())
