"""``eagle3``: EAGLE-3 (Li et al. 2025, arXiv:2503.01840) — a one-layer head fed by low, middle and
high-level target features, with its own reduced draft vocabulary; chain or tree as ``eagle``.

Head cost: the profile's ``eagle3_head`` stage when present (``simspec profile analytic --eagle3``
prices the fc over 3h, the 2h-input attention and the draft-vocabulary LM head from the head's
config); else composed as ``eagle``'s from the target's stages, with the LM head scaled by
``draft_vocab / vocab_size`` (``draft_vocab``: default the target's vocabulary, i.e. no reduction;
the public EAGLE-3 LLaMA-3.1-8B head has ``draft_vocab_size`` 32,000 against the target's 128,256 —
its config.json). Parameters otherwise as ``eagle``.
"""

from __future__ import annotations

from simspec.errors import ConfigError
from simspec.simulator.methods.base import register_method
from simspec.simulator.methods.eagle import HeadDrafter


@register_method("eagle3")
class Eagle3(HeadDrafter):
    __doc__ = __doc__
    param_defaults = {**HeadDrafter.param_defaults, "draft_vocab": -1}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        dv = self.params["draft_vocab"]
        vocab = (profile.models.get("target") or {}).get("vocab_size")
        if dv != -1:
            if isinstance(dv, bool) or not isinstance(dv, int) or dv < 1:
                raise ConfigError(f"--spec eagle3: draft_vocab must be an integer >= 1 (-1: the target's), got {dv!r}")
            if not vocab:
                raise ConfigError(f"--spec eagle3: draft_vocab needs the target's vocabulary size, and profile "
                                  f"{profile.name} has no models.target.vocab_size")
            if dv > int(vocab):
                raise ConfigError(f"--spec eagle3: draft_vocab {dv} exceeds the target's vocabulary of {int(vocab)}")
            self.vocab_ratio = dv / float(vocab)
