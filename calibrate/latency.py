"""Latency calibration: time the pieces of a real model at real batch shapes and build the
profile's ``latency`` section (torch + transformers; reached only from ``simspec calibrate``).

Stages (each a function of batch size ``B``, tokens fed per request ``T`` and context tokens per
request ``C`` already in the KV cache):

- ``layer``: one decoder layer (layer 0, whose input is exactly the token embeddings) attending over
  a real KV cache of ``C`` tokens per request;
- ``lm_head``: final norm + LM head over all ``B*T`` fed tokens (context-independent);
- ``embed``: the per-forward prelude every layer shares: token-embedding lookup, rotary position
  tables and the causal attention mask for a cache of ``C`` tokens;
- ``adapter``: a Kangaroo-style adapter (input norm, one attention block of the model's own
  attention class with its own KV cache of ``C`` tokens, residual, final norm; no MLP);
- ``draft_step``: one whole forward of the draft model (``--draft``), with its KV cache.

The KV cache is a transformers ``StaticCache`` sized to exactly ``C+T`` tokens, so a step writes its
new keys/values in place and attends over exactly ``C+T`` keys, as a serving engine's preallocated
(paged) cache does; its first ``C`` positions hold the keys/values a real prefill of real text
produced (one prefill of the longest context, sliced: causality makes a prefix's keys/values equal
to the prefill of that prefix). Inputs are the embeddings of real text tokens. After every timed
call the cache is cropped back to ``C`` tokens (outside the timed region).

Timing: CUDA events around the call plus a synchronise on CUDA; ``time.perf_counter`` on CPU
(eager CPU ops are synchronous). Warm-up calls first, then repeats until a time budget or a repeat
cap; every point keeps the median and the interquartile range (``spread_ms``).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from simspec.calibrate.fit import Point, fit_stage
from simspec.calibrate.models import LoadedModel
from simspec.errors import SimspecError

STAGES = ("embed", "layer", "lm_head", "adapter", "draft_step")
REMEASURE_REL_SPREAD = 0.2  # re-measure a point whose interquartile range exceeds 20% of its median
REMEASURE_MAX_MS = 100.0  # ... unless one call takes longer (long calls average short disturbances out)

# A public-domain passage (the opening of "Pride and Prejudice") tokenised and repeated to make
# real contexts and real next tokens.
_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is "
    "let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long "
    "has just been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do you not "
    "want to know who has taken it?\" cried his wife impatiently. \"You want to tell me, and I have "
    "no objection to hearing it.\" This was invitation enough. "
)


# ------------------------------------------------------------------------------------------ grid


@dataclass
class Grid:
    """What to measure: the training grid (full product of the three axes), the off-grid held-out
    shapes ``[B, T, C]``, and the timing budget per point."""

    name: str
    batch_sizes: list[int]
    tokens_per_request: list[int]
    context_tokens: list[int]
    heldout: list[list[int]]
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 25
    target_s: float = 0.2  # stop repeating once this much time has been measured at a point
    composition_check: list[list[int]] = field(default_factory=list)
    # the LM head's cost depends on B*T only, so it may be measured on fewer batch sizes
    lm_head_batch_sizes: list[int] | None = None

    def check(self, where: str) -> None:
        for axis in ("batch_sizes", "tokens_per_request", "context_tokens"):
            vals = getattr(self, axis)
            if not vals or any((not isinstance(v, int)) or isinstance(v, bool) for v in vals):
                raise SimspecError(f"grid {where}: field {axis}: expected a non-empty list of integers")
            if sorted(set(vals)) != list(vals):
                raise SimspecError(f"grid {where}: field {axis}: values must be strictly increasing")
            low = 0 if axis == "context_tokens" else 1
            if vals[0] < low:
                raise SimspecError(f"grid {where}: field {axis}: values must be >= {low}")
        lb = self.lm_head_batch_sizes
        if lb is not None and (not lb or sorted(set(lb)) != list(lb) or lb[0] < 1
                               or any(not isinstance(v, int) or isinstance(v, bool) for v in lb)):
            raise SimspecError(f"grid {where}: field lm_head_batch_sizes: expected a strictly increasing "
                               "list of integers >= 1")
        for key in ("heldout", "composition_check"):
            for i, p in enumerate(getattr(self, key)):
                if (not isinstance(p, list) or len(p) != 3 or any(not isinstance(v, int) for v in p)
                        or p[0] < 1 or p[1] < 1 or p[2] < 0):
                    raise SimspecError(f"grid {where}: field {key}[{i}]: expected [B>=1, T>=1, C>=0]")
        if self.warmup < 0 or self.min_repeats < 1 or self.max_repeats < self.min_repeats:
            raise SimspecError(f"grid {where}: field warmup/min_repeats/max_repeats: need warmup >= 0 "
                               "and 1 <= min_repeats <= max_repeats")

    @property
    def n_points(self) -> int:
        return len(self.batch_sizes) * len(self.tokens_per_request) * len(self.context_tokens)


# tokens per request: 1 = decode; 2..9 = verify of k = 1..8 drafts; larger = prefill chunks.
GRIDS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_sizes=[1, 4], tokens_per_request=[1, 3, 9], context_tokens=[64, 256],
                 heldout=[[2, 2, 128], [3, 5, 160], [2, 7, 200]], warmup=1, min_repeats=3,
                 max_repeats=8, target_s=0.03, composition_check=[[1, 1, 64]]),
    # quick: every integer batch size up to 8 and every verify width up to k=8 is a grid node (CPU
    # GEMM kernels are not smooth in the number of rows, so interpolating across B or T there would
    # be the largest error); held-out shapes sit between the context nodes and the prefill lengths.
    "quick": dict(batch_sizes=[1, 2, 3, 4, 5, 6, 7, 8],
                  tokens_per_request=[1, 2, 3, 4, 5, 6, 7, 8, 9, 32, 128, 256],
                  context_tokens=[0, 128, 512, 1024],
                  heldout=[[1, 1, 256], [1, 5, 768], [2, 3, 384], [3, 1, 64], [4, 4, 640],
                           [5, 2, 900], [6, 1, 300], [7, 6, 200], [8, 1, 768], [8, 9, 384],
                           [2, 64, 256], [4, 16, 768], [1, 96, 384], [8, 48, 0], [3, 20, 128],
                           [6, 80, 600]],
                  warmup=1, min_repeats=3, max_repeats=15, target_s=0.1, lm_head_batch_sizes=[1, 2, 4, 8],
                  composition_check=[[1, 1, 128], [1, 5, 128], [4, 1, 512], [4, 5, 512]]),
    "full": dict(batch_sizes=[1, 2, 4, 8, 16, 32, 64],
                 tokens_per_request=[1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 64, 256, 1024],
                 context_tokens=[0, 256, 1024, 2048, 4096, 8192],
                 heldout=[[1, 4, 512], [1, 7, 3072], [3, 2, 1536], [3, 5, 6144], [6, 1, 768],
                          [12, 3, 1536], [12, 9, 3072], [24, 1, 6144], [24, 4, 512], [48, 2, 2048],
                          [48, 6, 1024], [5, 32, 1024], [10, 128, 512], [2, 512, 2048],
                          [40, 1, 4096], [20, 8, 6144]],
                 warmup=3, min_repeats=10, max_repeats=50, target_s=0.3,
                 composition_check=[[1, 1, 1024], [1, 5, 1024], [8, 1, 2048], [8, 5, 2048],
                                    [32, 1, 1024]]),
}


from simspec.calibrate.grids import EXTRA_GRIDS  # noqa: E402  (serving / h200-8min / dry-run)

GRIDS.update(EXTRA_GRIDS)


def load_grid(spec: str) -> Grid:
    """A named grid (``tiny``, ``quick``, ``full``) or a JSON/YAML file with the same keys:
    ``batch_sizes``, ``tokens_per_request``, ``context_tokens`` (lists), optional ``heldout``
    (list of ``[B, T, C]``), ``warmup``, ``min_repeats``, ``max_repeats``, ``target_s``,
    ``composition_check``."""
    if spec in GRIDS:
        g = Grid(name=spec, **GRIDS[spec])
        g.check(spec)
        return g
    p = Path(spec)
    if not p.is_file():
        raise SimspecError(f"--grid {spec!r}: not one of {', '.join(GRIDS)} and no such file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except (OSError, ValueError) as exc:
        raise SimspecError(f"grid {p}: cannot parse ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # yaml.YAMLError
        raise SimspecError(f"grid {p}: cannot parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SimspecError(f"grid {p}: expected a mapping of grid settings")
    known = {f for f in Grid.__dataclass_fields__ if f != "name"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise SimspecError(f"grid {p}: field {unknown[0]}: unknown (known: {', '.join(sorted(known))})")
    for key in ("batch_sizes", "tokens_per_request", "context_tokens"):
        if key not in doc:
            raise SimspecError(f"grid {p}: field {key}: missing")
    doc.setdefault("heldout", [])
    try:
        g = Grid(name=str(p), **doc)
    except TypeError as exc:
        raise SimspecError(f"grid {p}: {exc}") from None
    g.check(str(p))
    return g


# ---------------------------------------------------------------------------------------- timing


class GraphCaptureError(RuntimeError):
    """A stage's call could not be captured into a CUDA graph (a host sync or an unsupported op)."""


class Timer:
    """Times a zero-argument callable: warm-ups, then repeats; returns (median_ms, iqr_ms, n).

    With ``cuda_graphs`` (CUDA only) the call sequence ``n_calls × (run(); reset())`` is captured
    once into a CUDA graph after side-stream warm-ups, and each repeat times one graph replay
    (divided by ``n_calls``): the engine mode where a serving step's kernels are launched from a
    captured graph, without Python or launch overhead. Eager mode times ``run()`` itself."""

    def __init__(self, device: str, grid: Grid, cuda_graphs: bool = False):
        self.cuda = device.startswith("cuda")
        self.device = device
        self.grid = grid
        self.cuda_graphs = bool(cuda_graphs and self.cuda)

    @torch.inference_mode()
    def measure(self, run: Callable[[], Any], reset: Callable[[], None], n_calls: int = 1,
                graphs: bool | None = None) -> tuple[float, float, int]:
        if self.cuda_graphs if graphs is None else (graphs and self.cuda):
            return self._measure_graph(run, reset, max(1, n_calls))
        g = self.grid
        for _ in range(g.warmup):
            run()
            reset()
        times: list[float] = []
        spent = 0.0
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
        while len(times) < g.min_repeats or (len(times) < g.max_repeats and spent < g.target_s):
            if self.cuda:
                start.record()
                run()
                end.record()
                torch.cuda.synchronize(self.device)
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                run()
                ms = (time.perf_counter() - t0) * 1e3
            reset()
            times.append(ms)
            spent += ms / 1e3
        return statistics.median(times), _iqr(times), len(times)

    def _measure_graph(self, run: Callable[[], Any], reset: Callable[[], None], n_calls: int
                       ) -> tuple[float, float, int]:
        g = self.grid
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-ups off the capture stream, as torch's docs require
            for _ in range(max(1, g.warmup) * n_calls):
                run()
                reset()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(n_calls):
                    run()
                    reset()
        except Exception as exc:  # capture failed: a host sync or an op graphs cannot hold
            del graph
            torch.cuda.synchronize(self.device)
            raise GraphCaptureError(str(exc).strip().splitlines()[0] if str(exc).strip()
                                    else type(exc).__name__) from None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(g.warmup):
            graph.replay()
        torch.cuda.synchronize(self.device)
        times: list[float] = []
        spent = 0.0
        while len(times) < g.min_repeats or (len(times) < g.max_repeats and spent < g.target_s):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize(self.device)
            ms = start.elapsed_time(end) / n_calls
            times.append(ms)
            spent += ms * n_calls / 1e3
        del graph
        return statistics.median(times), _iqr(times), len(times)


def _iqr(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[2] - q[0]


# ------------------------------------------------------------------------------ model structure


@dataclass
class Parts:
    """The pieces of a causal LM that calibration times (looked up by the conventional names of the
    Llama / Mistral / Qwen / Gemma families in transformers)."""

    base: nn.Module
    layers: Any
    norm: nn.Module
    rotary: nn.Module
    embed: nn.Module
    lm_head: nn.Module
    config: Any


def model_parts(lm: LoadedModel) -> Parts:
    model = lm.model
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    missing = [a for a in ("layers", "norm", "rotary_emb") if base is None or not hasattr(base, a)]
    if missing:
        raise SimspecError(f"--model {lm.model_id}: unsupported architecture "
                           f"{type(model).__name__} (no {', '.join(missing)} on the decoder); supported: "
                           "Llama/Mistral/Qwen/Gemma-style decoders")
    return Parts(base=base, layers=base.layers, norm=base.norm, rotary=base.rotary_emb,
                 embed=model.get_input_embeddings(), lm_head=model.get_output_embeddings(),
                 config=model.config)


def _cache_kwarg(module: nn.Module) -> str:
    """The keyword a module's forward takes its KV cache by (``cache`` in transformers >= 5.x,
    ``past_key_values`` before)."""
    fwd = module.forward
    params = inspect.signature(fwd).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    if "past_key_value" in params:
        return "past_key_value"
    return "cache"


class Adapter(nn.Module):
    """A Kangaroo-style early-exit adapter: input norm, one attention block (the model's own
    attention class, built from its config), residual, and a final norm — no MLP."""

    def __init__(self, parts: Parts):
        super().__init__()
        import copy

        layer0 = parts.layers[0]
        attn_cls = type(layer0.self_attn)
        try:
            self.self_attn = attn_cls(parts.config, layer_idx=0)
        except TypeError:
            self.self_attn = copy.deepcopy(layer0.self_attn)
        self.input_norm = copy.deepcopy(layer0.input_layernorm)
        self.final_norm = copy.deepcopy(parts.norm)
        self.cache_kw = _cache_kwarg(self.self_attn)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, position_ids=None,
                cache=None, **kwargs):
        residual = hidden_states
        h = self.input_norm(hidden_states)
        h = self.self_attn(hidden_states=h, attention_mask=attention_mask,
                           position_embeddings=position_embeddings, position_ids=position_ids,
                           **{self.cache_kw: cache})[0]
        return self.final_norm(residual + h)


def _static_cache(config: Any, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_len)


def _dynamic_cache(config: Any):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


def _causal_mask(config: Any, embeds, cache, position_ids):
    from transformers.masking_utils import create_causal_mask

    sig = inspect.signature(create_causal_mask).parameters
    kw = {"config": config, "inputs_embeds": embeds, "attention_mask": None, "position_ids": position_ids}
    kw["cache" if "cache" in sig else "past_key_values"] = cache
    if "cache_position" in sig:
        c0 = int(position_ids[0, 0])
        kw["cache_position"] = torch.arange(c0, c0 + embeds.shape[1], device=embeds.device)
    return create_causal_mask(**kw)


# ------------------------------------------------------------------------------ stage benchmarks


class TokenSource:
    """Token ids to feed: ``rows`` distinct passages of the text (different starting offsets), long
    enough for ``length`` tokens each. Without a tokenizer (random-weight models) the passage is a
    seeded pseudo-random sequence of ids below ``vocab_size`` (latency does not depend on which
    ids)."""

    def __init__(self, tokenizer: Any, device: str, vocab_size: int | None = None):
        if tokenizer is None:
            if not vocab_size:
                raise SimspecError("calibration without a tokenizer needs the model's vocab_size")
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, int(vocab_size), (4099,), generator=gen).tolist()
        else:
            ids = tokenizer(_TEXT, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SimspecError("tokenizer produced no tokens for the calibration text")
        self.ids = list(ids)
        self.device = device

    def batch(self, rows: int, length: int, offset: int = 0) -> torch.Tensor:
        n = len(self.ids)
        out = [[self.ids[(r * 37 + offset + i) % n] for i in range(length)] for r in range(rows)]
        return torch.tensor(out, dtype=torch.long, device=self.device)


def _tile_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat the first dimension cyclically to ``rows`` rows (contiguous)."""
    reps = math.ceil(rows / t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:rows].contiguous()


class ModuleStage:
    """Time a layer-like module (a decoder layer or the adapter) with its own KV cache.

    ``pool`` lists ``(module, layer_idx)``: successive timed calls rotate through the pool, so a
    module's weights have been evicted from the last-level cache by the others before it runs again,
    as in a real forward pass where the other layers run in between (see :func:`pool_size`). Every
    pool member gets its own KV cache holding the real prefill keys/values of the first member
    (timing does not depend on the values)."""

    def __init__(self, name: str, pool: Sequence[tuple[nn.Module, int]], parts: Parts, tokens: TokenSource,
                 max_context: int, distinct_rows: int, cache_kw: str):
        self.name = name
        self.pool = list(pool)
        self.n_calls = len(self.pool)  # one timed call per pool member before the rotation repeats
        self.parts = parts
        self.tokens = tokens
        self.cache_kw = cache_kw
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rows = distinct_rows
        if max_context > 0:
            self._prefill(max_context)

    @torch.inference_mode()
    def _prefill(self, length: int) -> None:
        """One real prefill of ``length`` tokens for ``rows`` distinct passages; keep K/V."""
        module, idx = self.pool[0]
        ids = self.tokens.batch(self.rows, length)
        emb = self.parts.embed(ids)
        pos = torch.arange(length, device=ids.device).unsqueeze(0).expand(self.rows, -1)
        cache = _dynamic_cache(self.parts.config)
        mask = _causal_mask(self.parts.config, emb, cache, pos)
        pe = self.parts.rotary(emb, pos)
        module(emb, attention_mask=mask, position_ids=pos, position_embeddings=pe,
               use_cache=True, **{self.cache_kw: cache})
        layer = cache.layers[idx]
        self.kv = (layer.keys.detach(), layer.values.detach())

    @torch.inference_mode()
    def prepare(self, b: int, t: int, c: int):
        """Return ``(run, reset)`` for one point ``(B, T, C)``."""
        cfg = self.parts.config
        cache = _static_cache(cfg, c + t)
        if c > 0:
            k_c, v_c = (_tile_rows(x[:, :, :c], b) for x in self.kv)
        for _, idx in self.pool:
            if c > 0:
                cache.update(k_c, v_c, idx)  # copies into this layer's own static buffer
            elif not getattr(cache.layers[idx], "is_initialized", True):
                z = _kv_zeros(cfg, b, self.parts.embed.weight)
                cache.layers[idx].lazy_initialization(z, z)
        ids = self.tokens.batch(b, t, offset=c)
        emb = self.parts.embed(ids)
        pos = torch.arange(c, c + t, device=ids.device).unsqueeze(0).expand(b, -1)
        mask = _causal_mask(cfg, emb, cache, pos)
        pe = self.parts.rotary(emb, pos)
        kw = self.cache_kw
        calls = [(module, cache.layers[idx], {kw: cache}) for module, idx in self.pool]
        state = [0]

        def run():
            module, _, ckw = calls[state[0]]
            return module(emb, attention_mask=mask, position_ids=pos, position_embeddings=pe,
                          use_cache=True, **ckw)

        def reset():
            _crop_static(calls[state[0]][1], t)
            state[0] = (state[0] + 1) % len(calls)

        # Check that the module really writes to the cache (else the timing would miss it).
        run()
        got = int(calls[0][1].get_seq_length())
        reset()
        state[0] = 0
        if got != c + t:
            raise SimspecError(f"stage {self.name}: the KV cache was not used by "
                               f"{type(calls[0][0]).__name__} (length {got}, expected {c + t}); "
                               "unsupported transformers/model version")
        return run, reset


def _crop_static(layer: Any, tokens: int) -> None:
    """Drop the last ``tokens`` positions of a static cache layer: ``crop(-t)`` where transformers has
    it (>= 5.2x); before that (5.17 on the GPU machine) the same in-place step back of the layer's
    ``cumulative_length`` counter, which is what ``crop`` does (graph-capturable either way)."""
    if hasattr(layer, "crop"):
        layer.crop(-tokens)
    else:
        layer.cumulative_length.sub_(tokens)


def _kv_zeros(cfg: Any, b: int, like: torch.Tensor) -> torch.Tensor:
    """A one-token key/value tensor of the model's cache shape (to initialise a static cache)."""
    kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return torch.zeros(b, kvh, 1, hd, dtype=like.dtype, device=like.device)


def last_level_cache_bytes(device: str) -> int:
    """Size of the last-level cache: the GPU's L2, or the largest CPU cache in sysfs (32 MiB if
    unknown)."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
        try:
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or 32 * 2**20


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pool_size(layer_bytes: int, llc_bytes: int, n_layers: int) -> int:
    """How many distinct layers to rotate through so that a layer's weights are out of the last-level
    cache when it runs again: enough layers to cover twice the cache, at most all of them."""
    return max(1, min(n_layers, math.ceil(2 * llc_bytes / max(layer_bytes, 1))))


class EmbedStage:
    """Embedding lookup + rotary tables + causal mask for a cache of ``C`` tokens."""

    def __init__(self, parts: Parts, tokens: TokenSource):
        self.parts, self.tokens = parts, tokens

    @torch.inference_mode()
    def prepare(self, b: int, t: int, c: int):
        cfg = self.parts.config
        cache = _static_cache(cfg, c + t)
        if c > 0:  # a cache that already holds c tokens at layer 0 (the mask depends on it)
            z = _kv_zeros(cfg, b, self.parts.embed.weight).expand(-1, -1, c, -1)
            cache.update(z, z, 0)
        ids = self.tokens.batch(b, t, offset=c)
        pos = torch.arange(c, c + t, device=ids.device).unsqueeze(0).expand(b, -1)
        embed, rotary = self.parts.embed, self.parts.rotary

        def run():
            e = embed(ids)
            pe = rotary(e, pos)
            m = _causal_mask(cfg, e, cache, pos)
            return e, pe, m

        return run, lambda: None


class LmHeadStage:
    """Final norm + LM head over every fed token. Timed calls rotate through ``copies`` copies of
    the head's weights (enough to cover twice the last-level cache) so every call reads them from
    memory, as in a real forward where all decoder layers run between two LM-head calls."""

    def __init__(self, parts: Parts, tokens: TokenSource, copies: int = 1):
        import copy

        self.parts, self.tokens = parts, tokens
        self.heads = [parts.lm_head] + [copy.deepcopy(parts.lm_head) for _ in range(max(copies, 1) - 1)]
        self.n_calls = len(self.heads)

    @torch.inference_mode()
    def prepare(self, b: int, t: int, c: int):
        h = self.parts.embed(self.tokens.batch(b, t, offset=c))
        norm, heads = self.parts.norm, self.heads
        state = [0]

        def run():
            return heads[state[0]](norm(h))

        def reset():
            state[0] = (state[0] + 1) % len(heads)

        return run, reset


class WholeModelStage:
    """One whole forward of a causal LM (embedding, every layer, final norm, LM head) with a static
    KV cache of ``C`` real prefilled tokens per request."""

    def __init__(self, name: str, lm: LoadedModel, tokens: TokenSource, max_context: int, distinct_rows: int):
        self.name = name
        self.model = lm.model
        self.config = lm.model.config
        self.tokens = tokens
        self.cache_kw = _cache_kwarg(lm.model)
        self.n_layers = int(self.config.num_hidden_layers)
        self.rows = distinct_rows
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        if max_context > 0:
            self._prefill(max_context)

    @torch.inference_mode()
    def _prefill(self, length: int) -> None:
        ids = self.tokens.batch(self.rows, length)
        cache = _dynamic_cache(self.config)
        self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache})
        self.kv = [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]

    @torch.inference_mode()
    def prepare(self, b: int, t: int, c: int):
        cache = _static_cache(self.config, c + t)
        if c > 0:
            for i, (k, v) in enumerate(self.kv):
                cache.update(_tile_rows(k[:, :, :c], b), _tile_rows(v[:, :, :c], b), i)
        ids = self.tokens.batch(b, t, offset=c)
        pos = torch.arange(c, c + t, device=ids.device).unsqueeze(0).expand(b, -1)
        model, kw = self.model, {self.cache_kw: cache}
        layers = [layer for layer in cache.layers]

        def run():
            return model(input_ids=ids, position_ids=pos, use_cache=True, **kw)

        def reset():
            for layer in layers:
                if getattr(layer, "is_initialized", True):
                    _crop_static(layer, t)

        run()
        got = int(cache.get_seq_length())
        reset()
        if got != c + t:
            raise SimspecError(f"stage {self.name}: the KV cache was not used by {type(model).__name__} "
                               f"(length {got}, expected {c + t})")
        return run, reset


# ------------------------------------------------------------------------ shapes that cannot run


def point_memory_bytes(name: str, b: int, t: int, c: int, cfg: Any, elem_bytes: int, n_pool: int = 1) -> int:
    """Upper estimate of the memory one measured point allocates (bytes): the static KV cache of every
    pool member (``B*(C+T)`` tokens) plus the tiled copy it is filled from, activations of ``B*T``
    tokens through attention and MLP, the attention mask and (when the attention kernel
    materialises them) the scores, and the logits for the LM head. Used to skip shapes that do not
    fit before trying them; an out-of-memory error while measuring is caught as well."""
    heads = int(cfg.num_attention_heads)
    kvh = int(getattr(cfg, "num_key_value_heads", None) or heads)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    hidden, inter = int(cfg.hidden_size), int(getattr(cfg, "intermediate_size", 0) or 4 * cfg.hidden_size)
    n_layers = int(cfg.num_hidden_layers)
    tok = b * t
    kv_tok = 2 * kvh * hd * elem_bytes  # K and V of one token in one layer
    act = tok * (6 * hidden + 3 * inter + 2 * heads * hd) * elem_bytes
    mask = b * t * (c + t) * 4
    scores = b * heads * t * (c + t) * 4
    if name == "lm_head":
        return tok * (hidden + 2 * int(cfg.vocab_size)) * 4
    if name == "embed":
        return tok * hidden * elem_bytes + mask
    if name in ("layer", "adapter"):
        return n_pool * b * (c + t) * kv_tok + b * c * kv_tok + act + mask + scores
    # whole forwards (target_step for the composition check, draft_step)
    return (n_layers * b * (c + t) * kv_tok + n_layers * b * c * kv_tok + act + mask + scores
            + tok * int(cfg.vocab_size) * 4)


def free_memory_bytes(device: str) -> int:
    """Memory a measurement may still allocate: free GPU memory (CUDA) or available RAM (CPU)."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def skip_reason(name: str, b: int, t: int, c: int, *, window: int | None, max_batched_tokens: int | None
                ) -> str | None:
    """Why a shape is not a serving shape of this model (None: measure it): a context beyond the
    model's window, or more tokens in one step than the engine's per-step token budget."""
    if window and c + t > window:
        return f"context + tokens {c + t} > the model's window {window}"
    if max_batched_tokens and b * t > max_batched_tokens:
        return f"B*T {b * t} > max batched tokens {max_batched_tokens}"
    return None


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError)
                                                          and "out of memory" in str(exc).lower())


# ----------------------------------------------------------------------------------- the driver


@dataclass
class LatencyResult:
    """What :func:`calibrate_latency` measured and fitted."""

    latency: dict[str, Any]
    models: dict[str, Any]
    capacity: dict[str, Any]
    meta: dict[str, Any]


def device_name(device: str) -> str:
    """The accelerator's name (CUDA) or the CPU model from /proc/cpuinfo."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def model_summary(lm: LoadedModel) -> dict[str, Any]:
    """``models.<role>`` for the profile: shape numbers and KV bytes per token."""
    cfg = lm.model.config
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = int(cfg.num_hidden_layers)
    elem = torch.tensor([], dtype=next(lm.model.parameters()).dtype).element_size()
    params = sum(p.numel() for p in {id(p): p for p in lm.model.parameters()}.values())
    return {"name": lm.model_id, "num_layers": layers, "hidden_size": int(cfg.hidden_size),
            "intermediate_size": int(getattr(cfg, "intermediate_size", 0) or 0),
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "vocab_size": int(cfg.vocab_size), "params": int(params),
            "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * elem, "dtype": lm.dtype,
            "architecture": type(lm.model).__name__}


def choose_capacity(device: str, grid: Grid, target: dict[str, Any], draft: dict[str, Any] | None
                    ) -> tuple[dict[str, int], str]:
    """Default replay capacity: the largest measured batch, and a KV budget that is the smaller of
    what memory holds and what the grid measured (max batch × max context)."""
    weights = target["params"] * (2 if target["dtype"] in ("bf16", "fp16") else 4)
    kv_per_tok = target["kv_bytes_per_token"]
    if draft:
        weights += draft["params"] * (2 if draft["dtype"] in ("bf16", "fp16") else 4)
        kv_per_tok += draft["kv_bytes_per_token"]
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        usable, how = 0.9 * total - weights, "90% of GPU memory minus weights"
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        usable, how = 0.5 * total - weights, "half of RAM minus weights"
    mem_tokens = max(int(usable // kv_per_tok), 1)
    max_b = max(grid.batch_sizes)
    grid_tokens = max_b * max(max(grid.context_tokens) + max(grid.tokens_per_request), 1)
    budget = min(mem_tokens, grid_tokens)
    note = (f"max_batch_size = largest measured batch ({max_b}); kv_budget_tokens = min(memory bound "
            f"{mem_tokens} tokens ({how}, at {kv_per_tok} KV bytes/token), grid coverage {grid_tokens} "
            f"tokens (max batch x (max context + max tokens/request))) = {budget}")
    max_bt = max_b * max(grid.tokens_per_request)
    note += f"; max_batched_tokens = max batch x max tokens/request measured = {max_bt}"
    return {"kv_budget_tokens": int(budget), "max_batch_size": int(max_b), "max_batched_tokens": int(max_bt)}, note


def _versions() -> dict[str, str]:
    import transformers

    import simspec

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "simspec": simspec.__version__, "python": platform.python_version()}


def effective_grid(grid: Grid, window: int | None) -> tuple[Grid, list[str]]:
    """``grid`` restricted to the model's context window: context nodes with ``C + 1 > window`` and
    token nodes with ``T > window`` are dropped (no request of this model can have them)."""
    if not window:
        return grid, []
    cs = [c for c in grid.context_tokens if c + 1 <= window]
    ts = [t for t in grid.tokens_per_request if t <= window]
    notes = []
    if cs != grid.context_tokens or ts != grid.tokens_per_request:
        notes.append(f"grid cut to the model's window of {window} tokens: context nodes "
                     f"{[c for c in grid.context_tokens if c not in cs]} and token nodes "
                     f"{[t for t in grid.tokens_per_request if t not in ts]} dropped")
    if not cs or not ts:
        raise SimspecError(f"grid {grid.name}: no node fits the model's window of {window} tokens")
    g = Grid(**{**asdict(grid), "context_tokens": cs, "tokens_per_request": ts,
                "heldout": [p for p in grid.heldout if p[1] + p[2] <= window],
                "composition_check": [p for p in grid.composition_check if p[1] + p[2] <= window]})
    return g, notes


def calibrate_latency(target: LoadedModel, grid: Grid, *, draft: LoadedModel | None = None,
                      threads: int | None = None, progress: bool = True,
                      stages: Sequence[str] | None = None, cuda_graphs: bool = False,
                      max_batched_tokens: int | None = None, memory_fraction: float = 0.9,
                      max_wall_s: float | None = None) -> LatencyResult:
    """Measure every stage on ``grid`` and its held-out shapes, fit, and return the sections.

    ``threads``: torch intra-op threads on CPU (default: all CPUs). ``stages``: restrict to a subset
    (default: embed, layer, lm_head, adapter, and draft_step when ``draft`` is given).
    ``cuda_graphs``: time CUDA-graph replays instead of eager calls (see :class:`Timer`); a stage
    whose calls cannot be captured falls back to eager, and ``meta.latency_calibration`` says so.
    ``max_batched_tokens``: shapes with ``B*T`` above it are not serving shapes and are skipped.
    ``memory_fraction``: a shape whose estimated memory (:func:`point_memory_bytes`) exceeds this
    share of the free memory is skipped, as is one that runs out of memory while measured.
    ``max_wall_s``: once the measurement has run this long, the remaining points are skipped.
    Skipped grid nodes are filled from the stage's linear fit (``fit.filled_nodes``) and every skip
    is listed with its reason in ``meta.latency_calibration.skipped``.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = target.device
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    wanted = list(stages) if stages else [s for s in STAGES if s != "draft_step" or draft is not None]
    if "draft_step" in wanted and draft is None:
        raise SimspecError("stage draft_step needs --draft")
    if cuda_graphs and not device.startswith("cuda"):
        raise SimspecError("--cuda-graphs needs --device cuda")
    parts = model_parts(target)
    cfg = target.model.config
    window = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
    if draft is not None:
        dwin = int(getattr(draft.model.config, "max_position_embeddings", 0) or 0) or None
        window = min(w for w in (window, dwin) if w) if (window or dwin) else None
    grid, notes = effective_grid(grid, window)
    tokens = TokenSource(target.tokenizer, device, vocab_size=int(cfg.vocab_size))
    max_c = max(grid.context_tokens + [p[2] for p in grid.heldout + grid.composition_check])
    rows = min(max(grid.batch_sizes + [p[0] for p in grid.heldout]), 4)
    elem = torch.tensor([], dtype=next(target.model.parameters()).dtype).element_size()

    llc = last_level_cache_bytes(device)
    n_layers = len(parts.layers)
    n_pool = pool_size(module_bytes(parts.layers[0]), llc, n_layers)
    n_heads = 0
    benches: dict[str, Any] = {}
    if "embed" in wanted:
        benches["embed"] = EmbedStage(parts, tokens)
    if "layer" in wanted:
        pool = [(parts.layers[i], int(getattr(parts.layers[i].self_attn, "layer_idx", i)))
                for i in range(n_pool)]
        benches["layer"] = ModuleStage("layer", pool, parts, tokens, max_c, rows, _cache_kwarg(parts.layers[0]))
    if "lm_head" in wanted:
        n_heads = pool_size(module_bytes(parts.lm_head), llc, 16)
        benches["lm_head"] = LmHeadStage(parts, tokens, n_heads)
    if "adapter" in wanted:
        adapter = Adapter(parts).to(device=device, dtype=next(target.model.parameters()).dtype).eval()
        benches["adapter"] = ModuleStage("adapter", [(adapter, 0)], parts, tokens, max_c, rows, "cache")
    if "draft_step" in wanted:
        dtokens = TokenSource(draft.tokenizer, draft.device, vocab_size=int(draft.model.config.vocab_size))
        benches["draft_step"] = WholeModelStage("draft_step", draft, dtokens, max_c, min(rows, 2))

    check_whole = bool(grid.composition_check) and {"embed", "layer", "lm_head"} <= set(benches)
    if check_whole:
        ctx = max(p[2] for p in grid.composition_check)
        benches["target_step"] = WholeModelStage("target_step", target, tokens, ctx, min(rows, 2))

    timer = Timer(device, grid, cuda_graphs=cuda_graphs)
    shapes_grid = [(b, t, c) for b in grid.batch_sizes for t in grid.tokens_per_request
                   for c in grid.context_tokens]
    heldout = [tuple(p) for p in grid.heldout]
    c0 = grid.context_tokens[0]
    lm_bs = grid.lm_head_batch_sizes or grid.batch_sizes
    plan_all: list[tuple[str, str, tuple[int, int, int]]] = []
    for name in benches:
        if name == "target_step":  # whole forwards for the composition check, not a stage
            plan_all += [(name, "check", tuple(p)) for p in grid.composition_check]
        elif name == "lm_head":  # context-independent: measured at one context only
            plan_all += [(name, "train", (b, t, c0)) for b in lm_bs for t in grid.tokens_per_request]
            plan_all += [(name, "heldout", (b, t, c0)) for b, t, _ in heldout]
        else:
            plan_all += [(name, "train", s) for s in shapes_grid]
            plan_all += [(name, "heldout", s) for s in heldout]

    # Shapes that are not serving shapes of this model (beyond its window, above the step's token
    # budget) or that cannot fit in memory are skipped, with the reason recorded.
    skipped: list[dict[str, Any]] = []
    budget = memory_fraction * free_memory_bytes(device)

    def why_skip(name: str, b: int, t: int, c: int) -> str | None:
        r = skip_reason(name, b, t, c, window=window, max_batched_tokens=max_batched_tokens)
        if r:
            return r
        pool_n = n_pool if name == "layer" else 1
        model_cfg = draft.model.config if name == "draft_step" else cfg
        need = point_memory_bytes(name, b, t, c, model_cfg, elem, pool_n)
        if need > budget:
            return f"needs ~{need / 2**30:.1f} GiB > {memory_fraction:.0%} of free memory ({budget / 2**30:.1f} GiB)"
        return None

    plan: list[tuple[str, str, tuple[int, int, int]]] = []
    for item in plan_all:
        r = why_skip(item[0], *item[2])
        if r:
            skipped.append({"stage": item[0], "role": item[1], "shape": list(item[2]), "reason": r})
        else:
            plan.append(item)

    # One-time costs (kernel selection, first-touch allocations, lazy inits) land in a global
    # warm-up, not in the first measured point (at the stage's smallest measured shape).
    with torch.inference_mode():
        for name, bench in benches.items():
            mine = [shape for n, _, shape in plan if n == name]
            if not mine:
                continue
            run, reset = bench.prepare(*min(mine, key=lambda s: (s[0] * s[1], s[2])))
            t_end = time.perf_counter() + 0.3
            for i in range(50):
                run()
                reset()
                if i >= 3 and time.perf_counter() > t_end:
                    break
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)

    # Measure in a shuffled (seeded) order: a burst of outside interference then spoils scattered
    # points, which the held-out error and the isotonic fit can see, not one contiguous block.
    import random

    random.Random(0).shuffle(plan)
    measured: dict[str, dict[str, list[Point]]] = {n: {"train": [], "heldout": [], "check": []}
                                                   for n in benches}
    graph_failed: dict[str, str] = {}

    def measure_point(name: str, b: int, t: int, c: int) -> Point:
        bench = benches[name]
        run, reset = bench.prepare(b, t, c)
        use_graphs = cuda_graphs and name not in graph_failed
        try:
            med, spread, n = timer.measure(run, reset, getattr(bench, "n_calls", 1), graphs=use_graphs)
        except GraphCaptureError as exc:
            graph_failed[name] = str(exc)
            run, reset = bench.prepare(b, t, c)
            med, spread, n = timer.measure(run, reset, graphs=False)
        return Point(b, t, c, med, spread, n)

    def try_point(name: str, role: str, b: int, t: int, c: int) -> Point | None:
        if max_wall_s is not None and time.perf_counter() - t_start > max_wall_s:
            skipped.append({"stage": name, "role": role, "shape": [b, t, c],
                            "reason": f"time limit of {max_wall_s:g} s reached"})
            return None
        try:
            return measure_point(name, b, t, c)
        except Exception as exc:  # noqa: BLE001  (only out-of-memory is skipped; the rest re-raised)
            if not _is_oom(exc):
                raise
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            skipped.append({"stage": name, "role": role, "shape": [b, t, c], "reason": "out of memory"})
            return None

    results: list[Point | None] = []
    noisy: list[int] = []
    bar = tqdm(total=len(plan), desc="calibrate latency", unit="pt", disable=not progress, dynamic_ncols=True)
    try:
        for name, role, (b, t, c) in plan:
            bar.set_postfix_str(f"{name} B={b} T={t} C={c}", refresh=False)
            results.append(try_point(name, role, b, t, c))
            bar.update(1)
        # Second pass: points whose repeats disagreed (interquartile range above 20% of the
        # median: something else ran) are measured again later, and the quieter of the two
        # measurements (smaller relative spread) is kept.
        noisy = [i for i, q in enumerate(results) if q is not None
                 and q.spread_ms > REMEASURE_REL_SPREAD * q.median_ms and q.median_ms < REMEASURE_MAX_MS]
        noisy = noisy[: max(1, len(results) // 4)]
        if max_wall_s is not None and time.perf_counter() - t_start > max_wall_s:
            noisy = []
        bar.reset(total=len(noisy))
        bar.set_description("re-measure noisy points")
        for i in noisy:
            name, _, (b, t, c) = plan[i]
            bar.set_postfix_str(f"{name} B={b} T={t} C={c}", refresh=False)
            again = measure_point(name, b, t, c)
            if again.spread_ms / again.median_ms < results[i].spread_ms / results[i].median_ms:
                results[i] = again
            bar.update(1)
    finally:
        bar.close()
    for (name, role, _), q in zip(plan, results):
        if q is not None:
            measured[name][role].append(q)

    for pts in measured.values():
        for role in pts:
            pts[role].sort(key=lambda q: (q.batch_size, q.tokens_per_request, q.context_tokens))
    whole_pts = measured.pop("target_step", {}).get("check", [])
    stage_docs: dict[str, Any] = {}
    for name, pts in measured.items():
        if not pts["train"]:
            notes.append(f"stage {name}: no grid point could be measured; stage left out")
            continue
        if name == "lm_head":
            doc = fit_stage(pts["train"], pts["heldout"], lm_bs, grid.tokens_per_request, [c0],
                            fill_missing=True)
            # the LM head never reads the KV cache: one context axis value, constant along it
            doc["valid"]["context_tokens"] = [0, max(grid.context_tokens)]
        else:
            doc = fit_stage(pts["train"], pts["heldout"], grid.batch_sizes, grid.tokens_per_request,
                            grid.context_tokens, fill_missing=True)
        doc["measures"] = STAGE_DESCRIPTIONS[name]
        stage_docs[name] = doc

    if not stage_docs:
        kinds = _skip_summary(skipped)["counts"]
        raise SimspecError(f"no stage could be measured (skipped: {', '.join(f'{k} {v}' for k, v in kinds.items())})")

    tsum = model_summary(target)
    models = {"target": tsum}
    dsum = model_summary(draft) if draft is not None else None
    if dsum:
        models["draft"] = dsum
    capacity, cap_note = choose_capacity(device, grid, tsum, dsum)
    if max_batched_tokens and capacity["max_batched_tokens"] > max_batched_tokens:
        capacity["max_batched_tokens"] = int(max_batched_tokens)
        cap_note += f" (capped to the --max-batched-tokens {max_batched_tokens} the grid was measured under)"

    composition = composition_check(whole_pts, stage_docs, int(target.model.config.num_hidden_layers)) \
        if whole_pts and {"embed", "layer", "lm_head"} <= set(stage_docs) else None

    wall = time.perf_counter() - t_start
    meta = {
        "source": "measured",
        "device": device_name(device),
        "device_type": "cuda" if device.startswith("cuda") else "cpu",
        "dtype": target.dtype,
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "versions": _versions(),
        "model_ids": {"target": target.model_id, **({"draft": draft.model_id} if draft else {})},
        "weights": ({"target": "random (" + str(target.extra.get("config_path")) + "; timing does not depend "
                     "on weight values)"} if target.extra.get("random_weights") else {"target": "real"}),
        "model_configs": {"target": _jsonable(target.config_dict),
                          **({"draft": _jsonable(draft.config_dict)} if draft else {})},
        "threads": int(torch.get_num_threads()) if not device.startswith("cuda") else None,
        "grid": {k: v for k, v in asdict(grid).items()},
        "latency_calibration": {
            "timer": "cuda events + synchronize" if device.startswith("cuda") else "time.perf_counter",
            "statistic": "median of repeats; spread_ms = interquartile range",
            "kv_cache": "transformers StaticCache sized to exactly C+T tokens per point, first C "
                        "positions from a real prefill of real text; cropped back to C after each call",
            "layer_pool": (f"timed calls rotate through decoder layers 0..{n_pool - 1} (and through "
                           f"{n_heads if 'lm_head' in benches else 0} copies of the LM head) so each runs "
                           f"with its weights out of the {llc // 2**20} MiB last-level cache, as in a real "
                           "forward"),
            "layer_pool_size": n_pool,
            "last_level_cache_bytes": llc,
            "attn_implementation": getattr(target.model.config, "_attn_implementation", None),
            "wall_time_s": round(wall, 1),
            "model_load_s": round(target.load_s, 2),
            "points_measured": sum(q is not None for q in results),
            "points_remeasured": len(noisy),
            "mode": ("cuda graphs (replay of a captured call sequence)" if cuda_graphs else "eager"),
            "cuda_graphs_failed": graph_failed,
            "max_batched_tokens": max_batched_tokens,
            "window_tokens": window,
            "memory_budget_bytes": int(budget),
            "skipped": _skip_summary(skipped),
            "notes": notes,
        },
        "capacity_note": cap_note,
    }
    if composition is not None:
        meta["composition_check"] = composition
    latency = {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0}, "stages": stage_docs}
    if composition is not None:
        latency["forward_overhead"] = forward_overhead_doc(composition)
        meta["composition_check"]["with_forward_overhead_mape_pct"] = \
            latency["forward_overhead"]["fit"]["with_overhead_mape_pct"]
    return LatencyResult(latency=latency, models=models, capacity=capacity, meta=meta)


def _skip_summary(skipped: Sequence[dict[str, Any]], keep: int = 200) -> dict[str, Any]:
    """Counts of skipped shapes per reason kind and stage, and the first ``keep`` of them in full."""
    counts: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(" ")[0] if not s["reason"].startswith(("B*T", "context")) else \
            ("token budget" if s["reason"].startswith("B*T") else "window")
        kind = {"needs": "memory estimate", "out": "out of memory", "time": "time limit"}.get(kind, kind)
        key = f"{s['stage']}: {kind}"
        counts[key] = counts.get(key, 0) + 1
    return {"n": len(skipped), "counts": counts, "shapes": list(skipped[:keep])}


STAGE_DESCRIPTIONS = {
    "embed": "token embedding lookup + rotary position tables + causal mask (once per forward)",
    "layer": "one decoder layer (attention over a KV cache of C tokens/request + MLP)",
    "lm_head": "final norm + LM head over every fed token (context-independent)",
    "adapter": "Kangaroo-style adapter: norm + one attention block with its own KV cache + final norm",
    "draft_step": "one whole forward of the draft model (embedding, all layers, LM head) with its KV cache",
}


def composition_check(whole: Sequence[Point], stage_docs: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Compare whole target forwards (measured interleaved with the stage points, so both see the
    same machine conditions) with ``embed + num_layers*layer + lm_head`` composed from the fitted
    stages: what a layer-level replay charges for a full step."""
    from simspec.simulator.latency_models import compile_stage

    fns = {n: compile_stage(stage_docs[n], stage_docs) for n in ("embed", "layer", "lm_head")}
    rows_out, errs = [], []
    for q in whole:
        b, bt, kv = q.batch_size, q.batched_tokens, q.kv_tokens
        comp = fns["embed"](b, bt, kv) + n_layers * fns["layer"](b, bt, kv) + fns["lm_head"](b, bt, kv)
        rows_out.append([b, bt, kv, round(q.median_ms, 4), round(comp, 4)])
        errs.append(abs(comp - q.median_ms) / q.median_ms * 100.0)
    return {"what": "whole target forward (measured) vs embed + num_layers*layer + lm_head (composed)",
            "points": rows_out, "columns": ["B", "batched_tokens", "kv_tokens", "measured_ms", "composed_ms"],
            "mape_pct": round(sum(errs) / len(errs), 2), "max_ape_pct": round(max(errs), 2)}


def forward_overhead_doc(composition: dict[str, Any]) -> dict[str, Any]:
    """``latency.forward_overhead`` from the composition check: the target's per-forward overhead is
    the intercept of the measured whole forwards over their composed parts
    (:func:`simspec.calibrate.fit.fit_forward_overhead`). ``draft_ms`` is 0: ``draft_step`` is
    itself a measured whole forward, so its fixed cost is already inside it."""
    from simspec.calibrate.fit import fit_forward_overhead

    pts = composition["points"]
    fit = fit_forward_overhead([p[3] for p in pts], [p[4] for p in pts])
    return {"target_ms": fit["target_ms"], "draft_ms": 0.0,
            "source": (f"calibrate latency: median over {fit['n']} composition-check shapes of measured whole "
                       f"target forward - (embed + N*layer + lm_head), clipped at 0; draft_step is measured whole "
                       f"(its fixed cost is inside it); sampling and the host sync are not timed"),
            "fit": fit}


def _jsonable(obj: Any) -> Any:
    """Config dicts can hold tuples, dtypes and other non-JSON values: keep JSON types, stringify
    the rest."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    return str(obj)
