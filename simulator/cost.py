"""Cost model: profile latency stages → milliseconds for one batch step.

Cost depends on the batch's shape only (batch size, tokens fed, context in the KV cache, which layers
run), never on which tokens get accepted. Every stage function takes
``(batch_size, batched_tokens, kv_tokens)`` — tokens fed this step and context tokens already cached,
each summed over the requests that run the stage.

Every method also takes numpy arrays (one entry per step of a window of steps, see
:meth:`simspec.simulator.methods.base.Method.decode_window`): each entry is computed with exactly the
arithmetic of the scalar call, so a window of steps costs what the same steps cost one at a time.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from simspec.errors import ProfileError
from simspec.profile import Profile
from simspec.simulator.latency_models import compile_stage

StageFn = Callable[[float, float, float], float]


class CostModel:
    """Stage latencies of one profile, composed into target / draft / layer-slice costs (ms)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        stages = profile.stages
        self.fns: dict[str, StageFn] = {name: compile_stage(doc, stages) for name, doc in stages.items()}
        self.vfns = {name: _vectorise(doc, self.fns[name], stages) for name, doc in stages.items()}
        self.c_spec = {name: float(doc["coef"].get("c_spec", 0.0))
                       for name, doc in stages.items() if doc.get("kind") == "linear"}
        ov = profile.overhead
        self.overhead_fraction = ov["fraction"]
        self.overhead_fixed_ms = ov["fixed_ms"]
        self.whole_model = "target_step" in self.fns
        target = profile.models.get("target", {})
        self.num_layers = int(target["num_layers"]) if "num_layers" in target else None
        if not self.whole_model and self.num_layers is None:
            raise ProfileError(f"profile {profile.path}: field models.target.num_layers: needed to compose "
                               f"layer-level stages")

    def has(self, stage: str) -> bool:
        return stage in self.fns

    def stage_ms(self, stage: str, batch_size: float, batched_tokens: float, kv_tokens: float,
                 speculating: bool = False) -> float:
        """Time of one stage (ms), with the linear fit's speculation term when ``speculating``."""
        if type(batch_size) is np.ndarray:
            return self._stage_ms_array(stage, batch_size, batched_tokens, kv_tokens, speculating)
        if batch_size <= 0:
            return 0.0
        fn = self.fns.get(stage)
        if fn is None:
            raise ProfileError(f"profile {self.profile.path}: field latency.stages.{stage}: missing stage")
        ms = fn(batch_size, batched_tokens, kv_tokens)
        if speculating:
            ms += self.c_spec.get(stage, 0.0)
        return max(ms, 0.0)

    def _stage_ms_array(self, stage: str, batch_size: np.ndarray, batched_tokens, kv_tokens,
                        speculating) -> np.ndarray:
        """:meth:`stage_ms` over arrays of shapes (0 where ``batch_size`` ≤ 0)."""
        fn = self.vfns.get(stage)
        if fn is None:
            raise ProfileError(f"profile {self.profile.path}: field latency.stages.{stage}: missing stage")
        b = batch_size if batch_size.dtype == np.float64 else batch_size.astype(np.float64)
        ms = fn(b, batched_tokens, kv_tokens)
        c = self.c_spec.get(stage, 0.0)
        if c and np.any(speculating):
            ms = ms + np.where(speculating, c, 0.0)
        ms = np.maximum(ms, 0.0)
        return np.where(b > 0, ms, 0.0)

    def layers_ms(self, n_layers: int, batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
        """``n_layers`` decoder layers over the batch (layer-level profiles)."""
        if n_layers <= 0 or _none(batch_size):
            return 0.0
        return n_layers * self.stage_ms("layer", batch_size, batched_tokens, kv_tokens)

    def slice_ms(self, first_layer: int, end_layer: int, batch_size: float, batched_tokens: float,
                 kv_tokens: float, *, embed: bool = False, lm_head: bool = False, adapter: bool = False,
                 logits_tokens: float | None = None) -> float:
        """Decoder layers ``first_layer .. end_layer-1`` over the batch, plus optionally the embedding
        (tokens entering layer 0), the early-exit ``adapter`` and the LM head (final norm included)
        over ``logits_tokens`` (default: every fed token; a prefill needs logits for its last token
        only). Layer-level profiles only; every decoder layer costs the profile's one ``layer`` stage."""
        if _none(batch_size):
            return 0.0
        ms = self.layers_ms(end_layer - first_layer, batch_size, batched_tokens, kv_tokens)
        if embed and self.has("embed"):
            ms += self.stage_ms("embed", batch_size, batched_tokens, kv_tokens)
        if adapter:
            ms += self.stage_ms("adapter", batch_size, batched_tokens, kv_tokens)
        if lm_head:
            lt = batched_tokens if logits_tokens is None else logits_tokens
            ms += self.stage_ms("lm_head", batch_size, lt, kv_tokens)
        return ms

    def target_ms(self, batch_size: float, batched_tokens: float, kv_tokens: float,
                  speculating: bool = False, logits_tokens: float | None = None) -> float:
        """One full target forward (embedding, all layers, LM head) over the batch; the LM head runs
        over ``logits_tokens`` (default: every fed token — pass fewer when prefills need only their
        last position). Whole-model profiles fit the full step and ignore ``logits_tokens``."""
        if _none(batch_size):
            return 0.0
        if self.whole_model:
            return self.stage_ms("target_step", batch_size, batched_tokens, kv_tokens, speculating)
        ms = self.layers_ms(self.num_layers, batch_size, batched_tokens, kv_tokens)
        lt = batched_tokens if logits_tokens is None else logits_tokens
        ms += self.stage_ms("lm_head", batch_size, lt, kv_tokens)
        if self.has("embed"):
            ms += self.stage_ms("embed", batch_size, batched_tokens, kv_tokens)
        return ms

    def finish(self, ms: float) -> float:
        """Add the profile's scheduling overhead to a step's compute time."""
        return ms * (1.0 + self.overhead_fraction) + self.overhead_fixed_ms


def _none(batch_size) -> bool:
    """True for a scalar batch of no requests (arrays are masked entry by entry instead)."""
    return type(batch_size) is not np.ndarray and batch_size <= 0


def _vectorise(doc, fn: StageFn, stages=None):
    """An array version of one compiled stage: linear models (and scaled ones of them) in numpy with
    the scalar's arithmetic (same operation order, so entries equal the scalar results bit for
    bit); others entry by entry. Arguments broadcast together."""
    if doc.get("kind") == "scaled" and stages is not None and stages.get(doc.get("of"), {}).get("kind") == "linear":
        base = _vectorise(stages[doc["of"]], fn)
        factor = float(doc["factor"])
        return lambda b, t, kv: factor * base(b, t, kv)
    if doc.get("kind") == "linear":
        coef = doc["coef"]
        c0, cb, ct, ckv = (float(coef[k]) for k in ("c0", "c_b", "c_t", "c_kv"))

        def linear(b, t, kv):
            ms = c0 + cb * b + ct * t + ckv * kv
            return np.where(ms > 0.0, ms, 0.0)

        return linear
    ufn = np.frompyfunc(fn, 3, 1)
    return lambda b, t, kv: np.asarray(ufn(b, t, kv), dtype=np.float64)
