"""Real speculative decoding runners: greedy, batch size 1, KV cache, lossless (torch + transformers;
imported only by ``simspec calibrate``).

Methods (``../shared/design/algorithms.md`` §3):

- ``none``: plain greedy decoding, one target forward per token.
- ``draft``: ``k`` draft tokens from a draft model — a separate causal LM sharing the tokenizer, or
  the target's first ``L`` layers + final norm + LM head (its own KV cache) — then one target pass
  over ``k + 1`` tokens; the longest matching prefix plus the target's correction/bonus token commit.
- ``kangaroo``: the draft is the target's layers ``0..ℓ-1`` + an exit adapter + the LM head. Drafting
  stops when a draft's top-1 probability is below ``η`` (that draft is still verified) or after
  ``γ`` drafts. Verification runs only layers ``ℓ..N-1`` over the ``k + 1`` early-exited hidden
  states, reusing the shallow layers' KV: layers ``< ℓ`` hold KV for every drafted token, layers
  ``≥ ℓ`` only for verified ones, and both are cropped to the committed prefix afterwards.
- ``hispec``: draft exit ``L_d``, intermediate exit ``L_i``, full model. Inner loop: ``N_d`` drafts at
  ``L_d``; layers ``L_d..L_i-1`` over them in one pass; the longest prefix the intermediate exit
  agrees with plus its own token at the first disagreement join a tentative buffer. Once the buffer
  holds ``≥ N_i`` tokens, layers ``L_i..N-1`` run over it in one pass and the prefix the full model
  agrees with, plus its correction/bonus token, commits.

Every runner returns a :class:`RunResult` whose ``tokens`` equal plain greedy decoding's (up to
floating-point ties: verification processes several tokens in one pass, so sums are ordered
differently than in one-token decoding) and whose ``steps`` log, per verification, the drafts made,
how many the final verifier accepted, each draft's top-1 probability, which level rejected, and wall
time per stage. ``committed = accepted + 1`` for every step, except that the last step is capped at
``max_new_tokens`` or the EOS token. The first generated token comes from the prefill pass and is not
a step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from simspec.calibrate.adapter import ExitAdapter
from simspec.calibrate.early_exit import KVStore, LayeredLM
from simspec.errors import SimspecError

METHODS = ("none", "draft", "kangaroo", "hispec")


@dataclass
class StepLog:
    """One verification step.

    ``drafts``: draft tokens proposed by the drafter this step (HiSpec: at the draft exit, over all
    inner rounds); ``offered``: tokens the final verifier checked (draft/Kangaroo: ``drafts``; HiSpec:
    the buffer length); ``accepted``: how many of those the final verifier accepted (a prefix);
    ``committed``: tokens appended (``accepted + 1``, capped at the end); ``confidences``: each
    draft's top-1 probability, in order; ``rejected_by``: ``None`` (all accepted), ``"target"``
    (draft/Kangaroo), ``"inter"`` or ``"full"`` (HiSpec: which level rejected first this step);
    ``inner``: HiSpec's inner rounds (``drafts``, ``inter_accepted``, ``appended`` each);
    ``stages_ms``: wall time per stage, milliseconds."""

    drafts: int
    offered: int
    accepted: int
    committed: int
    confidences: list[float] = field(default_factory=list)
    rejected_by: str | None = None
    inner: list[dict[str, int]] | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"drafts": self.drafts, "offered": self.offered, "accepted": self.accepted,
                             "committed": self.committed,
                             "confidences": [round(c, 6) for c in self.confidences],
                             "rejected_by": self.rejected_by,
                             "stages_ms": {k: round(v, 4) for k, v in self.stages_ms.items()}}
        if self.inner is not None:
            d["inner"] = self.inner
        return d


@dataclass
class RunResult:
    """One request: generated ``tokens`` (the prefill token first), per-step logs, timings (ms)."""

    method: str
    prompt_tokens: int
    tokens: list[int]
    steps: list[StepLog]
    prefill_ms: float
    total_ms: float
    stop: str  # "eos" | "max_new_tokens"


class _Timer:
    """Accumulate wall time per stage name (milliseconds); on CUDA, each stage boundary synchronises."""

    def __init__(self, sync: Any = None) -> None:
        self.ms: dict[str, float] = {}
        self.sync = sync

    def add(self, name: str, t0: float) -> float:
        if self.sync is not None:
            self.sync()
        t1 = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (t1 - t0) * 1e3
        return t1


def _top1(logits: torch.Tensor) -> tuple[int, float]:
    """Greedy token and its probability from ``[V]`` logits."""
    p = torch.softmax(logits.float(), dim=-1)
    conf, tok = torch.max(p, dim=-1)
    return int(tok), float(conf)


def _accept_prefix(proposed: list[int], verifier: list[int]) -> int:
    """Length of the longest prefix of ``proposed`` equal to ``verifier`` (position by position)."""
    m = 0
    for a, b in zip(proposed, verifier):
        if a != b:
            break
        m += 1
    return m


class _Base:
    """Shared loop: prefill, then ``_step`` until ``max_new_tokens`` or EOS."""

    method = "none"

    def __init__(self, target: LayeredLM, eos_token_id: int | None = None) -> None:
        self.lm = target
        self.eos = eos_token_id

    def _timer(self) -> _Timer:
        cuda = getattr(self.lm.device, "type", "cpu") == "cuda"
        return _Timer(torch.cuda.synchronize if cuda else None)

    # subclasses: _reset(), _prefill(prompt) -> first token, _step(seq) -> (proposed, verifier_tokens, log)
    def generate(self, prompt: list[int], max_new_tokens: int) -> RunResult:
        if not prompt:
            raise SimspecError("empty prompt")
        if max_new_tokens < 1:
            raise SimspecError(f"max_new_tokens {max_new_tokens}: must be >= 1")
        t_start = time.perf_counter()
        with torch.no_grad():
            self._reset()
            first = self._prefill(list(prompt))
            prefill_ms = (time.perf_counter() - t_start) * 1e3
            seq = list(prompt) + [first]
            out = [first]
            steps: list[StepLog] = []
            stop = "eos" if first == self.eos else "max_new_tokens"
            while len(out) < max_new_tokens and stop != "eos":
                new, log = self._step(seq)
                room = max_new_tokens - len(out)
                new = new[:room]
                if self.eos is not None and self.eos in new:
                    new = new[:new.index(self.eos) + 1]
                    stop = "eos"
                log.committed = len(new)
                seq.extend(new)
                out.extend(new)
                steps.append(log)
        return RunResult(method=self.method, prompt_tokens=len(prompt), tokens=out, steps=steps,
                         prefill_ms=prefill_ms, total_ms=(time.perf_counter() - t_start) * 1e3, stop=stop)


class GreedyRunner(_Base):
    """Plain greedy decoding (method ``none``)."""

    method = "none"

    def _reset(self) -> None:
        self.kv = self.lm.new_kv()

    def _prefill(self, prompt: list[int]) -> int:
        h = self.lm.run(self.lm.embed(prompt), 0, self.lm.num_layers, self.kv)
        return _top1(self.lm.head(h[:, -1:])[0, 0])[0]

    def _step(self, seq: list[int]) -> tuple[list[int], StepLog]:
        tm = self._timer()
        t = time.perf_counter()
        h = self.lm.run(self.lm.embed(seq[-1:]), 0, self.lm.num_layers, self.kv)
        t = tm.add("target_ms", t)
        tok = _top1(self.lm.head(h)[0, 0])[0]
        tm.add("head_ms", t)
        return [tok], StepLog(drafts=0, offered=0, accepted=0, committed=1, stages_ms=tm.ms)


class DraftRunner(_Base):
    """Classic speculative decoding with ``k`` drafts per step (method ``draft``).

    ``draft`` is a separate :class:`LayeredLM` (same tokenizer), or ``None`` to use the target's first
    ``draft_layers`` layers + final norm + LM head as the draft model."""

    method = "draft"

    def __init__(self, target: LayeredLM, k: int, draft: LayeredLM | None = None,
                 draft_layers: int | None = None, eos_token_id: int | None = None) -> None:
        super().__init__(target, eos_token_id)
        if k < 1:
            raise SimspecError(f"--k {k}: must be >= 1")
        self.k = int(k)
        if draft is None:
            if draft_layers is None or not 0 < draft_layers < target.num_layers:
                raise SimspecError(f"--draft-layers {draft_layers}: must be between 1 and "
                                   f"{target.num_layers - 1}")
            self.draft, self.draft_n = target, int(draft_layers)
        else:
            if draft.model.config.vocab_size != target.model.config.vocab_size:
                raise SimspecError("--draft: the draft model's vocabulary differs from the target's")
            self.draft, self.draft_n = draft, draft.num_layers

    def _reset(self) -> None:
        self.kv = self.lm.new_kv()
        self.dkv = self.draft.new_kv()

    def _prefill(self, prompt: list[int]) -> int:
        h = self.lm.run(self.lm.embed(prompt), 0, self.lm.num_layers, self.kv)
        return _top1(self.lm.head(h[:, -1:])[0, 0])[0]

    def _step(self, seq: list[int]) -> tuple[list[int], StepLog]:
        tm = self._timer()
        n = len(seq)
        feed = seq[self.dkv.length(0):]  # catch-up: tokens the draft has not seen, ending with seq[-1]
        drafts: list[int] = []
        confs: list[float] = []
        t = time.perf_counter()
        for _ in range(self.k):
            h = self.draft.run(self.draft.embed(feed), 0, self.draft_n, self.dkv)
            t = tm.add("draft_ms", t)
            tok, conf = _top1(self.draft.head(h[:, -1:])[0, 0])
            t = tm.add("draft_head_ms", t)
            drafts.append(tok)
            confs.append(conf)
            feed = [tok]
        h = self.lm.run(self.lm.embed([seq[-1]] + drafts), 0, self.lm.num_layers, self.kv)
        t = tm.add("verify_ms", t)
        ver = self.lm.head(h)[0].argmax(-1).tolist()
        tm.add("verify_head_ms", t)
        m = _accept_prefix(drafts, ver)
        self.kv.crop(range(self.lm.num_layers), n + m)
        self.dkv.crop(range(self.draft_n), n + m)
        log = StepLog(drafts=self.k, offered=self.k, accepted=m, committed=m + 1, confidences=confs,
                      rejected_by=None if m == self.k else "target", stages_ms=tm.ms)
        return drafts[:m] + [ver[m]], log


class _ExitMixin:
    """Exit heads with adapter KV catch-up.

    ``hist[L]`` maps absolute position → hidden state after the first ``L`` layers, for positions the
    adapter at ``L`` has not consumed yet; ``_exit_logits`` feeds the adapter any such backlog before
    the new states, so the adapter's KV always covers positions ``0..p`` in order."""

    lm: LayeredLM
    kv: KVStore
    adapters: dict[int, ExitAdapter | None]

    def _init_hist(self) -> None:
        self.hist: dict[int, dict[int, torch.Tensor]] = {e: {} for e in self.adapters}

    def _record(self, exit_layer: int, h: torch.Tensor, pos0: int) -> None:
        if exit_layer in self.hist:
            d = self.hist[exit_layer]
            for j in range(h.shape[1]):
                d[pos0 + j] = h[:, j:j + 1]

    def _exit_logits(self, exit_layer: int, h: torch.Tensor, pos0: int) -> torch.Tensor:
        """Logits ``[T, V]`` of the exit head for states ``h`` at positions ``pos0..``."""
        ad = self.adapters.get(exit_layer)
        if ad is None:  # logit lens
            return self.lm.head(h)[0]
        have = self.kv.length(ad.slot)
        d = self.hist[exit_layer]
        back = [d[p] for p in range(have, pos0)]
        if len(back) != pos0 - have:
            raise RuntimeError(f"adapter at exit {exit_layer}: missing hidden states for positions "
                               f"{have}..{pos0 - 1}")
        x = torch.cat(back + [h], dim=1) if back else h
        out = ad(self.lm, x, have, self.kv)
        for p in [p for p in d if p < pos0 + h.shape[1]]:
            del d[p]
        return self.lm.head(out[:, -h.shape[1]:], normed=True)[0]

    def _crop_exit(self, exit_layer: int, length: int) -> None:
        """Forget exit states and adapter KV at positions ``>= length`` (rejected tokens)."""
        if exit_layer in self.hist:
            d = self.hist[exit_layer]
            for p in [p for p in d if p >= length]:
                del d[p]
        ad = self.adapters.get(exit_layer)
        if ad is not None:
            self.kv.crop([ad.slot], length)


class KangarooRunner(_ExitMixin, _Base):
    """Kangaroo double early exit (method ``kangaroo``): exit ``exit_layer`` + adapter (``None`` = logit
    lens), at most ``gamma`` drafts, stop after a draft with top-1 probability below ``eta``."""

    method = "kangaroo"

    def __init__(self, target: LayeredLM, exit_layer: int, adapter: ExitAdapter | None, gamma: int = 6,
                 eta: float = 0.6, eos_token_id: int | None = None) -> None:
        super().__init__(target, eos_token_id)
        if not 0 < exit_layer < target.num_layers:
            raise SimspecError(f"--exit {exit_layer}: must be between 1 and {target.num_layers - 1}")
        if adapter is not None and adapter.exit_layer != exit_layer:
            raise SimspecError(f"adapter is for exit {adapter.exit_layer}, not {exit_layer}")
        if gamma < 1:
            raise SimspecError(f"--gamma {gamma}: must be >= 1")
        if not 0.0 <= eta <= 1.0:
            raise SimspecError(f"--eta {eta}: must be in [0, 1]")
        self.exit, self.gamma, self.eta = int(exit_layer), int(gamma), float(eta)
        self.adapters = {self.exit: adapter}
        self.n_slots = target.num_layers + (adapter.slot - target.num_layers + 1 if adapter else 0)

    def _reset(self) -> None:
        self.kv = KVStore(self.n_slots)
        self._init_hist()

    def _prefill(self, prompt: list[int]) -> int:
        h = self.lm.run(self.lm.embed(prompt), 0, self.exit, self.kv)
        self._record(self.exit, h, 0)
        h = self.lm.run(h, self.exit, self.lm.num_layers, self.kv)
        return _top1(self.lm.head(h[:, -1:])[0, 0])[0]

    def _step(self, seq: list[int]) -> tuple[list[int], StepLog]:
        tm = self._timer()
        n, L, N = len(seq), self.exit, self.lm.num_layers
        x = seq[-1]
        states: list[torch.Tensor] = []
        drafts: list[int] = []
        confs: list[float] = []
        t = time.perf_counter()
        for i in range(self.gamma):
            pos = n - 1 + i
            h = self.lm.run(self.lm.embed([x]), 0, L, self.kv)
            self._record(L, h, pos)
            states.append(h)
            t = tm.add("shallow_ms", t)
            logits = self._exit_logits(L, h, pos)
            t = tm.add("adapter_head_ms", t)
            tok, conf = _top1(logits[-1])
            drafts.append(tok)
            confs.append(conf)
            if conf < self.eta:
                break
            x = tok
        k = len(drafts)
        # shallow pass of the last draft, so the deep layers see k + 1 early-exited states
        h = self.lm.run(self.lm.embed([drafts[-1]]), 0, L, self.kv)
        self._record(L, h, n - 1 + k)
        states.append(h)
        t = tm.add("shallow_ms", t)
        hv = self.lm.run(torch.cat(states, dim=1), L, N, self.kv)
        t = tm.add("deep_ms", t)
        ver = self.lm.head(hv)[0].argmax(-1).tolist()
        tm.add("verify_head_ms", t)
        m = _accept_prefix(drafts, ver)
        self.kv.crop(range(N), n + m)
        self._crop_exit(L, n + m)
        log = StepLog(drafts=k, offered=k, accepted=m, committed=m + 1, confidences=confs,
                      rejected_by=None if m == k else "target", stages_ms=tm.ms)
        return drafts[:m] + [ver[m]], log


class HiSpecRunner(_ExitMixin, _Base):
    """HiSpec (method ``hispec``): draft exit ``exit_draft``, intermediate verifier ``exit_inter``, full
    model; ``n_draft`` drafts per inner round, full verification once ``n_inter`` tokens are buffered.
    ``adapters`` maps exit layer → adapter (missing/``None`` = logit lens)."""

    method = "hispec"

    def __init__(self, target: LayeredLM, exit_draft: int, exit_inter: int,
                 adapters: dict[int, ExitAdapter | None] | None = None, n_draft: int = 2, n_inter: int = 4,
                 eos_token_id: int | None = None) -> None:
        super().__init__(target, eos_token_id)
        if not 0 < exit_draft < exit_inter < target.num_layers:
            raise SimspecError(f"hispec exits {exit_draft}, {exit_inter}: need 0 < draft exit < "
                               f"intermediate exit < {target.num_layers}")
        if n_draft < 1 or n_inter < 1:
            raise SimspecError(f"hispec N_d {n_draft}, N_i {n_inter}: must be >= 1")
        adapters = dict(adapters or {})
        self.ld, self.li, self.nd, self.ni = int(exit_draft), int(exit_inter), int(n_draft), int(n_inter)
        self.adapters = {self.ld: adapters.get(self.ld), self.li: adapters.get(self.li)}
        slots = [a.slot for a in self.adapters.values() if a is not None]
        self.n_slots = max([target.num_layers - 1] + slots) + 1

    def _reset(self) -> None:
        self.kv = KVStore(self.n_slots)
        self._init_hist()

    def _prefill(self, prompt: list[int]) -> int:
        h = self.lm.run(self.lm.embed(prompt), 0, self.ld, self.kv)
        self._record(self.ld, h, 0)
        h = self.lm.run(h, self.ld, self.li, self.kv)
        self._record(self.li, h, 0)
        h = self.lm.run(h, self.li, self.lm.num_layers, self.kv)
        return _top1(self.lm.head(h[:, -1:])[0, 0])[0]

    def _crop_upto(self, length: int, layers: range) -> None:
        self.kv.crop(layers, length)
        self._crop_exit(self.ld, length)
        self._crop_exit(self.li, length)

    def _step(self, seq: list[int]) -> tuple[list[int], StepLog]:
        tm = self._timer()
        n, Ld, Li, N = len(seq), self.ld, self.li, self.lm.num_layers
        buf: list[int] = []
        inter_states: list[torch.Tensor] = []  # L_i states of seq[-1], buf[0..-2]
        confs: list[float] = []
        inner: list[dict[str, int]] = []
        x, p0 = seq[-1], n - 1  # frontier token and its position
        rejected_inter = False
        t = time.perf_counter()
        while len(buf) < self.ni:
            shallow: list[torch.Tensor] = []
            drafts: list[int] = []
            xx = x
            for j in range(self.nd):
                h = self.lm.run(self.lm.embed([xx]), 0, Ld, self.kv)
                self._record(Ld, h, p0 + j)
                shallow.append(h)
                t = tm.add("draft_layers_ms", t)
                tok, conf = _top1(self._exit_logits(Ld, h, p0 + j)[-1])
                t = tm.add("draft_head_ms", t)
                drafts.append(tok)
                confs.append(conf)
                xx = tok
            hm = self.lm.run(torch.cat(shallow, dim=1), Ld, Li, self.kv)
            self._record(Li, hm, p0)
            t = tm.add("inter_layers_ms", t)
            inter = self._exit_logits(Li, hm, p0).argmax(-1).tolist()
            t = tm.add("inter_head_ms", t)
            j = _accept_prefix(drafts, inter)
            appended = drafts if j == self.nd else drafts[:j] + [inter[j]]
            rejected_inter = rejected_inter or j < self.nd
            inner.append({"drafts": self.nd, "inter_accepted": j, "appended": len(appended)})
            inter_states.append(hm[:, :len(appended)])
            self._crop_upto(p0 + len(appended), range(0, Li))
            buf.extend(appended)
            x, p0 = appended[-1], p0 + len(appended)
        # full verification: L_i state of the frontier token, then layers L_i..N-1 over the buffer
        h = self.lm.run(self.lm.embed([x]), 0, Ld, self.kv)
        self._record(Ld, h, p0)
        h = self.lm.run(h, Ld, Li, self.kv)
        self._record(Li, h, p0)
        inter_states.append(h)
        t = tm.add("frontier_layers_ms", t)
        hv = self.lm.run(torch.cat(inter_states, dim=1), Li, N, self.kv)
        t = tm.add("full_layers_ms", t)
        ver = self.lm.head(hv)[0].argmax(-1).tolist()
        tm.add("full_head_ms", t)
        m = _accept_prefix(buf, ver)
        self._crop_upto(n + m, range(N))
        levels = (["inter"] if rejected_inter else []) + (["full"] if m < len(buf) else [])
        rejected_by = "+".join(levels) or None
        log = StepLog(drafts=self.nd * len(inner), offered=len(buf), accepted=m, committed=m + 1,
                      confidences=confs, rejected_by=rejected_by, inner=inner, stages_ms=tm.ms)
        return buf[:m] + [ver[m]], log


def greedy_reference(model: Any, prompt: list[int], max_new_tokens: int,
                     eos_token_id: int | None = None) -> list[int]:
    """Plain greedy tokens from transformers' own ``generate`` (the lossless reference in tests)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=0, do_sample=False, eos_token_id=eos_token_id,
                             pad_token_id=eos_token_id if eos_token_id is not None else 0)
    toks = out[0, len(prompt):].tolist()
    if eos_token_id is not None and eos_token_id in toks:
        toks = toks[:toks.index(eos_token_id) + 1]
    return toks
