"""Tree acceptance: which draft tree a request verifies and how deep its accepted path goes.

**Rank model.** At draft depth d (1-based) of a step, given that the path so far was accepted, the
target's next token has some rank R_d in the drafter's distribution at that node. The request's
per-position acceptance of the chain case is ``p_d = min(1, α_r · s_d)`` (the class's position
shape, exactly as :class:`simspec.simulator.acceptance.AcceptanceModel`); the tree model adds one
number per class, the *rank hazard* h::

    P(R_d = 1) = p_d,    P(R_d = r) = (1 − p_d) · h · (1 − h)^(r − 2)   for r ≥ 2

(when the drafter's top-1 misses, each following rank is the target's token with probability h, a
geometric tail; the R_d of different depths are independent given α_r). A node of the tree is a
rank path (r_1, …, r_d); the accepted path is the longest prefix of the sampled (R_1, R_2, …) whose
node is in the tree, so ``accepted`` = its length. With top-k 1 the tree is the chain of rank-1
nodes and ``accepted`` is the chain's accepted prefix: the same draws give the same result.

**Which tree.** The drafter scores nodes by their path probability ``v(node) = Π P(R_j = r_j)``
(EAGLE-2 and SGLang score by the product of draft probabilities, which EAGLE-2 shows tracks
acceptance). The verified tree is built as SGLang's EAGLE worker builds it
(``eagle_worker.draft_forward`` + ``organize_draft_results``): depth 1 offers the top-k tokens;
each later depth expands the top-k nodes of the previous depth (the *frontier*) by their top-k
children; all candidates are pooled and the best ``budget`` by score are verified. Medusa's static
sparse trees are chosen the same way without a frontier (every node of depth < D may be
expanded; ``frontier=None``). Ties are broken by depth, then by the rank path (lexicographic), so
the tree is deterministic and ancestor-closed (a child never outscores its parent). Because the
sampled rank path is accepted through a node with probability exactly v(node),
``E[accepted] = Σ_{nodes in tree} v(node)`` — top-by-score is the tree that maximises it.

The score uses the request's level quantised to a grid of 0.01 (the tree *shape* for α = 0.734 is
the one for 0.73; acceptance itself uses the exact α), so shapes are precomputed per class and
level; the verified tree for a budget of k nodes is the first k nodes of that level's order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from simspec.errors import ProfileError
from simspec.simulator.acceptance import AcceptanceModel

LEVELS = 101  # α grid for tree shapes: 0.00, 0.01, …, 1.00
NO_NODE = np.iinfo(np.int32).max


def rank_probs(p: float, h: float, topk: int) -> np.ndarray:
    """P(R = r) for r = 1..topk (see the module doc)."""
    r = np.arange(2, topk + 1)
    tail = (1.0 - p) * h * (1.0 - h) ** (r - 2)
    return np.concatenate(([p], tail))


def rank_thresholds(p: np.ndarray, h: np.ndarray, topk: int) -> np.ndarray:
    """Cumulative ``P(R ≤ r)`` for r = 1..topk, shape ``p.shape + (topk,)``; column 0 is ``p``
    exactly, so ``u < p`` ⇔ rank 1 (the chain's test)."""
    out = np.empty(p.shape + (topk,))
    out[..., 0] = p
    if topk > 1:
        miss = 1.0 - p
        keep = (1.0 - h)[..., None] ** np.arange(1, topk)
        out[..., 1:] = p[..., None] + miss[..., None] * (1.0 - keep)
    return out


@dataclass
class TreeOrder:
    """The candidate nodes of one class and level, best first. ``parent``: index in this order (−1:
    the root); ``rank`` 1-based; ``depth`` 1-based; ``value`` the node's score (path probability)."""

    parent: np.ndarray
    rank: np.ndarray
    depth: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.parent.shape[0])


def build_order(p_depth: np.ndarray, h: float, topk: int, n_nodes: int, frontier: bool) -> TreeOrder:
    """The best ``n_nodes`` nodes of a tree of depth ``len(p_depth)`` and branching ``topk`` at
    per-depth top-1 acceptance ``p_depth`` and rank hazard ``h``, in score order (module doc).
    ``frontier``: expand only the top-k nodes of each depth (EAGLE/SGLang); else best-first over
    every node (Medusa's static trees)."""
    depth_n = int(p_depth.shape[0])
    probs = [rank_probs(float(p), h, topk) for p in p_depth]
    if frontier:
        # level by level: candidates (value, depth, path code, parent candidate, rank)
        vals, deps, codes, pars, ranks = [], [], [], [], []
        base = topk + 1
        front_val = np.array([1.0])
        front_code = np.array([0], dtype=np.int64)
        front_id = np.array([-1], dtype=np.int64)
        n_cand = 0
        for d in range(depth_n):
            v = (front_val[:, None] * probs[d][None, :]).ravel()
            c = (front_code[:, None] * base + np.arange(1, topk + 1)[None, :]).ravel()
            par = np.repeat(front_id, topk)
            rk = np.tile(np.arange(1, topk + 1), front_val.shape[0])
            ids = np.arange(n_cand, n_cand + v.shape[0])
            n_cand += v.shape[0]
            vals.append(v), deps.append(np.full(v.shape[0], d + 1)), codes.append(c), pars.append(par), ranks.append(rk)
            o = np.lexsort((c, -v))[:topk]
            front_val, front_code, front_id = v[o], c[o], ids[o]
        v, dep, c = np.concatenate(vals), np.concatenate(deps), np.concatenate(codes)
        par, rk = np.concatenate(pars), np.concatenate(ranks)
        order = np.lexsort((c, dep, -v))[:n_nodes]
        pos = np.full(v.shape[0], -1, dtype=np.int64)
        pos[order] = np.arange(order.shape[0])
        parent = np.where(par[order] >= 0, pos[np.maximum(par[order], 0)], -1)
        return TreeOrder(parent=parent, rank=rk[order], depth=dep[order], value=v[order])
    # best-first: a child never outscores its parent, so pops come in global score order
    heap: list[tuple[float, int, tuple[int, ...], int]] = [(-float(probs[0][r]), 1, (r + 1,), -1)
                                                           for r in range(topk)]
    heapq.heapify(heap)
    parent, rank, depth, value = [], [], [], []
    while heap and len(parent) < n_nodes:
        negv, d, path, par = heapq.heappop(heap)
        i = len(parent)
        parent.append(par), rank.append(path[-1]), depth.append(d), value.append(-negv)
        if d < depth_n:
            for r in range(topk):
                heapq.heappush(heap, (negv * float(probs[d][r]), d + 1, path + (r + 1,), i))
    return TreeOrder(parent=np.array(parent, dtype=np.int64), rank=np.array(rank, dtype=np.int64),
                     depth=np.array(depth, dtype=np.int64), value=np.array(value))


def max_nodes(depth: int, topk: int, frontier: bool) -> int:
    """Candidate nodes a tree can hold: ``k + (D−1)·k²`` with a frontier (SGLang's pool), else
    ``k + k² + … + k^D``."""
    if frontier:
        return topk + (depth - 1) * topk * topk
    return sum(topk ** d for d in range(1, depth + 1))


class TreeAcceptance(AcceptanceModel):
    """Per-class tree shapes and per-step sampling of the accepted path (module doc).

    ``rank_hazard``: per-class h from the entries' ``rank_hazard`` (or the override); required
    when ``topk > 1``. ``hit_probability``: per class (n-gram lookup), 1 when absent."""

    def __init__(self, entries: list[dict[str, Any]], depth: int, topk: int, n_nodes: int, frontier: bool,
                 names: list[str], rank_hazard: float | None = None):
        super().__init__(entries)
        self.depth, self.topk, self.n_nodes, self.frontier = depth, topk, n_nodes, frontier
        hz = []
        for e, where in zip(entries, names):
            if rank_hazard is not None:
                hz.append(float(rank_hazard))
            elif topk == 1:
                hz.append(0.0)
            elif "rank_hazard" in e:
                hz.append(float(e["rank_hazard"]))
            else:
                raise ProfileError(f"{where}.rank_hazard: missing; a tree with topk > 1 needs the class's rank "
                                   f"hazard (P(the target's token is the next rank | not in the ranks above)); "
                                   f"add it to the profile or give rank_hazard=H")
        self.hazard = np.array(hz)
        self.hit = np.array([float(e.get("hit_probability", 1.0)) for e in entries])
        n_cls = len(entries)
        rows = n_nodes + 1
        # child[c, l, row, r]: order index of child rank r+1 of node row−1 (row 0: the root)
        self.child = np.full((n_cls, LEVELS, rows, topk), NO_NODE, dtype=np.int32)
        # depth_at[c, l, k]: depth of the tree of the first k nodes
        self.depth_at = np.zeros((n_cls, LEVELS, n_nodes + 1), dtype=np.int64)
        self.orders: list[list[TreeOrder]] = []
        for c in range(n_cls):
            per = []
            for lv in range(LEVELS):
                p = np.minimum(1.0, (lv / (LEVELS - 1)) * self.shape[c, :depth])
                o = build_order(p, float(self.hazard[c]), topk, n_nodes, frontier)
                per.append(o)
                m = len(o)
                self.child[c, lv, o.parent + 1, o.rank - 1] = np.arange(m, dtype=np.int32)
                dep = np.maximum.accumulate(o.depth) if m else np.zeros(0, dtype=np.int64)
                self.depth_at[c, lv, 1:m + 1] = dep
                self.depth_at[c, lv, m + 1:] = dep[-1] if m else 0
            self.orders.append(per)

    @staticmethod
    def level(alpha: np.ndarray) -> np.ndarray:
        """Shape level of each α: ``round(100·α)`` in 0..100."""
        return np.clip(np.rint(np.asarray(alpha) * (LEVELS - 1)), 0, LEVELS - 1).astype(np.int64)

    def tree_depth(self, alpha: np.ndarray, class_idx: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """Depth of each request's tree of ``budget`` nodes (0 for none); arrays broadcast."""
        return self.depth_at[class_idx, self.level(alpha), np.minimum(budget, self.n_nodes)]

    def walk(self, u: np.ndarray, alpha: np.ndarray, class_idx: np.ndarray,
             budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(accepted, position accepts) for uniforms ``u`` of shape ``S + (depth,)`` (one per depth)
        and ``alpha``, ``class_idx``, ``budget`` of shape S (tree nodes verified). Position accepts:
        the depths within the tree whose draw is rank 1 (the chain's per-position count)."""
        dn, kk = self.depth, self.topk
        p = np.minimum(1.0, alpha[..., None] * self.shape[class_idx, :dn])
        lv = self.level(alpha)
        depth_i = self.tree_depth(alpha, class_idx, budget)
        top1 = u < p
        positions = (top1 & (np.arange(dn) < depth_i[..., None])).sum(axis=-1)
        if kk == 1:  # the chain: rank 1 or nothing
            ok = top1 & (np.arange(dn) < np.minimum(budget, dn)[..., None])
            return np.cumprod(ok, axis=-1).sum(axis=-1), positions
        thr = rank_thresholds(p, self.hazard[class_idx][..., None], kk)
        rank = (u[..., None] >= thr).sum(axis=-1)  # 0-based; kk: beyond the top-k
        node = np.zeros(budget.shape, dtype=np.int64)  # row: 0 the root, i+1 order index i
        alive = np.ones(budget.shape, dtype=bool)
        accepted = np.zeros(budget.shape, dtype=np.int64)
        for d in range(dn):
            r = rank[..., d]
            inside = r < kk
            ch = self.child[class_idx, lv, node, np.minimum(r, kk - 1)].astype(np.int64)
            alive &= inside & (ch < budget)
            accepted += alive
            node = np.where(alive, ch + 1, 0)
        return accepted, positions

    def expected_accepted(self, alpha: float, class_i: int, budget: int) -> float:
        """E[accepted] = Σ over the first ``budget`` nodes of their path probability at ``alpha``."""
        if budget <= 0:
            return 0.0
        o = self.orders[class_i][int(self.level(np.array([alpha]))[0])]
        m = min(budget, len(o))
        p = np.minimum(1.0, alpha * self.shape[class_i, :self.depth])
        h = float(self.hazard[class_i])
        probs = np.stack([rank_probs(float(x), h, self.topk) for x in p])  # (depth, topk)
        v = np.empty(m)
        for i in range(m):
            par = o.parent[i]
            v[i] = (v[par] if par >= 0 else 1.0) * probs[o.depth[i] - 1, o.rank[i] - 1]
        return float(v.sum())
