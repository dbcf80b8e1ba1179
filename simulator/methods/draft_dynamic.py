"""``draft-dynamic``: a separate draft model with a dynamic draft length — drafting stops at the first
draft whose top-1 probability is below η (that draft is still verified) or after ``k`` drafts, as
Hugging Face's assisted generation does with ``assistant_confidence_threshold`` (transformers
``GenerationConfig``, default 0.4) and as Kangaroo's second early exit does.

Progress: the number of drafts D_i and the accepted prefix are sampled jointly as for ``kangaroo``
(:class:`simspec.simulator.acceptance_early_exit.KangarooAcceptance`) from the profile's ``draft``
section (or ``acceptance=SECTION``): per-position acceptance plus the ``confidence`` histograms
(Kangaroo's schema; ``simspec calibrate acceptance --method draft`` records them). A class without
histograms stops only at k (noted). Cost: as ``draft`` with per-request k = D_i: draft pass j runs
the requests with D_i > j (the batch waits for its longest drafter), then the target verifies
D_i + 1 tokens per request.

Parameters: ``k`` most drafts (default 8: simspec's choice), ``eta`` (0.4), ``draft_layers`` (as
``draft``), ``acceptance`` (default ``draft``).
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.simulator.acceptance_early_exit import KangarooAcceptance, kangaroo_expectations
from simspec.simulator.methods.base import BatchStep, Method, StepOutcome, register_method
from simspec.simulator.methods.draft import draft_model_pass_ms, draft_model_setup
from simspec.simulator.methods.kangaroo import DEFAULT_ALPHA, class_entry_names, int_param


@register_method("draft-dynamic")
class DraftDynamic(Method):
    __doc__ = __doc__
    param_defaults = {"k": 8, "eta": 0.4, "draft_layers": 0, "acceptance": "draft"}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        self._k = int_param(self.name, "k", self.params["k"], 1, 64)
        eta = self.params["eta"]
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= float(eta) <= 1.0:
            raise ConfigError(f"--spec {self.name}: eta must be a number in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.draft_layers, self.per_step = draft_model_setup(self.name, self.params["draft_layers"], profile, cost)
        if self.per_step:
            raise ConfigError(f"--spec {self.name}: profile {profile.name}'s draft_step is one figure per step "
                              f"(\"per\": \"step\"); a dynamic length needs a per-pass draft cost")
        self.acceptance_section = str(self.params["acceptance"]) or "draft"
        self.notes: list[str] = []

    @property
    def k_max(self) -> int:
        return self._k

    def stages_used(self) -> set[str]:
        return super().stages_used() | ({"draft_step"} if self.cost.has("draft_step") else {"layer", "lm_head"})

    def build_acceptance(self, entries):
        model = KangarooAcceptance(entries, self.eta, class_entry_names(self.profile, self.acceptance_section, entries))
        if 0.0 < self.eta < 1.0 and any(e.get("confidence") is None for e in entries):
            self.notes.append(f"--spec {self.name}: profile {self.profile.name}'s {self.acceptance_section} "
                              f"acceptance has no confidence histograms for some classes; their drafting stops "
                              f"only at k={self._k}")
        return model

    def _pass(self, b, tokens, kv, logits=None):
        return draft_model_pass_ms(self.cost, self.draft_layers, b, tokens, kv, logits)

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        n = batch.idx.shape[0]
        cap = np.minimum(batch.k, self._k)
        if cap.size and int(cap.max()) > 0:
            drafts, accepted = self.acceptance.sample_drafts(rng, batch.alpha, batch.class_idx, cap)
        else:
            drafts = np.zeros(n, dtype=np.int64)
            accepted = drafts.copy()
        pre = batch.prefill
        fed = np.where(pre, batch.fed_tokens, drafts + 1)
        fed_sum = float(fed.sum())
        logits = fed_sum - float(batch.fed_tokens[pre].sum()) + float(np.count_nonzero(pre))
        ms = self.cost.target_ms(n, fed_sum, float(batch.ctx_tokens.sum()), bool(drafts.max(initial=0) > 0),
                                 logits_tokens=logits)
        if pre.any():
            n_pre = int(np.count_nonzero(pre))
            ms += self._pass(n_pre, float(batch.fed_tokens[pre].sum()), 0.0, logits=n_pre)
        for j in range(int(drafts.max(initial=0))):
            sel = drafts > j
            b = int(sel.sum())
            ms += self._pass(b, b, float(batch.ctx_tokens[sel].sum()) + j * b)
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
        return (float(self._pass(batch_size, batch_size, kv_tokens)),
                self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0))

    def expected_step_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        """Drafting passes until the batch's longest drafter stops (E[max_i D_i]); verification over
        E[D] + 1 tokens per request."""
        k = min(k, self._k)
        if k <= 0:
            return self.cost.finish(self.cost.target_ms(batch_size, batch_size, kv_tokens))
        ca, cr = self._confidence()
        _, reach = kangaroo_expectations(self._alpha(), k, ca, cr)
        rounds = float((1.0 - (1.0 - reach) ** max(batch_size, 1)).sum())
        mean_d = float(reach.sum())
        draft = float(self._pass(batch_size, batch_size, kv_tokens))
        verify = self.cost.target_ms(batch_size, batch_size * (mean_d + 1), kv_tokens, speculating=True)
        return self.cost.finish(rounds * draft + verify)

    def expected_tokens(self, alpha: float, k: int) -> float:
        ca, cr = self._confidence()
        e_acc, _ = kangaroo_expectations(alpha, min(k, self._k), ca, cr)
        return 1.0 + e_acc
