"""SmartSpec: speculation length by goodput (algorithms.md §5.2), global and per-request.

Goodput = expected committed tokens (accepted + bonus) per ms of step time.

``smartspec`` — one acceptance estimate α̂ per replica, read from the engine's cumulative counters
as the SmartSpec authors' code does: ``α̂ = Σ accepted positions / Σ drafted positions`` over every
decode step of the replica so far, where a position counts as accepted when its own draft token
is accepted, prefix or not (``estimator=cumulative``, default). That is an unbiased estimate of the
per-token acceptance α the goodput formula uses, and it does not drift. Before any draft
α̂ = ``alpha0`` (0.7). ``estimator=ema``: ``α̂ ← decay·α̂ + (1 − decay)·rate`` after every step
that drafted, ``rate`` = that step's accepted/drafted positions (``decay`` = 0.85).

(An earlier version fed the accepted *prefix* per draft into the EMA; its mean is
(α + … + α^k)/k, 0.44 at α = 0.7 and k = 4, so α̂ drifted low, k = 0 won and then froze the
estimate: a "k = 0 trap" that was an artefact of the estimator, not of SmartSpec.)

Decision: at the first step of each window of ``interval`` (= 20) replica steps (step_index // 20
changes; a step with no decode members makes none and the next one with decode members decides),
for k = 0, 1, …, ``k_max`` (default the method's k_max; at most it):

- expected committed tokens ``B·(1 − α̂^(k+1))/(1 − α̂)`` with B the step's decode members (for a
  method that overrides ``Method.expected_tokens`` — Kangaroo's confidence stop, HiSpec's buffer —
  ``B·method.expected_tokens(α̂, k)`` instead; the two agree for ``draft``);
- step time ``method.expected_step_ms(B, kv_tokens, k)`` for this batch (draft + verify + overhead);
- goodput(k) = tokens / time; goodput(0) × ``bonus`` (= 1.1: speculation must win by 10 %);
- KV guard: goodput(k) = 0 when the drafts beyond what the batch already reserved
  (Σ max(min(k, remaining−1) − reserved_i, 0)) exceed ``kv_free_tokens``;
- stop at the first k whose goodput does not exceed the best so far; the choice is the last k
  that improved (0 when k = 1 does not beat 1.1 × goodput(0)).

The chosen k is used for every decode member until the next decision (capped by the engine at
remaining − 1), and :meth:`k_reserve` returns it, so batches between decisions reserve exactly
what they use and never need extra KV. Before the first decision k = k_max (the most it can
reserve, which the run's up-front fit check uses). If a batch ever needs more KV than is free, the
lowest-priority members fall back to their reservation (a final clip; the engine never raises).

``smartspec-per-request`` — α̂_i per request (the same estimator over its own counters),
k_i chosen per request by the same rule with tokens ``(1 − α̂_i^(k+1))/(1 − α̂_i)`` and the same
batch step time; decided for the whole batch at each window start, and on first sight for a member
that joined since. KV guard per request, then the final clip. ``k_reserve`` = the largest k_i of
its last batch (k_max before the first decision).

**k = 0 and learning.** A step at k = 0 drafts nothing, so α̂ does not move while k = 0; the
decision is still revisited every ``interval`` steps as the batch changes (goodput depends on the
batch size), and with the unbiased estimator k = 0 wins only when speculation really does not pay
at that α̂ and batch. Option ``probe=P`` (default 0: off): while a member's k is 0, every P-th
replica step (step_index % P == P − 1) it drafts one token anyway (KV permitting).

Engine horizon: the k decided at a window start holds until the next window start (or probe
step), so :meth:`horizon_steps` lets the engine advance that many steps at once.

**Trees** (``tree``, ``eagle`` … with ``topk`` > 1): k is the tree's node budget; expected tokens
are the tree model's exact ``1 + Σ node path probabilities`` at α̂ (``method.expected_tokens``), so
the rule picks the goodput-optimal tree size; α̂'s denominator is the depth of each step's tree
(``method.verified_positions``: the positions at which a top-1 accept was counted), not its nodes.

Parameters (defaults): ``alpha0=0.7``, ``decay=0.85`` (ema only), ``interval=20``, ``bonus=1.1``,
``k_max=-1`` (= the method's k_max), ``estimator=cumulative|ema``, ``probe=0``.

Steps log: ``policy_value`` = α̂ (per-request: mean α̂_i over its last decided batch); ``k_max``
column = the largest k used in the step.
"""

from __future__ import annotations

import math

import numpy as np

from simspec.errors import ConfigError
from simspec.policies.base import PolicyContext, SpecLenPolicy, StepRecord, register_spec_len
from simspec.simulator.methods.base import Method

ESTIMATORS = ("cumulative", "ema")


def choose_by_goodput(tokens: np.ndarray, step_ms: np.ndarray, kv_ok: np.ndarray, bonus: float) -> np.ndarray:
    """SmartSpec's rule, vectorised over rows.

    ``tokens`` (R, K+1) expected committed tokens at k = 0..K; ``step_ms`` (K+1,) step time at each
    k; ``kv_ok`` (R, K+1) whether k passes the KV check. Returns the chosen k per row: the end of the
    leading run of k's that each strictly improve goodput, goodput(0) multiplied by ``bonus``.
    """
    kk = step_ms.shape[0]
    good = np.where(kv_ok, tokens / step_ms[None, :], 0.0)
    good[:, 0] *= bonus
    if kk == 1:
        return np.zeros(tokens.shape[0], dtype=np.int64)
    improve = good[:, 1:] > good[:, :-1]
    return np.cumprod(improve, axis=1).sum(axis=1).astype(np.int64)


def iid_tokens(alpha: np.ndarray, k_max: int) -> np.ndarray:
    """(R, k_max+1): (1 − α^(k+1)) / (1 − α) for each α and k = 0..k_max (exact at α = 1)."""
    a = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)[:, None]
    return np.cumsum(a ** np.arange(k_max + 1)[None, :], axis=1)


@register_spec_len("smartspec")
class SmartSpec(SpecLenPolicy):
    batch_independent = True  # one k for every member, decided only at window starts
    param_defaults = {"alpha0": 0.7, "decay": 0.85, "interval": 20, "bonus": 1.1, "k_max": -1, "estimator": "cumulative",
                      "probe": 0}

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        p = self.params
        flag = f"--spec-len {self.name}"
        self.alpha0 = _unit(flag, "alpha0", p["alpha0"])
        self.decay = _unit(flag, "decay", p["decay"])
        iv = p["interval"]
        if isinstance(iv, bool) or not isinstance(iv, int) or iv < 1:
            raise ConfigError(f"{flag}: interval must be an integer >= 1, got {iv!r}")
        self.interval = iv
        b = p["bonus"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ConfigError(f"{flag}: bonus must be a finite number > 0, got {b!r}")
        self.bonus = float(b)
        km = p["k_max"]
        if km == -1:
            km = int(self.method.k_max)
        if isinstance(km, bool) or not isinstance(km, int) or km < 0 or km > self.method.k_max:
            raise ConfigError(f"{flag}: k_max must be an integer in 0..{self.method.k_max} for --spec "
                              f"{self.method.name}, got {p['k_max']!r}")
        self.k_max = km
        if p["estimator"] not in ESTIMATORS:
            raise ConfigError(f"{flag}: estimator must be one of {', '.join(ESTIMATORS)}, got {p['estimator']!r}")
        self.ema = p["estimator"] == "ema"
        self.drafted_total = 0
        self.position_accepts_total = 0
        pr = p["probe"]
        if isinstance(pr, bool) or not isinstance(pr, int) or pr < 0:
            raise ConfigError(f"{flag}: probe must be an integer >= 0 (0: off), got {pr!r}")
        self.probe = pr
        self.alpha = self.alpha0
        #: tree methods verify more nodes than positions: α̂'s denominator is the tree's depth
        #: (``Method.verified_positions``), not the nodes drafted; None for chains (= drafted)
        self.positions_of = getattr(self.method, "verified_positions", None)
        if self.positions_of is not None and not getattr(self.method, "maps_positions", False):
            self.positions_of = None
        self.k = self.k_max  # reserve the most until the first decision
        self.reserved = self.k
        self.window = -1
        #: the latest choice depended on free KV and tokens left (some member asked for drafts beyond
        #: its reservation): both change every step, so the choice holds for one step only
        self._kv_bound = False
        self.n_decisions = 0
        self.last_decision_step = -1

    # --- engine hooks --------------------------------------------------------------------------
    def k_reserve(self) -> int:
        self.reserved = self.k
        return self.k

    def choose_k(self, idx, kv_tokens, kv_free_tokens, step_index):
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        res = self._reservation(idx)
        window = step_index // self.interval
        if window != self.window:
            self.window = window
            self.n_decisions += 1
            self.last_decision_step = step_index
            self.k = self._decide(idx, kv_tokens, kv_free_tokens, res)
        k = np.full(idx.shape[0], self.k, dtype=np.int64)
        if self.k == 0 and self._probing(step_index):
            k[:] = min(1, self.k_max)
        return self._kv_clip(idx, k, res, kv_free_tokens)

    def horizon_steps(self, step_index: int) -> int:
        if self._kv_bound:
            return 1
        h = self.interval - step_index % self.interval
        if self.probe > 0:  # a probe step (step % P == P − 1) runs on its own
            h = min(h, (self.probe - 1 - step_index % self.probe) or 1)
        return h

    def _positions(self, drafted: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Positions α̂ counts per member (and step): the drafts of a chain, a tree's depth."""
        if self.positions_of is None:
            return drafted
        t = self.ctx.table
        return self.positions_of(drafted, t.alpha[idx], t.class_idx[idx])

    def observe(self, record: StepRecord) -> None:
        dec = ~record.prefill
        drafted = int(record.drafted[dec].sum())
        if drafted <= 0:
            return
        if self.positions_of is not None:
            drafted = int(self._positions(record.drafted[dec], record.idx[dec]).sum())
        pa = record.position_accepts if record.position_accepts is not None else record.accepted
        accepted = int(pa[dec].sum())
        if self.ema:
            self.alpha = self.decay * self.alpha + (1.0 - self.decay) * (accepted / drafted)
        else:
            self.drafted_total += drafted
            self.position_accepts_total += accepted
            self.alpha = self.position_accepts_total / self.drafted_total

    def observe_window(self, record) -> np.ndarray:
        if self.ema:
            return super().observe_window(record)
        d = np.cumsum(self._positions(record.drafted, record.idx[None, :]).sum(axis=1)) + self.drafted_total
        a = np.cumsum(record.position_accepts.sum(axis=1)) + self.position_accepts_total
        values = np.where(d > 0, a / np.maximum(d, 1), self.alpha)
        # a step that drafted nothing leaves α̂ as it was: carry the last value forward
        self.drafted_total = int(d[-1])
        self.position_accepts_total = int(a[-1])
        self.alpha = float(values[-1])
        return values

    def log_value(self) -> float:
        return float(self.alpha)

    # --- helpers -------------------------------------------------------------------------------
    def _probing(self, step_index: int) -> bool:
        """Whether this step is a probe step (k = 0 members draft one token)."""
        return self.probe > 0 and step_index % self.probe == self.probe - 1

    def _remaining(self, idx: np.ndarray) -> np.ndarray:
        t = self.ctx.table
        return np.maximum(t.output_tokens[idx] - t.generated[idx], 1)

    def _reservation(self, idx: np.ndarray) -> np.ndarray:
        """Drafts the engine reserved KV for, per decode member (as the engine computes it)."""
        return np.minimum(self.reserved, self._remaining(idx) - 1)

    def _extra(self, idx: np.ndarray, res: np.ndarray) -> np.ndarray:
        """(B, k_max+1): drafts beyond the reservation for each member at each k."""
        ks = np.arange(self.k_max + 1)
        eff = np.minimum(ks[None, :], (self._remaining(idx) - 1)[:, None])
        return np.maximum(eff - res[:, None], 0)

    def _step_ms(self, batch_size: int, kv_tokens: float) -> np.ndarray:
        m = self.method
        return np.array([m.expected_step_ms(batch_size, kv_tokens, k) for k in range(self.k_max + 1)])

    def _tokens(self, alpha: np.ndarray) -> np.ndarray:
        """(R, k_max+1) expected tokens committed per request per step: the i.i.d. formula, or the
        method's own ``expected_tokens`` when it overrides it (Kangaroo's confidence stop, HiSpec)."""
        if type(self.method).expected_tokens is Method.expected_tokens or getattr(self.method, "iid_tokens", False):
            return iid_tokens(alpha, self.k_max)
        f = self.method.expected_tokens
        return np.array([[f(float(a), k) for k in range(self.k_max + 1)] for a in alpha])

    def _decide(self, idx, kv_tokens, kv_free_tokens, res) -> int:
        if self.k_max == 0:
            return 0
        kv_ok = self._extra(idx, res).sum(axis=0) <= kv_free_tokens
        tokens = idx.size * self._tokens(np.array([self.alpha]))
        return int(choose_by_goodput(tokens, self._step_ms(idx.size, kv_tokens), kv_ok[None, :], self.bonus)[0])

    def _kv_clip(self, idx, k, res, kv_free_tokens) -> np.ndarray:
        """Lower the lowest-priority members to their reservation until the extra drafts fit."""
        extra = np.maximum(np.minimum(k, self._remaining(idx) - 1) - res, 0)
        self._kv_bound = bool(extra.any())
        if int(extra.sum()) > kv_free_tokens:
            over = np.cumsum(extra) > kv_free_tokens
            k = np.where(over, np.minimum(k, res), k)
        return k


@register_spec_len("smartspec-per-request")
class SmartSpecPerRequest(SmartSpec):
    """SmartSpec with a per-request acceptance estimate and per-request k (see the module doc)."""

    batch_independent = False  # its reservation is the largest k_i of the current batch

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        n = len(ctx.table)
        self.alpha_i = np.full(n, self.alpha0)
        self.k_i = np.full(n, -1, dtype=np.int64)  # -1: not decided yet
        self.alpha = float("nan")
        #: per-request α̂ denominators (tree depths) when the method maps nodes to positions
        self.positions_i = np.zeros(n, dtype=np.int64) if self.positions_of is not None else None

    def choose_k(self, idx, kv_tokens, kv_free_tokens, step_index):
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        res = self._reservation(idx)
        window = step_index // self.interval
        if window != self.window:
            self.window = window
            self.n_decisions += 1
            self.last_decision_step = step_index
            todo = np.ones(idx.shape[0], dtype=bool)
        else:
            todo = self.k_i[idx] < 0
        if todo.any():
            sel = idx[todo]
            if self.k_max == 0:
                self.k_i[sel] = 0
            else:
                kv_ok = self._extra(sel, res[todo]) <= kv_free_tokens
                self.k_i[sel] = choose_by_goodput(self._tokens(self._levels(sel)), self._step_ms(idx.size, kv_tokens),
                                                  kv_ok, self.bonus)
            # logged: mean α̂_i of the batch at its latest decision
            self.alpha = float(self._levels(idx).mean())
        k = self.k_i[idx].copy()
        if self._probing(step_index):
            k[k == 0] = min(1, self.k_max)
        k = self._kv_clip(idx, k, res, kv_free_tokens)
        self.k = int(k.max())
        return k

    def _levels(self, idx: np.ndarray) -> np.ndarray:
        """α̂_i: the request's cumulative accepted/drafted positions (engine counters), or its EMA."""
        if self.ema:
            return self.alpha_i[idx]
        t = self.ctx.table
        d = t.drafted[idx] if self.positions_i is None else self.positions_i[idx]
        return np.where(d > 0, t.position_accepts[idx] / np.maximum(d, 1), self.alpha0)

    def observe(self, record: StepRecord) -> None:
        if not self.ema:
            if self.positions_i is not None:
                dec = ~record.prefill
                self.positions_i[record.idx[dec]] += self._positions(record.drafted[dec], record.idx[dec])
            return  # the engine's per-request counters are the estimate
        dec = ~record.prefill & (record.drafted > 0)
        if not dec.any():
            return
        i = record.idx[dec]
        pa = record.position_accepts if record.position_accepts is not None else record.accepted
        self.alpha_i[i] = self.decay * self.alpha_i[i] + (1.0 - self.decay) * pa[dec] / record.drafted[dec]

    def observe_window(self, record) -> np.ndarray:
        if self.ema:
            return SpecLenPolicy.observe_window(self, record)
        if self.positions_i is not None:
            self.positions_i[record.idx] += self._positions(record.drafted, record.idx[None, :]).sum(axis=0)
        return np.full(record.n_steps, self.log_value())


def _unit(flag: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
        raise ConfigError(f"{flag}: {name} must be a number in [0, 1], got {v!r}")
    return float(v)
