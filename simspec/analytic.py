"""Analytic (roofline) profiles: per-layer and per-stage latencies estimated from a GPU datasheet and
a model's ``config.json``, for users without the hardware. No torch; numpy only.

Every operator of a stage is timed on a smooth roofline ``(t_c^p + t_m^p)^(1/p)`` with
``t_c = FLOPs / achievable FLOP/s`` and ``t_m = bytes moved / achievable bandwidth`` (summed over the
stage's operators), plus, under tensor parallelism, the all-reduces; the stage then pays its
kernels under the engine mode (:class:`EngineMode`: ``max(GPU time + kernels·gap, kernels·host
issue)``), and every forward adds the engine's per-forward overhead (the profile's
``latency.forward_overhead``). Achievable = datasheet peak × the GPU class's efficiency
(:class:`Efficiency`); GPUs are data (``simspec/data/gpus.json``, or ``--gpu-spec FILE``). The
result is a profile of schema v2 with ``meta.source = "analytic"``: ``layer``, ``lm_head``, ``embed``,
``adapter`` (and ``draft_step`` with a draft model, placed on ``draft_tp`` of the target's GPUs; and
drafter-head stages, :mod:`simspec.analytic_heads`) as
``grid`` stages over batch size × tokens per request × context, ``capacity`` from memory minus
weights, and documented default acceptance for ``draft``, ``kangaroo`` and ``hispec`` (simspec's
assumptions, not measurements). docs/methods.md states every number's source.

Per decoder layer (B requests, t tokens each, c cached context tokens each, T = B·t, s bytes per
element, TP degree p; weights, heads and FLOPs split over the p GPUs; KV heads replicated when fewer
than p):

- GEMMs (QKV, O, gate+up, down): FLOPs ``2·T·W``; bytes ``s·(W + T·(d_in + d_out))``;
- attention: FLOPs ``4·B·t·(c + (t+1)/2)·d_q`` (QKᵀ and PV, causal within the new tokens); bytes
  ``s·(2·B·c·d_kv + 4·B·t·d_kv + 2·T·d_q)`` (read the cached K,V; write and read the new ones;
  read Q, write O);
- element-wise (2 RMSNorms, residual adds, RoPE, SiLU·mul): bytes only;
- with p > 1 two all-reduces of ``T·h·s`` bytes (ring: ``latency + 2(p−1)/p · bytes / link
  bandwidth``).

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

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1}
LOGITS_TOKENS_CAP = 16

BATCH_AXIS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKENS_AXIS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096,
               8192, 16384, 32768)
CONTEXT_AXIS = (0, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

GPU_FIELDS = ("name", "class", "peak_tflops_fp16", "peak_tflops_bf16", "peak_tflops_fp8", "memory_bandwidth_tb_s",
              "memory_gib", "interconnect_gb_s")


# ------------------------------------------------------------------------------- GPUs (data)


@dataclass(frozen=True)
class GPUSpec:
    """Datasheet figures of one GPU: dense fp16 tensor-core peak ``peak_tflops`` (bf16, fp8 in
    ``peak_by_dtype``; fp8 None when unsupported), memory bandwidth (TB/s), memory (bytes),
    GPU-to-GPU bandwidth per direction (GB/s; NVLink, Infinity Fabric or PCIe), efficiency class."""

    key: str
    name: str
    peak_tflops: float
    hbm_tb_s: float
    memory_bytes: float
    nvlink_gb_s: float
    source: str
    gpu_class: str = "hbm-hopper"
    peak_tflops_bf16: float | None = None
    peak_tflops_fp8: float | None = None
    interconnect: str = ""

    def peak_for(self, dtype: str) -> float | None:
        """Dense tensor-core peak (TFLOP/s) for ``dtype`` (None when the GPU has none)."""
        if dtype == "fp8":
            return self.peak_tflops_fp8
        if dtype == "bf16":
            return self.peak_tflops_bf16 if self.peak_tflops_bf16 is not None else self.peak_tflops
        return self.peak_tflops


def _gpu_table() -> dict[str, Any]:
    return json.loads((resources.files("simspec") / "data" / "gpus.json").read_text(encoding="utf-8"))


def gpu_from_entry(key: str, e: Any, where: str, classes: dict[str, Any]) -> GPUSpec:
    """A :class:`GPUSpec` from one table entry; ConfigError naming the missing or bad field."""
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: expected a JSON object with fields {', '.join(GPU_FIELDS)}")
    for f in GPU_FIELDS:
        if f not in e:
            raise ConfigError(f"{where}: field {f}: missing (fields: {', '.join(GPU_FIELDS)}; null for an "
                              f"unsupported dtype)")
    for f in ("peak_tflops_fp16", "memory_bandwidth_tb_s", "memory_gib", "interconnect_gb_s"):
        v = e[f]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: field {f}: expected a number > 0, got {v!r}")
    for f in ("peak_tflops_bf16", "peak_tflops_fp8"):
        v = e[f]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise ConfigError(f"{where}: field {f}: expected a number > 0 or null, got {v!r}")
    if e["class"] not in classes:
        raise ConfigError(f"{where}: field class: expected one of {', '.join(classes)}, got {e['class']!r}")
    return GPUSpec(key=key, name=str(e["name"]), peak_tflops=float(e["peak_tflops_fp16"]),
                   hbm_tb_s=float(e["memory_bandwidth_tb_s"]), memory_bytes=float(e["memory_gib"]) * 2**30,
                   nvlink_gb_s=float(e["interconnect_gb_s"]), source=str(e.get("source", where)),
                   gpu_class=str(e["class"]),
                   peak_tflops_bf16=None if e["peak_tflops_bf16"] is None else float(e["peak_tflops_bf16"]),
                   peak_tflops_fp8=None if e["peak_tflops_fp8"] is None else float(e["peak_tflops_fp8"]),
                   interconnect=str(e.get("interconnect", "")))


_TABLE = _gpu_table()
GPU_CLASSES: dict[str, dict[str, Any]] = _TABLE["classes"]
GPUS: dict[str, GPUSpec] = {k: gpu_from_entry(k, v, f"simspec/data/gpus.json: gpus.{k}", GPU_CLASSES)
                            for k, v in _TABLE["gpus"].items()}


def load_gpu_spec(path: str) -> GPUSpec:
    """``--gpu-spec FILE``: one GPU entry (the fields of simspec/data/gpus.json) in a JSON file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--gpu-spec {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"--gpu-spec {path}: not valid JSON ({exc})") from None
    key = Path(path).stem
    return gpu_from_entry(key, doc, f"--gpu-spec {path}", GPU_CLASSES)


def resolve_gpu(gpu: str | GPUSpec) -> GPUSpec:
    if isinstance(gpu, GPUSpec):
        return gpu
    if gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown {gpu!r} (choose from {', '.join(GPUS)}, or give --gpu-spec FILE)")
    return GPUS[gpu]


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet peaks a serving engine achieves, and fixed costs (see
    docs/methods.md for the reasons behind each default).

    ``compute``: achievable share of the dense tensor-core peak; ``bandwidth``: of the memory
    bandwidth peak (per GPU class in simspec/data/gpus.json; these defaults are the Hopper class);
    ``roofline_p``: sharpness of the smooth roofline (``(t_c^p + t_m^p)^(1/p)``; ∞ = the hard max);
    ``nvlink``: NCCL all-reduce bus bandwidth over the per-direction link peak; ``allreduce_us``:
    latency of one small all-reduce; ``memory_utilization``: share of GPU memory the engine may use
    (vLLM's default 0.9); ``activation_reserve_gib``: per GPU, for activations, logits and the CUDA
    context. (Kernel launch costs belong to the engine mode: :class:`EngineMode`.)
    """

    compute: float = 0.65
    bandwidth: float = 0.80
    roofline_p: float = 3.0
    nvlink: float = 0.70
    allreduce_us: float = 8.0
    memory_utilization: float = 0.90
    activation_reserve_gib: float = 2.0

    def __post_init__(self):
        for name in ("compute", "bandwidth", "nvlink", "memory_utilization"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"efficiency {name}: must be in (0, 1], got {v}")
        for name in ("allreduce_us", "activation_reserve_gib"):
            if getattr(self, name) < 0:
                raise ConfigError(f"efficiency {name}: must be >= 0, got {getattr(self, name)}")
        if not self.roofline_p >= 1.0:
            raise ConfigError(f"efficiency roofline_p: must be >= 1 (inf for the hard max), got {self.roofline_p}")

    @classmethod
    def for_gpu(cls, gpu: GPUSpec, **overrides: Any) -> "Efficiency":
        """The efficiency set of ``gpu``'s class, with ``overrides`` (None values ignored)."""
        c = GPU_CLASSES.get(gpu.gpu_class, {})
        base = {k: float(c[k]) for k in ("compute", "bandwidth", "roofline_p") if k in c}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


# ------------------------------------------------------------------------------- engine modes


@dataclass(frozen=True)
class EngineMode:
    """How a serving stack issues a forward (docs/methods.md § Engine modes, with each source).

    ``kernels_*``: GPU kernels per decoder layer / adapter / LM head (final norm + head) /
    embedding prelude; ``gap_us``: GPU-side time per kernel between back-to-back kernels;
    ``host_us_per_kernel``: CPU time to issue one kernel (0 under CUDA graphs: one replay issues
    them all); per forward (their sum is ``per_forward_ms``, the profile's ``forward_overhead``):
    ``framework_ms`` (graph launch and input copy, or the eager ``generate`` loop's bookkeeping),
    ``sampling_ms`` (sampling kernels; inside the measured eager loop), ``sync_ms`` (the
    device→host copy of the sampled tokens the host waits for).

    A stage costs ``max(GPU time + kernels·gap, kernels·host)``: the GPU waits for the CPU when
    issuing is slower than executing (eager decode of a small model), and the CPU runs ahead
    otherwise. The sync at the end of each forward keeps the CPU from running ahead across forwards.
    """

    name: str
    kernels_per_layer: int
    kernels_adapter: int
    kernels_lm_head: int
    kernels_embed: int
    gap_us: float
    host_us_per_kernel: float
    framework_ms: float
    sampling_ms: float
    sync_ms: float
    source: str

    @property
    def per_forward_ms(self) -> float:
        """Fixed cost per forward: framework (graph launch and input copy, or the eager
        ``generate`` loop), sampling, and the device→host sync of the sampled tokens."""
        return round(self.framework_ms + self.sampling_ms + self.sync_ms, 6)


ENGINES: dict[str, EngineMode] = {
    "cuda-graph": EngineMode(
        "cuda-graph", kernels_per_layer=10, kernels_adapter=6, kernels_lm_head=2, kernels_embed=1, gap_us=2.0,
        host_us_per_kernel=0.0, framework_ms=0.020, sampling_ms=0.010, sync_ms=0.015,
        source=("a CUDA-graph serving engine (vLLM-style): 10 fused kernels per Llama layer (fused RMSNorm, QKV "
                "GEMM, rotary, KV-cache write, attention, O GEMM, fused add+RMSNorm, gate/up GEMM, SiLU*mul, down "
                "GEMM), 2 us GPU gap per kernel inside a graph, no per-kernel host cost; per forward 45 us = "
                "graph launch ~10 us + sampling kernels ~10 us + H2D input copy ~10 us + D2H token sync ~15 us "
                "(simspec's assumption, docs/methods.md)")),
    "eager": EngineMode(
        "eager", kernels_per_layer=36, kernels_adapter=30, kernels_lm_head=7, kernels_embed=10, gap_us=2.0,
        host_us_per_kernel=8.4, framework_ms=0.250, sampling_ms=0.0, sync_ms=0.015,
        source=("eager PyTorch + Hugging Face transformers (generate), as the public speculative-decoding "
                "benchmarks run: 36 aten kernels per LlamaDecoderLayer decode, 10 in the prelude, 7 in the head "
                "(counted), 8.4 us host time per kernel and 0.25 ms generate() overhead per forward (measured "
                "on a CPU by benchmarks/measure_eager_overhead.py) + 15 us D2H token sync (assumption)")),
}


def resolve_engine(engine: str | EngineMode) -> EngineMode:
    if isinstance(engine, EngineMode):
        return engine
    if engine not in ENGINES:
        raise ConfigError(f"--engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    return ENGINES[engine]


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


def resolve_model_config(spec: str, option: str = "--model") -> Path:
    """A bundled model config name (a file stem in ``simspec/data/models/`` or an alias such as
    ``llama2-7b``), a ``config.json`` path, or a directory holding one → the file. ``option``
    names the option in the one-line error."""
    bundled = bundled_models()
    key = MODEL_ALIASES.get(spec.lower(), spec.lower())
    if key in bundled:
        return bundled[key]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{option} {spec!r}: no such file and no bundled model of that name "
                          f"(bundled: {', '.join(bundled)})")
    return path


def read_model_config(path: Path, option: str = "--model") -> dict[str, Any]:
    """A model ``config.json`` as a JSON object, or a one-line error naming ``option`` and the file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot read ({exc.strerror})") from None
    except ValueError as exc:
        raise ConfigError(f"{option} {path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{option} {path}: expected a JSON object (a Hugging Face config.json)")
    return doc


def load_model_config(name_or_path: str) -> ModelConfig:
    """A bundled model name (``llama-2-7b``, ``vicuna-7b``, …) or a path to a ``config.json`` (or to
    a directory holding one)."""
    path = resolve_model_config(name_or_path)
    return ModelConfig.from_hf(read_model_config(path), str(path))


# ------------------------------------------------------------------------------- the roofline


def smooth_max(a, b, p: float):
    """``(a^p + b^p)^(1/p)`` for a, b >= 0 (numpy-broadcastable): the smooth roofline. It is never
    below ``max(a, b)``, at most ``2^(1/p)·max(a, b)`` (at a == b, the ridge), and tends to the hard
    max as p → ∞ (``p = inf`` is the hard max)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    hi = np.maximum(a, b)
    if math.isinf(p):
        return hi
    safe = np.where(hi > 0, hi, 1.0)
    return np.where(hi > 0, hi * ((a / safe) ** p + (b / safe) ** p) ** (1.0 / p), 0.0)


class Roofline:
    """Operator times (ms) for one GPU kind, dtype, TP degree, efficiency set and engine mode. Every
    method takes numpy-broadcastable ``B`` (requests), ``t`` (tokens fed per request), ``c`` (cached
    context per request) and returns ms."""

    def __init__(self, gpu: GPUSpec | str, dtype: str = "fp16", tp: int = 1, eff: Efficiency | None = None,
                 engine: EngineMode | str = "cuda-graph"):
        gpu = resolve_gpu(gpu)
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
        if tp < 1:
            raise ConfigError(f"--tp: must be >= 1, got {tp}")
        peak = gpu.peak_for(dtype)
        if peak is None:
            raise ConfigError(f"--dtype {dtype}: {gpu.name} has no {dtype} tensor-core peak (field "
                              f"peak_tflops_{dtype} is null)")
        self.gpu, self.dtype, self.tp = gpu, dtype, tp
        self.eff = eff or Efficiency.for_gpu(gpu)
        self.engine = resolve_engine(engine)
        self.s = DTYPE_BYTES[dtype]
        self.flops_per_s = peak * 1e12 * self.eff.compute
        self.bytes_per_s = gpu.hbm_tb_s * 1e12 * self.eff.bandwidth
        self.link_bytes_per_s = gpu.nvlink_gb_s * 1e9 * self.eff.nvlink

    # --- primitives (seconds) ---
    _record: list | None = None  # set by explain(): every _op appends (compute s, memory s)

    def _op(self, flops, nbytes):
        tc, tm = flops / self.flops_per_s, nbytes / self.bytes_per_s
        if self._record is not None:
            self._record.append((float(np.max(tc)), float(np.max(tm))))
        return smooth_max(tc, tm, self.eff.roofline_p)

    def _gemm(self, T, w, d_in, d_out):
        return self._op(2.0 * T * w, self.s * (w + T * (d_in + d_out)))

    def _allreduce(self, nbytes, count: int = 1, tp: int | None = None):
        p = self.tp if tp is None else tp
        if p <= 1:
            return 0.0 * nbytes
        return count * (self.eff.allreduce_us * 1e-6 + 2.0 * (p - 1) / p * nbytes / self.link_bytes_per_s)

    def _issue(self, gpu_sec, kernels: int):
        """A stage of ``kernels`` kernels whose GPU work takes ``gpu_sec``: the GPU gaps between
        kernels, and the host issue time when that is longer (eager)."""
        e = self.engine
        gpu = gpu_sec + kernels * e.gap_us * 1e-6
        if e.host_us_per_kernel <= 0:
            return gpu
        return np.maximum(gpu, kernels * e.host_us_per_kernel * 1e-6)

    def _split(self, m: ModelConfig, tp: int):
        q = m.num_heads / tp * m.head_dim
        kv = math.ceil(m.num_kv_heads / tp) * m.head_dim
        return q, kv, m.intermediate_size / tp

    def _attention(self, m: ModelConfig, B, t, c, tp: int):
        q, kv, _ = self._split(m, tp)
        flops = 4.0 * B * t * (c + (t + 1) / 2.0) * q
        nbytes = self.s * (2.0 * B * c * kv + 4.0 * B * t * kv + 2.0 * B * t * q)
        return self._op(flops, nbytes)

    # --- per-operator parts (seconds of GPU work; used by the stages and by --explain) ---
    def layer_parts(self, m: ModelConfig, B, t, c, tp: int | None = None) -> dict[str, Any]:
        """GPU seconds of each operator of one decoder layer (before kernel gaps and host issue)."""
        p = self.tp if tp is None else tp
        h = m.hidden_size
        q, kv, inter = self._split(m, p)
        T = B * t
        return {
            "qkv_gemm": self._gemm(T, h * (q + 2 * kv), h, q + 2 * kv),
            "attention": self._attention(m, B, t, c, p),
            "o_gemm": self._gemm(T, q * h, q, h),
            "gate_up_gemm": self._gemm(T, 2 * h * inter, h, 2 * inter),
            "down_gemm": self._gemm(T, inter * h, inter, h),
            "elementwise": self._op(0.0, self.s * T * (8.0 * h + 2.0 * (q + kv) + 3.0 * inter)),
            "allreduce": self._allreduce(self.s * T * h, 2, p),
        }

    def lm_head_parts(self, m: ModelConfig, B, t, c, tp: int | None = None) -> dict[str, Any]:
        p = self.tp if tp is None else tp
        h, v = m.hidden_size, m.vocab_size / p
        T = B * t
        Th = B * np.minimum(t, LOGITS_TOKENS_CAP)
        gather = 0.0 * T
        if p > 1:
            gather = gather + self.eff.allreduce_us * 1e-6 + (p - 1) / p * self.s * Th * m.vocab_size / self.link_bytes_per_s
        return {"final_norm": self._op(0.0, self.s * 2.0 * T * h) + 0.0 * c, "vocab_gemm": self._gemm(Th, h * v, h, v),
                "logits_gather": gather}

    def embed_parts(self, m: ModelConfig, B, t, c, tp: int | None = None) -> dict[str, Any]:
        p = self.tp if tp is None else tp
        T = B * t
        return {"gather": self._op(0.0, self.s * 2.0 * T * m.hidden_size) + 0.0 * c,
                "allreduce": self._allreduce(self.s * T * m.hidden_size, 1, p)}

    # --- stages (ms) ---
    def layer_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """One decoder layer."""
        sec = sum(self.layer_parts(m, B, t, c, tp).values())
        return 1e3 * self._issue(sec, self.engine.kernels_per_layer)

    def adapter_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Kangaroo's adapter: one attention block (QKV, attention, O) with its two RMSNorms."""
        p = self.tp if tp is None else tp
        h = m.hidden_size
        q, kv, _ = self._split(m, p)
        T = B * t
        sec = self._gemm(T, h * (q + 2 * kv), h, q + 2 * kv) + self._attention(m, B, t, c, p)
        sec = sec + self._gemm(T, q * h, q, h) + self._op(0.0, self.s * T * (6.0 * h + 2.0 * (q + kv)))
        sec = sec + self._allreduce(self.s * T * h, 1, p)
        return 1e3 * self._issue(sec, self.engine.kernels_adapter)

    def lm_head_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Final RMSNorm over all tokens + the vocabulary projection for ``min(t, 16)`` positions per
        request (+ the logits gather under TP)."""
        sec = sum(self.lm_head_parts(m, B, t, c, tp).values())
        return 1e3 * self._issue(sec, self.engine.kernels_lm_head)

    def embed_ms(self, m: ModelConfig, B, t, c, tp: int | None = None):
        """Token-embedding gather (vocabulary-parallel under TP, then an all-reduce) and the prelude."""
        sec = sum(self.embed_parts(m, B, t, c, tp).values())
        return 1e3 * self._issue(sec, self.engine.kernels_embed)

    def model_step_ms(self, m: ModelConfig, B, t, c, tp: int | None = None, pipeline: bool = False):
        """A whole forward (embedding, all layers, LM head) of ``m``, without the per-forward
        overhead (e.g. a draft-model pass; ``tp`` default: this roofline's TP degree). With
        ``pipeline`` the ``tp`` GPUs hold consecutive slices of the layers instead (pipeline
        parallel): each runs unsharded, one after another, and the hidden states hop ``tp − 1``
        times between them (one point-to-point transfer each)."""
        p = self.tp if tp is None else tp
        if pipeline and p > 1:
            hop = self.eff.allreduce_us * 1e-6 + self.s * B * t * m.hidden_size / self.link_bytes_per_s
            return (self.embed_ms(m, B, t, c, 1) + m.num_layers * self.layer_ms(m, B, t, c, 1)
                    + self.lm_head_ms(m, B, t, c, 1) + 1e3 * (p - 1) * hop)
        return (self.embed_ms(m, B, t, c, p) + m.num_layers * self.layer_ms(m, B, t, c, p)
                + self.lm_head_ms(m, B, t, c, p))

    def forward_ms(self, m: ModelConfig, B, t, c, tp: int | None = None, pipeline: bool = False):
        """:meth:`model_step_ms` plus the engine's per-forward overhead: one forward as the
        simulator prices it."""
        return self.model_step_ms(m, B, t, c, tp, pipeline) + self.engine.per_forward_ms


# ------------------------------------------------------------------------------- --explain


def explain(rf: Roofline, model: ModelConfig, *, draft: ModelConfig | None = None, batch: int = 1,
            context: int = 512, k: int = 4, draft_tp: int = 1, pipeline: bool = False) -> list[str]:
    """Lines of a per-operator breakdown of one decode step of ``batch`` requests with ``context``
    cached tokens each: the plain step (embedding, N layers by operator, LM head, kernel issue,
    per-forward overhead) and, with a draft, the speculative step at ``k`` (k draft passes + one
    verification of k+1 tokens per request)."""
    e = rf.engine
    B, c = float(batch), float(context)
    rows: list[tuple[str, str, float, str, int]] = []

    def parts(stage: str, fn, count: int, t: float, kernels: int, m: ModelConfig, tp: int | None = None):
        rf._record = []
        try:
            d = fn(m, B, t, c, tp)
        finally:
            rec, rf._record = rf._record, None
        it = iter(rec)
        gpu = 0.0
        for op, sec in d.items():
            sec = float(sec)
            gpu += sec
            if op in ("allreduce", "logits_gather"):
                bound = "link" if sec > 0 else "-"
            else:
                tc, tm = next(it)
                bound = "compute" if tc > tm else "memory"
            if sec > 0:
                rows.append((stage, op, 1e3 * sec, bound, count))
        issue = float(rf._issue(gpu, kernels)) - gpu
        label = (f"{kernels} kernels: gaps" if issue <= kernels * e.gap_us * 1e-6 + 1e-12
                 else f"{kernels} kernels: host issue (eager)")
        rows.append((stage, label, 1e3 * issue, "launch", count))

    def forward(m: ModelConfig, t: float, tp: int | None, role: str):
        start = len(rows)
        parts(f"{role}.embed", rf.embed_parts, 1, t, e.kernels_embed, m, tp)
        parts(f"{role}.layer", rf.layer_parts, m.num_layers, t, e.kernels_per_layer, m, tp)
        parts(f"{role}.lm_head", rf.lm_head_parts, 1, t, e.kernels_lm_head, m, tp)
        rows.append((role, "per-forward overhead", e.per_forward_ms, "fixed", 1))
        return sum(r[2] * r[4] for r in rows[start:])

    out = [f"one decode step of {batch} request(s), {context} cached tokens each: {model.name} on {rf.tp}x "
           f"{rf.gpu.name}, {rf.dtype}, {e.name} engine (ms; x count = times per forward)"]
    plain = forward(model, 1.0, None, "target")
    verify = None
    draft_ms = None
    if draft is not None and k > 0:
        verify = forward(model, float(k + 1), None, "verify")
        draft_ms = forward(draft, 1.0, draft_tp, "draft") if not pipeline else None
        if pipeline:
            draft_ms = float(rf.forward_ms(draft, B, 1.0, c, draft_tp, True))
            rows.append(("draft", f"whole forward, pipeline over {draft_tp} GPUs", draft_ms, "-", 1))
    w = max(len(r[0]) + len(r[1]) for r in rows) + 3
    out.append(f"{'stage / operator':<{w}} {'ms each':>10} {'x':>4} {'ms':>10}  bound")
    for stage, op, ms, bound, count in rows:
        out.append(f"{stage + ' / ' + op:<{w}} {ms:>10.4f} {count:>4d} {ms * count:>10.4f}  {bound}")
    out.append(f"plain step (one target forward): {plain:.4f} ms")
    if verify is not None:
        spec = k * draft_ms + verify
        out.append(f"speculative step, k={k}: {k} x draft {draft_ms:.4f} + verify {verify:.4f} = {spec:.4f} ms; "
                   f"speculative/plain = {spec / plain:.3f}; speedup = tau / {spec / plain:.3f} "
                   f"(tau = mean tokens per step), e.g. {2.3 / (spec / plain):.2f}x at tau = 2.3")
    out.append("(scheduler overhead per step not included; the profile's latency.overhead adds it)")
    return out


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


def check_placement(model: ModelConfig, draft: ModelConfig | None, tp: int, draft_tp: int | None,
                    draft_parallel: str) -> int:
    """Validate TP and the draft's placement; return the draft's degree (default: the target's TP)."""
    if model.num_heads % tp:
        raise ConfigError(f"--tp: {tp} does not divide the {model.num_heads} attention heads of {model.name}")
    if draft is None:
        return 1
    dtp = tp if draft_tp is None else draft_tp
    if draft_parallel not in ("tensor", "pipeline"):
        raise ConfigError(f"--draft-parallel: expected tensor or pipeline, got {draft_parallel!r}")
    if dtp < 1:
        raise ConfigError(f"--draft-tp: must be >= 1, got {dtp}")
    if dtp > tp:
        raise ConfigError(f"--draft-tp: {dtp} GPUs, but the draft shares the target's {tp} GPU(s); use at most {tp}")
    if draft_parallel == "tensor" and draft.num_heads % dtp:
        raise ConfigError(f"--draft-tp: {dtp} does not divide the {draft.num_heads} attention heads of the draft "
                          f"{draft.name} (or use --draft-parallel pipeline)")
    if draft_parallel == "pipeline" and dtp > draft.num_layers:
        raise ConfigError(f"--draft-tp: {dtp} pipeline stages for the {draft.num_layers} layers of the draft "
                          f"{draft.name}")
    return dtp


def kv_capacity(gpu: GPUSpec, eff: Efficiency, dtype: str, model: ModelConfig, tp: int,
                draft: ModelConfig | None = None, draft_tp: int = 1) -> int:
    """KV budget (tokens) when the target is split over ``tp`` GPUs and the draft over ``draft_tp``
    of the same GPUs: the most loaded GPU (one holding a draft shard) bounds it. Per GPU: usable
    memory − target weights/tp − draft weights/draft_tp − reserve, over the KV bytes per token it
    holds (target KV/tp + draft KV/draft_tp). With ``draft_tp == tp`` this is the pooled
    ``(tp·memory·u − all weights − tp·reserve) / (all KV bytes per token)``. ConfigError naming both
    models when they do not fit."""
    s = DTYPE_BYTES[dtype]
    per_gpu = gpu.memory_bytes * eff.memory_utilization - eff.activation_reserve_gib * 2**30
    wt = s * model.params() / tp
    kv = model.kv_bytes_per_token(s, tp) / tp
    wd = 0.0
    if draft is not None:
        wd = s * draft.params() / draft_tp
        kv += draft.kv_bytes_per_token(s, draft_tp) / draft_tp
    usable = per_gpu - wt - wd
    if usable <= 0:
        where = f"{tp} x {gpu.name} ({gpu.memory_bytes / 2**30:.0f} GiB each) at {eff.memory_utilization:.0%} memory use"
        if draft is None or per_gpu - wt <= 0:
            raise ConfigError(f"{model.name} ({s * model.params() / 1e9:.1f} GB of {dtype} weights, "
                              f"{wt / 1e9:.1f} GB per GPU) does not fit {where}; raise --tp")
        raise ConfigError(f"target {model.name} ({wt / 1e9:.1f} GB of {dtype} weights per GPU) + draft {draft.name} "
                          f"({wd / 1e9:.1f} GB per GPU over {draft_tp} GPU(s)) do not fit {where}; raise --tp or "
                          f"--draft-tp")
    return int(usable // kv)


def build_profile(gpu_key: str | GPUSpec, model: ModelConfig, *, draft: ModelConfig | None = None, tp: int = 1,
                  dtype: str = "fp16", eff: Efficiency | None = None, name: str | None = None,
                  max_batch: int = 256, date: str | None = None, engine: str | EngineMode = "cuda-graph",
                  draft_tp: int | None = None, draft_parallel: str = "tensor",
                  heads: list[Any] | None = None) -> dict[str, Any]:
    """The analytic profile document (schema v2) for ``model`` on ``tp`` × ``gpu_key`` (a bundled GPU
    name or a :class:`GPUSpec`) under ``engine``; the draft on ``draft_tp`` (default ``tp``) of the
    same GPUs, tensor- or pipeline-parallel."""
    gpu = resolve_gpu(gpu_key)
    rf = Roofline(gpu, dtype, tp, eff, engine)
    eff, eng = rf.eff, rf.engine
    s = rf.s
    dtp = check_placement(model, draft, tp, draft_tp, draft_parallel)
    if max_batch < 1:
        raise ConfigError(f"--max-batch: must be >= 1, got {max_batch}")
    axes = _axes(model, max_batch)
    top = axes["tokens_per_request"][-1]
    valid = {"batch_size": [1, max_batch], "tokens_per_request": [1, top], "context_tokens": [0, top]}
    kern = f"{eng.kernels_per_layer} kernels ({eng.name})"
    stages = {
        "layer": _grid_stage(lambda B, t, c: rf.layer_ms(model, B, t, c), axes,
                             f"one decoder layer (smooth roofline per operator + {kern}"
                             + (f" + 2 all-reduces over TP{tp})" if tp > 1 else ")"), valid),
        "lm_head": _grid_stage(lambda B, t, c: rf.lm_head_ms(model, B, t, c), axes,
                               f"final norm + LM head (logits for min(tokens, {LOGITS_TOKENS_CAP}) positions "
                               f"per request)", valid),
        "embed": _grid_stage(lambda B, t, c: rf.embed_ms(model, B, t, c), axes, "token embedding + prelude", valid),
        "adapter": _grid_stage(lambda B, t, c: rf.adapter_ms(model, B, t, c), axes,
                               "Kangaroo adapter: one attention block + 2 RMSNorms, no MLP", valid),
    }
    models: dict[str, Any] = {"target": _model_doc(model, s, tp)}
    placement = None
    if draft is not None:
        dax = _axes(draft, max_batch)
        dtop = dax["tokens_per_request"][-1]
        dvalid = {"batch_size": [1, max_batch], "tokens_per_request": [1, dtop], "context_tokens": [0, dtop]}
        pipe = draft_parallel == "pipeline"
        placement = ("one GPU" if dtp == 1 else
                     f"{dtp} GPUs, " + ("pipeline parallel" if pipe else "tensor parallel") + " (of the target's)")
        stages["draft_step"] = _grid_stage(lambda B, t, c: rf.model_step_ms(draft, B, t, c, tp=dtp, pipeline=pipe),
                                           dax, f"one forward of the draft {draft.name} on {placement}", dvalid)
        models["draft"] = _model_doc(draft, s, dtp)
        models["draft"]["placement"] = {"gpus": dtp, "parallel": draft_parallel if dtp > 1 else "none"}
    if heads:  # EAGLE / EAGLE-3 / Medusa / MTP drafter stages (simspec.analytic_heads)
        from simspec.analytic_heads import head_stages

        hs, hm = head_stages(rf, model, heads, _grid_stage, axes, valid)
        stages.update(hs)
        models.update(hm)
    n = model.num_layers
    models["target"]["exit_layers"] = {"kangaroo": max(1, round(n / 16)), "hispec_draft": max(1, round(n / 8)),
                                       "hispec_inter": max(2, round(n / 4))}
    kv_budget = kv_capacity(gpu, eff, dtype, model, tp, draft, dtp)
    weights = s * model.params() + (s * draft.params() if draft is not None else 0)
    b1 = float(rf.forward_ms(model, 1, 1, 0))  # batch-1 decode step, for the description
    label = f"{tp}x {gpu.name}" + (f" (tensor parallel {tp})" if tp > 1 else "")
    pname = name or (f"{model.name.split('/')[-1].lower()}-{gpu.key}" + (f"-tp{tp}" if tp > 1 else "")
                     + ("-eager" if eng.name == "eager" else "") + "-analytic")
    provenance = (
        f"ANALYTIC roofline estimate (simspec.analytic), not a measurement. GPU: {gpu.source}. Achievable = peak x "
        f"efficiency ({gpu.gpu_class} class): compute {eff.compute}, memory bandwidth {eff.bandwidth}, link "
        f"{eff.nvlink}; {eff.allreduce_us} us per all-reduce. Each operator (QKV/O/MLP GEMMs, attention, "
        f"element-wise) is timed as the smooth roofline (t_compute^p + t_memory^p)^(1/p), p = {eff.roofline_p}; "
        f"bytes = the slice's weights + KV read for the context + activations; FLOPs = 2 x params x tokens + "
        f"attention over the context. "
        + (f"TP {tp}: weights, heads and FLOPs split over {tp} GPUs, two ring all-reduces per layer. "
           if tp > 1 else "One GPU (no tensor parallelism). ")
        + f"Engine {eng.name}: {eng.source}. A stage costs max(GPU time + kernels x {eng.gap_us} us, kernels x "
        f"{eng.host_us_per_kernel} us host issue); each forward adds {eng.per_forward_ms} ms (latency.forward_overhead). "
        + (f"Draft {draft.name} on {placement}. " if draft is not None else "")
        + f"Capacity: per GPU {gpu.memory_bytes / 2**30:.0f} GiB x {eff.memory_utilization} - weights - "
        f"{eff.activation_reserve_gib} GiB reserve, over the KV bytes per token it holds ({weights / 1e9:.1f} GB "
        f"weights in all). Scheduling overhead per step is not modelled (0). Acceptance: simspec's documented "
        f"assumptions (see each entry's note and docs/methods.md).")
    fwd = eng.per_forward_ms
    doc = {
        "schema": "simspec-profile", "schema_version": 2,
        "meta": {
            "name": pname, "source": "analytic",
            "description": (f"ANALYTIC (roofline, not measured): {model.name} on {label}, {dtype}, {eng.name} engine"
                            + (f", draft {draft.name}" if draft is not None else "")
                            + f"; batch-1 decode step ~{b1:.2f} ms."),
            "provenance": provenance,
            "device": f"{label} [analytic]",
            "dtype": dtype,
            "date": date or _dt.date.today().isoformat(),
            "versions": {"simspec": __version__},
            "analytic": {"gpu": asdict(gpu), "efficiency": asdict(eff),
                         "engine": {**asdict(eng), "per_forward_ms": eng.per_forward_ms}, "tp": tp,
                         "draft_tp": dtp if draft is not None else None,
                         "draft_parallel": draft_parallel if draft is not None else None,
                         "logits_tokens_cap": LOGITS_TOKENS_CAP},
        },
        "models": models,
        "capacity": {"kv_budget_tokens": kv_budget, "max_batch_size": max_batch,
                     "max_batched_tokens": max(8192, model.max_position)},
        "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                    "forward_overhead": {"target_ms": fwd, "draft_ms": fwd, "early_exit_ms": fwd,
                                         "engine": eng.name, "source": eng.source},
                    "stages": stages},
        "acceptance": default_acceptance(model, draft),
    }
    return doc


def _model_doc(m: ModelConfig, s: int, tp: int) -> dict[str, Any]:
    return {"name": m.name, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "vocab_size": m.vocab_size,
            "max_position_embeddings": m.max_position, "params": m.params(),
            "weights_bytes": s * m.params(), "kv_bytes_per_token": m.kv_bytes_per_token(s, tp)}
