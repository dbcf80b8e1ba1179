"""Layer-by-layer forward of a Hugging Face decoder-only LM, for speculative runners that exit early
(torch + transformers; imported only by ``simspec calibrate``).

:class:`LayeredLM` wraps a Llama-style causal LM (``model.model.layers``, ``embed_tokens``, ``norm``,
``rotary_emb``, ``model.lm_head``) and runs any contiguous slice of its decoder layers over new tokens,
appending their keys/values to a :class:`KVStore`. The store keeps one key/value pair per *slot*
(slot ``i < num_layers`` is decoder layer ``i``; further slots belong to exit adapters), and each
slot has its own length, so shallow layers can hold KV for drafted tokens that deeper layers have not
seen yet (Kangaroo, HiSpec).

Invariant used by every call: the tokens fed to ``run(h, start, end, kv)`` sit at absolute positions
``kv.length(start), kv.length(start) + 1, ...``; all slots in ``[start, end)`` must have that same
length. Causal masking is explicit (a query at position ``p`` sees keys ``0..p``), so SDPA's
top-left-aligned ``is_causal`` is never relied on.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def cache_kwarg(fn: Any) -> str:
    """Name of the KV-cache keyword of a transformers layer/attention ``forward`` (``cache`` in
    transformers 5.x, ``past_key_values`` / ``past_key_value`` before)."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    return "past_key_values"


class KVStore:
    """Per-slot key/value tensors (shape ``[batch, kv_heads, tokens, head_dim]``).

    Duck-types the one method transformers attention layers call on a cache:
    ``update(key_states, value_states, layer_idx, ...) -> (keys, values)``.
    """

    def __init__(self, n_slots: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_slots
        self.values: list[torch.Tensor | None] = [None] * n_slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if k is None:
            k, v = key_states, value_states
        else:
            k = torch.cat([k, key_states], dim=-2)
            v = torch.cat([v, value_states], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def length(self, slot: int) -> int:
        """Tokens cached in ``slot``."""
        k = self.keys[slot]
        return 0 if k is None else int(k.shape[-2])

    def get_seq_length(self, layer_idx: int = 0) -> int:  # transformers-style alias
        return self.length(layer_idx)

    def crop(self, slots: range | list[int], length: int) -> None:
        """Keep at most the first ``length`` tokens of each slot in ``slots``."""
        for s in slots:
            k = self.keys[s]
            if k is not None and k.shape[-2] > length:
                self.keys[s] = k[..., :length, :]
                self.values[s] = self.values[s][..., :length, :]  # type: ignore[index]


def causal_mask(q_len: int, past: int, dtype: torch.dtype, device: Any) -> torch.Tensor | None:
    """Additive mask ``[1, 1, q_len, past + q_len]``: query ``i`` (at position ``past + i``) sees keys
    ``0..past + i``. ``None`` for a single query (it sees everything cached)."""
    if q_len == 1:
        return None
    q = torch.arange(q_len, device=device)[:, None] + past
    k = torch.arange(past + q_len, device=device)[None, :]
    mask = torch.zeros(q_len, past + q_len, dtype=dtype, device=device)
    mask.masked_fill_(k > q, torch.finfo(dtype).min)
    return mask[None, None]


class LayeredLM:
    """A Llama-style causal LM run slice by slice (see the module docstring).

    ``num_layers`` decoder layers; ``run`` feeds hidden states through ``[start, end)``; ``head``
    applies the final norm and LM head; ``embed`` looks up token embeddings.
    """

    def __init__(self, model: Any) -> None:
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for attr in ("layers", "embed_tokens", "norm", "rotary_emb"):
            if not hasattr(base, attr):
                raise TypeError(f"model {type(model).__name__} has no decoder.{attr}: only Llama-style "
                                "decoders (layers, embed_tokens, norm, rotary_emb) are supported")
        self.model = model
        self.base = base
        self.layers = base.layers
        self.num_layers = len(base.layers)
        self.hidden_size = int(model.config.hidden_size)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self._layer_cache_kw = cache_kwarg(self.layers[0].forward)
        self._attn_cache_kw = cache_kwarg(self.layers[0].self_attn.forward)

    # ------------------------------------------------------------------ pieces
    def new_kv(self, extra_slots: int = 0) -> KVStore:
        """An empty store with one slot per decoder layer plus ``extra_slots`` (adapters)."""
        return KVStore(self.num_layers + extra_slots)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """Token embeddings ``[1, len(ids), hidden]``."""
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.base.embed_tokens(t)

    def rope(self, h: torch.Tensor, pos0: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Rotary (cos, sin) and position ids for ``h.shape[1]`` tokens starting at ``pos0``."""
        pos = torch.arange(pos0, pos0 + h.shape[1], device=h.device)[None]
        return self.base.rotary_emb(h, pos), pos

    def run(self, h: torch.Tensor, start: int, end: int, kv: KVStore) -> torch.Tensor:
        """Feed ``h`` (``[1, T, hidden]``) through decoder layers ``start..end-1``, appending their KV."""
        if end <= start:
            return h
        past = kv.length(start)
        for i in range(start + 1, end):
            if kv.length(i) != past:
                raise RuntimeError(f"KV bookkeeping: layer {i} holds {kv.length(i)} tokens, layer {start} "
                                   f"holds {past}")
        pe, pos = self.rope(h, past)
        mask = causal_mask(h.shape[1], past, h.dtype, h.device)
        kw = {self._layer_cache_kw: kv}
        for i in range(start, end):
            out = self.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                                 use_cache=True, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def head(self, h: torch.Tensor, normed: bool = False) -> torch.Tensor:
        """Logits (float32) for hidden states ``h``; ``normed`` skips the final norm."""
        x = h if normed else self.base.norm(h)
        return self.model.lm_head(x).float()

    def attention(self, attn: Any, x: torch.Tensor, pos0: int, kv: KVStore | None) -> torch.Tensor:
        """Run a stand-alone attention module (an exit adapter's) over ``x`` at positions ``pos0..``.

        With ``kv`` it appends to the attention's slot (its ``layer_idx``); without, ``x`` is a whole
        sequence attended causally (training)."""
        pe, _ = self.rope(x, pos0)
        mask = causal_mask(x.shape[1], pos0 if kv is not None else 0, x.dtype, x.device)
        kw = {self._attn_cache_kw: kv} if kv is not None else {}
        out = attn(hidden_states=x, position_embeddings=pe, attention_mask=mask, **kw)
        return out[0] if isinstance(out, tuple) else out
