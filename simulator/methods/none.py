"""``none``: plain decoding, one target forward over one token per request (τ = 1)."""

from __future__ import annotations

import numpy as np

from simspec.simulator.methods.base import (BatchStep, DecodeWindow, Method, StepOutcome, WindowOutcome,
                                            register_method)


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

    draws_per_step = 0

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """One token per member per step; the window ends when the shortest request completes
        (``through``: when the longest does, members dropping out as they finish)."""
        n = w.idx.shape[0]
        rem = w.remaining
        s_eff = min(w.n_steps, int(rem.max() if w.through else rem.min()))
        s = np.arange(s_eff, dtype=np.int64)
        act = s[:, None] < rem[None, :]
        all_act = bool(act.all())
        if all_act:
            ctx_sum = (int(w.ctx_tokens.sum()) + n * s).astype(np.float64)
            b = np.full(s_eff, n, dtype=np.int64)
        else:
            ctx_sum = np.where(act, w.ctx_tokens[None, :] + s[:, None], 0).sum(axis=1).astype(np.float64)
            b = act.sum(axis=1)
        ms = self.cost.target_ms(b, b.astype(np.float64), ctx_sum, logits_tokens=b.astype(np.float64))
        zeros = np.zeros((s_eff, n), dtype=np.int64)
        ones = act.astype(np.int64)
        return WindowOutcome(step_ms=self.cost.finish(ms), k=zeros, drafted=zeros, accepted=zeros,
                             position_accepts=zeros, committed=ones, fed_tokens=ones,
                             draws=np.zeros((s_eff, n), dtype=np.uint64), active=None if all_act else act)
