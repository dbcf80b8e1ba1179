"""Policy interfaces and registries.

Policies are plain objects that return decisions: a :class:`Scheduler` ranks a replica's requests
(the engine uses the ranking to admit waiting requests and to choose preemption victims, or, in the
``preemptive`` batching mode, to pick each step's batch — see :mod:`simspec.simulator.batching`); a
:class:`SpecLenPolicy` chooses how many drafts each batch member gets. Neither yields SimPy events
or writes metrics, so each is unit-testable with a hand-made :class:`RequestTable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from simspec.errors import ConfigError
from simspec.simulator.state import RequestTable

SCHEDULERS: dict[str, type["Scheduler"]] = {}
SPEC_LEN_POLICIES: dict[str, type["SpecLenPolicy"]] = {}


def register_scheduler(name: str):
    """Class decorator: make a :class:`Scheduler` available as ``--policy NAME``."""

    def deco(cls):
        cls.name = name
        SCHEDULERS[name] = cls
        return cls

    return deco


def register_spec_len(name: str):
    """Class decorator: make a :class:`SpecLenPolicy` available as ``--spec-len NAME``."""

    def deco(cls):
        cls.name = name
        SPEC_LEN_POLICIES[name] = cls
        return cls

    return deco


def get_scheduler_class(name: str) -> type["Scheduler"]:
    if name not in SCHEDULERS:
        raise ConfigError(f"--policy: unknown scheduler {name!r} (choose from {', '.join(sorted(SCHEDULERS))})")
    return SCHEDULERS[name]


def get_spec_len_class(name: str) -> type["SpecLenPolicy"]:
    if name not in SPEC_LEN_POLICIES:
        raise ConfigError(f"--spec-len: unknown policy {name!r} (choose from {', '.join(sorted(SPEC_LEN_POLICIES))})")
    return SPEC_LEN_POLICIES[name]


@dataclass
class PolicyContext:
    """What a policy may know about the run: the request table, the method (for stage-time
    estimates), capacities and the run seed (policies draw from ``simspec.rng.stream(seed, name)``)."""

    table: RequestTable
    method: Any  # simspec.simulator.methods.base.Method
    max_batch_size: int
    kv_budget_tokens: int
    seed: int
    replica: int = -1


@dataclass
class StepRecord:
    """What happened in one step, given to policies after it ends.

    ``idx``: batch members; ``prefill``: which ran a prefill (chunk); ``drafted``/``accepted``/
    ``committed``: per member; ``step_ms``: the step's duration; ``end_s``: simulated time at its
    end; ``fed_tokens``: tokens each member fed (its prefill chunk, or k+1); ``position_accepts``:
    drafted positions whose own draw was accepted (prefix or not).
    """

    idx: np.ndarray
    prefill: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    committed: np.ndarray
    step_ms: float
    end_s: float
    fed_tokens: np.ndarray | None = None
    position_accepts: np.ndarray | None = None


@dataclass
class WindowRecord:
    """Several consecutive decode-only steps of one fixed batch (the engine's fast path).

    ``idx`` (B,) members; ``drafted``, ``accepted``, ``position_accepts``, ``committed``,
    ``fed_tokens``: (S, B) per step and member; ``step_ms``, ``end_s``: (S,) per step. Step s is
    exactly the :class:`StepRecord` a one-step engine would have produced (:meth:`step`)."""

    idx: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    position_accepts: np.ndarray
    committed: np.ndarray
    fed_tokens: np.ndarray
    step_ms: np.ndarray
    end_s: np.ndarray
    active: np.ndarray | None = None  # (S, B): member still running in step s (None: all)

    @property
    def n_steps(self) -> int:
        return int(self.step_ms.shape[0])

    def step(self, s: int) -> StepRecord:
        """Step ``s`` as a one-step engine records it (finished members are not in it)."""
        if self.active is None:
            m = slice(None)
            idx = self.idx
        else:
            m = self.active[s]
            idx = self.idx[m]
        return StepRecord(idx=idx, prefill=np.zeros(idx.shape[0], dtype=bool), drafted=self.drafted[s][m],
                          accepted=self.accepted[s][m], committed=self.committed[s][m],
                          step_ms=float(self.step_ms[s]), end_s=float(self.end_s[s]), fed_tokens=self.fed_tokens[s][m],
                          position_accepts=self.position_accepts[s][m])


class _Configurable:
    name: ClassVar[str] = ""
    param_defaults: ClassVar[dict[str, Any]] = {}
    flag: ClassVar[str] = ""

    @classmethod
    def check_param_names(cls, params: dict[str, Any]) -> None:
        """Refuse parameter names the class does not know (before any run; values are checked
        when the policy is built)."""
        unknown = set(params) - set(cls.param_defaults)
        if unknown:
            raise ConfigError(f"{cls.flag} {cls.name}: unknown parameter(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(cls.param_defaults)) or 'none'})")

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        self.check_param_names(params)
        return {**self.param_defaults, **params}


class Scheduler(_Configurable):
    """Orders a replica's unfinished requests each step (highest priority first)."""

    flag = "--policy"
    #: whether a running request may be displaced by a higher-priority one (documentation; the
    #: engine takes whatever order :meth:`order` returns)
    preemptive: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], ctx: PolicyContext):
        self.params = self._params(params)
        self.ctx = ctx
        self.table = ctx.table

    def order(self, active: np.ndarray, now_s: float) -> np.ndarray:
        """``active`` (request indices, in arrival order) sorted by priority."""
        raise NotImplementedError

    def observe(self, record: StepRecord) -> None:
        """Called after every step of every replica."""

    def observe_window(self, record: WindowRecord) -> None:
        """Called after a window of decode-only steps: the same as :meth:`observe` on each step in
        turn (override with a vectorised equivalent)."""
        if type(self).observe is Scheduler.observe:
            return
        for s in range(record.n_steps):
            self.observe(record.step(s))

    def extra_columns(self) -> dict[str, np.ndarray]:
        """Per-request output columns this policy adds (name → array over all requests)."""
        return {}


class SpecLenPolicy(_Configurable):
    """Chooses each decode member's speculation length for one replica's next step."""

    flag = "--spec-len"
    #: whether the k it gives each member (and its KV reservation) stays the same when other
    #: members leave the batch between decisions; the engine then runs windows past completions
    batch_independent: ClassVar[bool] = False
    #: k never changes (it depends on nothing the run observes): a window may then also start
    #: with the step that completes newcomers' prompts, since their k is known in advance
    constant_k: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any], ctx: PolicyContext):
        self.params = self._params(params)
        self.ctx = ctx
        self.method = ctx.method

    def k_reserve(self) -> int:
        """Drafts per decode request to reserve KV for when forming the batch."""
        return self.method.k_max

    def choose_k(self, idx: np.ndarray, kv_tokens: float, kv_free_tokens: int, step_index: int) -> np.ndarray:
        """k for each decode member ``idx`` (≥ 0). ``kv_tokens``: their context in total;
        ``kv_free_tokens``: KV room left beyond one token each (the sum of k must fit it)."""
        raise NotImplementedError

    def observe(self, record: StepRecord) -> None:
        """Called after each step of this policy's replica."""

    def horizon_steps(self, step_index: int) -> int:
        """How many steps, from ``step_index`` on, the k chosen at ``step_index`` stays the policy's
        choice for an unchanged batch (the engine advances at most that many steps at once)."""
        return 1 << 30

    def observe_window(self, record: WindowRecord) -> np.ndarray:
        """:meth:`observe` for each step of a window in turn; returns :meth:`log_value` after each
        step (override with a vectorised equivalent)."""
        if type(self).observe is SpecLenPolicy.observe:
            return np.full(record.n_steps, self.log_value())
        out = np.empty(record.n_steps)
        for s in range(record.n_steps):
            self.observe(record.step(s))
            out[s] = self.log_value()
        return out

    def log_value(self) -> float:
        """A number for the steps log (e.g. the current acceptance estimate); NaN if none."""
        return float("nan")
