"""``kangaroo``: self-speculative decoding with a double early exit (Liu et al. 2024, arXiv:2404.18911).

The draft is the target's first ℓ layers + an adapter (one attention block with its norms) + the
target's LM head. Per step and decode request, drafting stops at the first draft whose top-1
probability is below η (that draft is still verified) or at ``min(γ, k)`` drafts; verification runs
only layers ℓ..N−1 (+ LM head) over the bonus token and the drafts, reusing their shallow states.

Cost of one step (``docs/methods.md`` has the derivation), with D_i the drafts request i makes:

- drafting round j = 0..max D_i: layers 0..ℓ−1 (+ embedding) over one token for every request with
  D_i ≥ j (round 0 feeds the previous step's bonus token, round j the j-th draft); requests with
  D_i > j also run the adapter and the LM head and emit draft j+1. The last round of a request only
  computes its last draft's shallow states, as Kangaroo's reference loop does. A request that has
  stopped idles while the others draft (the batch waits for its longest drafter).
- verification: layers ℓ..N−1 + LM head over D_i + 1 tokens per request, in one pass.
- prefill members: their prompt goes through layers 0..ℓ−1 and the adapter (its KV) in round 0 and
  through layers ℓ..N−1 in the verification pass, with the LM head over its last position only: a
  full target prefill, as ``none`` charges it.

Progress: ``drafted`` = D_i, ``accepted`` = the accepted prefix (the engine commits accepted + 1).
Needs a layer-level profile with ``layer``, ``lm_head`` and ``adapter`` stages.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simspec.errors import ConfigError
from simspec.profile import Profile
from simspec.simulator.acceptance_early_exit import KangarooAcceptance, kangaroo_expectations
from simspec.simulator.cost import CostModel
from simspec.simulator.methods.base import BatchStep, Method, StepOutcome, register_method

DEFAULT_ALPHA = 0.7  # estimate used by policies before an acceptance model is bound


# ------------------------------------------------------------------ helpers shared with hispec


def require_layer_level(name: str, profile: Profile, cost: CostModel, stages: tuple[str, ...]) -> int:
    """The target's layer count; ConfigError unless the profile has layer-level ``stages``."""
    if cost.whole_model:
        raise ConfigError(f"--spec {name}: profile {profile.name} gives whole-model step times (target_step) "
                          f"only, but {name} runs slices of layers; use a layer-level profile "
                          f"(an analytic one such as vicuna7b-a100-analytic, `simspec profile analytic`, "
                          f"or a calibrated one)")
    missing = [s for s in stages if not cost.has(s)]
    if missing:
        raise ConfigError(f"--spec {name}: profile {profile.name} has no {', '.join(repr(s) for s in missing)} "
                          f"latency stage(s)")
    return int(cost.num_layers)


def profile_setting(profile: Profile, method: str, key: str) -> Any:
    """``acceptance[method][class].settings[key]`` of the ``default`` class (else the first class
    that has it), or None."""
    section = profile.acceptance.get(method) or {}
    names = (["default"] if "default" in section else []) + sorted(c for c in section if c != "default")
    for c in names:
        settings = section[c].get("settings")
        if isinstance(settings, dict) and key in settings:
            return settings[key]
    return None


def int_param(method: str, key: str, value: Any, lo: int, hi: int | None = None, why: str = "") -> int:
    """An integer parameter in ``lo..hi``, else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ConfigError(f"--spec {method}: {key} must be an integer in {rng}{why}, got {value!r}")
    return value


def setting_notes(method: str, profile: Profile, chosen: dict[str, int]) -> list[str]:
    """A note for each exit chosen differently from the one the profile's acceptance is for (the
    acceptance is then used as is: a what-if, not a measurement)."""
    out = []
    for key, value in chosen.items():
        at = profile_setting(profile, method, key)
        if at is not None and at != value:
            out.append(f"--spec {method}: {key}={value}, but profile {profile.name}'s {method} acceptance is "
                       f"for {key}={at}; it is used as is")
    return out


def class_entry_names(profile: Profile, method: str, entries: list[dict[str, Any]]) -> list[str]:
    """``profile <path>: field acceptance.<method>.<class>`` for each entry (for error messages)."""
    section = profile.acceptance.get(method) or {}
    out = []
    for e in entries:
        cls = next((c for c, v in section.items() if v is e), "?")
        out.append(f"profile {profile.path}: field acceptance.{method}.{cls}")
    return out


def draft_rounds_ms(cost: CostModel, drafts: np.ndarray, ctx: np.ndarray, exit_layer: int, adapter: bool,
                    prefill_b: int = 0, prefill_tokens: float = 0.0) -> float:
    """Self-drafting at an early exit, batched: round j = 0..max(drafts) runs layers 0..exit−1 (+
    embedding) over one token for each request with ``drafts ≥ j``, and (the adapter and) the LM head
    for each request with ``drafts > j``. ``ctx``: each request's cached context at round 0 (it grows
    by one per round). ``prefill_*``: prefill members whose prompts join round 0's shallow layers
    (and adapter), with no cached context."""
    n = drafts.shape[0]
    dmax = int(drafts.max()) if n else 0
    # per round j: requests (and their context) with drafts >= j and with drafts > j
    if n == 0:
        cnt_ge, ctx_ge = [0], [0.0]
    elif int(drafts.min()) == dmax:
        cnt_ge, ctx_ge = [n] * (dmax + 1), [float(ctx.sum())] * (dmax + 1)
    else:
        cnt = np.bincount(drafts, minlength=dmax + 1)[::-1].cumsum()[::-1]
        csum = np.bincount(drafts, weights=ctx, minlength=dmax + 1)[::-1].cumsum()[::-1]
        cnt_ge, ctx_ge = cnt.tolist(), csum.tolist()
    ms = 0.0
    for j in range(dmax + 1):
        b = cnt_ge[j]
        kv = ctx_ge[j] + j * b
        if j < dmax:
            bh = cnt_ge[j + 1]
            kvh = ctx_ge[j + 1] + j * bh
        else:
            bh, kvh = 0, 0.0
        sb, st = b, float(b)
        ab, at = bh, float(bh)
        if j == 0 and prefill_b:
            sb, st = sb + prefill_b, st + prefill_tokens
            ab, at = ab + prefill_b, at + prefill_tokens
        ms += cost.slice_ms(0, exit_layer, sb, st, kv, embed=True)
        if adapter:
            ms += cost.stage_ms("adapter", ab, at, kvh)
        ms += cost.stage_ms("lm_head", bh, bh, kvh)
    return ms


def early_exit_step_ms(cost: CostModel, batch: BatchStep, drafts: np.ndarray, exit_layer: int,
                       num_layers: int, adapter: bool) -> float:
    """Compute time (ms, no overhead) of one single-level early-exit step: the drafting rounds of
    the decode members (prefill prompts in round 0), then layers exit..N−1 over ``drafts + 1``
    tokens per decode member and the prompt of each prefill member, and the LM head over the
    decode members' tokens and each prompt's last position."""
    pre = batch.prefill
    dec = ~pre
    n = batch.idx.shape[0]
    n_pre = int(np.count_nonzero(pre))
    pre_tokens = float(batch.fed_tokens[pre].sum()) if n_pre else 0.0
    if n_pre == n:
        ms = draft_rounds_ms(cost, drafts[:0], batch.ctx_tokens[:0], exit_layer, adapter, n_pre, pre_tokens)
        deep_tokens = pre_tokens
    elif n_pre:
        ms = draft_rounds_ms(cost, drafts[dec], batch.ctx_tokens[dec], exit_layer, adapter, n_pre, pre_tokens)
        deep_tokens = pre_tokens + float((drafts[dec] + 1).sum())
    else:
        ms = draft_rounds_ms(cost, drafts, batch.ctx_tokens, exit_layer, adapter)
        deep_tokens = float((drafts + 1).sum())
    # logits: every verified position of a decode member, the last position of a prefill
    logits = deep_tokens - pre_tokens + n_pre
    ms += cost.slice_ms(exit_layer, num_layers, n, deep_tokens, float(batch.ctx_tokens.sum()), lm_head=True,
                        logits_tokens=logits)
    return ms


# ------------------------------------------------------------------------------- the method


@register_method("kangaroo")
class Kangaroo(Method):
    """Parameters: ``exit`` ℓ (default: the profile's kangaroo ``settings.exit``, else round(N/16)),
    ``gamma`` γ most drafts per step (default 6), ``eta`` η confidence threshold (default 0.6)."""

    param_defaults = {"exit": -1, "gamma": 6, "eta": 0.6}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        n_layers = require_layer_level("kangaroo", profile, cost, ("layer", "lm_head", "adapter"))
        ex = self.params["exit"]
        measured_at = profile_setting(profile, "kangaroo", "exit")
        if ex == -1:
            ex = measured_at if measured_at is not None else max(1, round(n_layers / 16))
        self.exit_layer = int_param("kangaroo", "exit", ex, 1, n_layers - 1,
                                    f" (the target has {n_layers} layers)")
        #: remarks for the run's notes (``simulate`` shows them to the user)
        self.notes: list[str] = setting_notes("kangaroo", profile, {"exit": self.exit_layer})
        self.gamma = int_param("kangaroo", "gamma", self.params["gamma"], 1)
        eta = self.params["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
            raise ConfigError(f"--spec kangaroo: eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.num_layers = n_layers

    @property
    def k_max(self) -> int:
        return self.gamma

    def stages_used(self) -> set[str]:
        return super().stages_used() | {"adapter"}

    @property
    def draws_per_step(self) -> int:  # type: ignore[override]
        """Every decode step consumes γ acceptance uniforms per member, and γ more for the
        confidence stop when it can stop early: what a request draws then depends only on its own
        decode steps, not on the caps of the requests it shares a batch with (so a pre-sampled
        per-request pattern, :mod:`simspec.forced_acceptance`, is what the simulator samples)."""
        stops = bool(getattr(self.acceptance, "stops_early", False))
        return self.gamma * (2 if stops else 1)

    def build_acceptance(self, entries):
        model = KangarooAcceptance(entries, self.eta, class_entry_names(self.profile, "kangaroo", entries))
        if 0.0 < self.eta < 1.0 and any(e.get("confidence") is None for e in entries):
            self.notes.append(f"--spec kangaroo: profile {self.profile.name} has no confidence histograms for "
                              f"some acceptance classes; their drafting stops only at gamma={self.gamma}")
        return model

    # --- per step ------------------------------------------------------------------------------
    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        cap = np.minimum(batch.k, self.gamma)
        if cap.size and int(cap.max()) > 0:
            drafts, accepted = self.acceptance.sample_drafts(rng, batch.alpha, batch.class_idx, cap,
                                                             width=self.gamma)
        else:
            drafts = np.zeros(batch.idx.shape[0], dtype=np.int64)
            accepted = drafts.copy()
        ms = early_exit_step_ms(self.cost, batch, drafts, self.exit_layer, self.num_layers, adapter=True)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=drafts, accepted=accepted)

    # --- estimates for policies ------------------------------------------------------------------
    def _confidence(self) -> tuple[np.ndarray, np.ndarray]:
        acc = self.acceptance
        if isinstance(acc, KangarooAcceptance):
            return acc.mean_confidence()
        one = np.ones(64)
        return one, one

    def _alpha(self) -> float:
        acc = self.acceptance
        return float(acc.mean_alpha.mean()) if acc is not None else DEFAULT_ALPHA

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        """(one drafting round over the batch, verification at k drafts incl. the last draft's
        shallow layers)."""
        c, b = self.cost, batch_size
        draft = c.slice_ms(0, self.exit_layer, b, b, kv_tokens, embed=True, adapter=True, lm_head=True)
        verify = c.slice_ms(0, self.exit_layer, b, b, kv_tokens, embed=True)
        verify += c.slice_ms(self.exit_layer, self.num_layers, b, b * (k + 1), kv_tokens, lm_head=True)
        return draft, verify

    def expected_step_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        """Expected duration at cap k: drafting rounds run until the batch's longest drafter stops."""
        k = min(k, self.gamma)
        draft, _ = self.stage_estimates_ms(batch_size, kv_tokens, k)
        if k <= 0:
            return self.cost.finish(self.cost.target_ms(batch_size, batch_size, kv_tokens))
        ca, cr = self._confidence()
        _, reach = kangaroo_expectations(self._alpha(), k, ca, cr)
        rounds = float((1.0 - (1.0 - reach) ** max(batch_size, 1)).sum())  # E[max_i D_i]
        mean_d = float(reach.sum())
        c, b = self.cost, batch_size
        verify = c.slice_ms(0, self.exit_layer, b, b, kv_tokens, embed=True)
        verify += c.slice_ms(self.exit_layer, self.num_layers, b, b * (mean_d + 1), kv_tokens, lm_head=True)
        return c.finish(rounds * draft + verify)

    def expected_tokens(self, alpha: float, k: int) -> float:
        """1 + E[accepted prefix] with the confidence stop (class-averaged stop probabilities)."""
        ca, cr = self._confidence()
        e_acc, _ = kangaroo_expectations(alpha, min(k, self.gamma), ca, cr)
        return 1.0 + e_acc
