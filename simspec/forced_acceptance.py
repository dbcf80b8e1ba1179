"""Forced acceptance for ``simspec validate --forced-acceptance``: the acceptance the simulated run
will sample, per request and decode step, so that the real run can accept exactly the same.

The simulator draws acceptance from counter-based per-request streams
(:func:`simspec.rng.counter_uniforms`): decode step ``s`` of a request uses the uniforms numbered
``s · draws_per_step + j`` of its own stream (seeded by the run seed and the request id), whatever
batch it runs in, for the methods whose ``draws_per_step`` is fixed (``draft``: ``k``; ``kangaroo``:
``γ``, or ``2γ`` with the confidence stop; ``hispec``: ``N_i·N_d + k_max``, or ``N_d`` single-level).
So the outcome of a request's ``s``-th decode step — drafts made and drafts accepted, and for
two-level HiSpec the tokens each inner iteration appended — is a function of (seed, request, ``s``,
its draft cap), the same in every batch. :class:`ForcedPattern` evaluates it with the simulator's own method object on a
one-request batch (:meth:`~simspec.simulator.methods.base.Method.step`, the code path of every
simulated step), after binding each request's acceptance level exactly as
:func:`simspec.simulator.run.simulate` does. The real run then executes real draft and verification
passes but commits that many drafts (:mod:`simspec.calibrate.batched`), and the two runs accept
identically by construction: the comparison validates cost composition and scheduling
independently of the acceptance model. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simspec.errors import ConfigError
from simspec.profile import Profile
from simspec.trace import Trace

#: methods whose per-step draws are fixed per request (see the module docstring)
FORCED_METHODS = ("draft", "kangaroo", "hispec")


@dataclass(frozen=True)
class ForcedStep:
    """One forced decode step of one request.

    Attributes:
        drafts: drafts the final verifier checks (draft/Kangaroo: drafts made; two-level HiSpec:
            the buffer size m).
        accepted: how many of those it accepts (a prefix), ``0 <= accepted <= drafts``.
        inner: two-level HiSpec: tokens each inner iteration appends to the buffer, in order (they
            sum to ``drafts``); empty for the other methods.
    """

    drafts: int
    accepted: int
    inner: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.accepted <= self.drafts:
            raise ValueError(f"forced step: accepted {self.accepted} outside 0..drafts {self.drafts}")
        if self.inner and (sum(self.inner) != self.drafts or min(self.inner) < 1):
            raise ValueError(f"forced step: inner iterations {list(self.inner)} must each append >= 1 token "
                             f"and sum to drafts {self.drafts}")


@dataclass
class ForcedPattern:
    """Per-request acceptance of a run (see the module docstring).

    ``index`` maps request id → row of ``rng_base``/``alpha``/``class_idx`` (the simulator's
    canonical order); ``draws_per_step`` uniforms per decode step; ``log`` records every decision
    asked for: (request id, decode step, cap, drafts, accepted, inner iterations' appended tokens
    joined by ``+``, empty when not HiSpec)."""

    method: Any
    index: dict[str, int]
    rng_base: np.ndarray
    alpha: np.ndarray
    class_idx: np.ndarray
    draws_per_step: int
    log: list[tuple[str, int, int, int, int, str]] = field(default_factory=list)

    def decide(self, request_id: str, decode_step: int, cap: int) -> tuple[int, int]:
        """(drafts, accepted) of decode step ``decode_step`` (0-based) of ``request_id`` with at most
        ``cap`` drafts: what the simulated run samples for that step."""
        f = self.decide_step(request_id, decode_step, cap)
        return f.drafts, f.accepted

    def decide_step(self, request_id: str, decode_step: int, cap: int) -> ForcedStep:
        """:meth:`decide` with HiSpec's inner iterations (a :class:`ForcedStep`)."""
        from simspec.simulator.methods.base import BatchStep, StepRandom

        if cap < 0 or decode_step < 0:
            raise ValueError(f"decide: cap {cap} and decode step {decode_step} must be >= 0")
        i = self.index[str(request_id)]
        inner: tuple[int, ...] = ()
        if cap == 0:
            d = a = 0
        else:
            one = np.array([i], dtype=np.int64)
            batch = BatchStep(idx=one, prefill=np.zeros(1, dtype=bool), fed_tokens=np.array([cap + 1]),
                              ctx_tokens=np.array([0]), k=np.array([cap], dtype=np.int64),
                              remaining=np.array([cap + 1]), alpha=self.alpha[one], class_idx=self.class_idx[one])
            rnd = StepRandom(self.rng_base[one], np.array([decode_step * self.draws_per_step], dtype=np.uint64))
            out = self.method.step(rnd, batch)
            d, a = int(out.drafted[0]), int(out.accepted[0])
            if out.inner is not None:
                inner = tuple(int(x) for x in out.inner[0] if x > 0)
        self.log.append((str(request_id), int(decode_step), int(cap), d, a, "+".join(map(str, inner))))
        return ForcedStep(drafts=d, accepted=a, inner=inner)

    def log_rows(self) -> list[dict[str, Any]]:
        """The decisions asked for, as table rows."""
        return [{"request_id": r, "decode_step": s, "cap": c, "drafts": d, "accepted": a, "inner": i}
                for r, s, c, d, a, i in self.log]


def forced_pattern(config: Any, trace: Trace, profile: Profile) -> ForcedPattern:
    """The pattern the simulated run of ``trace`` under ``config`` will sample (see the module
    docstring). ConfigError for a method without fixed per-step draws."""
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import get_method_class
    from simspec.simulator.run import bind_request_acceptance, canonical_order
    from simspec.simulator.state import RequestTable

    name = config.method.name
    if name not in FORCED_METHODS:
        raise ConfigError(f"--forced-acceptance: method {name} has no per-request acceptance pattern "
                          f"(supported: {', '.join(FORCED_METHODS)})")
    table = RequestTable.from_trace(canonical_order(trace))
    method = get_method_class(name)(dict(config.method.params), profile, CostModel(profile))
    bind_request_acceptance(config, table, method, profile)
    dps = method.draws_per_step
    if not isinstance(dps, int) or dps < 1:
        raise ConfigError(f"--forced-acceptance: method {name} draws a batch-dependent number of uniforms")
    ids = [str(x) for x in table.request_id.tolist()]
    return ForcedPattern(method=method, index={r: j for j, r in enumerate(ids)}, rng_base=table.rng_base.copy(),
                         alpha=table.alpha.copy(), class_idx=table.class_idx.copy(), draws_per_step=int(dps))
