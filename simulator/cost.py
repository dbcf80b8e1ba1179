"""Cost model: profile latency stages → milliseconds for one batch step.

Cost depends on the batch's shape only (batch size, tokens fed, context in the KV cache, which layers
run), never on which tokens get accepted. Every stage function takes
``(batch_size, batched_tokens, kv_tokens)`` — tokens fed this step and context tokens already cached,
each summed over the requests that run the stage.

**Arrays.** Every method takes Python/numpy numbers or numpy arrays (any argument; they broadcast;
e.g. one entry per step of a window of steps, see
:meth:`simspec.simulator.methods.base.Method.decode_window`) and then returns an array, elementwise,
with the same arithmetic as the scalar call (an element equals the scalar result bit for bit, so a
window of steps costs what the same steps cost one at a time); an element with ``batch_size <= 0``
costs 0. ``speculating`` may be a bool array too. Grid stages are interpolated in numpy directly
(``latency_models``), not entry by entry.

**Per-forward overhead** (``latency.forward_overhead`` of the profile, schema v2; 0 for v1
profiles): a fixed cost each model forward pays on top of its stages — framework dispatch prelude,
sampling, the device→host sync of the sampled tokens. Separate from the per-step scheduler overhead
(:meth:`CostModel.finish`). Where it is charged (so that the methods need not know):

- ``target``: once per :meth:`target_ms` call (whole-model ``target_step`` included), and once per
  :meth:`slice_ms` that runs the LM head after the last layer (an early-exit verification pass);
- ``draft``: inside ``stage_ms("draft_step")`` — that stage is one whole draft-model forward;
- ``early_exit``: once per :meth:`slice_ms` that runs the LM head at an exit before the last layer
  (a HiSpec draft or intermediate pass) and per direct ``stage_ms("lm_head")`` (a Kangaroo drafting
  round, a ``draft_layers`` draft): a direct LM-head call is an early-exit head; the target's own
  head is priced by :meth:`target_ms` / :meth:`slice_ms`.

:meth:`stage_compute_ms` is a stage without any per-forward overhead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from simspec.errors import ProfileError
from simspec.profile import FORWARD_ROLES, Profile
from simspec.simulator.latency_models import compile_stage

StageFn = Callable[[float, float, float], float]

_ND = np.ndarray

# whole-forward stages include their role's per-forward overhead
_FORWARD_STAGE_ROLE = {"draft_step": "draft", "target_step": "target", "lm_head": "early_exit"}


class CostModel:
    """Stage latencies of one profile, composed into target / draft / layer-slice costs (ms)."""

    def __init__(self, profile: Profile):
        self.profile = profile
        stages = profile.stages
        self.fns: dict[str, StageFn] = {name: compile_stage(doc, stages) for name, doc in stages.items()}
        self.c_spec = {name: float(doc["coef"].get("c_spec", 0.0))
                       for name, doc in stages.items() if doc.get("kind") == "linear"}
        ov = profile.overhead
        self.overhead_fraction = ov["fraction"]
        self.overhead_fixed_ms = ov["fixed_ms"]
        self.forward_overhead = dict(profile.forward_overhead)
        self.whole_model = "target_step" in self.fns
        target = profile.models.get("target", {})
        self.num_layers = int(target["num_layers"]) if "num_layers" in target else None
        if not self.whole_model and self.num_layers is None:
            raise ProfileError(f"profile {profile.path}: field models.target.num_layers: needed to compose "
                               f"layer-level stages")

    def has(self, stage: str) -> bool:
        return stage in self.fns

    def forward_overhead_ms(self, role: str) -> float:
        """Fixed cost (ms) of one forward of ``role`` (``target``, ``draft`` or ``early_exit``) on top
        of its stages; 0 when the profile gives none."""
        if role not in FORWARD_ROLES:
            raise ValueError(f"forward_overhead_ms: unknown role {role!r} (one of {', '.join(FORWARD_ROLES)})")
        return self.forward_overhead[role]

    def _per_forward(self, role: str, batch_size):
        """The role's per-forward overhead for passes of ``batch_size`` requests (0 where none run)."""
        ov = self.forward_overhead[role]
        if isinstance(batch_size, _ND):
            return np.where(batch_size > 0, ov, 0.0)
        return ov if batch_size > 0 else 0.0

    # Every public method has a scalar path (plain Python arithmetic, a few microseconds: the
    # simulator calls it per step) and, when any argument is an ndarray, an array path with the same
    # arithmetic in the same order.

    def _fn(self, stage: str):
        fn = self.fns.get(stage)
        if fn is None:
            raise ProfileError(f"profile {self.profile.path}: field latency.stages.{stage}: missing stage")
        return fn

    def _compute_array(self, stage: str, batch_size, batched_tokens, kv_tokens, speculating=False):
        ms = np.asarray(self._fn(stage)(batch_size, batched_tokens, kv_tokens), dtype=np.float64)
        cs = self.c_spec.get(stage, 0.0)
        if cs:
            ms = ms + np.where(speculating, cs, 0.0)
        return np.where(np.asarray(batch_size) > 0, np.maximum(ms, 0.0), 0.0)

    def stage_compute_ms(self, stage: str, batch_size: float, batched_tokens: float, kv_tokens: float,
                         speculating: bool = False) -> float:
        """Time of one stage (ms) without per-forward overhead, with the linear fit's speculation
        term when ``speculating``."""
        if (isinstance(batch_size, _ND) or isinstance(batched_tokens, _ND) or isinstance(kv_tokens, _ND)
                or isinstance(speculating, _ND)):
            return self._compute_array(stage, batch_size, batched_tokens, kv_tokens, speculating)
        if batch_size <= 0:
            return 0.0
        fn = self.fns.get(stage)
        if fn is None:
            self._fn(stage)
        ms = fn(batch_size, batched_tokens, kv_tokens)
        if speculating:
            ms += self.c_spec.get(stage, 0.0)
        return max(ms, 0.0)

    def stage_ms(self, stage: str, batch_size: float, batched_tokens: float, kv_tokens: float,
                 speculating: bool = False) -> float:
        """Time of one stage (ms). ``draft_step`` and ``target_step`` are whole forwards and include
        their role's per-forward overhead; a direct ``lm_head`` is an early-exit head pass and
        includes the ``early_exit`` overhead (see the module docstring)."""
        ms = self.stage_compute_ms(stage, batch_size, batched_tokens, kv_tokens, speculating)
        role = _FORWARD_STAGE_ROLE.get(stage)
        if role is not None and self.forward_overhead[role]:
            ms = ms + self._per_forward(role, batch_size)
        return ms

    def layers_ms(self, n_layers: int, batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
        """``n_layers`` decoder layers over the batch (layer-level profiles)."""
        if isinstance(batch_size, _ND) or isinstance(batched_tokens, _ND) or isinstance(kv_tokens, _ND):
            if n_layers <= 0:
                return np.zeros(np.broadcast(batch_size, batched_tokens, kv_tokens).shape)
            return n_layers * self._compute_array("layer", batch_size, batched_tokens, kv_tokens)
        if n_layers <= 0 or batch_size <= 0:
            return 0.0
        return n_layers * self.stage_compute_ms("layer", batch_size, batched_tokens, kv_tokens)

    def slice_ms(self, first_layer: int, end_layer: int, batch_size: float, batched_tokens: float,
                 kv_tokens: float, *, embed: bool = False, lm_head: bool = False, adapter: bool = False,
                 logits_tokens: float | None = None) -> float:
        """Decoder layers ``first_layer .. end_layer-1`` over the batch, plus optionally the embedding
        (tokens entering layer 0), the early-exit ``adapter`` and the LM head (final norm included)
        over ``logits_tokens`` (default: every fed token; a prefill needs logits for its last token
        only). Layer-level profiles only; every decoder layer costs the profile's one ``layer`` stage.
        With ``lm_head`` the pass ends a forward: it adds the ``target`` per-forward overhead when
        ``end_layer`` is the last layer, else the ``early_exit`` one."""
        if not (isinstance(batch_size, _ND) or isinstance(batched_tokens, _ND) or isinstance(kv_tokens, _ND)
                or isinstance(logits_tokens, _ND)) and batch_size <= 0:
            return 0.0
        ms = self.layers_ms(end_layer - first_layer, batch_size, batched_tokens, kv_tokens)
        if embed and "embed" in self.fns:
            ms = ms + self.stage_compute_ms("embed", batch_size, batched_tokens, kv_tokens)
        if adapter:
            ms = ms + self.stage_compute_ms("adapter", batch_size, batched_tokens, kv_tokens)
        if lm_head:
            lt = batched_tokens if logits_tokens is None else logits_tokens
            ms = ms + self.stage_compute_ms("lm_head", batch_size, lt, kv_tokens)
            role = "target" if self.num_layers is not None and end_layer >= self.num_layers else "early_exit"
            if self.forward_overhead[role]:
                ms = ms + self._per_forward(role, batch_size)
        return ms

    def target_ms(self, batch_size: float, batched_tokens: float, kv_tokens: float,
                  speculating: bool = False, logits_tokens: float | None = None) -> float:
        """One full target forward (embedding, all layers, LM head) over the batch, its per-forward
        overhead included; the LM head runs over ``logits_tokens`` (default: every fed token — pass
        fewer when prefills need only their last position). Whole-model profiles fit the full step
        and ignore ``logits_tokens``."""
        if (isinstance(batch_size, _ND) or isinstance(batched_tokens, _ND) or isinstance(kv_tokens, _ND)
                or isinstance(speculating, _ND) or isinstance(logits_tokens, _ND)):
            return self._target_array(batch_size, batched_tokens, kv_tokens, speculating, logits_tokens)
        if batch_size <= 0:
            return 0.0
        fns = self.fns
        if self.whole_model:
            ms = fns["target_step"](batch_size, batched_tokens, kv_tokens)
            if speculating:
                ms += self.c_spec.get("target_step", 0.0)
            return max(ms, 0.0) + self.forward_overhead["target"]
        ms = fns["layer"](batch_size, batched_tokens, kv_tokens)
        ms = self.num_layers * (ms if ms > 0.0 else 0.0)
        lt = batched_tokens if logits_tokens is None else logits_tokens
        head = fns["lm_head"](batch_size, lt, kv_tokens)
        ms += head if head > 0.0 else 0.0
        embed = fns.get("embed")
        if embed is not None:
            e = embed(batch_size, batched_tokens, kv_tokens)
            ms += e if e > 0.0 else 0.0
        return ms + self.forward_overhead["target"]

    def _target_array(self, batch_size, batched_tokens, kv_tokens, speculating, logits_tokens):
        if self.whole_model:
            return self.stage_ms("target_step", batch_size, batched_tokens, kv_tokens, speculating)
        ms = self.layers_ms(self.num_layers, batch_size, batched_tokens, kv_tokens)
        lt = batched_tokens if logits_tokens is None else logits_tokens
        ms = ms + self._compute_array("lm_head", batch_size, lt, kv_tokens)
        if "embed" in self.fns:
            ms = ms + self._compute_array("embed", batch_size, batched_tokens, kv_tokens)
        if self.forward_overhead["target"]:
            ms = ms + self._per_forward("target", batch_size)
        return ms

    def draft_ms(self, batch_size: float, batched_tokens: float, kv_tokens: float) -> float:
        """One draft-model forward (``draft_step``), its per-forward overhead included."""
        return self.stage_ms("draft_step", batch_size, batched_tokens, kv_tokens)

    def finish(self, ms: float) -> float:
        """Add the profile's scheduling overhead (per step) to a step's compute time."""
        return ms * (1.0 + self.overhead_fraction) + self.overhead_fixed_ms
