"""A real, lossless tree speculative runner on a Llama-style model (torch): top-k candidates from an
early-exit drafter (layers 0..ℓ−1 + the bundled exit adapter + the LM head, as ``kangaroo`` drafts),
the tree chosen as SGLang's EAGLE worker chooses it, one target pass over the context and every tree
token with a tree attention mask, greedy verification along the tree.

A step (``depth`` D, ``topk`` K, ``tokens`` N verified per request incl. the root):

1. drafting: depth 1 takes the drafter's top-K tokens after the committed sequence (score = their
   probability); each further depth expands the top-K nodes of the previous depth (the frontier) by
   their own top-K (score = parent score × probability); the best N − 1 nodes of the pool by score
   (ties: shallower first, then creation order — so every node's parent is in) are the tree;
2. verification: the target runs once over the committed sequence plus the tree's tokens; a tree
   token at depth d sits at position L − 1 + d and attends to the context and its own ancestors only;
3. greedy walk: starting at the last committed token, the target's argmax there is accepted if a
   child of the current node carries it, and the walk moves to that child; the first argmax no child
   carries is the correction/bonus token. Committed = accepted path + that token.

Every committed token is the target's argmax given the committed prefix, so the output equals plain
greedy decoding (up to floating-point ties: the tree pass sums in another order; in fp32 the tests
see none). No KV cache: every pass recomputes the sequence (simple and obviously lossless; this
runner measures acceptance, not speed); the drafter runs one shallow pass per depth over the
sequence and the candidate pool so far with the tree mask, and the LM heads run only where logits
are read. Logs: ``drafts`` = ``offered`` = tree nodes, ``accepted`` =
accepted path length, ``inner``: the tree's node count and depth.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from simspec.calibrate.adapter import ExitAdapter
from simspec.calibrate.early_exit import LayeredLM
from simspec.calibrate.runners import StepLog, _Base, _top1
from simspec.errors import SimspecError


def _run(lm: LayeredLM, h: torch.Tensor, start: int, end: int, mask: torch.Tensor | None,
         pos: torch.Tensor) -> torch.Tensor:
    """Layers ``start..end-1`` over ``h`` ``[1, T, hidden]`` with an explicit additive mask and
    positions, no KV cache."""
    pe = lm.base.rotary_emb(h, pos)
    for i in range(start, end):
        out = lm.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe, use_cache=False)
        h = out[0] if isinstance(out, tuple) else out
    return h


def causal(n: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    m = torch.zeros(n, n, dtype=dtype, device=device)
    m.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), torch.finfo(dtype).min)
    return m[None, None]


def tree_mask(ctx_len: int, parents: list[int], dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Additive mask over ``ctx_len`` context tokens (causal) then one token per tree node (``parents``:
    index of each node's parent among the nodes, −1 for depth 1; parents come first): a node sees the
    context, its ancestors and itself."""
    n = len(parents)
    size = ctx_len + n
    allowed = torch.zeros(size, size, dtype=torch.bool, device=device)
    allowed[:ctx_len, :ctx_len] = torch.ones(ctx_len, ctx_len, dtype=torch.bool, device=device).tril()
    allowed[ctx_len:, :ctx_len] = True
    for i, p in enumerate(parents):
        allowed[ctx_len + i, ctx_len + i] = True
        if p >= 0:
            allowed[ctx_len + i] |= allowed[ctx_len + p] & (torch.arange(size, device=device) >= ctx_len)
    m = torch.zeros(size, size, dtype=dtype, device=device)
    m.masked_fill_(~allowed, torch.finfo(dtype).min)
    return m[None, None]


class TreeRunner(_Base):
    """Tree speculation with an early-exit drafter (module doc)."""

    method = "tree"

    def __init__(self, target: LayeredLM, exit_layer: int, adapter: ExitAdapter | None, depth: int, topk: int,
                 tokens: int, eos_token_id: int | None = None) -> None:
        super().__init__(target, eos_token_id)
        if not 0 < exit_layer < target.num_layers:
            raise SimspecError(f"exit layer {exit_layer}: must be between 1 and {target.num_layers - 1}")
        most = topk + (depth - 1) * topk * topk
        if depth < 1 or topk < 1 or not 2 <= tokens <= most + 1:
            raise SimspecError(f"tree depth {depth}, topk {topk}, tokens {tokens}: need depth, topk >= 1 and "
                               f"2 <= tokens <= {most + 1}")
        self.exit_layer, self.adapter = exit_layer, adapter
        self.depth, self.topk, self.n_nodes = depth, topk, tokens - 1

    def _reset(self) -> None:
        pass

    def _target_logits(self, ids: list[int], mask: torch.Tensor | None, pos: torch.Tensor,
                       first_row: int = 0) -> torch.Tensor:
        """Target logits for rows ``first_row..`` of ``ids`` (the LM head only where needed)."""
        h = _run(self.lm, self.lm.embed(ids), 0, self.lm.num_layers, mask, pos)
        return self.lm.head(h[:, first_row:])[0]

    def _prefill(self, prompt: list[int]) -> int:
        pos = torch.arange(len(prompt), device=self.lm.device)[None]
        mask = causal(len(prompt), self.lm.dtype, self.lm.device)
        return _top1(self._target_logits(prompt, mask, pos, len(prompt) - 1)[-1])[0]

    def _draft_probs(self, seq: list[int], toks: list[int], parents: list[int], depths: list[int],
                     rows: list[int]) -> torch.Tensor:
        """The drafter's next-token distributions after the committed ``seq`` (row −1) and after
        each node ``rows`` of the partial tree (``toks``, ``parents``, ``depths``): one shallow pass
        over the sequence and the tree with the tree mask (a node sees the context and its
        ancestors), then the adapter (same mask) and the LM head at those rows."""
        lm = self.lm
        L = len(seq)
        mask = tree_mask(L, parents, lm.dtype, lm.device)
        pos = torch.tensor([list(range(L)) + [L - 1 + d for d in depths]], device=lm.device)
        h = _run(lm, lm.embed(seq + toks), 0, self.exit_layer, mask, pos)
        at = torch.tensor([L - 1 if r < 0 else L + r for r in rows], device=lm.device)
        if self.adapter is not None:
            ad = self.adapter
            x = ad.in_norm(h)
            out = ad.attn(hidden_states=x, position_embeddings=lm.base.rotary_emb(x, pos), attention_mask=mask)
            a = out[0] if isinstance(out, tuple) else out
            logits = lm.head(ad.out_norm(h + a)[:, at], normed=True)
        else:
            logits = lm.head(h[:, at])
        return torch.softmax(logits[0].float(), dim=-1)

    def _build_tree(self, seq: list[int]) -> tuple[list[int], list[int], list[int], list[float]]:
        """(tokens, parents, depths, scores) of the verified tree, parents before children."""
        k = self.topk
        # candidate pool: (score, depth, creation index, token, parent creation index); creation
        # order puts parents first, so the pool itself is a valid tree for the drafter's pass
        pool: list[tuple[float, int, int, int, int]] = []
        frontier = [(1.0, -1)]
        for d in range(1, self.depth + 1):
            layer: list[tuple[float, int, int, int, int]] = []
            probs = self._draft_probs(seq, [c[3] for c in pool], [c[4] for c in pool], [c[1] for c in pool],
                                      [node for _, node in frontier])
            for (score, node), pr in zip(frontier, probs):
                p, tok = torch.topk(pr, k)
                for pi, ti in zip(p.tolist(), tok.tolist()):
                    idx = len(pool) + len(layer)
                    layer.append((score * pi, d, idx, int(ti), node))
            pool.extend(layer)
            layer.sort(key=lambda c: (-c[0], c[2]))
            frontier = [(c[0], c[2]) for c in layer[:k]]
        chosen = sorted(pool, key=lambda c: (-c[0], c[1], c[2]))[:self.n_nodes]
        chosen.sort(key=lambda c: (c[1], c[2]))  # parents first
        where = {c[2]: i for i, c in enumerate(chosen)}
        parents = [where[c[4]] if c[4] >= 0 else -1 for c in chosen]
        if any(c[4] >= 0 and c[4] not in where for c in chosen):
            raise SimspecError("tree selection lost a parent (ancestor closure)")
        return [c[3] for c in chosen], parents, [c[1] for c in chosen], [c[0] for c in chosen]

    def _step(self, seq: list[int]) -> tuple[list[int], StepLog]:
        tm = self._timer()
        t = time.perf_counter()
        toks, parents, depths, _ = self._build_tree(seq)
        t = tm.add("draft_ms", t)
        L = len(seq)
        pos = torch.tensor([list(range(L)) + [L - 1 + d for d in depths]], device=self.lm.device)
        logits = self._target_logits(seq + toks, tree_mask(L, parents, self.lm.dtype, self.lm.device), pos, L - 1)
        tm.add("target_ms", t)
        children: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            children.setdefault(p, []).append(i)
        node, row, out = -1, 0, []  # logits rows: 0 the last committed token, 1 + i node i
        while True:
            want = int(torch.argmax(logits[row]))
            kids = children.get(node, [])
            hit = next((i for i in kids if toks[i] == want), None)
            if hit is None:
                out.append(want)
                break
            out.append(toks[hit])
            node, row = hit, 1 + hit
        accepted = len(out) - 1
        return out, StepLog(drafts=len(toks), offered=len(toks), accepted=accepted, committed=len(out),
                            rejected_by=None if accepted == self.depth else "target",
                            inner=[{"tree_nodes": len(toks), "tree_depth": max(depths)}],
                            stages_ms=tm.ms)
