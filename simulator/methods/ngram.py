"""``ngram``: prompt lookup / n-gram speculation (Saxena 2023, "Prompt Lookup Decoding"; vLLM
``method: "ngram"``, SGLang ``NGRAM``): the drafts are the tokens that followed the latest earlier
occurrence of the context's last n-gram; no draft model, no draft compute on the accelerator.

Per step and decode request: with the class's *hit probability* π (``hit_probability`` of the
profile's ``ngram`` entry, or the parameter) the lookup finds a match and proposes
``min(depth, k)`` tokens, verified as a chain with the entry's per-position acceptance (``alpha``,
``position_conditional``); otherwise it proposes nothing and the request decodes one token
(vLLM V1 leaves such a request without draft tokens). ``drafted`` is what was proposed; the target
verifies drafted + 1 tokens per request. The hit is drawn per step, independently (the draw after
the ``depth`` acceptance draws). The CPU lookup itself is not priced.

Parameters: ``depth`` (vLLM ``num_speculative_tokens``, default 4: simspec's choice),
``hit_probability`` (-1: the profile's), ``acceptance`` (profile section, default ``ngram``).
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError, ProfileError
from simspec.simulator.methods.base import register_method
from simspec.simulator.methods.tree import TreeSpec


@register_method("ngram")
class NGram(TreeSpec):
    __doc__ = __doc__
    param_defaults = {"depth": 4, "hit_probability": -1.0, "acceptance": ""}
    extra_draws = 1
    passes_per_depth = False

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        hp = self.params["hit_probability"]
        if hp != -1.0 and (isinstance(hp, bool) or not isinstance(hp, (int, float)) or not 0.0 <= float(hp) <= 1.0):
            raise ConfigError(f"--spec ngram: hit_probability must be a number in [0, 1] (-1: the profile's), "
                              f"got {hp!r}")
        self.hit_override = None if hp == -1.0 else float(hp)

    def build_acceptance(self, entries):
        model = super().build_acceptance(entries)
        if self.hit_override is not None:
            model.hit[:] = self.hit_override
        else:
            from simspec.simulator.methods.kangaroo import class_entry_names

            for e, where in zip(entries, class_entry_names(self.profile, self.acceptance_section, entries)):
                if "hit_probability" not in e:
                    raise ProfileError(f"{where}.hit_probability: missing; n-gram speculation needs the class's "
                                       f"lookup hit probability (add it or give hit_probability=P)")
        return model

    def drafter_pass_ms(self, batch_size, batched_tokens, kv_tokens):
        return 0.0

    def prefill_draft_ms(self, n_prefill: int, prompt_tokens: float) -> float:
        return 0.0

    def add_draft_ms(self, ms, depth, ctx):
        return ms

    def proposals(self, u_extra, k, class_idx):
        return np.where(u_extra[..., 0] < self.acceptance.hit[class_idx], k, 0)
