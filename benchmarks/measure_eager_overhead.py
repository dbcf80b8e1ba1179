"""Measure, on this machine's CPU, the host-side costs of an eager Hugging Face decode that
``simspec profile analytic --engine eager`` uses (docs/methods.md § Engine modes):

1. operators (aten calls, i.e. GPU kernels on a GPU) per decoder layer, in the model prelude
   (embedding, rotary tables, mask) and in the head (final norm + LM head) of one decode forward of
   a Llama model in ``transformers`` (counted with a TorchDispatchMode: the count does not depend on
   the model's size);
2. host time per operator: the wall time of one decode forward of a tiny Llama (hidden 64, so the
   arithmetic is negligible and the time is Python + dispatcher), divided by its operator count;
3. per-forward overhead of ``generate``: the wall time per generated token of greedy
   ``model.generate`` minus the time of one bare decode forward of the same tiny model (logits
   processors, stopping criteria, cache and input bookkeeping, argmax).

Run: ``python benchmarks/measure_eager_overhead.py`` (needs torch + transformers; CPU only; ~1 min).
The numbers printed are the ones recorded in simspec/data/engines.json with this machine named.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # views, metadata and shape queries launch no GPU kernel
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if not any(name.startswith(p) for p in ("view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze",
                                                "squeeze", "slice", "select", "permute", "as_strided",
                                                "detach", "alias", "sym_", "_to_copy_noop", "lift_fresh",
                                                "reshape", "split", "unbind")) or name in ("tanh", "triu", "tril"):
            self.n += 1
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def tiny(layers: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=layers, vocab_size=128, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_inputs(model, ctx: int = 32):
    ids = torch.randint(0, 128, (1, ctx))
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return cache, torch.randint(0, 128, (1, 1))


def step(model, cache, nxt):
    return model(nxt, use_cache=True, **{_cache_kw(model): cache})


def count_ops(layers: int) -> int:
    model = tiny(layers)
    cache, nxt = decode_inputs(model)
    c = Count()
    with torch.no_grad(), c:
        step(model, cache, nxt)
    return c.n


def forward_ms(model, reps: int = 300) -> float:
    cache, nxt = decode_inputs(model)
    ts = []
    with torch.no_grad():
        for _ in range(20):
            step(model, cache, nxt)
            cache.crop(-1)
        for _ in range(reps):
            t0 = time.perf_counter()
            step(model, cache, nxt)
            ts.append(time.perf_counter() - t0)
            cache.crop(-1)
    return statistics.median(ts) * 1e3


def generate_ms_per_token(model, new: int = 64, reps: int = 15) -> float:
    ids = torch.randint(0, 128, (1, 32))
    ts = []
    with torch.no_grad():
        for _ in range(3):
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        for _ in range(reps):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            t2 = time.perf_counter()
            ts.append(((t1 - t0) - (t2 - t1)) / (new - 1))
    return statistics.median(ts) * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n2, n4 = count_ops(2), count_ops(4)
    per_layer = (n4 - n2) / 2
    outside = n2 - 2 * per_layer
    m = tiny(4)
    fwd = forward_ms(m)
    per_op_us = fwd * 1e3 / n4
    gen = generate_ms_per_token(m)
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"transformers {__import__('transformers').__version__}, 1 thread",
           "ops_per_layer": per_layer, "ops_outside_layers": outside,
           "decode_forward_ms_tiny_4_layers": round(fwd, 4), "host_us_per_op": round(per_op_us, 2),
           "generate_ms_per_token": round(gen, 4),
           "generate_overhead_ms_per_forward": round(gen - fwd, 4)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
