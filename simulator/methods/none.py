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
    lead_step = True

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """One token per member per step; the window ends when the shortest request completes
        (``through``: when the longest does, members dropping out as they finish). With
        ``w.lead``, newcomers feed their last prompt chunk in step 0 (its first token) and one token
        per step after, so every member still commits one token per step."""
        n = w.idx.shape[0]
        rem = w.remaining
        s_eff = min(w.n_steps, int(rem.max() if w.through else rem.min()))
        s = np.arange(s_eff, dtype=np.int64)
        act = s[:, None] < rem[None, :]
        all_act = bool(act.all())
        lead = w.lead
        ones = act.astype(np.int64)
        if lead is None and all_act:
            ctx_sum = (int(w.ctx_tokens.sum()) + n * s).astype(np.float64)
            b = np.full(s_eff, n, dtype=np.int64)
            fed_sum = b.astype(np.float64)
            logits = fed_sum
        else:
            ctx = np.where(act, w.ctx_tokens[None, :] + s[:, None], 0)
            b = act.sum(axis=1)
            fed = ones
            if lead is not None:  # step 0: the newcomers' chunks over what they computed before
                pre = lead.prefill
                ctx[0] = np.where(pre, lead.ctx_tokens, ctx[0])
                fed = ones.copy()
                fed[0] = np.where(pre, lead.fed_tokens, fed[0])
            ctx_sum = ctx.sum(axis=1).astype(np.float64)
            fed_sum = fed.sum(axis=1).astype(np.float64)
            logits = fed_sum
            if lead is not None:  # a prompt chunk needs the LM head at its last position only
                logits = fed_sum.copy()
                logits[0] = fed_sum[0] - float(lead.fed_tokens.sum()) + float(pre.sum())
                ones = fed
        ms = self.cost.target_ms(b, fed_sum, ctx_sum, logits_tokens=logits)
        zeros = np.zeros((s_eff, n), dtype=np.int64)
        committed = act.astype(np.int64)
        return WindowOutcome(step_ms=self.cost.finish(ms), k=zeros, drafted=zeros, accepted=zeros,
                             position_accepts=zeros, committed=committed, fed_tokens=ones,
                             draws=np.zeros((s_eff, n), dtype=np.uint64), active=None if all_act else act)
