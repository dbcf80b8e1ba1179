"""``eagle``: EAGLE / EAGLE-2 (Li et al. 2024, arXiv:2401.15077 and arXiv:2406.16858) — a one-layer
draft head on the target's hidden states, drafting a chain (``topk=1``, vLLM's default EAGLE
proposer) or a tree (SGLang ``--speculative-eagle-topk``); see :mod:`.tree` for the family's cost and
acceptance.

Head cost per drafter pass: the profile's ``eagle_head`` stage (one head forward over the batch,
e.g. from ``simspec profile analytic --eagle``) when present; else composed on a layer-level profile
from the target's own stages: ``head_layers`` × ``layer`` (EAGLE's head is one decoder layer of
the target's width: ``num_hidden_layers = 1`` in the published EAGLE checkpoints' configs) +
``lm_head`` (EAGLE shares the target's LM head) + ``embed``; the fc layer that fuses the token
embedding with the feature (2h → h, one small GEMM) is not priced in that composition. Each pass is
a forward of its own and pays the profile's ``draft`` per-forward overhead.

Parameters: ``depth`` (default 3: simspec's choice), ``topk`` (1), ``tokens`` (default depth + 1
for a chain, 1 + depth·topk for a tree), ``head_layers`` (1), ``rank_hazard`` (override the
profile's), ``acceptance`` (the profile's acceptance section to read, default the method's name).
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.simulator.methods.base import register_method
from simspec.simulator.methods.kangaroo import int_param
from simspec.simulator.methods.tree import TreeSpec


class HeadDrafter(TreeSpec):
    """A drafter made of decoder layer(s) + an LM head run on the target's hidden states (EAGLE,
    EAGLE-3, MTP): priced by the profile's ``<method>_head`` stage or composed from the target's
    ``layer``, ``lm_head`` and ``embed`` stages."""

    param_defaults = {**TreeSpec.param_defaults, "depth": 3, "head_layers": 1}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        self.head_stage = f"{self.name}_head"
        self.head_layers = int_param(self.name, "head_layers", self.params["head_layers"], 1, 8)
        self.composed = not cost.has(self.head_stage)
        if self.composed and cost.whole_model:
            raise ConfigError(f"--spec {self.name}: profile {profile.name} has no '{self.head_stage}' stage and gives "
                              f"whole-model step times only, so the head cannot be composed from its layers; use a "
                              f"layer-level profile (e.g. vicuna7b-a100-analytic) or add the stage")
        self.vocab_ratio = 1.0

    def stages_used(self) -> set[str]:
        return super().stages_used() | ({"layer", "lm_head", "embed"} if self.composed else {self.head_stage})

    def prefill_draft_ms(self, n_prefill: int, prompt_tokens: float) -> float:
        """The head runs over each prompt (its features and KV), logits for the last position."""
        if not n_prefill:
            return 0.0
        return float(self.drafter_pass_ms(n_prefill, prompt_tokens, 0.0, logits_tokens=float(n_prefill)))

    def drafter_pass_ms(self, batch_size, batched_tokens, kv_tokens, logits_tokens=None):
        c = self.cost
        if not self.composed:
            ms = c.stage_compute_ms(self.head_stage, batch_size, batched_tokens, kv_tokens)
        else:
            ms = c.layers_ms(self.head_layers, batch_size, batched_tokens, kv_tokens)
            head = c.stage_compute_ms("lm_head", batch_size, batched_tokens if logits_tokens is None
                                      else logits_tokens, kv_tokens)
            ms = ms + (head if self.vocab_ratio == 1.0 else head * self.vocab_ratio)
            if c.has("embed"):
                ms = ms + c.stage_compute_ms("embed", batch_size, batched_tokens, kv_tokens)
        if c.forward_overhead_ms("draft"):
            ov = c.forward_overhead_ms("draft")
            ms = ms + (np.where(np.asarray(batch_size) > 0, ov, 0.0) if isinstance(batch_size, np.ndarray)
                       else (ov if batch_size > 0 else 0.0))
        return ms


@register_method("eagle")
class Eagle(HeadDrafter):
    __doc__ = __doc__
