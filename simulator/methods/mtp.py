"""``mtp``: multi-token prediction modules of the target as the drafter (DeepSeek-V3, arXiv:2412.19437
§2.2; vLLM ``method: "mtp"``, SGLang ``NEXTN``). An MTP module is the shared embedding, a projection
of [embedding; hidden] (2h → h), one transformer block and the shared output head; the modules are
chained (``num_nextn_predict_layers`` of them, 1 in DeepSeek-V3's config.json) and, as vLLM does,
one module is run again for every further draft position.

Head cost: the profile's ``mtp_head`` stage when present; else composed from the target's stages
as ``eagle``'s (``head_layers`` × ``layer`` + ``lm_head`` + ``embed``; the projection is not priced
there). Parameters as ``eagle`` (``depth`` = vLLM's ``num_speculative_tokens``, default 1 = one MTP
module; ``topk`` > 1 drafts a tree, as SGLang allows for NEXTN).
"""

from __future__ import annotations

from simspec.simulator.methods.base import register_method
from simspec.simulator.methods.eagle import HeadDrafter


@register_method("mtp")
class MTP(HeadDrafter):
    __doc__ = __doc__
    param_defaults = {**HeadDrafter.param_defaults, "depth": 1}
