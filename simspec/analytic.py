"""Analytic (roofline) profiles: per-layer and per-stage latencies estimated from a GPU datasheet and
a model's ``config.json``, for users without the hardware. No torch; numpy only.

Every operator of a stage is timed as ``max(FLOPs / achievable FLOP/s, bytes moved / achievable
bandwidth)`` (a roofline per operator, summed over the stage's operators), plus a fixed launch
overhead per kernel and, under tensor parallelism, the all-reduces. Achievable = datasheet peak ×
an efficiency factor (:class:`Efficiency`, documented in docs/methods.md). The result is a profile
of schema v1 with ``meta.source = "analytic"``: ``layer``, ``lm_head``, ``embed``, ``adapter`` (and
``draft_step`` with a draft model) as ``grid`` stages over batch size × tokens per request × context,
``capacity`` from memory minus weights, and documented default acceptance for ``draft``,
``kangaroo`` and ``hispec`` (simspec's assumptions, not measurements).

Per decoder layer (B requests, t tokens each, c cached context tokens each, T = B·t, s bytes per
element, TP degree p; weights, heads and FLOPs split over the p GPUs; KV heads replicated when fewer
than p):

- GEMMs (QKV, O, gate+up, down): FLOPs ``2·T·W``; bytes ``s·(W + T·(d_in + d_out))``;
- attention: FLOPs ``4·B·t·(c + (t+1)/2)·d_q`` (QKᵀ and PV, causal within the new tokens); bytes
  ``s·(2·B·c·d_kv + 4·B·t·d_kv + 2·T·d_q)`` (read the cached K,V; write and read the new ones;
  read Q, write O);
- element-wise (2 RMSNorms, residual adds, RoPE, SiLU·mul): bytes only;
- 10 kernels; with p > 1 two all-reduces of ``T·h·s`` bytes (ring: ``latency + 2(p−1)/p · bytes /
  link bandwidth``).

LM head (final norm + vocabulary GEMM): the norm over all T tokens, logits for
``min(t, LOGITS_TOKENS_CAP)`` positions per request — serving engines compute logits only where
they are needed (the last prompt position for a prefill; every position for a verification of
up to 16 tokens) — plus a logits gather under TP. Embedding: a row gather (and an all-reduce under
TP). Adapter (Kangaroo): one attention block with its two norms, no MLP.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from simspec import __version__
from simspec.errors import ConfigError

DTYPE_BYTES = {"fp16": 2, "bf16": 2}
LOGITS_TOKENS_CAP = 16
KERNELS_PER_LAYER = 10
KERNELS_ADAPTER = 6
KERNELS_LM_HEAD = 2
KERNELS_EMBED = 1

BATCH_AXIS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS_AXIS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096,
               8192, 16384, 32768)
CONTEXT_AXIS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures of one GPU: dense fp16/bf16 tensor-core peak (TFLOP/s), HBM bandwidth
    (TB/s), memory (bytes), NVLink bandwidth per direction (GB/s)."""

    key: str
    name: str
    peak_tflops: float
    hbm_tb_s: float
    memory_bytes: float
    nvlink_gb_s: float
    source: str


GPUS: dict[str, GPUSpec] = {
    "a100-80gb": GPUSpec("a100-80gb", "NVIDIA A100 80GB SXM", 312.0, 2.039, 80 * 2**30, 300.0,
                         "NVIDIA A100 datasheet: 312 TFLOP/s dense FP16/BF16 tensor core, 2,039 GB/s HBM2e, "
                         "80 GB; NVLink 3 600 GB/s total (300 GB/s per direction)"),
    "h100-sxm": GPUSpec("h100-sxm", "NVIDIA H100 80GB SXM", 989.0, 3.35, 80 * 2**30, 450.0,
                        "NVIDIA H100 datasheet (SXM): 989 TFLOP/s dense FP16/BF16 tensor core (1,979 with "
                        "sparsity), 3.35 TB/s HBM3, 80 GB; NVLink 4 900 GB/s total (450 GB/s per direction)"),
    "h200": GPUSpec("h200", "NVIDIA H200 141GB SXM", 989.0, 4.8, 141e9, 450.0,
                    "NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense FP16/BF16 tensor core, 4.8 TB/s HBM3e, "
                    "141 GB; NVLink 4 900 GB/s total (450 GB/s per direction)"),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks a serving engine achieves, and fixed costs (see
    docs/methods.md for the reasons behind each default).

    ``compute``: large fp16 GEMMs in cuBLAS/CUTLASS reach ~60-75 % of the dense tensor-core peak;
    ``bandwidth``: streaming kernels (decode GEMVs, paged attention) reach ~75-85 % of HBM peak;
    ``launch_us``: gap per kernel under CUDA graphs; ``nvlink``: NCCL all-reduce bus bandwidth over
    the per-direction NVLink peak; ``allreduce_us``: latency of one small all-reduce;
    ``memory_utilization``: share of GPU memory the engine may use (vLLM's default 0.9);
    ``activation_reserve_gib``: per GPU, for activations, logits and the CUDA context.
    """

    compute: float = 0.65
    bandwidth: float = 0.80
    launch_us: float = 2.0
    nvlink: float = 0.70
    allreduce_us: float = 8.0
    memory_utilization: float = 0.90
    activation_reserve_gib: float = 2.0

    def __post_init__(self):
        for name in ("compute", "bandwidth", "nvlink", "memory_utilization"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"efficiency {name}: must be in (0, 1], got {v}")
        for name in ("launch_us", "allreduce_us", "activation_reserve_gib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"efficiency {name}: must be >= 0, got {getattr(self, name)}")


# ------------------------------------------------------------------------------- model configs


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder (from a Hugging Face ``config.json``)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position: int
    head_dim: int
    tie_word_embeddings: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_params(self) -> int:
        h = self.hidden_size
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 3 * h * self.intermediate_size + 2 * h

    def adapter_params(self) -> int:
        h = self.hidden_size
        return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h + 2 * h

    def params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        return self.num_layers * self.layer_params() + emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV-cache bytes per token over the whole TP group (KV heads replicated when fewer than tp)."""
        kv_heads = math.ceil(self.num_kv_heads / tp) * tp
        return 2 * self.num_layers * kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf(cls, doc: Any, where: str, name: str | None = None) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` document; ConfigError naming the field otherwise."""
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: expected a JSON object (a Hugging Face config.json)")

        def need(key: str, *alts: str) -> int:
            for k in (key, *alts):
                if k in doc:
                    v = doc[k]
                    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                        raise ConfigError(f"{where}: field {k}: expected a positive integer, got {v!r}")
                    return v
            raise ConfigError(f"{where}: field {key}: missing (needed for the roofline)")

        layers = need("num_hidden_layers", "n_layer", "num_layers")
        hidden = need("hidden_size", "n_embd")
        inter = need("intermediate_size")
        heads = need("num_attention_heads", "n_head")
        vocab = need("vocab_size")
        kv = need("num_key_value_heads") if "num_key_value_heads" in doc else heads
        maxpos = need("max_position_embeddings") if "max_position_embeddings" in doc else 2048
        head_dim = need("head_dim") if doc.get("head_dim") is not None else None
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(f"{where}: field num_attention_heads: {heads} does not divide hidden_size {hidden}")
            head_dim = hidden // heads
        if heads % kv:
            raise ConfigError(f"{where}: field num_key_value_heads: {kv} does not divide num_attention_heads {heads}")
        return cls(name=name or str(doc.get("_name_or_path") or Path(where).stem), num_layers=layers,
                   hidden_size=hidden, intermediate_size=inter, num_heads=heads, num_kv_heads=kv,
                   vocab_size=vocab, max_position=maxpos, head_dim=head_dim,
                   tie_word_embeddings=bool(doc.get("tie_word_embeddings", False)))


MODEL_ALIASES = {"vicuna-7b": "vicuna-7b-v1.3", "llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b",
                 "llama2-70b": "llama-2-70b", "llama3-8b": "llama-3-8b"}


def bundled_models() -> dict[str, Path]:
    """Bundled model configs: name (file stem) → path."""
    d = Path(str(resources.files("simspec") / "data" / "models"))
    return {p.stem: p for p in sorted(d.glob("*.json"))}


def load_model_config(name_or_path: str) -> ModelConfig:
    """A bundled model name (``llama-2-7b``, ``vicuna-7b``, …) or a path to a ``config.json`` (or to
    a directory holding one)."""
    bundled = bundled_models()
    key = MODEL_ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in bundled:
        path = bundled[key]
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"--model {name_or_path!r}: no such file and no bundled model of that name "
                              f"(bundled: {', '.join(bundled)})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return ModelConfig.from_hf(doc, str(path))


# ------------------------------------------------------------------------------- the roofline


class Roofline:
    """Operator times (ms) for one GPU kind, dtype, TP degree and efficiency set. Every method takes
    numpy-broadcastable ``B`` (requests), ``t`` (tokens fed per request), ``c`` (cached context per
    request) and returns ms."""

    def __init__(self, gpu: GPUSpec, dtype: str = "fp16", tp: int = 1, eff: Efficiency | None = None):
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        if tp < 1:
            raise ConfigError(f"--tp: must be >= 1, got {tp}")
        self.gpu, self.dtype, self.tp = gpu, dtype, tp
        self.eff = eff or Efficiency()
        self.s = DTYPE_BYTES[dtype]
        self.flops_per_s = gpu.peak_tflops * 1e12 * self.eff.compute
        self.bytes_per_s = gpu.hbm_tb_s * 1e12 * self.eff.bandwidth
        self.link_bytes_per_s = gpu.nvlink_gb_s * 1e9 * self.eff.nvlink

    # --- primitives (seconds) ---
    def _op(self, flops, nbytes):
        return np.maximum(flops / self.flops_per_s, nbytes / self.bytes_per_s)

    def _gemm(self, T, w, d_in, d_out):
        return self._op(2.0 * T * w, self.s * (w + T * (d_in + d_out)))

    def _allreduce(self, nbytes, count: int = 1, tp: int | None = None):
        p = self.tp if tp is None else tp
        if p <= 1:
            return 0.0 * nbytes
        return count * (self.eff.allreduce_us * 1e-6 + 2.0 * (p - 1) / p * nbytes / self.link_bytes_per_s)

    def _launch(self, kernels: int):
        return kernels * self.eff.launch_us * 1e-6

    def _split(self, m: ModelConfig, tp: int):
        q = m.num_heads / tp * m.head_dim
        kv = math.ceil(m.num_kv_heads / tp) * m.head_dim
        return q, kv, m.intermediate_size / tp

    def _attention(self, m: ModelConfig, B, t, c, tp: int):
        q, kv, _ = self._split(m, tp)
        flops = 4.0 * B * t * (c + (t + 1) / 2.0) * q
        nbytes = self.s * (2.0 * B * c * kv + 4.0 * B * t * kv + 2.0 * B * t * q)
        return self._op(flops, nbytes)

    # --- stages (ms) ---
    def layer_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """One decoder layer."""
        p = self.tp if tp is None else tp
        h = m.hidden_size
        q, kv, inter = self._split(m, p)
        T = B * t
        sec = self._gemm(T, h * (q + 2 * kv), h, q + 2 * kv)
        sec = sec + self._attention(m, B, t, c, p)
        sec = sec + self._gemm(T, q * h, q, h)
        sec = sec + self._gemm(T, 2 * h * inter, h, 2 * inter)
        sec = sec + self._gemm(T, inter * h, inter, h)
        elementwise = self.s * T * (8.0 * h + 2.0 * (q + kv) + 3.0 * inter)
        sec = sec + self._op(0.0, elementwise)
        sec = sec + self._launch(KERNELS_PER_LAYER) + self._allreduce(self.s * T * h, 2, p)
        return 1e3 * sec

    def adapter_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Kangaroo's adapter: one attention block (QKV, attention, O) with its two RMSNorms."""
        p = self.tp if tp is None else tp
        h = m.hidden_size
        q, kv, _ = self._split(m, p)
        T = B * t
        sec = self._gemm(T, h * (q + 2 * kv), h, q + 2 * kv) + self._attention(m, B, t, c, p)
        sec = sec + self._gemm(T, q * h, q, h) + self._op(0.0, self.s * T * (6.0 * h + 2.0 * (q + kv)))
        sec = sec + self._launch(KERNELS_ADAPTER) + self._allreduce(self.s * T * h, 1, p)
        return 1e3 * sec

    def lm_head_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Final RMSNorm over all tokens + the vocabulary projection for ``min(t, 16)`` positions per
        request (+ the logits gather under TP)."""
        p = self.tp if tp is None else tp
        h, v = m.hidden_size, m.vocab_size / p
        T = B * t
        Th = B * np.minimum(t, LOGITS_TOKENS_CAP)
        sec = self._op(0.0, self.s * 2.0 * T * h) + self._gemm(Th, h * v, h, v)
        if p > 1:
            sec = sec + self.eff.allreduce_us * 1e-6 + (p - 1) / p * self.s * Th * m.vocab_size / self.link_bytes_per_s
        sec = sec + self._launch(KERNELS_LM_HEAD) + 0.0 * c
        return 1e3 * sec

    def embed_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Token-embedding gather (vocabulary-parallel under TP, then an all-reduce)."""
        p = self.tp if tp is None else tp
        T = B * t
        sec = self._op(0.0, self.s * 2.0 * T * m.hidden_size) + self._launch(KERNELS_EMBED)
        sec = sec + self._allreduce(self.s * T * m.hidden_size, 1, p) + 0.0 * c
        return 1e3 * sec

    def model_step_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """A whole forward (embedding, all layers, LM head) of ``m`` (e.g. a draft-model pass with
        ``tp=1``; default: this roofline's TP degree)."""
        return (self.embed_ms(m, B, t, c, tp) + m.num_layers * self.layer_ms(m, B, t, c, tp)
                + self.lm_head_ms(m, B, t, c, tp))


# ------------------------------------------------------------------------------- the profile


def _axes(model: ModelConfig, max_batch: int) -> dict[str, list[int]]:
    top = max(model.max_position, 16)
    b = [x for x in BATCH_AXIS if x < max_batch] + [max_batch]
    t = [x for x in TOKENS_AXIS if x < top] + [top]
    c = [x for x in CONTEXT_AXIS if x < top] + [top]
    return {"batch_size": b, "tokens_per_request": t, "context_tokens": c}


def _grid_stage(fn, axes: dict[str, list[int]], what: str, valid: dict[str, list[float]]) -> dict[str, Any]:
    B = np.asarray(axes["batch_size"], dtype=np.float64)[:, None, None]
    t = np.asarray(axes["tokens_per_request"], dtype=np.float64)[None, :, None]
    c = np.asarray(axes["context_tokens"], dtype=np.float64)[None, None, :]
    ms = np.broadcast_to(fn(B, t, c), (B.shape[0], t.shape[1], c.shape[2]))
    table = [[[float(f"{v:.5g}") for v in row] for row in plane] for plane in ms]
    return {"kind": "grid", "axes": {k: list(v) for k, v in axes.items()}, "ms": table, "valid": valid,
            "fit": {"heldout_mape_pct": None, "note": "analytic roofline, not fitted to measurements"},
            "note": what}


KANGAROO_CONFIDENCE = {
    "bin_edges": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
    "accepted": [[1, 2, 3, 4, 5, 6, 9, 12, 18, 40]],
    "rejected": [[14, 16, 15, 12, 10, 8, 7, 7, 6, 5]],
}


def _beta_mean_of(fn, a: float, b: float, n: int = 401) -> float:
    """E[fn(α)] for α ~ Beta(a, b), by quadrature on a uniform grid."""
    x = np.linspace(0.0, 1.0, n + 2)[1:-1]
    w = x ** (a - 1.0) * (1.0 - x) ** (b - 1.0)
    w = w / w.sum()
    return float(sum(wi * fn(xi) for xi, wi in zip(x, w)))


def default_acceptance(model: ModelConfig, draft: ModelConfig | None) -> dict[str, Any]:
    """Documented default acceptance for the analytic profiles (simspec's assumptions; see
    docs/methods.md § Defaults and sources). ``mean_tokens_per_step`` is what these defaults imply
    at the default settings (computed exactly, averaged over the per-request Beta spread)."""
    from simspec.simulator.acceptance_early_exit import (confidence_at_least, hispec_buffer_expectations,
                                                         kangaroo_expectations)

    n = model.num_layers
    out: dict[str, Any] = {}
    if draft is not None:
        out["draft"] = {"default": {
            "alpha": {"kind": "beta", "a": 6.0, "b": 4.0},
            "mean_tokens_per_step": round(_beta_mean_of(lambda a: (1 - a ** 5) / (1 - a), 6.0, 4.0), 3),
            "settings": {"k": 4, "draft": draft.name},
            "source": "assumption",
            "note": (f"simspec's assumption, not measured: per-request per-token acceptance ~ Beta(6, 4) "
                     f"(mean 0.6, sd 0.15) for the {draft.name} draft; mean_tokens_per_step at k=4."),
        }}
    ex = max(1, round(n / 16))
    ca, cr = confidence_at_least(KANGAROO_CONFIDENCE, 0.6, "kangaroo default")
    tau_k = _beta_mean_of(lambda a: 1.0 + kangaroo_expectations(a, 6, ca, cr)[0], 6.0, 4.0)
    out["kangaroo"] = {"default": {
        "alpha": {"kind": "beta", "a": 6.0, "b": 4.0},
        "confidence": KANGAROO_CONFIDENCE,
        "mean_tokens_per_step": round(tau_k, 3),
        "settings": {"exit": ex, "gamma": 6, "eta": 0.6, "adapter": True},
        "source": "assumption, matched to Kangaroo (Liu et al. 2024, arXiv:2404.18911)",
        "note": (f"simspec's assumption, not measured: draft (layers 0..{ex - 1} + adapter) vs full per-token "
                 f"acceptance ~ Beta(6, 4) (mean 0.6); top-1 confidence histograms (one row for every "
                 f"position) with P(conf >= 0.6 | accepted) = 0.79 and P(conf >= 0.6 | rejected) = 0.25. "
                 f"Chosen so that tokens per verification at gamma=6, eta=0.6 is ~{tau_k:.2f}, inside the "
                 f"~2.0-2.5 mean accepted length (compression rate) range the Kangaroo paper reports for "
                 f"Vicuna-7B with exit layer 2 on Spec-Bench. Exit {ex} = round(N/16) for this "
                 f"{n}-layer model."),
    }}
    ld, li = max(1, round(n / 8)), max(2, round(n / 4))
    r = 0.8 / 0.65
    tau_h = _beta_mean_of(lambda a: hispec_buffer_expectations(min(1.0, a * r), a, 2, 4, 5)[0], 6.5, 3.5, 201)
    out["hispec"] = {"default": {
        "alpha": {"kind": "beta", "a": 6.5, "b": 3.5},
        "draft_vs_inter": {"alpha": {"kind": "beta", "a": 8.0, "b": 2.0}},
        "mean_tokens_per_step": round(tau_h, 3),
        "settings": {"draft_exit": ld, "inter_exit": li, "nd": 2, "ni": 4},
        "source": "assumption; exit placement from HiSpec (Kumar et al. 2025, arXiv:2510.01336)",
        "note": (f"simspec's assumption, not measured: intermediate (layer {li}) vs full per-token agreement "
                 f"~ Beta(6.5, 3.5) (mean 0.65); draft (layer {ld}) vs intermediate ~ Beta(8, 2) (mean 0.8). "
                 f"Exits at ~1/8 and ~1/4 of depth and nd=2, ni=4 follow the HiSpec paper; the paper reports "
                 f"throughput relative to single-layer speculation, not these rates. mean_tokens_per_step "
                 f"(per full verification) at the default settings."),
    }}
    return out


def build_profile(gpu_key: str, model: ModelConfig, *, draft: ModelConfig | None = None, tp: int = 1,
                  dtype: str = "fp16", eff: Efficiency | None = None, name: str | None = None,
                  max_batch: int = 256, date: str | None = None) -> dict[str, Any]:
    """The analytic profile document (schema v1) for ``model`` on ``tp`` × ``gpu_key``."""
    if gpu_key not in GPUS:
        raise ConfigError(f"--gpu: unknown {gpu_key!r} (choose from {', '.join(GPUS)})")
    gpu = GPUS[gpu_key]
    rf = Roofline(gpu, dtype, tp, eff)
    eff = rf.eff
    s = rf.s
    if model.num_heads % tp:
        raise ConfigError(f"--tp: {tp} does not divide the {model.num_heads} attention heads of {model.name}")
    if max_batch < 1:
        raise ConfigError(f"--max-batch: must be >= 1, got {max_batch}")
    axes = _axes(model, max_batch)
    top = axes["tokens_per_request"][-1]
    valid = {"batch_size": [1, max_batch], "tokens_per_request": [1, top], "context_tokens": [0, top]}
    stages = {
        "layer": _grid_stage(lambda B, t, c: rf.layer_ms(model, B, t, c), axes,
                             "one decoder layer (roofline per operator + 10 kernel launches"
                             + (f" + 2 all-reduces over TP{tp})" if tp > 1 else ")"), valid),
        "lm_head": _grid_stage(lambda B, t, c: rf.lm_head_ms(model, B, t, c), axes,
                               f"final norm + LM head (logits for min(tokens, {LOGITS_TOKENS_CAP}) positions "
                               f"per request)", valid),
        "embed": _grid_stage(lambda B, t, c: rf.embed_ms(model, B, t, c), axes, "token embedding", valid),
        "adapter": _grid_stage(lambda B, t, c: rf.adapter_ms(model, B, t, c), axes,
                               "Kangaroo adapter: one attention block + 2 RMSNorms, no MLP", valid),
    }
    weights = s * model.params()
    kv_per_token = model.kv_bytes_per_token(s, tp)
    models: dict[str, Any] = {"target": _model_doc(model, s, tp)}
    if draft is not None:
        dax = _axes(draft, max_batch)
        dtop = dax["tokens_per_request"][-1]
        dvalid = {"batch_size": [1, max_batch], "tokens_per_request": [1, dtop], "context_tokens": [0, dtop]}
        stages["draft_step"] = _grid_stage(lambda B, t, c: rf.model_step_ms(draft, B, t, c, tp=1), dax,
                                           f"one forward of the draft {draft.name} on one GPU (no TP)", dvalid)
        weights += s * draft.params()
        kv_per_token += draft.kv_bytes_per_token(s, 1)
        models["draft"] = _model_doc(draft, s, 1)
    n = model.num_layers
    models["target"]["exit_layers"] = {"kangaroo": max(1, round(n / 16)), "hispec_draft": max(1, round(n / 8)),
                                       "hispec_inter": max(2, round(n / 4))}
    usable = tp * gpu.memory_bytes * eff.memory_utilization - weights - tp * eff.activation_reserve_gib * 2**30
    if usable <= 0:
        raise ConfigError(f"{model.name} ({weights / 1e9:.1f} GB of {dtype} weights) does not fit {tp} x "
                          f"{gpu.name} at {eff.memory_utilization:.0%} memory use; raise --tp")
    kv_budget = int(usable // kv_per_token)
    b1 = float(rf.model_step_ms(model, 1, 1, 0))  # batch-1 decode step, for the description
    label = f"{tp}x {gpu.name}" + (f" (tensor parallel {tp})" if tp > 1 else "")
    pname = name or f"{model.name.split('/')[-1].lower()}-{gpu_key}" + (f"-tp{tp}" if tp > 1 else "") + "-analytic"
    provenance = (
        f"ANALYTIC roofline estimate (simspec.analytic), not a measurement. GPU: {gpu.source}. Achievable = peak x "
        f"efficiency: compute {eff.compute}, HBM bandwidth {eff.bandwidth}, NVLink {eff.nvlink}; {eff.launch_us} us "
        f"per kernel launch, {eff.allreduce_us} us per all-reduce. Each operator (QKV/O/MLP GEMMs, attention, "
        f"element-wise) is timed as max(FLOPs / achievable FLOP/s, bytes / achievable bandwidth); bytes = the "
        f"slice's weights + KV read for the context + activations; FLOPs = 2 x params x tokens + attention over "
        + (f"the context. TP {tp}: weights, heads and FLOPs split over {tp} GPUs, two ring all-reduces per layer. "
           if tp > 1 else "the context. One GPU (no tensor parallelism). ")
        + f"Capacity: {tp} x {gpu.memory_bytes / 2**30:.0f} GiB x {eff.memory_utilization} - "
        f"{weights / 1e9:.1f} GB weights - {eff.activation_reserve_gib} GiB/GPU reserve, over "
        f"{kv_per_token} KV bytes per token. Scheduling overhead is not modelled (0). Acceptance: simspec's "
        f"documented assumptions (see each entry's note and docs/methods.md).")
    doc = {
        "schema": "simspec-profile", "schema_version": 1,
        "meta": {
            "name": pname, "source": "analytic",
            "description": (f"ANALYTIC (roofline, not measured): {model.name} on {label}, {dtype}"
                            + (f", draft {draft.name}" if draft is not None else "")
                            + f"; batch-1 decode step ~{b1:.2f} ms."),
            "provenance": provenance,
            "device": f"{label} [analytic]",
            "dtype": dtype,
            "date": date or _dt.date.today().isoformat(),
            "versions": {"simspec": __version__},
            "analytic": {"gpu": asdict(gpu), "efficiency": asdict(eff), "tp": tp,
                         "logits_tokens_cap": LOGITS_TOKENS_CAP, "kernels_per_layer": KERNELS_PER_LAYER},
        },
        "models": models,
        "capacity": {"kv_budget_tokens": kv_budget, "max_batch_size": max_batch,
                     "max_batched_tokens": max(8192, model.max_position)},
        "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0}, "stages": stages},
        "acceptance": default_acceptance(model, draft),
    }
    return doc


def _model_doc(m: ModelConfig, s: int, tp: int) -> dict[str, Any]:
    return {"name": m.name, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position, "params": m.params(),
            "weights_bytes": s * m.params(), "kv_bytes_per_token": m.kv_bytes_per_token(s, tp)}
