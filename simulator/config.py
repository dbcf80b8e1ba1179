"""Run configuration: everything a replay needs besides the trace and the profile."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from simspec.errors import ConfigError

ROUTERS = ("round-robin", "least-outstanding")
PREEMPT_MODES = ("recompute", "swap")
#: old name of ``swap`` (before the vLLM-style engine, "keep" meant "keep KV while it fits")
PREEMPT_ALIASES = {"keep": "swap"}
BATCHING_MODES = ("vllm", "preemptive")
#: what steps.parquet keeps (simulator/steplog.py): every step, every Nth step of each replica, none
STEPS_LOG_MODES = ("full", "sampled", "none")
#: vLLM V1's ``max_num_batched_tokens`` default for ``vllm serve`` on GPUs with ≥ 70 GiB
#: (vllm/engine/arg_utils.py, EngineArgs._set_default_args); used when neither the run nor the
#: profile gives a token budget
DEFAULT_MAX_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class ComponentSpec:
    """A registry name plus its parameters, e.g. ``draft:k=4`` → ``("draft", {"k": 4})``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, what: str) -> "ComponentSpec":
        """Parse ``NAME[:key=value,key=value]``; values become int, float or str."""
        text = text.strip()
        if not text:
            raise ConfigError(f"{what}: empty value")
        name, _, rest = text.partition(":")
        params: dict[str, Any] = {}
        if rest.strip():
            for item in rest.split(","):
                key, eq, val = item.partition("=")
                key, val = key.strip(), val.strip()
                if not eq or not key or not val:
                    raise ConfigError(f"{what}: bad parameter {item!r} in {text!r} (expected key=value)")
                params[key] = _coerce(val)
        return cls(name=name.strip().lower(), params=params)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))


def _coerce(val: str) -> Any:
    for conv in (int, float):
        try:
            return conv(val)
        except ValueError:
            pass
    return val


@dataclass(frozen=True)
class RunConfig:
    """One simulated run.

    Attributes:
        scheduler: request scheduler (``fcfs``, ``srpt:predictor=oracle``, ``laps-sd``, …).
        method: speculation method (``none``, ``draft:k=4``, ``kangaroo:exit=2,gamma=6,eta=0.6``, …).
        spec_len: speculation-length policy (``fixed`` uses the method's k; ``smartspec``, …).
        replicas: number of model replicas behind the router.
        router: ``round-robin`` or ``least-outstanding`` (fewest outstanding tokens).
        max_batch_size: most requests in one step of one replica (None: the profile's capacity).
        kv_budget_tokens: KV-cache capacity of one replica in tokens (None: the profile's capacity).
        max_batched_tokens: most tokens fed in one step of one replica (prefill chunks plus k+1 per
            decode request), vLLM's ``max_num_batched_tokens`` (None: the profile's capacity, else
            8192, vLLM's ``vllm serve`` default on large GPUs).
        batching: ``vllm`` (default: vLLM V1's scheduler — running requests first, admission in
            priority order into the room left, preemption only when a KV allocation fails) or
            ``preemptive`` (the scheduler picks the batch every step; see
            :mod:`simspec.simulator.batching`).
        block_size: KV-cache block size in tokens (vLLM's ``--block-size``, default 16).
        chunked_prefill: split long prompts over steps within ``max_batched_tokens`` (vLLM's
            default); off: a prompt runs whole in one step.
        long_prefill_token_threshold: most prompt tokens one request feeds per step (None: no cap).
        watermark: share of KV blocks kept free when admitting a waiting request (vLLM's 0.01).
        preempt_mode: what happens to a preempted request's KV: ``recompute`` (default, vLLM V1:
            dropped, its context re-prefilled on resume) or ``swap`` (moved out and restored
            without recompute; the transfer time is not modelled). ``keep`` is the old name of
            ``swap``.
        window_steps: most decode-only steps the engine advances per SimPy event when the batch is
            stable (1: one step per event; outputs are identical either way).
        gpu_memory_utilization: share of GPU memory the engine may use, as vLLM's
            ``--gpu-memory-utilization``: the KV budget is then derived from the profile's memory
            figures (GPU memory × TP × share − weights − activation reserve, over KV bytes per
            token) instead of taken from ``kv_budget_tokens`` (None: the profile's budget).
        max_concurrency: most requests in flight at once, as ``vllm bench serve
            --max-concurrency``: a request due while that many are in flight is held until one
            completes and sent then (None: open loop, the trace's arrival times).
        steps_log: what ``steps.parquet`` keeps: ``full`` (every step of every replica, default),
            ``sampled`` (the steps whose per-replica index is a multiple of ``steps_log_every``) or
            ``none`` (no rows; the file is written with its columns and no rows). The summary
            counts every step whatever the mode; requests.parquet is the same in all three.
        steps_log_every: the sampling period of ``steps_log="sampled"``, in steps (ignored otherwise).
        seed: run seed; every random stream derives from it.
        slo_ttft_ms / slo_tpot_ms: optional SLO thresholds for attainment metrics.
        allow_extrapolation: permit latency lookups outside the profile's measured range.
    """

    scheduler: ComponentSpec = ComponentSpec("fcfs")
    method: ComponentSpec = ComponentSpec("none")
    spec_len: ComponentSpec = ComponentSpec("fixed")
    replicas: int = 1
    router: str = "round-robin"
    max_batch_size: int | None = None
    kv_budget_tokens: int | None = None
    max_batched_tokens: int | None = None
    preempt_mode: str = "recompute"
    batching: str = "vllm"
    block_size: int = 16
    chunked_prefill: bool = True
    long_prefill_token_threshold: int | None = None
    watermark: float = 0.01
    window_steps: int = 256
    gpu_memory_utilization: float | None = None
    max_concurrency: int | None = None
    steps_log: str = "full"
    steps_log_every: int = 100
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    allow_extrapolation: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas: must be >= 1, got {self.replicas}")
        if self.router not in ROUTERS:
            raise ConfigError(f"router: unknown {self.router!r} (choose from {', '.join(ROUTERS)})")
        if self.preempt_mode in PREEMPT_ALIASES:
            object.__setattr__(self, "preempt_mode", PREEMPT_ALIASES[self.preempt_mode])
        if self.batching not in BATCHING_MODES:
            raise ConfigError(f"batching: unknown {self.batching!r} (choose from {', '.join(BATCHING_MODES)})")
        if self.steps_log not in STEPS_LOG_MODES:
            raise ConfigError(f"steps_log: unknown {self.steps_log!r} (choose from {', '.join(STEPS_LOG_MODES)})")
        for name in ("block_size", "window_steps", "steps_log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: must be an integer >= 1, got {v!r}")
        lp = self.long_prefill_token_threshold
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or lp < 1):
            raise ConfigError(f"long_prefill_token_threshold: must be an integer >= 1, got {lp!r}")
        if not isinstance(self.watermark, (int, float)) or isinstance(self.watermark, bool) or not 0 <= self.watermark < 1:
            raise ConfigError(f"watermark: must be a number in [0, 1), got {self.watermark!r}")
        mc = self.max_concurrency
        if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or mc < 1):
            raise ConfigError(f"max_concurrency: must be an integer >= 1, got {mc!r}")
        u = self.gpu_memory_utilization
        if u is not None:
            if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
                raise ConfigError(f"gpu_memory_utilization: must be a number in (0, 1], got {u!r}")
            if self.kv_budget_tokens is not None:
                raise ConfigError("gpu_memory_utilization: give it or kv_budget_tokens, not both")
        if self.preempt_mode not in PREEMPT_MODES:
            raise ConfigError(f"preempt_mode: unknown {self.preempt_mode!r} (choose from {', '.join(PREEMPT_MODES)})")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.max_batched_tokens is not None and self.max_batched_tokens < 1:
            raise ConfigError(f"max_batched_tokens: must be >= 1, got {self.max_batched_tokens}")
        if self.kv_budget_tokens is not None and self.kv_budget_tokens < 1:
            raise ConfigError(f"kv_budget_tokens: must be >= 1, got {self.kv_budget_tokens}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name}: must be > 0, got {v}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("scheduler", "method", "spec_len"):
            d[key] = str(getattr(self, key))
        return d

    def identity_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` for hashing a run's identity (sweep run ids, default run directory names):
        the step-log fields are left out while at their defaults (``full``; the period unless
        ``sampled``), so that runs named before they existed keep their names."""
        d = self.to_dict()
        if self.steps_log != "sampled":
            d.pop("steps_log_every")
        if self.steps_log == "full":
            d.pop("steps_log")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict` (component fields given as ``name:k=v`` strings)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"config: unknown field(s) {', '.join(sorted(unknown))}")
        kw = dict(d)
        for key, what in (("scheduler", "policy"), ("method", "spec"), ("spec_len", "spec-len")):
            if key in kw and not isinstance(kw[key], ComponentSpec):
                kw[key] = ComponentSpec.parse(str(kw[key]), what)
        return cls(**kw)
