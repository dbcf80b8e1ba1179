"""Batched real speculative runners: several requests per step, packed like a serving engine
(torch + transformers; reached only from ``simspec validate``).

**Packing.** One step feeds every member's new tokens as *one* sequence ``[1, ΣT, hidden]``
(vLLM-style varlen packing: linear layers cost ΣT tokens, whatever mix of prefills and decodes),
with each token's own rotary position and a block-diagonal causal mask: a query of member ``b`` at
position ``p`` sees member ``b``'s keys ``0..p`` only. :class:`PackedKV` keeps each request's keys
and values in its own preallocated buffer per slot (one slot per decoder layer, further slots for
exit adapters); an attention layer's ``update`` writes each member's new keys in place and returns
the members' caches concatenated, in member order. Cropping (rejected drafts) only shortens a
length: nothing is copied.

**Runners** (:class:`BatchedGreedy`, :class:`BatchedDraft`, :class:`BatchedKangaroo`,
:class:`BatchedHiSpec`, :class:`BatchedHiSpecSingle`): the algorithms of
:mod:`simspec.calibrate.runners` over a batch. A step takes prefill members (their
whole prompt; the pass yields their first token) and decode members with a draft cap each (the
server caps it at ``remaining − 1``), and returns per member the tokens committed, drafts made and
drafts accepted. Work per step mirrors what the simulator's methods charge
(:mod:`simspec.simulator.methods`): draft — the draft model prefills a newcomer's prompt in a pass of
its own, then ``max cap`` draft passes (pass j runs the members with cap > j), then one target pass
over every member; Kangaroo — drafting rounds at the exit (round j: shallow layers for members with
≥ j drafts, adapter + LM head for members still drafting; newcomers' prompts join round 0's shallow
layers and adapter), then layers exit..N−1 over every member; HiSpec — inner iterations in lockstep
over the members whose buffer is short (drafting rounds at the draft exit, then one intermediate
pass over each member's drafts), then layers 0..L_i−1 over the frontier tokens and the prompts and
layers L_i..N−1 over every member (see :class:`BatchedHiSpec`).

**Forced acceptance**: ``step(..., forced={rid: (drafts, accepted)})`` still runs every real draft
and verification pass, but the member drafts exactly ``drafts`` tokens (Kangaroo; the draft method
always drafts its cap; HiSpec: fills its buffer with ``drafts`` tokens, each inner iteration
appending what ``ForcedStep.inner`` says) and commits its first ``accepted`` drafts plus the target's
token after them, instead of the longest prefix the target agrees with (see
:mod:`simspec.forced_acceptance`). Without
``forced`` the runners are lossless: tokens equal plain greedy decoding's (up to floating-point ties).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from simspec.calibrate.adapter import ExitAdapter
from simspec.calibrate.early_exit import LayeredLM
from simspec.errors import ConfigError, SimspecError
from simspec.forced_acceptance import ForcedStep

BATCHED_METHODS = ("none", "draft", "kangaroo", "hispec")


# ------------------------------------------------------------------------------------ packed KV


class PackedKV:
    """Keys/values of many requests, one buffer ``[kv_heads, capacity_tokens, head_dim]`` per
    (request row, slot), allocated on first use. Duck-types ``update`` for transformers attention
    layers: the forward in progress (:meth:`begin`) says which rows feed how many tokens, in order."""

    def __init__(self, n_slots: int, capacity_tokens: int) -> None:
        self.n_slots = int(n_slots)
        self.capacity_tokens = int(capacity_tokens)
        self.k: dict[int, list[torch.Tensor | None]] = {}
        self.v: dict[int, list[torch.Tensor | None]] = {}
        self.len: dict[int, list[int]] = {}
        self._members: list[tuple[int, int]] = []

    def add_row(self, row: int) -> None:
        if row in self.len:
            raise SimspecError(f"KV row {row} already in use")
        self.k[row] = [None] * self.n_slots
        self.v[row] = [None] * self.n_slots
        self.len[row] = [0] * self.n_slots

    def drop_row(self, row: int) -> None:
        """Free a finished request's buffers."""
        for d in (self.k, self.v, self.len):
            d.pop(row, None)

    def length(self, row: int, slot: int) -> int:
        """Tokens cached for ``row`` in ``slot``."""
        return self.len[row][slot]

    def crop(self, row: int, slots: range | list[int], length: int) -> None:
        """Keep at most the first ``length`` tokens of ``row`` in each of ``slots``."""
        lens = self.len[row]
        for s in slots:
            if lens[s] > length:
                lens[s] = int(length)

    def begin(self, members: list[tuple[int, int]]) -> None:
        """The forward about to run feeds ``members`` = ``[(row, new_tokens), ...]``, packed in order."""
        self._members = members

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        slot = int(layer_idx)
        ks, vs = [], []
        s0 = 0
        for row, n in self._members:
            kb, vb = self.k[row][slot], self.v[row][slot]
            if kb is None:
                h, d = key_states.shape[1], key_states.shape[3]
                kb = key_states.new_empty((h, self.capacity_tokens, d))
                vb = value_states.new_empty((h, self.capacity_tokens, value_states.shape[3]))
                self.k[row][slot], self.v[row][slot] = kb, vb
            p = self.len[row][slot]
            if p + n > self.capacity_tokens:
                raise SimspecError(f"KV row {row}: {p + n} tokens exceed the buffer of {self.capacity_tokens}")
            kb[:, p:p + n] = key_states[0, :, s0:s0 + n]
            vb[:, p:p + n] = value_states[0, :, s0:s0 + n]
            self.len[row][slot] = p + n
            ks.append(kb[:, :p + n])
            vs.append(vb[:, :p + n])
            s0 += n
        if len(ks) == 1:
            return ks[0][None], vs[0][None]
        return torch.cat(ks, dim=1)[None], torch.cat(vs, dim=1)[None]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers-style; unused by the runners
        return max((lens[layer_idx] for lens in self.len.values()), default=0)


def packed_mask(pasts: list[int], news: list[int], dtype: torch.dtype, device: Any) -> torch.Tensor | None:
    """Additive mask ``[1, 1, ΣT, Σ(past+new)]``: query ``q`` of member ``b`` (position
    ``pasts[b] + q``) sees member ``b``'s keys ``0..pasts[b] + q`` only. None for one member feeding
    one token (it sees all its keys)."""
    if len(news) == 1 and news[0] == 1:
        return None
    q_mem = torch.repeat_interleave(torch.arange(len(news), device=device), torch.tensor(news, device=device))
    q_pos = torch.cat([torch.arange(p, p + n, device=device) for p, n in zip(pasts, news)])
    tot = [p + n for p, n in zip(pasts, news)]
    k_mem = torch.repeat_interleave(torch.arange(len(tot), device=device), torch.tensor(tot, device=device))
    k_pos = torch.cat([torch.arange(t, device=device) for t in tot])
    ok = (q_mem[:, None] == k_mem[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    mask = torch.zeros(ok.shape, dtype=dtype, device=device)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[None, None]


class PackedLM:
    """A :class:`LayeredLM` run over packed members (see the module docstring)."""

    def __init__(self, lm: LayeredLM) -> None:
        self.lm = lm

    def embed(self, seqs: list[list[int]]) -> torch.Tensor:
        """Embeddings ``[1, ΣT, hidden]`` of the members' new tokens, packed in order."""
        return self.lm.embed([t for s in seqs for t in s])

    def _prep(self, h: torch.Tensor, start: int, rows: list[int], news: list[int], kv: PackedKV):
        pasts = []
        for r in rows:
            p = kv.length(r, start)
            pasts.append(p)
        pos = torch.cat([torch.arange(p, p + n, device=h.device) for p, n in zip(pasts, news)])[None]
        pe = self.lm.base.rotary_emb(h, pos)
        mask = packed_mask(pasts, news, h.dtype, h.device)
        kv.begin(list(zip(rows, news)))
        return pos, pe, mask, pasts

    def run(self, h: torch.Tensor, start: int, end: int, kv: PackedKV, rows: list[int],
            news: list[int]) -> torch.Tensor:
        """Feed packed ``h`` through decoder layers ``start..end-1``; member ``b`` (KV row
        ``rows[b]``) feeds ``news[b]`` tokens at its next positions."""
        if end <= start:
            return h
        for r in rows:
            p = kv.length(r, start)
            for i in range(start + 1, end):
                if kv.length(r, i) != p:
                    raise RuntimeError(f"KV bookkeeping: row {r} layer {i} holds {kv.length(r, i)} tokens, "
                                       f"layer {start} holds {p}")
        pos, pe, mask, _ = self._prep(h, start, rows, news, kv)
        kw = {self.lm._layer_cache_kw: kv}
        for i in range(start, end):
            out = self.lm.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                                    use_cache=True, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def adapter(self, ad: ExitAdapter, h: torch.Tensor, kv: PackedKV, rows: list[int],
                news: list[int]) -> torch.Tensor:
        """An exit adapter over packed states (its attention appends to slot ``ad.slot``); returns
        normed states for ``lm.head(..., normed=True)``."""
        x = ad.in_norm(h)
        pos, pe, mask, _ = self._prep(x, ad.slot, rows, news, kv)
        out = ad.attn(hidden_states=x, position_embeddings=pe, attention_mask=mask,
                      **{self.lm._attn_cache_kw: kv})
        a = out[0] if isinstance(out, tuple) else out
        return ad.out_norm(h + a)


def _top1(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """Greedy tokens and their probabilities from ``[M, V]`` logits."""
    p = torch.softmax(logits.float(), dim=-1)
    conf, tok = torch.max(p, dim=-1)
    return tok.tolist(), conf.tolist()


def _prefix(proposed: list[int], verifier: list[int]) -> int:
    m = 0
    for a, b in zip(proposed, verifier):
        if a != b:
            break
        m += 1
    return m


def _segments(news: list[int]) -> list[tuple[int, int]]:
    out, s = [], 0
    for n in news:
        out.append((s, s + n))
        s += n
    return out


# ------------------------------------------------------------------------------------ runners


@dataclass
class MemberStep:
    """One member's outcome of a step: ``tokens`` committed (a prefill: its first token), ``drafts``
    made, ``accepted`` (a prefix of the drafts), each draft's top-1 probability (``confidences``)."""

    tokens: list[int]
    drafts: int = 0
    accepted: int = 0
    confidences: list[float] = field(default_factory=list)
    #: two-level HiSpec: per inner iteration (drafts made at L_d, tokens appended to the buffer)
    inner: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Seq:
    row: int
    seq: list[int]
    prompt_len: int
    hist: dict[int, torch.Tensor] = field(default_factory=dict)  # Kangaroo: exit states not yet in the adapter


class BatchedRunner:
    """Shared bookkeeping: requests are :meth:`add`-ed (a KV row each), stepped, :meth:`release`-d."""

    method = "none"

    def __init__(self, target: LayeredLM, capacity_tokens: int, n_slots: int | None = None) -> None:
        self.lm = target
        self.p = PackedLM(target)
        self.kv = PackedKV(n_slots or target.num_layers, capacity_tokens)
        self.reqs: dict[Any, _Seq] = {}
        self._next_row = 0

    @property
    def k_max(self) -> int:
        """Most drafts per member and step (the draft cap the server starts from)."""
        return 0

    def add(self, rid: Any, prompt: list[int]) -> None:
        if not prompt:
            raise SimspecError(f"request {rid}: empty prompt")
        if rid in self.reqs:
            raise SimspecError(f"request {rid} added twice")
        row = self._next_row
        self._next_row += 1
        self.kv.add_row(row)
        self._add_extra(row)
        self.reqs[rid] = _Seq(row=row, seq=list(prompt), prompt_len=len(prompt))

    def _add_extra(self, row: int) -> None:
        pass

    def release(self, rid: Any) -> None:
        r = self.reqs.pop(rid)
        self.kv.drop_row(r.row)
        self._drop_extra(r.row)

    def _drop_extra(self, row: int) -> None:
        pass

    def tokens(self, rid: Any) -> list[int]:
        """Tokens generated so far (after the prompt)."""
        r = self.reqs[rid]
        return r.seq[r.prompt_len:]

    def _check(self, prefill: list[Any], decode: list[tuple[Any, int]]) -> None:
        for rid in prefill:
            r = self.reqs[rid]
            if len(r.seq) != r.prompt_len:
                raise SimspecError(f"request {rid}: prefilled twice")
        for rid, cap in decode:
            r = self.reqs[rid]
            if len(r.seq) == r.prompt_len:
                raise SimspecError(f"request {rid}: decode before its prefill")
            if cap < 0 or cap > self.k_max:
                raise SimspecError(f"request {rid}: draft cap {cap} outside 0..{self.k_max}")

    def step(self, prefill: list[Any], decode: list[tuple[Any, int]],
             forced: dict[Any, ForcedStep | tuple[int, int]] | None = None) -> dict[Any, MemberStep]:
        """One step of the batch ``prefill`` (request ids) + ``decode`` (``(request id, draft cap)``);
        ``forced``: per decode member, a :class:`~simspec.forced_acceptance.ForcedStep` or a
        ``(drafts, accepted)`` pair (see the module docstring)."""
        if not prefill and not decode:
            return {}
        self._check(prefill, decode)
        fs: dict[Any, ForcedStep] = {}
        for rid, f in (forced or {}).items():
            try:
                fs[rid] = f if isinstance(f, ForcedStep) else ForcedStep(*f)
            except (TypeError, ValueError) as e:
                raise SimspecError(f"request {rid}: bad forced step {f!r}: {e}") from None
        with torch.no_grad():
            out = self._step(prefill, decode, fs)
        for rid, ms in out.items():
            self.reqs[rid].seq.extend(ms.tokens)
        return out

    def _step(self, prefill, decode, forced) -> dict[Any, MemberStep]:
        raise NotImplementedError

    def _verify(self, prefill: list[Any], decode_feeds: list[tuple[Any, list[int]]], start: int = 0,
                h_in: torch.Tensor | None = None) -> tuple[dict[Any, list[int]], dict[Any, int]]:
        """Target layers ``start..N-1`` over every member (decode members: their fed tokens; prefill
        members: their prompts), LM head over every decode position and each prompt's last one.
        Returns the argmax tokens per member and the context length each decode member had."""
        rids = [rid for rid, _ in decode_feeds] + list(prefill)
        rows = [self.reqs[r].row for r in rids]
        news = [len(f) for _, f in decode_feeds] + [self.reqs[r].prompt_len for r in prefill]
        ctx = {rid: self.kv.length(self.reqs[rid].row, start) for rid, _ in decode_feeds}
        if h_in is None:
            h_in = self.p.embed([f for _, f in decode_feeds] + [self.reqs[r].seq for r in prefill])
        h = self.p.run(h_in, start, self.lm.num_layers, self.kv, rows, news)
        segs = _segments(news)
        nd = len(decode_feeds)
        pick = [j for (a, b) in segs[:nd] for j in range(a, b)] + [b - 1 for (_, b) in segs[nd:]]
        toks = self.lm.head(h[:, pick])[0].argmax(-1).tolist()
        out: dict[Any, list[int]] = {}
        o = 0
        for rid, n in zip(rids[:nd], news[:nd]):
            out[rid] = toks[o:o + n]
            o += n
        for rid in rids[nd:]:
            out[rid] = [toks[o]]
            o += 1
        return out, ctx


class BatchedGreedy(BatchedRunner):
    """Plain greedy decoding, batched (method ``none``)."""

    method = "none"

    def _step(self, prefill, decode, forced):
        ver, _ = self._verify(prefill, [(rid, [self.reqs[rid].seq[-1]]) for rid, _ in decode])
        return {rid: MemberStep(tokens=[t[0]]) for rid, t in ver.items()}


class BatchedDraft(BatchedRunner):
    """Speculative decoding with a draft model, batched (method ``draft``): ``draft`` is a separate
    :class:`LayeredLM` sharing the vocabulary, or None for the target's first ``draft_layers`` layers
    + final norm + LM head (its own KV)."""

    method = "draft"

    def __init__(self, target: LayeredLM, k: int, capacity_tokens: int, draft: LayeredLM | None = None,
                 draft_layers: int | None = None) -> None:
        super().__init__(target, capacity_tokens)
        if k < 1:
            raise ConfigError(f"--method draft: k {k}: must be >= 1")
        self.k = int(k)
        if draft is None:
            if draft_layers is None or not 0 < draft_layers < target.num_layers:
                raise ConfigError(f"--method draft: draft_layers {draft_layers}: must be between 1 and "
                                  f"{target.num_layers - 1}")
            self.d, self.dn = target, int(draft_layers)
        else:
            self.d, self.dn = draft, draft.num_layers
        self.dp = PackedLM(self.d)
        self.dkv = PackedKV(self.dn, capacity_tokens)

    @property
    def k_max(self) -> int:
        return self.k

    def _add_extra(self, row: int) -> None:
        self.dkv.add_row(row)

    def _drop_extra(self, row: int) -> None:
        self.dkv.drop_row(row)

    def _draft_pass(self, feeds: list[tuple[Any, list[int]]]) -> tuple[list[int], list[float]]:
        rows = [self.reqs[r].row for r, _ in feeds]
        news = [len(f) for _, f in feeds]
        h = self.dp.run(self.dp.embed([f for _, f in feeds]), 0, self.dn, self.dkv, rows, news)
        last = [b - 1 for _, b in _segments(news)]
        return _top1(self.d.head(h[:, last])[0])

    def _step(self, prefill, decode, forced):
        if prefill:  # the draft model prefills the newcomers' prompts (logits at their last position)
            self._draft_pass([(rid, self.reqs[rid].seq) for rid in prefill])
        drafts: dict[Any, list[int]] = {rid: [] for rid, _ in decode}
        confs: dict[Any, list[float]] = {rid: [] for rid, _ in decode}
        caps = dict(decode)
        for rid, cap in decode:
            want = forced[rid].drafts if rid in forced else cap
            if want != cap:
                raise SimspecError(f"request {rid}: forced drafts {want} != cap {cap} (draft always drafts its cap)")
        for j in range(max(caps.values(), default=0)):
            feeds = []
            for rid, cap in decode:
                if cap > j:
                    r = self.reqs[rid]
                    feed = r.seq[self.dkv.length(r.row, 0):] if j == 0 else [drafts[rid][-1]]
                    feeds.append((rid, feed))
            toks, cs = self._draft_pass(feeds)
            for (rid, _), t, c in zip(feeds, toks, cs):
                drafts[rid].append(t)
                confs[rid].append(c)
        ver, ctx = self._verify(prefill, [(rid, [self.reqs[rid].seq[-1]] + drafts[rid]) for rid, _ in decode])
        out = {rid: MemberStep(tokens=ver[rid]) for rid in prefill}
        for rid, cap in decode:
            d, v = drafts[rid], ver[rid]
            m = forced[rid].accepted if rid in forced else _prefix(d, v)
            if not 0 <= m <= cap:
                raise SimspecError(f"request {rid}: accepted {m} outside 0..{cap}")
            n = ctx[rid] + 1  # tokens in the sequence before this step (the last one not yet in KV)
            row = self.reqs[rid].row
            self.kv.crop(row, range(self.lm.num_layers), n + m)
            self.dkv.crop(row, range(self.dn), n + m)
            out[rid] = MemberStep(tokens=d[:m] + [v[m]], drafts=cap, accepted=m, confidences=confs[rid])
        return out


class BatchedKangaroo(BatchedRunner):
    """Kangaroo double early exit, batched (method ``kangaroo``): exit ``exit_layer`` + ``adapter``
    (None: logit lens), at most ``gamma`` drafts, stop after a draft whose top-1 probability is
    below ``eta``."""

    method = "kangaroo"

    def __init__(self, target: LayeredLM, exit_layer: int, adapter: ExitAdapter | None, capacity_tokens: int,
                 gamma: int = 6, eta: float = 0.6) -> None:
        n = target.num_layers
        if not 0 < exit_layer < n:
            raise ConfigError(f"--method kangaroo: exit {exit_layer}: must be between 1 and {n - 1}")
        if adapter is not None and adapter.exit_layer != exit_layer:
            raise ConfigError(f"--method kangaroo: the adapter is for exit {adapter.exit_layer}, not {exit_layer}")
        if gamma < 1 or not 0.0 <= eta <= 1.0:
            raise ConfigError(f"--method kangaroo: gamma {gamma} must be >= 1 and eta {eta} in [0, 1]")
        super().__init__(target, capacity_tokens, n_slots=max(n, (adapter.slot + 1) if adapter else n))
        self.exit, self.gamma, self.eta, self.ad = int(exit_layer), int(gamma), float(eta), adapter

    @property
    def k_max(self) -> int:
        return self.gamma

    def _exit_heads(self, heads: list[tuple[Any, torch.Tensor]], fill: list[tuple[Any, torch.Tensor]]
                    ) -> tuple[list[int], list[float]]:
        """Exit logits for the last state of each ``heads`` member (adapter fed its backlog first);
        ``fill``: prefill members whose prompt states only fill the adapter's KV (no logits)."""
        if not heads and (self.ad is None or not fill):
            return [], []
        if self.ad is None:
            x = torch.cat([h for _, h in heads], dim=1)
            return _top1(self.lm.head(x)[0])
        feeds, rows, news = [], [], []
        for rid, h in heads:
            r = self.reqs[rid]
            p = self.kv.length(r.row, self.ad.slot)
            back = []
            while p in r.hist:  # states the adapter has not consumed, ending with the new one
                back.append(r.hist.pop(p))
                p += 1
            if not back or back[-1] is not h:
                raise RuntimeError(f"adapter backlog of request {rid} does not end with its new exit state")
            x = torch.cat(back, dim=1) if len(back) > 1 else back[0]
            feeds.append(x)
            rows.append(r.row)
            news.append(x.shape[1])
        for rid, h in fill:
            feeds.append(h)
            rows.append(self.reqs[rid].row)
            news.append(h.shape[1])
        out = self.p.adapter(self.ad, torch.cat(feeds, dim=1), self.kv, rows, news)
        if not heads:
            return [], []
        last = [b - 1 for _, b in _segments(news)[:len(heads)]]
        return _top1(self.lm.head(out[:, last], normed=True)[0])

    def _step(self, prefill, decode, forced):
        L, N = self.exit, self.lm.num_layers
        states: dict[Any, list[torch.Tensor]] = {rid: [] for rid, _ in decode}
        drafts: dict[Any, list[int]] = {rid: [] for rid, _ in decode}
        confs: dict[Any, list[float]] = {rid: [] for rid, _ in decode}
        stop_at: dict[Any, int] = {}
        for rid, cap in decode:
            if rid in forced:
                d = forced[rid].drafts
                if not (min(cap, 1) <= d <= cap):
                    raise SimspecError(f"request {rid}: forced drafts {d} outside {min(cap, 1)}..{cap}")
                stop_at[rid] = d
        caps = dict(decode)
        drafting = {rid for rid, cap in decode if cap > 0}
        shallow = [rid for rid, _ in decode]  # round 0: every decode member's last token
        pre_h: torch.Tensor | None = None
        j = 0
        while shallow or (j == 0 and prefill):
            feeds = [[self.reqs[rid].seq[-1]] if j == 0 else [drafts[rid][-1]] for rid in shallow]
            rids = list(shallow) + (list(prefill) if j == 0 else [])
            feeds += [self.reqs[rid].seq for rid in prefill] if j == 0 else []
            rows = [self.reqs[r].row for r in rids]
            news = [len(f) for f in feeds]
            h = self.p.run(self.p.embed(feeds), 0, L, self.kv, rows, news)
            segs = _segments(news)
            heads, fill = [], []
            for b, rid in enumerate(rids):
                a, e = segs[b]
                hb = h[:, a:e]
                if b >= len(shallow):
                    fill.append((rid, hb))
                    continue
                states[rid].append(hb)
                r = self.reqs[rid]
                pos = self.kv.length(r.row, 0) - 1
                if self.ad is not None:
                    r.hist[pos] = hb
                if rid in drafting:
                    heads.append((rid, hb))
            if j == 0 and prefill:
                pre_h = h[:, segs[len(shallow)][0]:]
            toks, cs = self._exit_heads(heads, fill)
            nxt = []
            for (rid, _), t, c in zip(heads, toks, cs):
                drafts[rid].append(t)
                confs[rid].append(c)
                nxt.append(rid)  # its new draft needs its shallow pass next round
                k = len(drafts[rid])
                done = k >= (stop_at[rid] if rid in stop_at else caps[rid]) or (rid not in stop_at and c < self.eta)
                if done:
                    drafting.discard(rid)
            shallow = nxt
            j += 1
        # verification: layers L..N-1 over every decode member's D+1 exit states and the prompts
        rids = [rid for rid, _ in decode]
        hs = [torch.cat(states[rid], dim=1) for rid in rids] + ([pre_h] if pre_h is not None else [])
        feeds = [(rid, [0] * (len(drafts[rid]) + 1)) for rid in rids]
        ver, ctx = self._verify(prefill, feeds, start=L, h_in=torch.cat(hs, dim=1))
        out = {rid: MemberStep(tokens=ver[rid]) for rid in prefill}
        for rid in rids:
            d, v = drafts[rid], ver[rid]
            m = forced[rid].accepted if rid in forced else _prefix(d, v)
            if not 0 <= m <= len(d):
                raise SimspecError(f"request {rid}: accepted {m} outside 0..{len(d)}")
            n = ctx[rid] + 1
            r = self.reqs[rid]
            self.kv.crop(r.row, range(N), n + m)
            if self.ad is not None:
                self.kv.crop(r.row, [self.ad.slot], n + m)
                for p in [p for p in r.hist if p >= n + m]:
                    del r.hist[p]
            out[rid] = MemberStep(tokens=d[:m] + [v[m]], drafts=len(d), accepted=m, confidences=confs[rid])
        return out


class BatchedHiSpec(BatchedRunner):
    """HiSpec, batched (method ``hispec``, two levels: draft exit ``exit_draft`` < intermediate exit
    ``exit_inter`` < N): the algorithm of :class:`simspec.calibrate.runners.HiSpecRunner` with a
    draft cap per member, as the simulator's ``hispec`` charges it. ``adapters`` maps exit layer →
    :class:`ExitAdapter` (missing/None: logit lens). A member with cap k fills a buffer of at least
    ``min(N_i, k)`` tokens:

    - inner iterations, in lockstep over the members whose buffer is still short: ``d = min(N_d,
      k − m)`` drafting rounds at L_d (round j: layers 0..L_d−1 + exit head over one token of each
      member with d > j — its frontier token, then its previous draft), then layers L_d..L_i−1 + exit
      head over its d tokens in one packed pass; the prefix L_i agrees with plus L_i's own token at
      the first disagreement (all d drafts when it agrees with all) joins the buffer, KV of layers
      < L_i and the exits is cropped to it;
    - full verification: layers 0..L_i−1 over each frontier token (the buffer's last, not yet run)
      and the newcomers' prompts, then layers L_i..N−1 + LM head over each member's m + 1 states at
      L_i and the prompts; the prefix the full model agrees with plus its token commits.

    ``MemberStep.drafts`` is the buffer size m (what the full model verified, the simulator's
    ``drafted``), ``inner`` each iteration's (drafts, appended). Forced: a
    :class:`~simspec.forced_acceptance.ForcedStep` whose ``inner`` says how many tokens each
    iteration appends (real passes; a forced count below d appends the drafts before it and L_i's
    token) and whose ``accepted`` how many buffer tokens the full model accepts."""

    method = "hispec"

    def __init__(self, target: LayeredLM, exit_draft: int, exit_inter: int,
                 adapters: dict[int, ExitAdapter | None] | None, capacity_tokens: int, n_draft: int = 2,
                 n_inter: int = 4) -> None:
        n = target.num_layers
        if not 0 < exit_draft < exit_inter < n:
            raise ConfigError(f"--method hispec: draft_exit {exit_draft}, inter_exit {exit_inter}: need "
                              f"1 <= draft_exit < inter_exit < {n}")
        if n_draft < 1 or n_inter < 1:
            raise ConfigError(f"--method hispec: nd {n_draft}, ni {n_inter}: must be >= 1")
        ads = dict(adapters or {})
        self.ads: dict[int, ExitAdapter | None] = {int(exit_draft): ads.get(exit_draft),
                                                  int(exit_inter): ads.get(exit_inter)}
        for e, a in self.ads.items():
            if a is not None and a.exit_layer != e:
                raise ConfigError(f"--method hispec: the adapter for exit {e} is for exit {a.exit_layer}")
        slots = [a.slot for a in self.ads.values() if a is not None]
        super().__init__(target, capacity_tokens, n_slots=max([n - 1] + slots) + 1)
        self.ld, self.li, self.nd, self.ni = int(exit_draft), int(exit_inter), int(n_draft), int(n_inter)
        #: per KV row and exit with an adapter: exit states (position → [1, 1, hidden]) the adapter
        #: has not consumed yet (prompts and frontier tokens; consumed as a backlog before new states)
        self.hist: dict[int, dict[int, dict[int, torch.Tensor]]] = {}

    @property
    def k_max(self) -> int:
        """Largest buffer: at most N_i − 1 tokens before the last inner iteration, which adds at most
        N_d (the simulator's ``hispec`` k_max)."""
        return self.ni + self.nd - 1

    def _add_extra(self, row: int) -> None:
        self.hist[row] = {e: {} for e, a in self.ads.items() if a is not None}

    def _drop_extra(self, row: int) -> None:
        self.hist.pop(row, None)

    def _record(self, row: int, exit_layer: int, h: torch.Tensor, pos0: int) -> None:
        """Keep exit states ``h`` ``[1, T, hidden]`` at positions ``pos0..`` for the adapter's backlog."""
        d = self.hist[row].get(exit_layer)
        if d is not None:
            for j in range(h.shape[1]):
                d[pos0 + j] = h[:, j:j + 1]

    def _crop_exits(self, row: int, length: int) -> None:
        """Forget exit states and adapter KV at positions ``>= length``."""
        for e, d in self.hist[row].items():
            for p in [p for p in d if p >= length]:
                del d[p]
            self.kv.crop(row, [self.ads[e].slot], length)  # type: ignore[union-attr]

    def _exit_logits(self, exit_layer: int, items: list[tuple[int, torch.Tensor, int]]) -> list[torch.Tensor]:
        """Exit-head logits ``[T_b, V]`` for each item ``(KV row, states [1, T_b, hidden] at positions
        pos0.., pos0)``, in one packed pass; an adapter is fed each row's backlog first."""
        ad = self.ads[exit_layer]
        t_new = [h.shape[1] for _, h, _ in items]
        if ad is None:  # logit lens
            logits = self.lm.head(torch.cat([h for _, h, _ in items], dim=1))[0]
            return [logits[a:b] for a, b in _segments(t_new)]
        feeds, rows, news = [], [], []
        for row, h, pos0 in items:
            have = self.kv.length(row, ad.slot)
            d = self.hist[row][exit_layer]
            back = [d[p] for p in range(have, pos0) if p in d]
            if len(back) != pos0 - have:
                raise RuntimeError(f"adapter at exit {exit_layer}: row {row} misses exit states for positions "
                                   f"{have}..{pos0 - 1}")
            for p in [p for p in d if p < pos0 + h.shape[1]]:
                del d[p]
            x = torch.cat(back + [h], dim=1) if back else h
            feeds.append(x)
            rows.append(row)
            news.append(x.shape[1])
        out = self.p.adapter(ad, torch.cat(feeds, dim=1), self.kv, rows, news)
        pick = [j for (_, b), t in zip(_segments(news), t_new) for j in range(b - t, b)]
        logits = self.lm.head(out[:, pick], normed=True)[0]
        return [logits[a:b] for a, b in _segments(t_new)]

    def _step(self, prefill, decode, forced):
        Ld, Li, N, nd = self.ld, self.li, self.lm.num_layers, self.nd
        rids = [rid for rid, _ in decode]
        caps = dict(decode)
        R = {rid: self.reqs[rid] for rid in rids}
        target = {rid: min(self.ni, caps[rid]) for rid in rids}
        m = {rid: 0 for rid in rids}
        buf: dict[Any, list[int]] = {rid: [] for rid in rids}
        states: dict[Any, list[torch.Tensor]] = {rid: [] for rid in rids}  # L_i states of the verified tokens
        confs: dict[Any, list[float]] = {rid: [] for rid in rids}
        inner: dict[Any, list[tuple[int, int]]] = {rid: [] for rid in rids}
        front = {rid: R[rid].seq[-1] for rid in rids}  # frontier token (not in any KV yet)
        p0 = {rid: len(R[rid].seq) - 1 for rid in rids}  # its position
        t = 0
        while True:
            act = [rid for rid in rids if m[rid] < target[rid]]
            if not act:
                break
            d = {rid: min(nd, caps[rid] - m[rid]) for rid in act}
            drafts: dict[Any, list[int]] = {rid: [] for rid in act}
            shallow: dict[Any, list[torch.Tensor]] = {rid: [] for rid in act}
            for j in range(max(d.values())):  # drafting round j at L_d
                rr = [rid for rid in act if d[rid] > j]
                feeds = [[front[rid]] if j == 0 else [drafts[rid][-1]] for rid in rr]
                h = self.p.run(self.p.embed(feeds), 0, Ld, self.kv, [R[r].row for r in rr], [1] * len(rr))
                items = []
                for b, rid in enumerate(rr):
                    hb = h[:, b:b + 1]
                    shallow[rid].append(hb)
                    items.append((R[rid].row, hb, p0[rid] + j))
                toks, cs = _top1(torch.cat([lg[-1:] for lg in self._exit_logits(Ld, items)], dim=0))
                for rid, tok, c in zip(rr, toks, cs):
                    drafts[rid].append(tok)
                    confs[rid].append(c)
            # layers L_d..L_i-1 + the intermediate head over every active member's d tokens
            news = [d[rid] for rid in act]
            hm = self.p.run(torch.cat([torch.cat(shallow[rid], dim=1) for rid in act], dim=1), Ld, Li, self.kv,
                            [R[rid].row for rid in act], news)
            segs = _segments(news)
            inter_logits = self._exit_logits(Li, [(R[rid].row, hm[:, a:b], p0[rid]) for rid, (a, b) in zip(act, segs)])
            for rid, (a, _), lg in zip(act, segs, inter_logits):
                dr, dd, inter = drafts[rid], d[rid], lg.argmax(-1).tolist()
                if rid in forced:
                    plan = forced[rid].inner
                    if t >= len(plan) or not 1 <= plan[t] <= dd:
                        raise SimspecError(f"request {rid}: forced inner iterations {list(plan)} do not fit iteration "
                                           f"{t} ({dd} drafts, buffer {m[rid]} of {target[rid]})")
                    n_app = plan[t]
                    appended = dr if n_app == dd else dr[:n_app - 1] + [inter[n_app - 1]]
                else:
                    agreed = _prefix(dr, inter)
                    appended = dr if agreed == dd else dr[:agreed] + [inter[agreed]]
                n_app = len(appended)
                inner[rid].append((dd, n_app))
                states[rid].append(hm[:, a:a + n_app])
                row = R[rid].row
                self.kv.crop(row, range(Li), p0[rid] + n_app)
                self._crop_exits(row, p0[rid] + n_app)
                buf[rid].extend(appended)
                m[rid] += n_app
                front[rid], p0[rid] = appended[-1], p0[rid] + n_app
            t += 1
        for rid in rids:
            if rid in forced and (len(forced[rid].inner) != len(inner[rid]) or forced[rid].drafts != m[rid]):
                raise SimspecError(f"request {rid}: forced step {forced[rid]} does not match its cap {caps[rid]} "
                                   f"(inner iterations {inner[rid]})")
        # full verification: layers 0..L_i-1 over the frontier tokens and the prompts, then L_i..N-1
        feeds = [[front[rid]] for rid in rids] + [self.reqs[r].seq for r in prefill]
        members = rids + list(prefill)
        rows = [self.reqs[r].row for r in members]
        news = [len(f) for f in feeds]
        starts = [p0[rid] for rid in rids] + [0] * len(prefill)
        segs = _segments(news)
        h = self.p.run(self.p.embed(feeds), 0, Ld, self.kv, rows, news)
        for row, (a, b), s0 in zip(rows, segs, starts):
            self._record(row, Ld, h[:, a:b], s0)
        h = self.p.run(h, Ld, Li, self.kv, rows, news)
        for row, (a, b), s0 in zip(rows, segs, starts):
            self._record(row, Li, h[:, a:b], s0)
        hs = [torch.cat(states[rid] + [h[:, a:b]], dim=1) for rid, (a, b) in zip(rids, segs)]
        if prefill:
            hs.append(h[:, segs[len(rids)][0]:])
        ver, ctx = self._verify(prefill, [(rid, [0] * (m[rid] + 1)) for rid in rids], start=Li,
                                h_in=torch.cat(hs, dim=1))
        out = {rid: MemberStep(tokens=ver[rid]) for rid in prefill}
        for rid in rids:
            b, v = buf[rid], ver[rid]
            acc = forced[rid].accepted if rid in forced else _prefix(b, v)
            if not 0 <= acc <= len(b):
                raise SimspecError(f"request {rid}: accepted {acc} outside 0..{len(b)}")
            n = ctx[rid] + 1
            row = R[rid].row
            self.kv.crop(row, range(N), n + acc)
            self._crop_exits(row, n + acc)
            out[rid] = MemberStep(tokens=b[:acc] + [v[acc]], drafts=len(b), accepted=acc, confidences=confs[rid],
                                  inner=inner[rid])
        return out


class BatchedHiSpecSingle(BatchedKangaroo):
    """Single-level HiSpec (``inter_exit = N``), batched: ``min(N_d, cap)`` drafts at ``exit_draft``
    (+ its adapter, None: logit lens), verified by layers ``exit_draft..N−1`` — Kangaroo with
    γ = N_d and no confidence stop, as the simulator's ``hispec`` charges it."""

    method = "hispec"

    def __init__(self, target: LayeredLM, exit_draft: int, adapter: ExitAdapter | None, capacity_tokens: int,
                 n_draft: int = 2) -> None:
        if not 0 < exit_draft < target.num_layers or n_draft < 1:
            raise ConfigError(f"--method hispec: draft_exit {exit_draft} must be between 1 and "
                              f"{target.num_layers - 1} and nd {n_draft} >= 1")
        super().__init__(target, exit_draft, adapter, capacity_tokens, gamma=n_draft, eta=0.0)


def generate_batch(runner: BatchedRunner, prompts: list[list[int]], max_new_tokens: int | list[int],
                   admit_every: int = 0) -> list[list[int]]:
    """Serve ``prompts`` to ``max_new_tokens`` each (one count for all, or one per prompt) with
    ``runner`` (tests and examples): all admitted at once, or with ``admit_every = s`` one newcomer
    every ``s`` steps (so prefills share steps with decodes). Draft caps: the runner's ``k_max``,
    capped at ``remaining − 1``."""
    want = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [int(max_new_tokens)] * len(prompts)
    if len(want) != len(prompts) or min(want, default=1) < 1:
        raise SimspecError(f"max_new_tokens {max_new_tokens}: give one count >= 1, or one per prompt")
    waiting = list(range(len(prompts)))
    live: list[int] = []
    out: dict[int, list[int]] = {}
    step = 0
    while waiting or live:
        new = []
        if waiting and (admit_every <= 0 or step % admit_every == 0):
            take = len(waiting) if admit_every <= 0 else 1
            new, waiting = waiting[:take], waiting[take:]
            for i in new:
                runner.add(i, prompts[i])
        dec = [(i, max(0, min(runner.k_max, want[i] - len(runner.tokens(i)) - 1))) for i in live]
        runner.step(new, dec)
        live += new
        for i in list(live):
            if len(runner.tokens(i)) >= want[i]:
                out[i] = runner.tokens(i)[:want[i]]
                runner.release(i)
                live.remove(i)
        step += 1
    return [out[i] for i in range(len(prompts))]
