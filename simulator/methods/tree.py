"""Tree speculation: the method family of EAGLE/EAGLE-3, Medusa, MTP and draft-model trees, and
``tree`` itself (a separate draft model drafting a tree: SGLang's ``STANDALONE`` with top-k).

A step of one decode request verifies a draft tree of ``k`` nodes (the engine's k: the
speculation-length policy's cap, at most ``tokens − 1``). Vocabulary (vLLM / SGLang):

- ``depth`` D — drafting steps (SGLang ``speculative_num_steps``, vLLM ``num_speculative_tokens``);
- ``topk`` K — branching per node (SGLang ``speculative_eagle_topk``); 1 is a chain;
- ``tokens`` N — tokens verified per request, the root (the previous step's bonus token) included
  (SGLang ``speculative_num_draft_tokens``); the tree has N − 1 draft nodes (default D + 1 for a
  chain, else 1 + D·K: simspec's choice).

**Cost** (cost never depends on acceptance): the target verifies k + 1 tokens per request in one
pass with tree attention — :meth:`CostModel.target_ms` over the fed tokens, as a chain of k + 1
(the tree mask only restricts which of the step's tokens attend to each other; the KV read and the
GEMMs are those of k + 1 tokens). Drafting runs the drafter ``depth_i`` times, ``depth_i`` the depth
of request i's tree: pass 0 over one token per request (the root), pass j ≥ 1 over the K frontier
tokens, each attending to its context plus its j ancestors (SGLang's ``draft_forward``: the first
top-k come from the draft-extend pass, then D − 1 forwards of K tokens per request). Pass j runs the
requests whose tree reaches depth j + 1; the batch waits for its deepest tree. Subclasses price a
pass (:meth:`drafter_pass_ms`) and may replace the whole drafting cost (Medusa: one pass of all
heads; n-gram: none). As for ``draft``, the drafter's catch-up on the tokens accepted in the last
step is not charged separately (it rides on pass 0).

**Progress**: :class:`simspec.simulator.acceptance_tree.TreeAcceptance` (rank model, SGLang's tree
selection). ``drafted`` = k (nodes verified), ``accepted`` = accepted path length, committed =
accepted + 1; ``position_accepts`` = the depths within the tree whose draw is the drafter's top-1 —
the chain's per-position count. With ``topk=1`` the method is the chain: ``tree:depth=D,topk=1`` is
``draft:k=D`` step for step (tested).

Draws: ``depth`` uniforms per decode member per step (one per depth), whatever k is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from simspec.errors import ConfigError
from simspec.rng import counter_uniforms
from simspec.simulator.acceptance_tree import TreeAcceptance, max_nodes
from simspec.simulator.methods.base import (BatchStep, DecodeWindow, Method, StepOutcome, WindowOutcome,
                                            draw_random, register_method)
from simspec.simulator.methods.draft import draft_model_pass_ms, draft_model_setup
from simspec.simulator.methods.kangaroo import class_entry_names, int_param

MAX_DEPTH = 16  # tree depth limit (path codes of the tie-break fit int64 up to 11^16)
MAX_TOPK = 10
MAX_NODES = 1024  # draft nodes per tree (SGLang's trees verify tens of tokens; bounds the shape tables)


class TreeSpec(Method):
    """Base of the tree family. Subclasses set ``param_defaults`` (with the keys below) and price
    the drafter; ``frontier`` says whether only the top-k nodes of a depth are expanded (EAGLE,
    SGLang) or any node (Medusa's static trees)."""

    param_defaults: ClassVar[dict[str, Any]] = {"depth": 4, "topk": 1, "tokens": -1, "rank_hazard": -1.0,
                                                "acceptance": ""}
    frontier: ClassVar[bool] = True
    #: extra uniforms drawn per step after the depth draws (n-gram: its hit draw)
    extra_draws: ClassVar[int] = 0

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        p = self.params
        name = self.name
        self.depth = int_param(name, "depth", p["depth"], 1, MAX_DEPTH)
        self.topk = int_param(name, "topk", p.get("topk", 1), 1, MAX_TOPK)
        most = min(max_nodes(self.depth, self.topk, self.frontier), MAX_NODES)
        tokens = p.get("tokens", -1)
        if tokens == -1:
            tokens = self.depth + 1 if self.topk == 1 else min(1 + self.depth * self.topk, most + 1)
        self.tokens = int_param(name, "tokens", tokens, 2, most + 1,
                                f" (a depth-{self.depth}, top-{self.topk} tree has at most {most} draft nodes + the root)")
        self.n_nodes = self.tokens - 1
        hz = p.get("rank_hazard", -1.0)
        if hz != -1.0 and (isinstance(hz, bool) or not isinstance(hz, (int, float)) or not 0.0 <= float(hz) <= 1.0):
            raise ConfigError(f"--spec {name}: rank_hazard must be a number in [0, 1] (-1: the profile's), got {hz!r}")
        self.rank_hazard = None if hz == -1.0 else float(hz)
        section = p.get("acceptance", "")
        if not isinstance(section, str):
            raise ConfigError(f"--spec {name}: acceptance must name a profile acceptance section, got {section!r}")
        #: the profile's acceptance section this method reads (default: its own name)
        self.acceptance_section = section or name
        self._expect_cache: dict[tuple[float, int], float] = {}

    # --- configuration ---------------------------------------------------------------------
    @property
    def k_max(self) -> int:
        return self.n_nodes

    @property
    def draws_per_step(self) -> int:  # type: ignore[override]
        return self.depth + self.extra_draws

    def build_acceptance(self, entries):
        names = class_entry_names(self.profile, self.acceptance_section, entries)
        return TreeAcceptance(entries, self.depth, self.topk, self.n_nodes, self.frontier, names, self.rank_hazard)

    # --- drafter (subclasses) ----------------------------------------------------------------
    def drafter_pass_ms(self, batch_size, batched_tokens, kv_tokens):
        """One drafter forward over ``batch_size`` requests feeding ``batched_tokens`` tokens with
        ``kv_tokens`` cached context in total (ms, its per-forward overhead included); scalars or
        arrays (elementwise)."""
        raise NotImplementedError

    def prefill_draft_ms(self, n_prefill: int, prompt_tokens: float) -> float:
        """Drafter cost of the step's prefill members (their prompts), ms."""
        return float(self.drafter_pass_ms(n_prefill, prompt_tokens, 0.0)) if n_prefill else 0.0

    def add_draft_ms(self, ms, depth: np.ndarray, ctx: np.ndarray):
        """``ms`` (S,) plus the drafting cost of S steps, pass by pass; ``depth`` and ``ctx`` (S, n):
        each member's tree depth (0: not drafting) and cached context at the step's start."""
        dmax = int(depth.max()) if depth.size else 0
        if dmax == 0:
            return ms
        jj = np.arange(dmax)
        sel = depth[:, :, None] > jj[None, None, :]
        bj = sel.sum(axis=1).astype(np.float64)
        kv = (ctx[:, :, None] * sel).sum(axis=1).astype(np.float64) + jj[None, :] * bj
        tok = bj * np.where(jj == 0, 1.0, float(self.topk))[None, :]
        passes = self.drafter_pass_ms(bj, tok, kv)
        for j in range(dmax):
            ms = ms + passes[:, j]
        return ms

    def proposals(self, u_extra: np.ndarray | None, k: np.ndarray, class_idx: np.ndarray) -> np.ndarray:
        """Draft nodes each member actually proposes given its cap ``k`` (n-gram: 0 on a miss)."""
        return k

    # --- per step ----------------------------------------------------------------------------
    def _sample(self, u: np.ndarray, k: np.ndarray, alpha: np.ndarray, class_idx: np.ndarray):
        """(drafted, accepted, position accepts, tree depth) from one step's uniforms ``u``
        (…, draws_per_step); leading shapes of the other arrays match."""
        acc: TreeAcceptance = self.acceptance  # type: ignore[assignment]
        extra = u[..., self.depth:] if self.extra_draws else None
        drafted = self.proposals(extra, k, class_idx)
        accepted, positions = acc.walk(u[..., :self.depth], alpha, class_idx, drafted)
        depth = np.where(drafted > 0, acc.tree_depth(alpha, class_idx, drafted), 0)
        return drafted, accepted, positions, depth

    def step(self, rng: np.random.Generator, batch: BatchStep) -> StepOutcome:
        k = batch.k
        n = batch.idx.shape[0]
        pre = batch.prefill
        if k.size and int(k.max()) > 0:
            u = draw_random(rng, (n, self.draws_per_step))
            drafted, accepted, positions, depth = self._sample(u, k, batch.alpha, batch.class_idx)
        else:
            drafted = np.zeros(n, dtype=np.int64)
            accepted, positions, depth = drafted.copy(), drafted.copy(), drafted.copy()
        fed = np.where(pre, batch.fed_tokens, drafted + 1)
        speculating = bool(drafted.size and int(drafted.max()) > 0)
        logits = float(fed.sum()) - float(batch.fed_tokens[pre].sum()) + float(np.count_nonzero(pre))
        ms = self.cost.target_ms(n, float(fed.sum()), float(batch.ctx_tokens.sum()), speculating,
                                 logits_tokens=logits if pre.any() else float(fed.sum()))
        if pre.any():
            ms += self.prefill_draft_ms(int(np.count_nonzero(pre)), float(batch.fed_tokens[pre].sum()))
        if speculating:
            ms = float(self.add_draft_ms(np.array([ms]), depth[None, :], batch.ctx_tokens[None, :])[0])
        return StepOutcome(step_ms=self.cost.finish(ms), drafted=drafted.astype(np.int64),
                           accepted=accepted.astype(np.int64), position_accepts=positions.astype(np.int64))

    def decode_window(self, w: DecodeWindow) -> WindowOutcome:
        """Steps one at a time for acceptance (a step's cap, min(k, remaining − 1), decides its
        tree, so it depends on the steps before), vectorised over members; costs for all steps at
        once. Step s of member i uses draws ``draws_i + s·draws_per_step + j``."""
        n = w.idx.shape[0]
        dps = self.draws_per_step
        rem = w.remaining.copy()
        ctx = w.ctx_tokens.copy()
        act = np.ones(n, dtype=bool)
        cols: dict[str, list[np.ndarray]] = {key: [] for key in ("k", "d", "a", "p", "c", "f", "x", "dep", "act")}
        cols_j = np.arange(dps, dtype=np.uint64)
        for s in range(w.n_steps):
            k_s = np.where(act, np.minimum(w.k, rem - 1), 0)
            u = counter_uniforms(w.rng_base[:, None], w.draws[:, None] + np.uint64(s * dps) + cols_j[None, :])
            drafted, accepted, positions, depth = self._sample(u, k_s, w.alpha, w.class_idx)
            committed = np.where(act, np.minimum(accepted + 1, rem), 0)
            for key, v in (("k", k_s), ("d", drafted), ("a", accepted), ("p", positions), ("c", committed),
                           ("f", np.where(act, k_s + 1, 0)), ("x", np.where(act, ctx, 0)), ("dep", depth),
                           ("act", act.copy())):
                cols[key].append(v)
            rem = rem - committed
            ctx = ctx + committed
            nxt = act & (rem > 0)
            if not bool(nxt.any()) or (not w.through and not bool(nxt.all())):
                break
            act = nxt
        k_eff, drafted, accepted, positions, committed, fed, ctx_s, depth = (
            np.asarray(cols[key], dtype=np.int64) for key in ("k", "d", "a", "p", "c", "f", "x", "dep"))
        active = np.asarray(cols["act"], dtype=bool)
        all_act = bool(active.all())
        s_eff = k_eff.shape[0]
        verify = np.where(active, drafted + 1, 0)
        verify_sum = verify.sum(axis=1).astype(np.float64)
        b = active.sum(axis=1).astype(np.float64)
        ms = self.cost.target_ms(b, verify_sum, ctx_s.sum(axis=1).astype(np.float64), drafted.max(axis=1) > 0,
                                 logits_tokens=verify_sum)
        ms = self.add_draft_ms(ms, depth, ctx_s)
        draws = np.where(active, np.uint64(dps), np.uint64(0)).astype(np.uint64)
        return WindowOutcome(step_ms=self.cost.finish(ms), k=k_eff, drafted=drafted, accepted=accepted,
                             position_accepts=positions, committed=committed, fed_tokens=fed, draws=draws,
                             active=None if all_act else active)

    # --- estimates used by policies (SmartSpec, LAPS-SD) ----------------------------------------
    #: whether the drafting cost is one drafter pass per depth (SmartSpec's chain estimate applies)
    passes_per_depth: ClassVar[bool] = True

    @property
    def iid_tokens(self) -> bool:
        """A chain (top-1, every proposal made): SmartSpec's i.i.d. token formula, as for ``draft``."""
        return self.topk == 1 and self.extra_draws == 0

    @property
    def maps_positions(self) -> bool:
        """Whether a step's verified nodes differ from its positions (a tree)."""
        return self.topk > 1

    def verified_positions(self, drafted: np.ndarray, alpha: np.ndarray, class_idx: np.ndarray) -> np.ndarray:
        """Depth of the tree of ``drafted`` nodes (arrays broadcast): the positions at which
        ``position_accepts`` counted a top-1 accept."""
        acc = self.acceptance
        if not isinstance(acc, TreeAcceptance) or self.topk == 1:
            return drafted
        return np.where(drafted > 0, acc.tree_depth(alpha, class_idx, drafted), 0)

    def _class_mean_depth(self, k: int) -> np.ndarray:
        acc = self.acceptance
        if isinstance(acc, TreeAcceptance):
            n = acc.mean_alpha.shape[0]
            return acc.tree_depth(acc.mean_alpha, np.arange(n), np.full(n, k))
        return np.array([min(k, self.depth)])

    def draft_total_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        """Drafting time (ms) of a decode step of ``batch_size`` requests with ``kv_tokens`` context
        in total, every request's tree of ``k`` nodes as deep as the classes' mean-level tree."""
        if k <= 0 or batch_size <= 0:
            return 0.0
        dep = int(np.round(self._class_mean_depth(k).mean())) or 1
        per = kv_tokens / batch_size
        depth = np.full((1, batch_size), dep)
        ctx = np.full((1, batch_size), per)
        return float(self.add_draft_ms(np.zeros(1), depth, ctx)[0])

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        """(drafting time per draft node, verification over k + 1 tokens per request). A chain
        drafted pass by pass: one drafter pass over one token per request at ``kv_tokens`` (the
        estimate ``draft`` makes)."""
        verify = self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0)
        if self.topk == 1 and self.passes_per_depth:
            return float(self.drafter_pass_ms(batch_size, batch_size, kv_tokens)), verify
        return (self.draft_total_ms(batch_size, kv_tokens, k) / k if k > 0 else 0.0), verify

    def expected_step_ms(self, batch_size: int, kv_tokens: float, k: int) -> float:
        draft, verify = self.stage_estimates_ms(batch_size, kv_tokens, k)
        return self.cost.finish(k * draft + verify)

    def expected_tokens(self, alpha: float, k: int) -> float:
        """1 + E[accepted] of a k-node tree at level ``alpha``, averaged over the classes (exact
        under the rank model: the sum of the tree's node path probabilities)."""
        key = (round(float(alpha), 4), int(k))
        hit = self._expect_cache.get(key)
        if hit is None:
            acc = self.acceptance
            if not isinstance(acc, TreeAcceptance) or k <= 0:
                from simspec.simulator.acceptance import expected_tokens_iid

                hit = expected_tokens_iid(float(alpha), min(int(k), self.depth)) if k > 0 else 1.0
            else:
                e = [acc.expected_accepted(float(alpha), c, int(k)) * float(acc.hit[c])
                     for c in range(len(acc.classes))]
                hit = 1.0 + float(np.mean(e))
            self._expect_cache[key] = hit
        return hit


@register_method("tree")
class TreeDraftModel(TreeSpec):
    """A separate draft model drafts a tree (SGLang ``STANDALONE`` with ``speculative_eagle_topk``).
    Parameters: ``depth``, ``topk``, ``tokens`` (see the module doc), ``rank_hazard`` (override
    the profile's), ``acceptance`` (profile section, default ``tree``), ``draft_layers`` (as
    ``draft``). Pass cost: the profile's ``draft_step``, as ``draft``."""

    param_defaults = {**TreeSpec.param_defaults, "draft_layers": 0}

    def __init__(self, params, profile, cost):
        super().__init__(params, profile, cost)
        self.draft_layers, self.per_step = draft_model_setup(self.name, self.params["draft_layers"], profile, cost)

    def stages_used(self) -> set[str]:
        used = super().stages_used()
        return used | ({"draft_step"} if self.cost.has("draft_step") else {"layer", "lm_head", "embed"})

    def drafter_pass_ms(self, batch_size, batched_tokens, kv_tokens):
        return draft_model_pass_ms(self.cost, self.draft_layers, batch_size, batched_tokens, kv_tokens)

    def prefill_draft_ms(self, n_prefill: int, prompt_tokens: float) -> float:
        if not n_prefill:
            return 0.0
        return draft_model_pass_ms(self.cost, self.draft_layers, n_prefill, prompt_tokens, 0.0,
                                   logits_tokens=n_prefill)

    def stage_estimates_ms(self, batch_size: int, kv_tokens: float, k: int) -> tuple[float, float]:
        if not self.per_step:
            return super().stage_estimates_ms(batch_size, kv_tokens, k)
        draft = self.drafter_pass_ms(batch_size, batch_size, kv_tokens)  # one figure per step, as draft
        verify = self.cost.target_ms(batch_size, batch_size * (k + 1), kv_tokens, speculating=k > 0)
        return (draft / k if k > 0 else 0.0), verify

    def add_draft_ms(self, ms, depth, ctx):
        if not self.per_step:
            return super().add_draft_ms(ms, depth, ctx)
        sel = depth > 0
        if not bool(sel.any()):
            return ms
        bs = sel.sum(axis=1).astype(np.float64)
        return ms + self.drafter_pass_ms(bs, bs, (ctx * sel).sum(axis=1).astype(np.float64))
