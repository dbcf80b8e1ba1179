"""``medusa``: Medusa heads (Cai et al. 2024, arXiv:2401.10774) — ``depth`` heads on the target's last
hidden state, head i predicting the token i + 1 positions ahead, all in one pass; their top-k
candidates form a static sparse tree verified with tree attention.

Tree: Medusa's heads do not condition on the drafted path, so any node of depth < D may be expanded
(no frontier): the verified tree is the best ``tokens − 1`` rank paths by path probability, which is
how Medusa's sparse trees are chosen (greedily by estimated accuracy). Acceptance per depth comes
from the ``medusa`` profile section (head i's accuracy is position i's conditional acceptance).

Head cost: one pass per step over one token per request: the profile's ``medusa_heads`` stage
(all heads) when present, else composed as ``depth`` × ``lm_head`` × (1 + hidden / vocab) — each
Medusa-1 head is one residual block (an h×h linear + SiLU) and its own LM head (h×V). The heads run
on the verification forward's last hidden state, inside that forward: no per-forward overhead.

Parameters: ``depth`` heads (default 4), ``topk`` (4), ``tokens`` (1 + depth·topk), ``rank_hazard``,
``acceptance`` (as ``eagle``); defaults are simspec's choice.
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.simulator.methods.base import register_method
from simspec.simulator.methods.tree import TreeSpec


@register_method("medusa")
class Medusa(TreeSpec):
    __doc__ = __doc__
    param_defaults = {**TreeSpec.param_defaults, "depth": 4, "topk": 4}
    frontier = False
    passes_per_depth = False

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        self.composed = not cost.has("medusa_heads")
        if self.composed and cost.whole_model:
            raise ConfigError(f"--spec medusa: profile {profile.name} has no 'medusa_heads' stage and gives "
                              f"whole-model step times only; use a layer-level profile or add the stage")
        t = profile.models.get("target") or {}
        h, v = t.get("hidden_size"), t.get("vocab_size")
        self.head_factor = 1.0 + (float(h) / float(v) if h and v else 0.0)

    def stages_used(self) -> set[str]:
        return super().stages_used() | ({"lm_head"} if self.composed else {"medusa_heads"})

    def drafter_pass_ms(self, batch_size, batched_tokens, kv_tokens):
        c = self.cost
        if not self.composed:
            return c.stage_compute_ms("medusa_heads", batch_size, batched_tokens, kv_tokens)
        return c.stage_compute_ms("lm_head", batch_size, batched_tokens, kv_tokens) * (self.depth * self.head_factor)

    def prefill_draft_ms(self, n_prefill: int, prompt_tokens: float) -> float:
        """The heads run on each prompt's last position only."""
        return float(self.drafter_pass_ms(n_prefill, float(n_prefill), 0.0)) if n_prefill else 0.0

    def add_draft_ms(self, ms, depth: np.ndarray, ctx: np.ndarray):
        """One pass of all heads over one token per drafting member."""
        sel = depth > 0
        if not bool(sel.any()):
            return ms
        b = sel.sum(axis=1).astype(np.float64)
        return ms + self.drafter_pass_ms(b, b, (ctx * sel).sum(axis=1).astype(np.float64))
