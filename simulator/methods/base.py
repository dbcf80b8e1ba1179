"""The method interface: what one step of a batch costs and how far each request progresses.

A method is a plain object: given the batch's shape and per-request acceptance it returns the step
time and the per-request drafted/accepted counts. It never touches SimPy or writes metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from simspec.errors import ConfigError
from simspec.profile import Profile
from simspec.simulator.acceptance import AcceptanceModel
from simspec.simulator.cost import CostModel

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    """Class decorator: make a :class:`Method` available as ``--spec NAME``."""

    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def get_method_class(name: str) -> type["Method"]:
    if name not in METHODS:
        raise ConfigError(f"--spec: unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


@dataclass
class BatchStep:
    """The shape of one step of one replica's batch (arrays aligned with ``idx``).

    ``prefill``: request runs its (re)prefill this step (k = 0, feeds ``fed_tokens`` = its context).
    ``ctx_tokens``: tokens already in its KV cache before the step (0 for a prefill).
    ``k``: drafts requested this step (0 for prefill members).
    ``remaining``: output tokens it still needs.
    """

    idx: np.ndarray
    prefill: np.ndarray
    fed_tokens: np.ndarray
    ctx_tokens: np.ndarray
    k: np.ndarray
    remaining: np.ndarray
    alpha: np.ndarray
    class_idx: np.ndarray

    def logits_tokens(self) -> float:
        """Positions that need the LM head: k+1 per decode member, the last one per prefill."""
        fed = float(np.add.reduce(self.fed_tokens))
        if not np.logical_or.reduce(self.prefill):
            return fed
        return fed - float(np.add.reduce(self.fed_tokens[self.prefill])) + float(np.add.reduce(self.prefill))


@dataclass
class StepOutcome:
    """Result of one step: its duration (ms, overhead included) and per-request progress.

    ``drafted``: draft tokens actually proposed (verified) per request; ``accepted``: of those, the
    accepted prefix length. Committed tokens are ``accepted + 1`` (capped by the engine at the
    request's remaining output).
    """

    step_ms: float
    drafted: np.ndarray
    accepted: np.ndarray


class Method:
    """Base class. Subclasses set ``param_defaults`` and implement :meth:`step`."""

    name: ClassVar[str] = ""
    param_defaults: ClassVar[dict[str, Any]] = {}
    uses_acceptance: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any], profile: Profile, cost: CostModel):
        unknown = set(params) - set(self.param_defaults)
        if unknown:
            raise ConfigError(f"--spec {self.name}: unknown parameter(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(self.param_defaults)) or 'none'})")
        self.params = {**self.param_defaults, **params}
        self.profile = profile
        self.cost = cost
        self.acceptance: AcceptanceModel | None = None

    # --- configuration ---------------------------------------------------------------------
    @property
    def k_max(self) -> int:
        """Most drafts a request can get in one step (KV is reserved for this many)."""
        return 0

    @property
    def default_k(self) -> int:
        """k the fixed speculation-length policy uses."""
        return self.k_max

    def build_acceptance(self, entries: list[dict[str, Any]]) -> AcceptanceModel:
        """The acceptance model for this method from the profile entries of the trace's classes
        (in class order). Methods with richer entries (Kangaroo confidence, HiSpec levels) override."""
        return AcceptanceModel(entries)

    def bind_acceptance(self, model: AcceptanceModel) -> None:
        self.acceptance = model

    # --- per step ----------------------------------------------------------------------------
    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        raise NotImplementedError

    # --- estimates used by policies (SmartSpec, LAPS-SD) ----------------------------------------
    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        """(draft time per draft token, verify time) of a decode step of ``batch_size`` requests
        holding ``kv_tokens`` context in total, each speculating ``k`` tokens; overhead excluded."""
        verify = self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0)
        return 0.0, verify

    def expected_step_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        """Expected duration of a decode step at uniform ``k`` (overhead included)."""
        draft, verify = self.stage_estimates_ms(batch_size, kv_tokens, k)
        return self.cost.finish(k * draft + verify)

    def expected_tokens(self, alpha: float, k: int) -> float:
        """Expected tokens committed per request per step at per-token acceptance ``alpha``."""
        from simspec.simulator.acceptance import expected_tokens_iid

        return expected_tokens_iid(alpha, k)
