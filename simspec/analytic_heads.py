"""Analytic (roofline) drafter stages for the head-based speculation methods: EAGLE / EAGLE-3 heads,
Medusa heads and MTP modules, from their public configs. Used by :func:`simspec.analytic.build_profile`
(``simspec profile analytic --eagle/--eagle3/--medusa/--mtp``); each adds one stage named as the
method reads it (``eagle_head``, ``eagle3_head``, ``medusa_heads``, ``mtp_head``), a ``grid`` over the
target's axes, priced on the target's GPUs and tensor-parallel degree (vLLM and SGLang run the
drafter with the target's TP). Per drafter pass over B requests of t tokens (T = B·t):

- ``eagle_head`` (EAGLE-1/2; Li et al. 2024): token embedding + fc [embedding; feature] 2h → h +
  ``num_hidden_layers`` decoder layers of the head's config (1 in the public checkpoints) + the
  target's LM head (shared);
- ``eagle3_head`` (EAGLE-3; Li et al. 2025): embedding + fc over the three target features 3h → h +
  one decoder layer whose QKV projection reads [embedding; hidden], 2h wide (an extra h×(q+2kv)
  GEMM) + the head's own LM head over ``draft_vocab_size`` tokens; the fc is charged on every pass
  (it runs on the target features at the first pass only: an upper bound for later passes);
- ``mtp_head`` (DeepSeek-V3 §2.2): embedding + eh_proj 2h → h + one decoder layer of the target's
  config (dense MLP: the roofline has no MoE) + the shared LM head, per module pass;
- ``medusa_heads`` (Cai et al. 2024): ``medusa_num_heads`` × (one residual block, an h×h linear + SiLU,
  and its own LM head), all on the same hidden state, in one pass.

Kernel issue: the layer's kernels + the LM head's + the embedding's + 1 (the fc), per pass; the
per-forward overhead is the profile's ``draft`` role (Medusa's heads run inside the verification
forward: the method charges no overhead for them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from simspec.errors import ConfigError

HEAD_KINDS = ("eagle", "eagle3", "medusa", "mtp")
STAGE_OF = {"eagle": "eagle_head", "eagle3": "eagle3_head", "medusa": "medusa_heads", "mtp": "mtp_head"}


@dataclass(frozen=True)
class HeadSpec:
    """One drafter head: ``kind``, its decoder-layer config (None for Medusa), ``n_heads`` (Medusa),
    ``draft_vocab`` (EAGLE-3's own vocabulary, else the target's), ``source``."""

    kind: str
    config: Any
    n_heads: int
    draft_vocab: int
    source: str


def load_head(kind: str, name_or_path: str | None, target) -> HeadSpec:
    """A head of ``kind`` for ``target`` (a :class:`simspec.analytic.ModelConfig`): ``eagle`` and
    ``eagle3`` read the head's config.json (bundled name or path); ``medusa`` a config with
    ``medusa_num_heads``; ``mtp`` needs none (the target's layer; ``name_or_path`` = module count)."""
    from simspec.analytic import ModelConfig, bundled_models

    if kind not in HEAD_KINDS:
        raise ConfigError(f"head kind {kind!r}: choose from {', '.join(HEAD_KINDS)}")
    flag = f"--{kind}"
    if kind == "mtp":
        return HeadSpec("mtp", target, 1, target.vocab_size, "the target's own layer (an MTP module)")
    bundled = bundled_models()
    path = bundled.get(str(name_or_path).lower()) or Path(str(name_or_path))
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{flag} {name_or_path!r}: no such file and no bundled config of that name "
                          f"(bundled: {', '.join(bundled)})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read a JSON config ({exc})") from None
    source = str(doc.get("_simspec_source", path.name))
    if kind == "medusa":
        n = doc.get("medusa_num_heads")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"{flag} {path}: field medusa_num_heads: expected a positive integer, got {n!r}")
        for key in ("hidden_size", "vocab_size"):
            if doc.get(key) not in (None, getattr(target, key)):
                raise ConfigError(f"{flag} {path}: field {key}: {doc[key]} does not match the target's "
                                  f"{getattr(target, key)}")
        return HeadSpec("medusa", None, n, target.vocab_size, source)
    cfg = ModelConfig.from_hf(doc, f"{flag} {path}")
    if cfg.hidden_size != target.hidden_size:
        raise ConfigError(f"{flag} {path}: field hidden_size: {cfg.hidden_size} does not match the target's "
                          f"{target.hidden_size} (the head reads the target's hidden states)")
    dv = doc.get("draft_vocab_size", cfg.vocab_size) if kind == "eagle3" else cfg.vocab_size
    if isinstance(dv, bool) or not isinstance(dv, int) or dv < 1:
        raise ConfigError(f"{flag} {path}: field draft_vocab_size: expected a positive integer, got {dv!r}")
    return HeadSpec(kind, cfg, 1, dv, source)


def head_pass_ms(rf, target, head: HeadSpec, B, t, c):
    """One drafter pass (ms, no per-forward overhead) over B requests of t tokens with c cached."""
    T = B * t
    h = target.hidden_size
    eng = rf.engine
    if head.kind == "medusa":
        sec = 0.0 * T
        for _ in range(head.n_heads):
            sec = sec + rf._gemm(T, h * h, h, h) + sum(rf.lm_head_parts(target, B, t, c).values())
        return 1e3 * rf._issue(sec, head.n_heads * (1 + eng.kernels_lm_head))
    m = head.config
    fc_in = 3 if head.kind == "eagle3" else 2
    sec = sum(rf.embed_parts(m, B, t, c).values()) + rf._gemm(T, fc_in * h * h, fc_in * h, h)
    layers = m.num_layers if head.kind == "eagle" else 1
    sec = sec + layers * sum(rf.layer_parts(m, B, t, c).values())
    if head.kind == "eagle3":
        q, kv, _ = rf._split(m, rf.tp)
        sec = sec + rf._gemm(T, h * (q + 2 * kv), h, q + 2 * kv)
    head_m = replace(m, vocab_size=head.draft_vocab) if head.draft_vocab != m.vocab_size else m
    sec = sec + sum(rf.lm_head_parts(head_m, B, t, c).values())
    kernels = layers * eng.kernels_per_layer + eng.kernels_lm_head + eng.kernels_embed + 1
    return 1e3 * rf._issue(sec, kernels)


def head_params(target, head: HeadSpec) -> int:
    """Weights of the head (its own, not the target's shared embedding/LM head)."""
    h = target.hidden_size
    if head.kind == "medusa":
        return head.n_heads * (h * h + h * target.vocab_size)
    m = head.config
    fc_in = 3 if head.kind == "eagle3" else 2
    p = fc_in * h * h + (m.num_layers if head.kind == "eagle" else 1) * m.layer_params()
    if head.kind == "eagle3":
        q, kv = m.q_dim, m.kv_dim
        p += h * (q + 2 * kv) + head.draft_vocab * h
    return int(p)


def head_stages(rf, target, heads: list[HeadSpec], grid_stage, axes, valid) -> tuple[dict, dict]:
    """(stages, models entries) for ``heads``; ``grid_stage`` is analytic's grid builder. A models
    entry carries the head's weights and KV bytes per token (one layer's worth; Medusa none), so
    ``--gpu-memory-utilization`` counts them."""
    stages, models = {}, {}
    for hd in heads:
        stage = STAGE_OF[hd.kind]
        what = {"eagle": "EAGLE head pass: embedding + fc 2h->h + decoder layer(s) + the target's LM head",
                "eagle3": f"EAGLE-3 head pass: embedding + fc 3h->h + a decoder layer with 2h-wide QKV input + "
                          f"its LM head over {hd.draft_vocab} tokens",
                "mtp": "MTP module pass: embedding + eh_proj 2h->h + one target decoder layer + shared LM head",
                "medusa": f"{hd.n_heads} Medusa heads (residual block + own LM head each), one pass"}[hd.kind]
        stages[stage] = grid_stage(lambda B, t, c, hd=hd: head_pass_ms(rf, target, hd, B, t, c), axes,
                                   f"{what} [{hd.source}]", valid)
        kv = 0 if hd.kind == "medusa" else hd.config.kv_bytes_per_token(rf.s, rf.tp) // max(hd.config.num_layers, 1)
        if hd.kind == "eagle":
            kv *= hd.config.num_layers
        models[stage] = {"kind": hd.kind, "params": head_params(target, hd), "source": hd.source,
                         "weights_bytes": rf.s * head_params(target, hd), "kv_bytes_per_token": kv,
                         **({"medusa_num_heads": hd.n_heads} if hd.kind == "medusa" else {}),
                         **({"draft_vocab_size": hd.draft_vocab} if hd.kind == "eagle3" else {})}
    return stages, models
