"""Validation against an engine nobody here wrote: transformers' continuous-batching engine
(``transformers.generation.continuous_batching``: paged KV cache, chunked prefill under a per-step
token budget, FIFO scheduler) serves a trace on the wall clock; simspec simulates the same trace
with the same limits; the report gives per-request latency/TTFT error, MAPE, mean and p99
(torch + transformers; reached only from ``simspec validate --engine transformers-cb``).

**Real run** (:func:`engine_run`): the model is loaded (the bundled SmolLM2-135M, a local checkpoint,
or a random-weight model from a config on a GPU) with ``attn_implementation="paged|sdpa"`` and
served by a :class:`~transformers.generation.continuous_batching.ContinuousBatchingManager` built
from :class:`EngineSettings`. After warm-up requests (not timed), the trace is admitted on the wall
clock: request ``i`` is ``add_request``-ed at ``t0 + arrival_s[i]`` with ``max_new_tokens =
output_tokens[i]`` and EOS disabled (``eos_token_id=-1``), so it produces exactly its trace length.
The engine's own clock gives each request's admission (``created_time``), its first token
(``timestamps[0]``) and its completion (``lifespan[1]``); those times, relative to ``t0``, are the
real per-request table. Every engine step is also logged (scheduler output: requests, query tokens,
cached tokens per request; wall time of the step), by wrapping the scheduler's ``schedule_batch``
and the processor's ``update_batch`` for the duration of the run.

**Simulated run**: :func:`simspec.simulator.run.simulate` on the trace with the *admission times the
engine recorded* as arrivals, with a :class:`~simspec.simulator.config.RunConfig` built from the
engine's settings by :func:`run_config_for_engine` — the one place that maps the engine onto the
simulator (switch it to ``batching="vllm"`` when that mode lands).

**Machine load**: the 1-minute load average is sampled every second during the real run; a run
whose load exceeded the number of CPUs is refused (one-line error, exit 2) instead of reported.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd

from simspec.errors import ConfigError, SimspecError
from simspec.trace import Trace

ENGINE_NAME = "transformers-cb"


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class EngineSettings:
    """The transformers continuous-batching settings that shape scheduling (``ContinuousBatchingConfig``).

    Attributes:
        scheduler: ``fifo`` (decoding requests first, then the prefilling one, then waiting requests
            in arrival order) or ``prefill_first``.
        page_size_tokens: KV tokens per page (the engine's block size).
        num_blocks: KV blocks in the cache; with ``page_size_tokens`` the KV capacity in tokens.
        max_batch_tokens: most query tokens in one step (chunked prefill splits a prompt to fit).
        max_requests_per_batch: most requests in one step.
        safety_margin: share of free blocks under which no new prefill is admitted (None: the
            scheduler's default, 0.15 for fifo).
        attn_implementation: the paged attention kernel (``paged|sdpa`` on CPU).
        cuda_graphs: let the engine use CUDA graphs (GPU only; False on CPU).
    """

    scheduler: str = "fifo"
    page_size_tokens: int = 32
    num_blocks: int = 512
    max_batch_tokens: int = 512
    max_requests_per_batch: int = 8
    safety_margin: float | None = None
    attn_implementation: str = "paged|sdpa"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.scheduler not in ("fifo", "prefill_first"):
            raise ConfigError(f"--engine-scheduler {self.scheduler!r}: expected fifo or prefill_first")
        for name in ("page_size_tokens", "num_blocks", "max_batch_tokens", "max_requests_per_batch"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"engine setting {name}: must be >= 1, got {getattr(self, name)}")
        if self.page_size_tokens < 4:
            raise ConfigError(f"--page-size {self.page_size_tokens}: transformers needs at least 4 tokens per page")

    @property
    def kv_capacity_tokens(self) -> int:
        return int(self.page_size_tokens * self.num_blocks)


def run_config_for_engine(settings: EngineSettings, *, seed: int = 0) -> Any:
    """The simulated run configured like the engine: THE mapping from transformers' continuous
    batching onto simspec (one function, so it switches in one place).

    - scheduler ``fifo`` → ``fcfs`` under ``batching="vllm"``: running (decoding or partly
      prefilled) requests first, then waiting ones admitted in arrival order into the room left;
    - ``max_requests_per_batch`` → ``max_batch_size``; ``max_batch_tokens`` →
      ``max_batched_tokens`` with ``chunked_prefill=True`` (a prompt that does not fit the room
      left is split, as the engine does);
    - ``page_size`` → ``block_size``; ``num_blocks × page_size`` → ``kv_budget_tokens``;
    - ``safety_margin`` (no new prefill while fewer than this share of blocks is free; fifo's
      default 0.15) → ``watermark`` (share of blocks kept free when admitting);
    - preemption: the engine frees a preempted request's blocks (or offloads them) →
      ``preempt_mode="recompute"``.

    On a simulator without the vLLM batching mode (``RunConfig`` with no ``batching`` field) the
    same limits are set on the fields it has (whole-prompt prefills, no block rounding).
    """
    from simspec.simulator.config import ComponentSpec, RunConfig

    if settings.scheduler != "fifo":
        raise ConfigError(f"--engine-scheduler {settings.scheduler}: only fifo has a simspec counterpart (fcfs)")
    kw: dict[str, Any] = dict(scheduler=ComponentSpec("fcfs"), method=ComponentSpec("none"),
                              max_batch_size=int(settings.max_requests_per_batch),
                              kv_budget_tokens=int(settings.kv_capacity_tokens),
                              max_batched_tokens=int(settings.max_batch_tokens), preempt_mode="recompute",
                              seed=seed, allow_extrapolation=True)
    fields = RunConfig.__dataclass_fields__
    if "batching" in fields:
        kw.update(batching="vllm", block_size=int(settings.page_size_tokens), chunked_prefill=True)
        if "watermark" in fields:
            kw["watermark"] = float(settings.safety_margin if settings.safety_margin is not None else 0.15)
    return RunConfig(**kw)


def mapping_notes(settings: EngineSettings) -> list[str]:
    """The differences between the engine and the simulated run that remain under
    :func:`run_config_for_engine` (written into every report)."""
    from simspec.simulator.config import RunConfig

    vllm = "batching" in RunConfig.__dataclass_fields__
    notes = ["simulated with fcfs, max_batch_size = max_requests_per_batch, max_batched_tokens = "
             "max_batch_tokens, kv_budget_tokens = num_blocks x page_size, preempt_mode recompute"
             + (", batching vllm, block_size = page_size, chunked prefill on, watermark = the engine's "
                "safety margin" if vllm else
                " (this simulator has no vllm batching mode: whole-prompt prefills, no block rounding)")]
    if vllm:
        notes.append("safety margin vs watermark: the engine stops admitting new prefills while fewer than "
                     "that share of blocks is free; the simulator keeps that share free when admitting "
                     "(same threshold, slightly different rule); the trace stays far below the KV capacity "
                     f"({settings.kv_capacity_tokens} tokens) either way")
    else:
        notes.append("chunked prefill: the engine splits a prompt that does not fit the step's remaining token "
                     "budget; this simulator defers it to a later step instead")
    notes += [
        "LM head: both the engine and the simulator compute logits for the last prompt token of a prefill only",
        "the engine's per-step host work (scheduling, building the paged-attention index tensors, "
        "sampling) is outside the profile's stages; it is measured per step in engine_steps.csv and "
        "folded into latency.overhead by --fit-overhead",
    ]
    return notes


# ------------------------------------------------------------------------------------ load sampler


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc (None elsewhere)."""
    try:
        fields = open("/proc/stat", encoding="ascii").readline().split()[1:]
        vals = [int(x) for x in fields]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
        me = open("/proc/self/stat", encoding="ascii").read().rsplit(")", 1)[1].split()
        return busy, int(me[11]) + int(me[12])  # utime + stime, all threads
    except (OSError, ValueError, IndexError):
        return None


class LoadSampler:
    """Samples the machine load every ``period_s`` in a daemon thread between start() and stop():
    the 1-minute load average, and the CPU cores busy with *other* processes over each period
    (machine busy time minus this process's, from /proc/stat and /proc/self/stat). The load
    average lags by a minute; the other processes' CPU use shows contention as it happens."""

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self.samples: list[tuple[float, float, float | None]] = []  # (s since start, load 1m, others' cores)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> "LoadSampler":
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="simspec-load-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        prev, prev_t = _cpu_jiffies(), time.perf_counter()
        while not self._stop.wait(self.period_s):
            now, now_t = _cpu_jiffies(), time.perf_counter()
            others = None
            if prev is not None and now is not None and now_t > prev_t:
                d_busy, d_me = now[0] - prev[0], now[1] - prev[1]
                others = max(0.0, (d_busy - d_me) / self._hz / (now_t - prev_t))
            prev, prev_t = now, now_t
            try:
                self.samples.append((now_t - self._t0, os.getloadavg()[0], others))
            except OSError:
                return

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        vals = [v for _, v, _ in self.samples]
        oth = [o for _, _, o in self.samples if o is not None]
        return {"n_samples": len(vals), "period_s": self.period_s,
                "max_1m": round(max(vals), 2) if vals else None,
                "mean_1m": round(float(np.mean(vals)), 2) if vals else None,
                "other_processes_cores_mean": round(float(np.mean(oth)), 2) if oth else None,
                "other_processes_cores_p90": round(float(np.percentile(oth, 90)), 2) if oth else None,
                "other_processes_cores_series": [round(o, 2) for o in oth]}


def other_cores_limit(cpus: int, threads: int, max_other_cores: float | None = None) -> float:
    """CPU cores other processes may keep busy on average during a gated run: ``max_other_cores``
    when given (``--max-other-cores``: e.g. 0.1 for a run that backs a 5 % figure), else what the
    run's ``threads`` leave free (at least half a CPU)."""
    return float(max_other_cores) if max_other_cores is not None else float(max(cpus - threads, 0.5))


def overload_verdict(device: str, cpus: int, threads: int, before: dict[str, Any], during: dict[str, Any],
                     after: dict[str, Any], max_other_cores: float | None = None) -> tuple[bool, str]:
    """(overloaded, why): on a CPU run, the 1-minute load average exceeded the CPU count before,
    during or after the run, or other processes kept more CPUs busy on average than
    :func:`other_cores_limit` allows."""
    worst = max(before["loadavg_1m"], during.get("max_1m") or 0, after["loadavg_1m"])
    others = during.get("other_processes_cores_mean")
    limit = other_cores_limit(cpus, threads, max_other_cores)
    contended = others is not None and others > limit
    if device != "cpu" or not (worst > cpus or contended):
        return False, ""
    why = (f"load average reached {worst} on {cpus} CPU(s)" if worst > cpus else
           f"other processes kept {others} of {cpus} CPU(s) busy on average (limit {limit:g}; this run needs "
           f"{threads})")
    return True, why


def load_now() -> dict[str, Any]:
    """1/5/15-minute load averages and the CPUs this process may use."""
    la = os.getloadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "loadavg_15m": round(la[2], 2),
            "cpus": cpus}


# ------------------------------------------------------------------------------------ engine run


@dataclass
class EngineRun:
    """Per-request and per-step tables of one real engine run (seconds from the trace start ``t0``)."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    wall_s: float
    admission_lag_ms: dict[str, float]
    notes: list[str] = field(default_factory=list)


def _cb_config(settings: EngineSettings) -> Any:
    """A ``ContinuousBatchingConfig`` for ``settings`` (only the fields this transformers knows)."""
    import inspect

    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    want = {"page_size": settings.page_size_tokens, "block_size": settings.page_size_tokens,
            "num_blocks": settings.num_blocks, "max_batch_tokens": settings.max_batch_tokens,
            "max_requests_per_batch": settings.max_requests_per_batch, "scheduler_type": settings.scheduler,
            "safety_margin": settings.safety_margin, "allow_block_sharing": False,
            "use_cuda_graph": bool(settings.cuda_graphs), "use_async_batching": False,
            "auto_switch_to_flash": False, "max_memory_percent": 0.5}
    params = inspect.signature(ContinuousBatchingConfig).parameters
    if "page_size" in params:
        want.pop("block_size")  # deprecated alias in 5.17+
    kw = {k: v for k, v in want.items() if k in params}
    return ContinuousBatchingConfig(**kw)


@contextmanager
def _step_log(records: list[dict[str, Any]], t0_ref: list[float]) -> Iterator[None]:
    """Log every engine step: what the scheduler put in the batch and when the step ended.

    Wraps ``Scheduler.schedule_batch`` (start of a step: the batch) and
    ``ContinuousBatchProcessor.update_batch`` (end of a step: tokens delivered) on the classes for
    the duration of the block."""
    from transformers.generation.continuous_batching import continuous_api as api
    from transformers.generation.continuous_batching import scheduler as sch

    classes = [c for c in vars(sch).values() if isinstance(c, type) and issubclass(c, sch.Scheduler)
               and "schedule_batch" in vars(c)]
    originals = {c: c.schedule_batch for c in classes}
    orig_update = api.ContinuousBatchProcessor.update_batch
    current: dict[str, Any] = {}

    def wrap(orig):
        def schedule_batch(self, token_budget, cache_budget):
            start = time.perf_counter()
            # cached tokens per request before this step (position_offset: tokens already in the cache)
            out = orig(self, token_budget, cache_budget)
            reqs = out[0] or []
            q = [int(getattr(f, "query_length", None) or len(f.state.tokens_to_process)) for f in reqs]
            ctx = [int(getattr(f.state, "position_offset", 0)) for f in reqs]
            current.clear()
            current.update(start_s=start - t0_ref[0], n_requests=len(reqs), q_tokens=int(sum(q)),
                           ctx_tokens=int(sum(ctx)), max_q=int(max(q) if q else 0),
                           prefill_requests=int(sum(1 for x in q if x > 1)),
                           # a prefill chunk that does not finish its prompt yields no token
                           partial_prefills=int(sum(1 for f in reqs if not getattr(f, "has_new_token", True))),
                           request_ids=" ".join(str(f.state.request_id) for f in reqs))
            return out
        return schedule_batch

    def update_batch(self):
        out = orig_update(self)
        if current:
            end = time.perf_counter() - t0_ref[0]
            records.append({**current, "end_s": end, "step_ms": 1e3 * (end - current["start_s"])})
            current.clear()
        return out

    for c in classes:
        c.schedule_batch = wrap(originals[c])
    api.ContinuousBatchProcessor.update_batch = update_batch
    try:
        yield
    finally:
        for c, f in originals.items():
            c.schedule_batch = f
        api.ContinuousBatchProcessor.update_batch = orig_update


def engine_run(model: Any, settings: EngineSettings, trace: Trace, prompt_ids: list[list[int]], *,
               warmup_requests: int = 4, timeout_s: float = 600.0) -> EngineRun:
    """Serve ``trace`` with transformers' continuous batching on the wall clock (see the module
    docstring). ``model`` is a transformers causal LM already on its device."""
    import torch
    from transformers import GenerationConfig

    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(settings.attn_implementation)
    gen = GenerationConfig(max_new_tokens=int(trace.output_tokens.max()), do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    try:
        mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=_cb_config(settings))
    except TypeError:  # an older transformers without the continuous_batching_config argument
        gen.continuous_batching_config = _cb_config(settings)
        mgr = model.init_continuous_batching(generation_config=gen)
    records: list[dict[str, Any]] = []
    t0_ref = [time.perf_counter()]
    n = len(trace)
    results: dict[str, Any] = {}
    submitted: dict[str, float] = {}
    with _step_log(records, t0_ref), torch.inference_mode():
        mgr.start()
        try:
            # Warm-up (not timed): first calls allocate and select kernels.
            longest = max(range(n), key=lambda i: len(prompt_ids[i]))
            warm = [f"warmup-{j}" for j in range(max(0, warmup_requests))]
            for j, rid in enumerate(warm):
                mgr.add_request(prompt_ids[(longest + j) % n], request_id=rid, max_new_tokens=4,
                                eos_token_id=-1)
            done = 0
            while done < len(warm):
                r = mgr.get_result(timeout=timeout_s)
                if r is None:
                    raise SimspecError(f"engine {ENGINE_NAME}: no warm-up result within {timeout_s:g} s")
                if r.is_finished():
                    done += 1
            records.clear()
            # The trace, on the wall clock.
            ids = [str(x) for x in trace.request_id]
            t0 = time.perf_counter()
            t0_ref[0] = t0
            for i in range(n):
                wait = float(trace.arrival_s[i]) - (time.perf_counter() - t0)
                if wait > 0:
                    time.sleep(wait)
                submitted[ids[i]] = time.perf_counter() - t0
                mgr.add_request(list(prompt_ids[i]), request_id=ids[i], max_new_tokens=int(trace.output_tokens[i]),
                                record_timestamps=True, eos_token_id=-1)
            deadline = time.perf_counter() + timeout_s
            while len(results) < n:
                r = mgr.get_result(timeout=max(1.0, deadline - time.perf_counter()))
                if r is None:
                    raise SimspecError(f"engine {ENGINE_NAME}: {n - len(results)} request(s) unfinished after "
                                       f"{timeout_s:g} s")
                if r.is_finished() and r.request_id in submitted:
                    if r.error:
                        raise SimspecError(f"engine {ENGINE_NAME}: request {r.request_id} failed ({r.error})")
                    results[r.request_id] = r
            wall = time.perf_counter() - t0
        finally:
            mgr.stop(block=True)
    rows = []
    lags = []
    for i, rid in enumerate(ids):
        r = results[rid]
        ts = list(r.timestamps or [])
        if len(r.generated_tokens) != int(trace.output_tokens[i]):
            raise SimspecError(f"engine {ENGINE_NAME}: request {rid} generated {len(r.generated_tokens)} tokens, "
                               f"expected {int(trace.output_tokens[i])} (EOS not disabled?)")
        admitted = r.created_time - t0
        lags.append(1e3 * (admitted - float(trace.arrival_s[i])))
        first = (ts[0] - t0) if ts else (r.lifespan[1] - t0)
        rows.append({"request_id": rid, "arrival_s": admitted, "trace_arrival_s": float(trace.arrival_s[i]),
                     "submitted_s": submitted[rid], "scheduled_s": r.lifespan[0] - t0, "first_token_s": first,
                     "completion_s": r.lifespan[1] - t0, "prompt_tokens": int(trace.prompt_tokens[i]),
                     "output_tokens": int(trace.output_tokens[i]), "generated_tokens": len(r.generated_tokens),
                     "acceptance_class": str(trace.acceptance_class[i])})
    req = pd.DataFrame(rows)
    steps = pd.DataFrame.from_records(records, columns=["start_s", "end_s", "step_ms", "n_requests", "q_tokens",
                                                        "ctx_tokens", "max_q", "prefill_requests", "partial_prefills",
                                                        "request_ids"])
    lag = np.asarray(lags)
    return EngineRun(requests=req, steps=steps, wall_s=wall,
                     admission_lag_ms={"mean": float(lag.mean()), "max": float(lag.max())})


# ------------------------------------------------------------------------------------ prompts


def engine_prompt_ids(tokenizer: Any, trace: Trace, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids of exactly ``prompt_tokens`` each: the bundled Spec-Bench prompts through the
    tokenizer (as ``simspec validate`` builds them), or seeded pseudo-random ids for a random-weight
    model without a tokenizer (latency does not depend on which ids)."""
    if tokenizer is not None:
        from simspec.calibrate.validate import prompt_ids_for_trace

        return prompt_ids_for_trace(tokenizer, trace)
    rng = np.random.default_rng(0)
    return [rng.integers(10, max(11, vocab_size - 1), int(n)).tolist() for n in trace.prompt_tokens], \
        ["random-weight model: prompts are seeded pseudo-random token ids"]


# ------------------------------------------------------------------------------------ step model


def model_step_ms(cost: Any, steps: pd.DataFrame) -> np.ndarray:
    """The profile's compute time (ms, no overhead) of each real engine step, charged like a target
    forward of that batch: ``embed + L*layer + lm_head`` at (requests, query tokens, cached tokens),
    with the LM head over one token per request (the engine keeps the last logits only)."""
    out = np.empty(len(steps))
    fo, ff = cost.overhead_fraction, cost.overhead_fixed_ms
    cost.overhead_fraction, cost.overhead_fixed_ms = 0.0, 0.0
    try:
        for j, row in enumerate(steps.itertuples(index=False)):
            b, q, kv = max(int(row.n_requests), 1), max(int(row.q_tokens), 1), int(row.ctx_tokens)
            out[j] = cost.target_ms(b, q, kv, logits_tokens=b)
    finally:
        cost.overhead_fraction, cost.overhead_fixed_ms = fo, ff
    return out


# ------------------------------------------------------------------------------------ orchestration


def run_engine_validation(trace_arg: str, *, model: str, profile_arg: str, out_dir: str,
                          settings: EngineSettings, device: str = "cpu", dtype: str | None = None,
                          threads: int | None = None, time_scale: float = 1.0, seed: int = 0,
                          random_config: str | None = None, max_requests: int | None = None,
                          allow_overload: bool = False, fit_overhead_to: str | None = None,
                          echo: Any = print, force: bool = False,
                          max_other_cores: float | None = None) -> dict[str, Any]:
    """The whole of ``simspec validate --engine transformers-cb``: checks, engine run, simulated run,
    report. Returns the ``validation.json`` document.

    ``fit_overhead_to``: also fit ``latency.overhead`` (``real = model·(1+fraction) + fixed_ms``)
    on this run's engine steps and write a copy of the profile with it there; validate that copy on
    a different trace. ``allow_overload``: report even when the load average exceeded the CPU count
    (the report is then marked ``valid: false``; for smoke tests only). ``out_dir`` is checked
    first (an existing one is replaced only with ``force``, and only if simspec wrote it) and written
    atomically at the end."""
    from pathlib import Path

    from simspec import __version__
    from simspec.atomic import atomic_dir, check_output_dir, check_output_file, write_json, write_text

    check_output_dir(out_dir, "validation", force=force)
    if fit_overhead_to:
        check_output_file(fit_overhead_to, force=True, what="--fit-overhead")
    from simspec.calibrate.validate import scale_trace
    from simspec.profile import load_profile
    from simspec.simulator.cost import CostModel
    from simspec.simulator.run import simulate
    from simspec.traces.formats import resolve_trace_arg
    from simspec.traces.transforms import load_and_transform
    from simspec.validation_report import format_table, write_report

    profile = load_profile(profile_arg)
    trace = scale_trace(load_and_transform(resolve_trace_arg(trace_arg), None, seed=seed), time_scale)
    if max_requests is not None:
        if max_requests < 1:
            raise ConfigError(f"--max-requests {max_requests}: must be >= 1")
        trace = _head(trace, max_requests)
    config = run_config_for_engine(settings, seed=seed)
    need = int((trace.prompt_tokens + trace.output_tokens).sum())
    if need > settings.kv_capacity_tokens * (1 - (settings.safety_margin or 0.15)):
        raise ConfigError(f"engine KV cache of {settings.kv_capacity_tokens} tokens could fill up with this trace "
                          f"({need} tokens in all): raise --num-blocks (preemption is not what this validates)")
    dtype = dtype or str(profile.meta.get("dtype") or "fp32")
    threads = threads or profile.meta.get("threads")

    import torch
    import transformers

    from simspec.calibrate.models import load_model, random_model

    if threads and device == "cpu":
        torch.set_num_threads(int(threads))
    loaded = random_model(random_config, dtype, device) if random_config else load_model(model, dtype, device)
    prompt_ids, notes = engine_prompt_ids(loaded.tokenizer, trace, int(loaded.model.config.vocab_size))
    notes += mapping_notes(settings)
    cpus = load_now()["cpus"]
    load_before = load_now()
    sampler = LoadSampler().start()
    echo(f"engine run: {len(trace)} requests on {ENGINE_NAME} (transformers {transformers.__version__}), "
         f"{device} ({dtype}), {torch.get_num_threads()} thread(s) ...")
    real = engine_run(loaded.model, settings, trace, prompt_ids)
    load_during = sampler.stop()
    load_after = load_now()
    echo(f"engine run done in {real.wall_s:.1f} s; load 1m before {load_before['loadavg_1m']}, "
         f"max during {load_during['max_1m']}, after {load_after['loadavg_1m']} ({cpus} CPUs); other processes "
         f"used {load_during['other_processes_cores_mean']} cores on average")
    overloaded, why = overload_verdict(device, cpus, int(torch.get_num_threads()), load_before, load_during,
                                       load_after, max_other_cores)
    if overloaded and not allow_overload:
        raise SimspecError(f"machine too busy: {why} during the engine run; timings are not representative, "
                           "not reporting (rerun on a quiet machine)")

    # --- simulated run on the admission times the engine recorded --------------------------------
    sim_trace = Trace.from_columns(request_id=real.requests["request_id"].to_numpy(),
                                   arrival_s=np.maximum(real.requests["arrival_s"].to_numpy(), 0.0),
                                   prompt_tokens=trace.prompt_tokens, output_tokens=trace.output_tokens,
                                   acceptance_class=trace.acceptance_class, source=trace.source, sort=False)
    sim = simulate(config, sim_trace, profile)
    notes += [n for n in sim.notes if n not in notes]

    cost = CostModel(profile)
    steps = real.steps.copy()
    if len(steps):
        steps["model_ms"] = model_step_ms(cost, steps)
    dec = steps[steps["max_q"] <= 1] if len(steps) else steps
    pre = steps[steps["max_q"] > 1] if len(steps) else steps
    held = {"engine_steps": {
        "n_steps": int(len(steps)), "n_decode_only": int(len(dec)), "n_with_prefill": int(len(pre)),
        "n_with_chunked_prefill": int((steps["partial_prefills"] > 0).sum()) if len(steps) else 0,
        "mean_requests_per_step": float(steps["n_requests"].mean()) if len(steps) else None,
        "decode_real_ms_mean": float(dec["step_ms"].mean()) if len(dec) else None,
        "decode_model_ms_mean": float(dec["model_ms"].mean()) if len(dec) else None,
        "decode_real_over_model_median": float((dec["step_ms"] / dec["model_ms"]).median()) if len(dec) else None,
        "prefill_real_over_model_median": float((pre["step_ms"] / pre["model_ms"]).median()) if len(pre) else None,
        "decode_residual_ms_median": float((dec["step_ms"] - dec["model_ms"]).median()) if len(dec) else None,
        "sim_steps": int(len(sim.steps)),
        "real_over_model_median_by_5s_window": ([round(float(v), 3) for v in steps.assign(
            w=(steps["start_s"] // 5).astype(int), r=steps["step_ms"] / steps["model_ms"]).groupby("w")["r"].median()]
            if len(steps) else []),
        "note": "model = profile stages composed for the engine's batch (embed + L*layer + lm_head over one "
                "token per request), no overhead term; real = wall time from schedule_batch to update_batch",
    }}
    if fit_overhead_to:
        from simspec.calibrate.profile_io import update_profile
        from simspec.calibrate.validate import fit_overhead

        ok = steps[steps["n_requests"] > 0] if len(steps) else steps
        if len(ok) < 3:
            raise SimspecError("--fit-overhead: fewer than 3 engine steps were logged")
        fitted = fit_overhead(ok["step_ms"].to_numpy(), ok["model_ms"].to_numpy())
        src, dst = Path(profile.path), Path(fit_overhead_to)
        if src.resolve() != dst.resolve():
            write_text(dst, src.read_text(encoding="utf-8"))
        lat = dict(profile.doc["latency"])
        lat["overhead"] = {"fraction": round(fitted["fraction"], 6), "fixed_ms": round(fitted["fixed_ms"], 6)}
        update_profile(dst, latency=lat, meta_updates={"overhead_calibration": {
            "method": f"least squares real_step_ms = model_ms*(1+fraction) + fixed_ms over every step of a "
                      f"{ENGINE_NAME} run (wall time from schedule_batch to update_batch), both terms >= 0",
            "engine_version": f"transformers {transformers.__version__}", "trace": str(trace_arg),
            "time_scale": time_scale, "n_steps": fitted["n_steps"],
            "rms_residual_ms": round(fitted["rms_residual_ms"], 4), "machine_load_during": load_during,
            "simspec_version": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "caution": "validate on a different trace than this one"}})
        held["overhead_fit"] = {**fitted, "written_to": str(dst)}
        echo(f"overhead fitted: fraction {fitted['fraction']:.4f}, fixed {fitted['fixed_ms']:.3f} ms -> {dst}")
    meta = {
        "valid": not overloaded, "overload_allowed": bool(overloaded and allow_overload),
        "load_gate_max_other_cores": other_cores_limit(cpus, int(torch.get_num_threads()), max_other_cores),
        "simspec_version": __version__, "engine": ENGINE_NAME, "engine_version": f"transformers {transformers.__version__}",
        "torch_version": torch.__version__, "engine_settings": asdict(settings),
        "simulated_config": config.to_dict(), "trace": str(trace_arg), "n_requests": len(trace),
        "time_scale": time_scale, "model": random_config or model, "model_id": loaded.model_id, "dtype": dtype,
        "device": device, "torch_threads": int(torch.get_num_threads()),
        "profile": {"name": profile.name, "path": profile.path, "sha256": profile.sha256,
                    "overhead": dict(profile.overhead)},
        "seed": seed, "real_wall_s": round(real.wall_s, 2), "admission_lag_ms": real.admission_lag_ms,
        "machine_load_before": load_before, "machine_load_during": load_during, "machine_load_after": load_after,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes,
    }
    title = f"{Path(str(trace_arg)).stem} x{time_scale:g} · {ENGINE_NAME} vs simspec · {profile.name}"
    with atomic_dir(out_dir, overwrite=force, kind="validation") as out:
        doc = write_report(out, real.requests, sim.requests, meta=meta, heldout=held, title=title)
        write_json(out / "summary.json", {"meta": {k: meta[k] for k in ("engine", "engine_version", "trace",
                                                                         "time_scale", "device", "dtype",
                                                                         "machine_load_during")},
                                          "profile": profile.name, **doc["errors"]})
        write_text(out / "real_requests.csv", real.requests.to_csv(index=False, float_format="%.6f"))
        write_text(out / "engine_steps.csv", steps.to_csv(index=False, float_format="%.4f"))
        write_text(out / "sim_requests.csv", sim.requests.to_csv(index=False, float_format="%.6f"))
        write_text(out / "sim_steps.csv", sim.steps.to_csv(index=False, float_format="%.4f"))
    echo(format_table(doc["errors"], title))
    for n in notes:
        echo(f"note: {n}")
    return doc


def _head(trace: Trace, n: int) -> Trace:
    """The first ``n`` requests of a trace (in arrival order)."""
    k = min(n, len(trace))
    return Trace.from_columns(request_id=trace.request_id[:k], arrival_s=trace.arrival_s[:k],
                              prompt_tokens=trace.prompt_tokens[:k], output_tokens=trace.output_tokens[:k],
                              acceptance_class=trace.acceptance_class[:k], slo_class=trace.slo_class[:k],
                              source=trace.source)


def resimulate(run_dir: str, profile_arg: str, out_dir: str, echo: Any = print, force: bool = False) -> dict[str, Any]:
    """Simulate a committed engine run again with another profile (no torch, no engine run): the
    real tables of ``run_dir`` (``real_requests.csv``, ``engine_steps.csv``, ``validation.json``'s
    engine settings and seed) against a fresh simulation with ``profile_arg``; the report goes to
    ``out_dir`` like ``simspec validate``'s. Use it to score a profile on a run it was not fitted on."""
    import json
    from pathlib import Path

    from simspec.atomic import atomic_dir, check_output_dir, write_json, write_text
    from simspec.profile import load_profile
    from simspec.simulator.cost import CostModel
    from simspec.simulator.run import simulate
    from simspec.validation_report import format_table, write_report

    check_output_dir(out_dir, "validation", force=force)
    src = Path(run_dir)
    try:
        doc = json.loads((src / "validation.json").read_text(encoding="utf-8"))
        real = pd.read_csv(src / "real_requests.csv")
        steps = pd.read_csv(src / "engine_steps.csv")
    except (OSError, ValueError) as exc:
        raise SimspecError(f"{run_dir}: not a transformers-cb validation folder ({exc})") from None
    meta = dict(doc.get("meta", {}))
    if meta.get("engine") != ENGINE_NAME:
        raise SimspecError(f"{run_dir}: not a {ENGINE_NAME} validation (meta.engine {meta.get('engine')!r})")
    settings = EngineSettings(**meta["engine_settings"])
    profile = load_profile(profile_arg)
    real["request_id"] = real["request_id"].astype(str)
    trace = Trace.from_columns(request_id=real["request_id"].to_numpy(),
                               arrival_s=np.maximum(real["arrival_s"].to_numpy(), 0.0),
                               prompt_tokens=real["prompt_tokens"].to_numpy(),
                               output_tokens=real["output_tokens"].to_numpy(),
                               acceptance_class=real["acceptance_class"].astype(str).to_numpy(),
                               source=str(src), sort=False)
    sim = simulate(run_config_for_engine(settings, seed=int(meta.get("seed", 0))), trace, profile)
    steps["model_ms"] = model_step_ms(CostModel(profile), steps) if len(steps) else []
    meta.update(resimulated_from=str(src), profile={"name": profile.name, "path": profile.path,
                                                   "sha256": profile.sha256, "overhead": dict(profile.overhead)},
                simulated_config=run_config_for_engine(settings).to_dict(),
                notes=list(meta.get("notes", [])) + [f"re-simulated from the real run in {src} with profile "
                                                     f"{profile.name} (no new engine run)"])
    held = {"engine_steps": {"decode_real_over_model_median": float(
        (steps.loc[steps["max_q"] <= 1, "step_ms"] / steps.loc[steps["max_q"] <= 1, "model_ms"]).median())
        if len(steps) else None, "sim_steps": int(len(sim.steps)), "n_steps": int(len(steps))}}
    title = f"{src.name} re-simulated · {ENGINE_NAME} vs simspec · {profile.name}"
    with atomic_dir(out_dir, overwrite=force, kind="validation") as out:
        rep = write_report(out, real, sim.requests, meta=meta, heldout=held, title=title)
        write_json(out / "summary.json", {"meta": {k: meta.get(k) for k in ("engine", "engine_version", "trace",
                                                                             "resimulated_from",
                                                                             "machine_load_during")},
                                          "profile": profile.name, **rep["errors"]})
        write_text(out / "sim_requests.csv", sim.requests.to_csv(index=False, float_format="%.6f"))
    echo(format_table(rep["errors"], title))
    return rep
