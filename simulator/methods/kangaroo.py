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
from simspec.simulator import kernels
from simspec.simulator.methods.base import (BatchStep, DecodeWindow, Method, StepOutcome, StepRandom, WindowOutcome,
                                            register_method)

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
    return rounds_ms(cost, dmax, cnt_ge, ctx_ge, exit_layer, adapter, prefill_b, prefill_tokens)


def rounds_ms(cost: CostModel, dmax: int, cnt_ge: list, ctx_ge: list, exit_layer: int, adapter: bool,
              prefill_b: int = 0, prefill_tokens: float = 0.0) -> float:
    """:func:`draft_rounds_ms` from its counts: rounds j = 0..``dmax``, ``cnt_ge[j]`` requests
    with drafts ≥ j holding ``ctx_ge[j]`` context tokens in all (at round 0)."""
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


def slices_ms(cost: CostModel, parts: list[tuple]) -> list[np.ndarray]:
    """:meth:`CostModel.slice_ms` of several array-valued passes, with one evaluation per latency
    stage over all of them (an array evaluation of a grid stage has a fixed overhead, so a window
    pays it once per stage, not once per pass). Each part is ``(first_layer, end_layer,
    batch_size, batched_tokens, kv_tokens, embed, adapter, lm_head, logits_tokens)`` with numpy
    arrays; returns each part's ms array, elementwise bit-identical to ``slice_ms`` (a part with
    ``first_layer == end_layer`` and only ``adapter`` or ``lm_head`` equals ``stage_ms`` of that
    stage: its early-exit per-forward overhead included for the LM head)."""
    need: dict[str, list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for i, (first, end, b, t, kv, embed, adapter, lm_head, logits) in enumerate(parts):
        b, t, kv = np.broadcast_arrays(b, t, kv)
        if end - first > 0:
            need.setdefault("layer", []).append((i, b, t, kv))
        if embed and cost.has("embed"):
            need.setdefault("embed", []).append((i, b, t, kv))
        if adapter:
            need.setdefault("adapter", []).append((i, b, t, kv))
        if lm_head:
            need.setdefault("lm_head", []).append((i, b, t if logits is None else np.broadcast_to(logits, b.shape), kv))
    got: dict[tuple[str, int], np.ndarray] = {}
    for stage, items in need.items():
        flat = [np.concatenate([np.asarray(x[j], dtype=np.float64).ravel() for x in items]) for j in (1, 2, 3)]
        ms = np.asarray(cost.stage_compute_ms(stage, flat[0], flat[1], flat[2]))
        at = 0
        for i, b, _, _ in items:
            got[(stage, i)] = ms[at:at + b.size].reshape(b.shape)
            at += b.size
    out = []
    for i, (first, end, b, t, kv, embed, adapter, lm_head, logits) in enumerate(parts):
        shape = np.broadcast(b, t, kv).shape
        n_layers = end - first
        ms = n_layers * got[("layer", i)] if n_layers > 0 else np.zeros(shape)
        for stage, on in (("embed", embed and cost.has("embed")), ("adapter", adapter), ("lm_head", lm_head)):
            if on:
                ms = ms + got[(stage, i)]
        if lm_head:
            role = "target" if cost.num_layers is not None and end >= cost.num_layers else "early_exit"
            ov = cost.forward_overhead_ms(role)
            if ov:
                ms = ms + np.where(np.asarray(b) > 0, ov, 0.0)
        out.append(ms)
    return out


def early_exit_step_ms(cost: CostModel, batch: BatchStep, drafts: np.ndarray, exit_layer: int,
                       num_layers: int, adapter: bool) -> float:
    """Compute time (ms, no overhead) of one single-level early-exit step: the drafting rounds of
    the decode members (prefill prompts in round 0), then layers exit..N−1 over ``drafts + 1``
    tokens per decode member and the prompt of each prefill member, and the LM head over the
    decode members' tokens and each prompt's last position."""
    n = batch.idx.shape[0]
    # the step's integer sums in one pass (simulator/kernels.py)
    n_pre, pre_tok, dmax, cnt_ge, ctx_ge, deep_dec, ctx_all = kernels.early_exit_step_sums(
        drafts, batch.prefill, batch.fed_tokens, batch.ctx_tokens)
    n_pre = int(n_pre)
    pre_tokens = float(pre_tok) if n_pre else 0.0
    ms = rounds_ms(cost, int(dmax), cnt_ge.tolist(), [float(x) for x in ctx_ge.tolist()], exit_layer, adapter, n_pre,
                   pre_tokens)
    if n_pre == n:
        deep_tokens = pre_tokens
    elif n_pre:
        deep_tokens = pre_tokens + float(deep_dec)
    else:
        deep_tokens = float(deep_dec)
    # logits: every verified position of a decode member, the last position of a prefill
    logits = deep_tokens - pre_tokens + n_pre
    ms += cost.slice_ms(exit_layer, num_layers, n, deep_tokens, float(ctx_all), lm_head=True,
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
        acc = self.acceptance
        if cap.size and int(cap.max()) > 0 and type(rng) is StepRandom and type(acc) is KangarooAcceptance:
            # sample_drafts at width γ on the engine's counter-based draws, in one pass (kernels.py)
            wd = self.gamma
            probs = acc.position_probs(batch.alpha, batch.class_idx, wd)
            early = bool(acc.stops_early)
            if probs.shape[1] < wd:  # γ beyond the acceptance positions: numpy's error, as before
                return self._numpy_step(rng, batch, cap)
            drafts, accepted = kernels.kangaroo_step_draws(probs, acc.conf_acc, acc.conf_rej, batch.class_idx, early,
                                                           rng.base, rng.start + rng.used, cap, wd)
            rng.used += np.uint64(wd * (2 if early else 1))
        elif cap.size and int(cap.max()) > 0:
            drafts, accepted = self.acceptance.sample_drafts(rng, batch.alpha, batch.class_idx, cap,
                                                             width=self.gamma)
        else:
            drafts = np.zeros(batch.idx.shape[0], dtype=np.int64)
            accepted = drafts.copy()
        ms = early_exit_step_ms(self.cost, batch, drafts, self.exit_layer, self.num_layers, adapter=True)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=drafts, accepted=accepted)

    def _numpy_step(self, rng, batch: BatchStep, cap: np.ndarray) -> StepOutcome:
        drafts, accepted = self.acceptance.sample_drafts(rng, batch.alpha, batch.class_idx, cap, width=self.gamma)
        ms = early_exit_step_ms(self.cost, batch, drafts, self.exit_layer, self.num_layers, adapter=True)
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=drafts, accepted=accepted)

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """The window's steps, equal to :meth:`step` one step at a time.

        Draws: every running member draws ``u`` uniforms per step whatever it drafts
        (:attr:`draws_per_step`: γ for the accepted prefix and, when the acceptance model
        ``stops_early``, γ more for the confidence stop, as :meth:`KangarooAcceptance.sample_drafts`
        at width γ), so step s of member i reads draws ``c_i + s·u + j`` (prefix) and ``c_i + s·u +
        γ + j`` (stop); a step whose batch cap (the largest ``min(k, remaining − 1, γ)`` of its
        members) is 0 samples nothing and commits one token per member. The sampling and each
        step's shape (per member and drafting round) run step by step in one pass
        (:func:`simspec.simulator.kernels.kangaroo_window`); the cost of all steps is evaluated
        at the end as (steps, rounds) arrays and summed round by round in :func:`draft_rounds_ms`'s
        order, so each step's duration (ms) is bit-identical to :meth:`step`'s."""
        n, steps = w.idx.shape[0], w.n_steps
        acc: KangarooAcceptance = self.acceptance  # type: ignore[assignment]
        cap_full = np.minimum(w.k, self.gamma)  # the cap before the remaining − 1 limit
        kk = int(cap_full.max()) if n else 0
        early = bool(acc.stops_early)
        wd = self.gamma  # uniforms per step for the prefix (and as many for the stop): a fixed width
        per = wd * (2 if early else 1)  # uniforms each running member draws per step (draws_per_step)
        if kk:
            probs = acc.position_probs(w.alpha, w.class_idx, wd)
            if probs.shape[1] < wd:  # γ beyond the acceptance positions: step by step (numpy's error)
                return super().decode_window(w)
        else:
            probs = np.zeros((n, wd))
        # sampling and each step's shape in one pass (simulator/kernels.py)
        (s_n, act, drafts, accepted, k_s, committed, fed, draws, ctx_s, cnt_ge, ctx_ge,
         dmax) = kernels.kangaroo_window(probs, np.arange(n), acc.conf_acc, acc.conf_rej, w.class_idx, early,
                                         w.rng_base, w.draws, w.k, cap_full, w.remaining, w.ctx_tokens, steps,
                                         bool(w.through), wd, per)
        all_act = bool(act.all())
        ms = self._window_ms(drafts, ctx_s, act, all_act, cnt_ge, ctx_ge, dmax)
        return WindowOutcome(step_ms=self.cost.finish(ms), k=k_s, drafted=drafts, accepted=accepted,
                             position_accepts=accepted, committed=committed, fed_tokens=fed, draws=draws,
                             active=None if all_act else act)

    def _window_ms(self, drafts: np.ndarray, ctx: np.ndarray, act: np.ndarray, all_act: bool, cnt_ge: np.ndarray,
                   ctx_ge: np.ndarray, dmax: np.ndarray) -> np.ndarray:
        """Compute time (ms, no overhead) of each step of a decode-only window: ``drafts``/``ctx``
        (steps, members), zero where a member is not running (``act``); ``cnt_ge``/``ctx_ge``
        (steps, rounds): the running members with drafts ≥ j and their context (tokens);
        ``dmax``: each step's largest drafts. The arithmetic of :func:`early_exit_step_ms` per
        step, with every drafting round j of every step in one (steps, rounds) evaluation per
        stage; a round a step does not run costs exactly 0."""
        c = self.cost
        s_n, n = drafts.shape
        if s_n == 0:
            return np.zeros(0)
        nj = int(dmax.max()) + 1
        # per (step, round): b, kv (drafts >= j), bh, kvh (drafts > j; none in a step's last
        # round); per step the batch, the verified tokens and the context (simulator/kernels.py)
        b, kv, bh, kvh, nb, deep, ctx_sum = kernels.kangaroo_window_rounds(act, drafts, ctx, cnt_ge, ctx_ge, dmax)
        ex = self.exit_layer
        shallow, adapter, head, verify = slices_ms(c, [
            (0, ex, b, b, kv, True, False, False, None),  # slice_ms(0, ℓ, ..., embed=True)
            (0, 0, bh, bh, kvh, False, True, False, None),  # stage_ms("adapter", ...)
            (0, 0, bh, bh, kvh, False, False, True, None),  # stage_ms("lm_head", ...): an early-exit head
            (ex, self.num_layers, nb, deep, ctx_sum, False, False, True, deep)])
        ms = np.zeros(s_n)
        for j in range(nj):
            ms = ms + shallow[:, j]
            ms = ms + adapter[:, j]
            ms = ms + head[:, j]
        return ms + verify

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
