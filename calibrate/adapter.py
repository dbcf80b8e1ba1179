"""Early-exit adapters for Kangaroo and HiSpec, and their training by self-distillation
(torch + transformers; imported only by ``simspec calibrate``).

An :class:`ExitAdapter` at exit layer ``ℓ`` turns the hidden state after the first ``ℓ`` decoder
layers into next-token logits: ``logits = lm_head(out_norm(h + attn(in_norm(h))))`` — one attention
block with its two norms and no MLP, as in Kangaroo (Liu et al. 2024); the LM head is the target's,
frozen. The attention block is initialised as a copy of decoder layer ``ℓ``'s attention with its
output projection zeroed, and ``out_norm`` as a copy of the model's final norm, so an untrained
adapter is exactly the *logit lens* (final norm + LM head applied to the exit hidden state).

Training (:func:`train_adapters`) matches the full model's next-token distribution (KL over the
teacher's top-``K`` tokens) from the exit hidden states, on prompts plus the model's own greedy
continuations; it reports the exit's top-1 agreement with the full model before (logit lens) and
after, on held-out prompts. One run trains any number of exits (Kangaroo needs one, HiSpec two).

On disk an adapter directory holds ``adapter.json`` (format, model, per-exit settings and training
report) and one ``exit<L>.safetensors`` per exit.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from simspec.calibrate.early_exit import LayeredLM
from simspec.errors import SimspecError

ADAPTER_FORMAT = "simspec-exit-adapter"
ADAPTER_VERSION = 1


class ExitAdapter(nn.Module):
    """One attention block + two RMS norms mapping exit-layer hidden states to LM-head inputs.

    ``slot`` is the KV-store slot its attention writes to (its ``layer_idx``)."""

    def __init__(self, lm: LayeredLM, exit_layer: int, slot: int) -> None:
        super().__init__()
        if not 0 < exit_layer < lm.num_layers:
            raise SimspecError(f"exit layer {exit_layer}: must be between 1 and {lm.num_layers - 1}")
        self.exit_layer = int(exit_layer)
        src = lm.layers[exit_layer]
        self.in_norm = copy.deepcopy(src.input_layernorm)
        self.attn = copy.deepcopy(src.self_attn)
        self.out_norm = copy.deepcopy(lm.base.norm)
        with torch.no_grad():
            self.attn.o_proj.weight.zero_()
            if getattr(self.attn.o_proj, "bias", None) is not None:
                self.attn.o_proj.bias.zero_()
        self.set_slot(slot)
        for p in self.parameters():
            p.requires_grad_(False)

    def set_slot(self, slot: int) -> None:
        self.slot = int(slot)
        self.attn.layer_idx = int(slot)

    def forward(self, lm: LayeredLM, h: torch.Tensor, pos0: int, kv: Any | None) -> torch.Tensor:
        """Normed hidden states ready for ``lm.head(..., normed=True)``."""
        a = lm.attention(self.attn, self.in_norm(h), pos0, kv)
        return self.out_norm(h + a)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------ save / load


def save_adapters(out_dir: Path, adapters: dict[int, ExitAdapter], info: dict[str, Any],
                  dtype: torch.dtype = torch.bfloat16) -> None:
    """Write ``exit<L>.safetensors`` per adapter and ``adapter.json`` (``info`` plus file names)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    exits_info = dict(info.get("exits", {}))
    for layer, ad in sorted(adapters.items()):
        fname = f"exit{layer}.safetensors"
        tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in ad.state_dict().items()}
        save_file(tensors, str(out_dir / fname), metadata={"format": ADAPTER_FORMAT,
                                                           "exit_layer": str(layer)})
        e = dict(exits_info.get(str(layer), {}))
        e.update({"file": fname, "n_params": ad.n_params(), "stored_dtype": str(dtype).replace("torch.", "")})
        exits_info[str(layer)] = e
    doc = dict(info)
    doc.update({"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "exits": exits_info})
    (out_dir / "adapter.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``adapter.json`` of an adapter directory (one-line error if missing or malformed)."""
    d = Path(adapter_dir)
    p = d / "adapter.json"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SimspecError(f"--adapter {d}: no adapter.json (not an adapter directory)") from None
    except (OSError, ValueError) as exc:
        raise SimspecError(f"adapter {p}: cannot read ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != ADAPTER_FORMAT:
        raise SimspecError(f"adapter {p}: field format: expected {ADAPTER_FORMAT!r}")
    if doc.get("version") != ADAPTER_VERSION:
        raise SimspecError(f"adapter {p}: field version: this simspec reads {ADAPTER_VERSION}, "
                           f"got {doc.get('version')!r}")
    if not isinstance(doc.get("exits"), dict) or not doc["exits"]:
        raise SimspecError(f"adapter {p}: field exits: no exits")
    return doc


def load_adapters(adapter_dir: str | Path, lm: LayeredLM, exits: list[int] | None = None,
                  first_slot: int | None = None) -> dict[int, ExitAdapter]:
    """Load the adapters for ``exits`` (all in the directory when None) onto ``lm``'s dtype/device.

    Slots are assigned ``first_slot, first_slot + 1, ...`` (default ``lm.num_layers``) in exit order.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    info = read_adapter_info(d)
    if int(info.get("num_layers", lm.num_layers)) != lm.num_layers or \
            int(info.get("hidden_size", lm.hidden_size)) != lm.hidden_size:
        raise SimspecError(f"adapter {d / 'adapter.json'}: trained for a model with "
                           f"{info.get('num_layers')} layers / hidden {info.get('hidden_size')}, this model has "
                           f"{lm.num_layers} / {lm.hidden_size}")
    have = sorted(int(k) for k in info["exits"])
    want = have if exits is None else list(exits)
    slot = lm.num_layers if first_slot is None else first_slot
    out: dict[int, ExitAdapter] = {}
    for layer in sorted(want):
        if layer not in have:
            raise SimspecError(f"adapter {d / 'adapter.json'}: field exits: no adapter for exit layer {layer} "
                               f"(has {', '.join(map(str, have))})")
        ad = ExitAdapter(lm, layer, slot)
        slot += 1
        path = d / info["exits"][str(layer)]["file"]
        try:
            state = load_file(str(path))
        except (OSError, Exception) as exc:  # safetensors raises its own error types
            raise SimspecError(f"adapter {path}: cannot read ({exc})") from None
        try:
            ad.load_state_dict({k: v.to(lm.dtype) for k, v in state.items()})
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise SimspecError(f"adapter {path}: weights do not fit this model ({first})") from None
        ad.to(device=lm.device, dtype=lm.dtype)
        ad.eval()
        out[layer] = ad
    return out


# ------------------------------------------------------------------------------------ training


@dataclass
class DistillData:
    """Teacher data for self-distillation, per sequence.

    ``hidden[L][s]``: exit-layer hidden states ``[T_s, H]`` (float32) of sequence ``s``;
    ``top_ids[s]`` / ``top_logp[s]``: the full model's top-``K`` next-token ids and log-probabilities
    ``[T_s, K]``; ``greedy[s]``: the full model's argmax ``[T_s]``; ``scored[s]``: positions whose
    next token was generated (the last prompt position onwards), used for agreement.
    """

    hidden: dict[int, list[torch.Tensor]]
    top_ids: list[torch.Tensor]
    top_logp: list[torch.Tensor]
    greedy: list[torch.Tensor]
    scored: list[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return int(sum(t.shape[0] for t in self.greedy))


def generate_continuations(lm: LayeredLM, prompts: list[list[int]], max_new_tokens: int,
                           eos_token_id: int | None) -> list[list[int]]:
    """Greedy continuations (token ids, EOS included if hit) of each prompt, one prompt at a time with a
    KV cache (batched ``generate`` with left padding is slower on CPU)."""
    from simspec.calibrate.runners import GreedyRunner

    runner = GreedyRunner(lm, eos_token_id)
    return [runner.generate(p, max_new_tokens).tokens for p in prompts]


def build_distill_data(lm: LayeredLM, sequences: list[tuple[list[int], list[int]]], exits: list[int],
                       top_k: int = 64) -> DistillData:
    """Run the full model over each ``(prompt, continuation)`` once and keep exit hidden states and the
    teacher's top-``K`` next-token distribution."""
    hidden: dict[int, list[torch.Tensor]] = {e: [] for e in exits}
    top_ids, top_logp, greedy, scored = [], [], [], []
    for prompt, cont in sequences:
        ids = prompt + cont
        kv = lm.new_kv()
        h = lm.embed(ids)
        start = 0
        with torch.no_grad():
            for e in sorted(exits):
                h = lm.run(h, start, e, kv)
                hidden[e].append(h[0].float().clone())
                start = e
            h = lm.run(h, start, lm.num_layers, kv)
            logp = torch.log_softmax(lm.head(h)[0], dim=-1)
        v, i = torch.topk(logp, top_k, dim=-1)
        top_ids.append(i)
        top_logp.append(v)
        greedy.append(i[:, 0].clone())
        scored.append(torch.arange(len(prompt) - 1, len(ids) - 1))
    return DistillData(hidden, top_ids, top_logp, greedy, scored)


def _student_logits(lm: LayeredLM, ad: ExitAdapter, h: torch.Tensor) -> torch.Tensor:
    x = h[None].to(lm.dtype)
    return lm.head(ad(lm, x, 0, None), normed=True)[0]


def distill_loss(lm: LayeredLM, ad: ExitAdapter, h: torch.Tensor, top_ids: torch.Tensor,
                 top_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher top-K, renormalised ‖ student) for one sequence (nats)."""
    logp_s = torch.log_softmax(_student_logits(lm, ad, h), dim=-1)
    t = torch.log_softmax(top_logp, dim=-1)  # renormalise the teacher over its top-K
    kl = (t.exp() * (t - logp_s.gather(-1, top_ids))).sum(-1)
    return kl.mean()


def agreement(lm: LayeredLM, ad: ExitAdapter, data: DistillData, exit_layer: int) -> float:
    """Top-1 agreement of the exit (through ``ad``) with the full model on the scored positions."""
    hit = tot = 0
    with torch.no_grad():
        for s, h in enumerate(data.hidden[exit_layer]):
            pred = _student_logits(lm, ad, h).argmax(-1)
            idx = data.scored[s]
            hit += int((pred[idx] == data.greedy[s][idx]).sum())
            tot += int(idx.numel())
    return hit / max(tot, 1)


@dataclass
class TrainReport:
    """What one exit's training did: losses (nats), agreement before/after, wall time."""

    exit_layer: int
    steps: int
    loss_first: float
    loss_last: float
    heldout_loss_before: float
    heldout_loss_after: float
    agreement_before: float
    agreement_after: float
    train_s: float
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["losses"] = [round(x, 5) for x in self.losses]
        return d


def _heldout_loss(lm: LayeredLM, ad: ExitAdapter, data: DistillData, e: int) -> float:
    with torch.no_grad():
        vals = [float(distill_loss(lm, ad, h, data.top_ids[s], data.top_logp[s]))
                for s, h in enumerate(data.hidden[e])]
    return sum(vals) / max(len(vals), 1)


def train_exit(lm: LayeredLM, ad: ExitAdapter, train: DistillData, heldout: DistillData | None, *,
               steps: int, lr: float = 1e-3, tokens_per_step: int = 512, seed: int = 0,
               log: Callable[[str], None] | None = None) -> TrainReport:
    """Train one adapter in place with Adam (cosine learning-rate decay); returns its report."""
    e = ad.exit_layer
    t0 = time.perf_counter()
    before = agreement(lm, ad, heldout, e) if heldout is not None else float("nan")
    hl_before = _heldout_loss(lm, ad, heldout, e) if heldout is not None else float("nan")
    params = [p for p in ad.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n_seq = len(train.hidden[e])
    losses: list[float] = []
    ad.train()
    order: list[int] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        opt.zero_grad()
        tokens = 0
        total = 0.0
        while tokens < tokens_per_step:
            if not order:
                order = torch.randperm(n_seq, generator=gen).tolist()
            s = order.pop()
            h = train.hidden[e][s]
            n = h.shape[0]
            loss = distill_loss(lm, ad, h, train.top_ids[s], train.top_logp[s])
            (loss * n / tokens_per_step).backward()
            total += float(loss.detach()) * n
            tokens += n
        opt.step()
        losses.append(total / tokens)
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"exit {e}: step {step + 1}/{steps} loss {losses[-1]:.4f}")
    ad.eval()
    for p in params:
        p.requires_grad_(False)
    after = agreement(lm, ad, heldout, e) if heldout is not None else float("nan")
    hl_after = _heldout_loss(lm, ad, heldout, e) if heldout is not None else float("nan")
    return TrainReport(exit_layer=e, steps=steps, loss_first=losses[0] if losses else float("nan"),
                       loss_last=losses[-1] if losses else float("nan"), heldout_loss_before=hl_before,
                       heldout_loss_after=hl_after, agreement_before=before, agreement_after=after,
                       train_s=time.perf_counter() - t0, losses=losses)


def train_adapters(lm: LayeredLM, eos_token_id: int | None, train_prompts: list[list[int]],
                   heldout_prompts: list[list[int]], exits: list[int], *, max_new_tokens: int = 64,
                   steps: int = 150, lr: float = 1e-2, tokens_per_step: int = 256, top_k: int = 64,
                   seed: int = 0, log: Callable[[str], None] | None = None
                   ) -> tuple[dict[int, ExitAdapter], dict[int, TrainReport], dict[str, Any]]:
    """Self-distil one adapter per exit in ``exits`` (see the module docstring).

    Continuations are the model's own greedy outputs (``max_new_tokens`` each). Returns the adapters,
    a report per exit and a summary (token counts, timings in seconds)."""
    torch.manual_seed(seed)
    for p in lm.model.parameters():  # only the adapters learn (no gradients for the frozen LM head)
        p.requires_grad_(False)
    t0 = time.perf_counter()
    conts = generate_continuations(lm, train_prompts + heldout_prompts, max_new_tokens, eos_token_id)
    t_gen = time.perf_counter() - t0
    if log:
        log(f"generated {sum(map(len, conts))} continuation tokens for {len(conts)} prompts in {t_gen:.1f} s")
    seqs = list(zip(train_prompts + heldout_prompts, conts))
    t1 = time.perf_counter()
    train = build_distill_data(lm, seqs[:len(train_prompts)], exits, top_k=top_k)
    held = build_distill_data(lm, seqs[len(train_prompts):], exits, top_k=top_k)
    t_teacher = time.perf_counter() - t1
    if log:
        log(f"teacher pass: {train.n_tokens} training / {held.n_tokens} held-out tokens in {t_teacher:.1f} s")
    adapters: dict[int, ExitAdapter] = {}
    reports: dict[int, TrainReport] = {}
    for slot, e in enumerate(sorted(exits)):
        ad = ExitAdapter(lm, e, lm.num_layers + slot)
        rep = train_exit(lm, ad, train, held, steps=steps, lr=lr, tokens_per_step=tokens_per_step,
                         seed=seed + e, log=log)
        if log:
            log(f"exit {e}: top-1 agreement with the full model on held-out prompts "
                f"{rep.agreement_before:.3f} (logit lens) -> {rep.agreement_after:.3f} "
                f"in {rep.train_s:.1f} s")
        adapters[e], reports[e] = ad, rep
    summary = {"n_train_prompts": len(train_prompts), "n_heldout_prompts": len(heldout_prompts),
               "train_tokens": train.n_tokens, "heldout_tokens": held.n_tokens,
               "heldout_scored_tokens": int(sum(int(s.numel()) for s in held.scored)),
               "generate_s": round(t_gen, 2), "teacher_s": round(t_teacher, 2),
               "total_s": round(time.perf_counter() - t0, 2)}
    return adapters, reports, summary
