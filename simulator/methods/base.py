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
    position_accepts: np.ndarray | None = None  # accepted positions, prefix or not (None: = accepted)
    #: two-level HiSpec: tokens each inner iteration appended to a member's buffer, (members, N_i),
    #: 0 past its last iteration (what forced acceptance replays); None for other methods
    inner: np.ndarray | None = None


@dataclass
class LeadStep:
    """A window's first step when it also completes newcomers' prompts (arrays per member):
    ``prefill`` members run their last prompt chunk of ``fed_tokens`` tokens over ``ctx_tokens``
    already computed, commit their first token in that step and decode from the next one (their
    ``DecodeWindow.k`` is for those later steps); the other members decode from the first step."""

    prefill: np.ndarray
    fed_tokens: np.ndarray
    ctx_tokens: np.ndarray


@dataclass
class DecodeWindow:
    """Up to ``n_steps`` consecutive decode-only steps of one fixed batch (every member decoding,
    each with a fixed speculation length ``k``, capped per step at its remaining − 1).

    Inputs are per member (aligned with ``idx``): ``ctx_tokens`` and ``remaining`` at the window's
    start, ``rng_base``/``draws`` (counter-based random state, see :class:`StepRandom`).
    ``through``: run on past completions with the members left (the batch only shrinks; the engine
    allows it when nothing waits for admission) until every member is done or ``n_steps``;
    otherwise stop at the first step in which a member completes.
    """

    idx: np.ndarray
    ctx_tokens: np.ndarray
    k: np.ndarray
    remaining: np.ndarray
    alpha: np.ndarray
    class_idx: np.ndarray
    rng_base: np.ndarray
    draws: np.ndarray
    n_steps: int
    through: bool = False
    lead: LeadStep | None = None
    #: the window's start and the next arrival for the replica (simulated seconds): a method may
    #: stop at the step during which that arrival comes (the engine cuts the window there anyway)
    start_s: float = 0.0
    stop_at_s: float = float("inf")


@dataclass
class WindowOutcome:
    """Per-step results of a :class:`DecodeWindow`, arrays of shape (steps, members) unless said.

    The window stops at the first step in which a member completes (that step included), so every
    member is unfinished at the start of every step. ``step_ms`` (steps,); ``k`` the speculation
    length each member used; ``draws`` the random draws each member consumed in each step.
    """

    step_ms: np.ndarray
    k: np.ndarray
    drafted: np.ndarray
    accepted: np.ndarray
    position_accepts: np.ndarray
    committed: np.ndarray
    fed_tokens: np.ndarray
    draws: np.ndarray
    active: np.ndarray | None = None  # (steps, members): member still running (None: all)

    @property
    def n_steps(self) -> int:
        return int(self.step_ms.shape[0])


class StepRandom:
    """Counter-based uniforms for one step's batch, a drop-in for ``Generator.random(shape)``.

    Row r of every draw belongs to batch member r; its numbers are ``counter_uniforms(base_r,
    draws_r + offset_r + j)``, so what a request draws depends only on the run seed, its id and how
    many numbers it drew before — not on the batch, the replica, or how steps are grouped. Methods
    that draw for a subset of rows pass ``rows``. ``used`` is each row's count after the step.
    """

    __slots__ = ("base", "start", "used")

    def __init__(self, base: np.ndarray, draws: np.ndarray):
        self.base = base
        self.start = draws
        self.used = np.zeros(base.shape[0], dtype=np.uint64)

    def random(self, shape, rows: np.ndarray | None = None) -> np.ndarray:
        from simspec.rng import counter_uniforms

        m = int(shape[1]) if len(shape) > 1 else 1
        if rows is None:
            base, ctr = self.base, self.start + self.used
        else:
            base, ctr = self.base[rows], self.start[rows] + self.used[rows]
        u = counter_uniforms(base[:, None], ctr[:, None] + np.arange(m, dtype=np.uint64)[None, :])
        if rows is None:
            self.used += np.uint64(m)
        else:
            self.used[rows] += np.uint64(m)
        return u if len(shape) > 1 else u[:, 0]


def draw_random(rng, shape, rows: np.ndarray | None = None) -> np.ndarray:
    """``rng.random(shape)`` for the batch rows ``rows`` (all when None); works for a plain
    ``numpy.random.Generator`` (tests) and for :class:`StepRandom` (the engine)."""
    if isinstance(rng, StepRandom):
        return rng.random(shape, rows)
    return rng.random(shape)


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

    def bind_requests(self, alpha: np.ndarray, class_idx: np.ndarray) -> None:
        """Called once per run with every request's acceptance level and class (request table
        order), after :meth:`bind_acceptance`: methods may precompute per-request quantities."""

    def stages_used(self) -> set[str]:
        """Profile latency stages this method's steps evaluate (range checks look at these only)."""
        if self.cost.whole_model:
            return {"target_step"}
        return {"layer", "lm_head", "embed"}

    # --- per step ----------------------------------------------------------------------------
    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        raise NotImplementedError

    #: uniforms a decode member consumes per step whatever it drafts (None: what it actually drew).
    #: Methods with a vectorised :meth:`decode_window` fix it so draws line up across steps.
    draws_per_step: ClassVar[int | None] = None
    #: :meth:`decode_window` handles ``DecodeWindow.lead`` (a first step that completes prompts)
    lead_step: ClassVar[bool] = False

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """Run up to ``w.n_steps`` decode-only steps of a fixed batch (see :class:`DecodeWindow`).

        This generic version calls :meth:`step` once per step; methods override it with a
        vectorised one. Either way step ``s`` of a window is exactly what a one-step window started
        there would compute, which the engine's equivalence tests check."""
        n = w.idx.shape[0]
        ctx = w.ctx_tokens.copy()
        rem = w.remaining.copy()
        draws = w.draws.copy()
        cols: dict[str, list] = {key: [] for key in ("ms", "k", "d", "a", "p", "c", "f", "r", "act")}
        fixed = self.draws_per_step
        act = np.ones(n, dtype=bool)
        clock_s = w.start_s
        for _ in range(w.n_steps):
            sel = np.flatnonzero(act)
            k_s = np.minimum(w.k[sel], rem[sel] - 1)
            batch = BatchStep(idx=w.idx[sel], prefill=np.zeros(sel.size, dtype=bool), fed_tokens=k_s + 1,
                              ctx_tokens=ctx[sel], k=k_s, remaining=rem[sel], alpha=w.alpha[sel],
                              class_idx=w.class_idx[sel])
            rnd = StepRandom(w.rng_base[sel], draws[sel])
            out = self.step(rnd, batch)
            used = np.zeros(n, dtype=np.uint64)
            used[sel] = np.uint64(fixed) if fixed is not None else rnd.used
            draws = draws + used
            committed_s = np.minimum(out.accepted + 1, rem[sel])
            pa = out.position_accepts if out.position_accepts is not None else out.accepted
            full = {}
            for key, v in (("k", k_s), ("d", out.drafted), ("a", out.accepted), ("p", pa), ("c", committed_s),
                           ("f", k_s + 1)):
                arr = np.zeros(n, dtype=np.int64)
                arr[sel] = v
                full[key] = arr
                cols[key].append(arr)
            cols["ms"].append(out.step_ms)
            cols["r"].append(used)
            cols["act"].append(act.copy())
            rem = rem - full["c"]
            ctx = ctx + full["c"]
            act = act & (rem > 0)
            if not w.through and not bool(act.all()):
                break
            if not bool(act.any()):
                break
            clock_s = clock_s + out.step_ms / 1000.0  # as the engine adds step times
            if w.stop_at_s <= clock_s:  # the next arrival comes during this step: steps after it are cut
                break
        active = np.asarray(cols["act"], dtype=bool)
        return WindowOutcome(step_ms=np.asarray(cols["ms"], dtype=np.float64), k=np.asarray(cols["k"]),
                             drafted=np.asarray(cols["d"], dtype=np.int64),
                             accepted=np.asarray(cols["a"], dtype=np.int64),
                             position_accepts=np.asarray(cols["p"], dtype=np.int64),
                             committed=np.asarray(cols["c"], dtype=np.int64),
                             fed_tokens=np.asarray(cols["f"], dtype=np.int64),
                             draws=np.asarray(cols["r"], dtype=np.uint64),
                             active=None if bool(active.all()) else active)

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
