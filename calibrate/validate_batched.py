"""``simspec validate`` at batch size > 1 (and ``--forced-acceptance``): a batched real server with
the lossless runners of :mod:`simspec.calibrate.batched`, against the simulator configured alike
(torch + transformers; reached only from ``simspec validate``).

**Real run** (:func:`batched_real_run`): requests are admitted at their (scaled) trace arrival times
on the wall clock; at every step boundary the server forms the batch with the *same scheduler
object* the simulator uses (:mod:`simspec.policies`, over a
:class:`~simspec.simulator.state.RequestTable` kept with the engine's bookkeeping) and the
simulator's batching rules for a KV cache that never fills and a token budget that never binds
(checked up front):

- ``vllm``: every running request (it holds KV) decodes; waiting requests are admitted in the
  scheduler's order over the waiting ones into the batch slots left, and prefill in that step;
- ``preemptive``: the batch is the top ``max_batch`` of the scheduler's order over every unfinished
  request; a resident pushed out pauses, keeping its KV (a *pause*; nothing is ever recomputed).

A decode member drafts at most ``min(k, remaining − 1)`` (``k``: draft's ``k``, Kangaroo's ``γ``,
HiSpec's buffer cap ``N_i + N_d − 1``), as the simulator's engine caps it; a prefill member's step
yields its first token. EOS is ignored.

**Forced acceptance** (``forced=True``): before each decode step the server asks the
:class:`~simspec.forced_acceptance.ForcedPattern` what the simulator samples for that request's
``s``-th decode step at that cap (HiSpec: with each inner iteration's appended tokens), and the
runner drafts and accepts exactly that (real passes, real costs). The report checks that both runs accepted identically, per request.

**Simulated run**: :func:`simspec.simulator.run.simulate` on the same scaled trace with
:func:`run_config_for_batched`.

**Machine load**: sampled every second (:class:`~simspec.calibrate.validate_cb.LoadSampler`); a run
whose 1-minute load average exceeded the CPU count, or during which other processes kept more
CPUs busy than the run leaves free, is refused (one-line error, exit 2, nothing written) unless
``allow_overload`` (report marked ``valid: false``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from simspec.errors import ConfigError, SimspecError
from simspec.trace import Trace

BATCHING = ("vllm", "preemptive")


@dataclass(frozen=True)
class BatchSettings:
    """How the batched server (and the simulated run) forms batches.

    Attributes:
        max_batch: most requests per step (the simulator's ``max_batch_size``).
        batching: ``vllm`` or ``preemptive`` (see the module docstring).
        max_batched_tokens: most tokens fed per step; must hold ``max_batch`` whole prompts (the
            server does not chunk prefills); None: exactly enough for that.
        forced: accept according to the simulator's per-request pattern.
    """

    max_batch: int
    batching: str = "vllm"
    max_batched_tokens: int | None = None
    forced: bool = False

    def __post_init__(self) -> None:
        if int(self.max_batch) < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be >= 1")
        if self.batching not in BATCHING:
            raise ConfigError(f"--batching {self.batching!r}: expected one of {', '.join(BATCHING)}")


def token_budget(settings: BatchSettings, trace: Trace, k_max: int) -> int:
    """The step token budget: ``max_batched_tokens``, or the most any step can feed (the ``max_batch``
    largest of each request's ``max(prompt, k + 1)``). ConfigError if a step could exceed it."""
    per = np.maximum(trace.prompt_tokens.astype(np.int64), k_max + 1)
    need = int(np.sort(per)[::-1][: settings.max_batch].sum())
    if settings.max_batched_tokens is None:
        return need
    if settings.max_batched_tokens < need:
        raise ConfigError(f"--max-batch-tokens {settings.max_batched_tokens}: a step of {settings.max_batch} "
                          f"requests of this trace can feed {need} tokens, and the batched server does not chunk "
                          f"prefills; raise it or lower --max-batch")
    return int(settings.max_batched_tokens)


def run_config_for_batched(scheduler: Any, method: Any, settings: BatchSettings, trace: Trace, k_max: int,
                           seed: int) -> Any:
    """The simulated run configured like the batched server: same scheduler, method, batch size and
    batching mode; a KV budget no run can fill; the token budget of :func:`token_budget` with chunked
    prefill off (it never binds, so no prompt is deferred); extrapolation allowed."""
    from simspec.simulator.config import RunConfig

    kv = int(max(4 * int((trace.prompt_tokens + trace.output_tokens + k_max).sum()), 4096))
    return RunConfig(scheduler=scheduler, method=method, max_batch_size=int(settings.max_batch),
                     kv_budget_tokens=kv, max_batched_tokens=token_budget(settings, trace, k_max),
                     chunked_prefill=False, batching=settings.batching, seed=seed, allow_extrapolation=True)


def build_batched_runner(lm: Any, spec: Any, adapter_dir: str | None, capacity_tokens: int,
                         sim_method: Any = None) -> Any:
    """The batched runner for ``spec`` (simulator parameter names, as :func:`validate.build_method`).
    ``sim_method``: the simulator's method object for ``spec``; when given, Kangaroo's exit and
    HiSpec's exits and N_d/N_i are the values it resolved (a parameter left out defaults to the
    profile's measured setting there), so both runs use the same ones."""
    from simspec.calibrate import batched as B
    from simspec.calibrate.validate import _adapters

    p = dict(spec.params)
    n = lm.num_layers
    if spec.name == "none":
        return B.BatchedGreedy(lm, capacity_tokens)
    if spec.name == "draft":
        dl = int(p.get("draft_layers", 0))
        if dl <= 0:
            raise ConfigError("--method draft: give draft_layers=L (the draft is the target's first L layers)")
        return B.BatchedDraft(lm, int(p.get("k", 4)), capacity_tokens, draft_layers=dl)
    if spec.name == "kangaroo":
        ex = int(sim_method.exit_layer) if sim_method is not None else int(p.get("exit", max(1, n // 16)))
        ads = _adapters(lm, adapter_dir, [ex])
        return B.BatchedKangaroo(lm, ex, ads.get(ex), capacity_tokens, gamma=int(p.get("gamma", 6)),
                                 eta=float(p.get("eta", 0.6)))
    if spec.name == "hispec":
        if sim_method is not None:
            ld, li, nd, ni = (int(sim_method.draft_exit), int(sim_method.inter_exit), int(sim_method.nd),
                              int(sim_method.ni))
        else:
            ld, li = int(p.get("draft_exit", max(1, n // 8))), int(p.get("inter_exit", max(2, n // 4)))
            nd, ni = int(p.get("nd", 2)), int(p.get("ni", 4))
        if li == n:  # single level: the intermediate verifier is the full model
            ads = _adapters(lm, adapter_dir, [ld])
            return B.BatchedHiSpecSingle(lm, ld, ads.get(ld), capacity_tokens, n_draft=nd)
        return B.BatchedHiSpec(lm, ld, li, _adapters(lm, adapter_dir, [ld, li]), capacity_tokens, n_draft=nd,
                               n_inter=ni)
    raise ConfigError(f"--method {spec.name}: no batched runner (batched: {', '.join(B.BATCHED_METHODS)}); "
                      f"use --max-batch 1")


# ------------------------------------------------------------------------------------ server


@dataclass
class BatchedRun:
    """Per-request and per-step tables of a batched real run (seconds from the run start);
    ``members``: per step, the members' shapes for costing (see :func:`batched_model_step_ms`):
    arrays ``prefill``, ``fed`` (tokens), ``ctx`` (tokens), ``cap``, ``drafted`` per member and
    ``inner_d``/``inner_a`` (members, iterations): two-level HiSpec's drafts and appended tokens per
    inner iteration (shape (members, 0) for the other methods)."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    members: list[dict[str, np.ndarray]]
    wall_s: float
    notes: list[str] = field(default_factory=list)


def _form_batch(settings: BatchSettings, sched: Any, running: list[int], waiting: list[int],
                now: float) -> tuple[list[int], list[int]]:
    """(decode members, newcomers to prefill) of the next step, in the scheduler's order."""
    if settings.batching == "vllm":
        slots = settings.max_batch - len(running)
        new: list[int] = []
        if slots > 0 and waiting:
            w = np.array(sorted(waiting), dtype=np.int64)
            order = sched.order(w, now) if w.size > 1 else w
            new = [int(i) for i in order[:slots]]
        return list(running), new
    active = np.array(sorted(running + waiting), dtype=np.int64)
    order = sched.order(active, now) if active.size > 1 else active
    sel = [int(i) for i in order[: settings.max_batch]]
    res = set(running)
    return [i for i in sel if i in res], [i for i in sel if i not in res]


def batched_real_run(runner: Any, trace: Trace, prompt_ids: list[list[int]], config: Any, settings: BatchSettings,
                     sim_method: Any, pattern: Any = None, progress: Callable[[int], Any] | None = None) -> BatchedRun:
    """Serve ``trace`` with ``runner`` (see the module docstring). ``sim_method``: the simulator's
    method object, acceptance bound (LAPS-SD asks it for stage-time estimates, as in the simulator)."""
    from simspec.policies import PolicyContext, StepRecord, get_scheduler_class
    from simspec.simulator.metrics import requests_frame
    from simspec.simulator.state import RequestTable

    t = RequestTable.from_trace(trace)
    n = len(t)
    ids = [str(x) for x in t.request_id.tolist()]
    ctx = PolicyContext(table=t, method=sim_method, max_batch_size=settings.max_batch,
                        kv_budget_tokens=int(config.kv_budget_tokens), seed=int(config.seed))
    sched = get_scheduler_class(config.scheduler.name)(dict(config.scheduler.params), ctx)
    k_base = int(runner.k_max)
    running: list[int] = []
    waiting: list[int] = []
    last: list[int] = []
    steps: list[tuple] = []
    members: list[dict[str, np.ndarray]] = []
    nxt = 0
    arrivals = t.arrival_s
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        while nxt < n and arrivals[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not running and not waiting:
            if nxt >= n:
                break
            time.sleep(max(0.0, float(arrivals[nxt]) - (time.perf_counter() - t0)))
            continue
        dec, new = _form_batch(settings, sched, running, waiting, now)
        for i in running:
            if i not in dec:
                t.pauses[i] += 1
        caps = [max(0, min(k_base, int(t.output_tokens[i] - t.generated[i]) - 1)) for i in dec]
        forced = None
        if pattern is not None:
            forced = {ids[i]: pattern.decide_step(ids[i], int(t.decode_steps[i]), c) for i, c in zip(dec, caps)}
        for i in new:
            runner.add(ids[i], prompt_ids[i])
            t.start_s[i] = now
        ctx_tok = [len(prompt_ids[i]) + int(t.generated[i]) for i in dec]  # the simulator's convention
        ts, cs = time.perf_counter(), time.thread_time()
        out = runner.step([ids[i] for i in new], [(ids[i], c) for i, c in zip(dec, caps)], forced)
        te, ce = time.perf_counter(), time.thread_time()
        end, step_ms = te - t0, (te - ts) * 1e3
        for i in new:
            waiting.remove(i)
            running.append(i)
        idx = np.array(dec + new, dtype=np.int64)
        pre = np.array([False] * len(dec) + [True] * len(new))
        drafted = np.array([out[ids[i]].drafts for i in dec] + [0] * len(new), dtype=np.int64)
        accepted = np.array([out[ids[i]].accepted for i in dec] + [0] * len(new), dtype=np.int64)
        committed = np.array([len(out[ids[i]].tokens) for i in idx.tolist()], dtype=np.int64)
        fed = np.array([d + 1 for d in drafted[:len(dec)].tolist()] + [len(prompt_ids[i]) for i in new],
                       dtype=np.int64)
        t.generated[idx] += committed
        t.steps[idx] += 1
        t.decode_steps[idx[~pre]] += 1
        t.drafted[idx] += drafted
        t.accepted[idx] += accepted
        t.position_accepts[idx] += accepted
        t.kv_resident[idx] = True
        t.kv_blocks[idx] = 1
        t.first_token_s[idx[pre]] = end
        if np.any(t.generated[idx] > t.output_tokens[idx]):
            raise RuntimeError("batched server: a request committed past its output length")
        done = idx[t.generated[idx] >= t.output_tokens[idx]]
        t.in_batch[last] = False
        live = [int(i) for i in idx.tolist() if i not in set(done.tolist())]
        t.in_batch[live] = True
        last = live
        for i in done.tolist():
            t.completion_s[i] = end
            t.kv_resident[i] = False
            t.kv_blocks[i] = 0
            t.in_batch[i] = False
            runner.release(ids[i])
            running.remove(i)
            if progress is not None:
                progress(1)
        sched.observe(StepRecord(idx=idx, prefill=pre, drafted=drafted, accepted=accepted, committed=committed,
                                 step_ms=step_ms, end_s=end, fed_tokens=fed))
        n_it = max((len(out[ids[i]].inner) for i in dec), default=0)
        inner_d = np.zeros((idx.size, n_it), dtype=np.int64)
        inner_a = np.zeros((idx.size, n_it), dtype=np.int64)
        for b, i in enumerate(dec):
            for it, (dd, aa) in enumerate(out[ids[i]].inner):
                inner_d[b, it], inner_a[b, it] = dd, aa
        members.append({"prefill": pre, "fed": fed, "ctx": np.array(ctx_tok + [0] * len(new), dtype=np.int64),
                        "cap": np.array(caps + [0] * len(new), dtype=np.int64), "drafted": drafted,
                        "inner_d": inner_d, "inner_a": inner_a})
        steps.append((len(steps), ts - t0, end, step_ms, (ce - cs) * 1e3, int(idx.size), int(len(new)), int(max(caps, default=0)),
                      int(drafted.sum()), int(accepted.sum()), int(committed.sum()), int(fed.sum()),
                      int(sum(ctx_tok)), len(waiting), " ".join(ids[i] for i in idx.tolist())))
    wall = time.perf_counter() - t0
    req = requests_frame(t, sched.extra_columns())
    st = pd.DataFrame.from_records(steps, columns=["step", "start_s", "end_s", "step_ms", "cpu_ms", "batch_size", "prefills",
                                                   "k_max", "drafted", "accepted", "committed", "fed_tokens",
                                                   "ctx_tokens", "queue_len", "request_ids"])
    return BatchedRun(requests=req, steps=st, members=members, wall_s=wall)


# ------------------------------------------------------------------------------------ model vs steps


def batched_model_step_ms(sim_method: Any, cost: Any, members: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The latency model's compute time (ms, no overhead) of each real step, charged as the
    simulator's method charges a step of that exact shape (members, prefill flags, tokens fed,
    context, drafts made; two-level HiSpec: each member's inner iterations)."""
    from simspec.simulator.methods.base import BatchStep
    from simspec.simulator.methods.hispec import HiSpec
    from simspec.simulator.methods.kangaroo import Kangaroo, early_exit_step_ms

    out = np.empty(len(members))
    rng = np.random.default_rng(0)
    m = sim_method
    # draft: its cost never uses acceptance (Kangaroo and HiSpec are costed from the real shapes below)
    if getattr(m, "uses_acceptance", False) and not isinstance(m, (Kangaroo, HiSpec)):
        m = type(m)(dict(m.params), m.profile, cost)
        m.bind_acceptance(m.build_acceptance([{"alpha": {"kind": "fixed", "value": 0.5}}]))
    fo, ff = cost.overhead_fraction, cost.overhead_fixed_ms
    cost.overhead_fraction, cost.overhead_fixed_ms = 0.0, 0.0
    try:
        for j, s in enumerate(members):
            b = s["prefill"].size
            k = np.where(s["prefill"], 0, s["drafted"]).astype(np.int64)
            batch = BatchStep(idx=np.arange(b), prefill=s["prefill"], fed_tokens=s["fed"], ctx_tokens=s["ctx"], k=k,
                              remaining=np.full(b, 10**6), alpha=np.full(b, 0.5), class_idx=np.zeros(b, dtype=np.int64))
            if isinstance(m, Kangaroo):
                out[j] = early_exit_step_ms(cost, batch, k, m.exit_layer, m.num_layers, adapter=True)
            elif isinstance(m, HiSpec) and m.single_level:
                out[j] = early_exit_step_ms(cost, batch, k, m.draft_exit, m.num_layers, adapter=False)
            elif isinstance(m, HiSpec):
                out[j] = m.plan_ms(batch, s["inner_d"], s["inner_a"])
            else:
                out[j] = m.step(rng, batch).step_ms
    finally:
        cost.overhead_fraction, cost.overhead_fixed_ms = fo, ff
    return out


# ------------------------------------------------------------------------------------ orchestration


def run_batched_validation(trace_arg: str, *, model: str, method: str, adapter: str | None, policy: str,
                           profile_arg: str, device: str, out_dir: str, settings: BatchSettings,
                           time_scale: float = 1.0, seed: int = 0, dtype: str | None = None,
                           threads: int | None = None, fit_overhead_to: str | None = None,
                           allow_overload: bool = False, progress: bool = True, echo: Any = print,
                           force: bool = False, max_other_cores: float | None = None,
                           speed_reference: bool = False) -> dict[str, Any]:
    """The whole of ``simspec validate --max-batch B`` (B > 1) or ``--forced-acceptance``: checks, real
    run, simulated run, report (``validation.json`` etc., as :func:`validate.run_validation`, plus
    ``sim_steps.csv`` and, when forced, ``forced_pattern.csv``). Returns the ``validation.json``
    document. ``speed_reference``: time :func:`validate.speed_probe` right before and after the real
    run; the report then also gives the errors of a replay at that speed relative to the speed
    recorded when the profile's overhead was fitted (``--fit-overhead`` records it)."""
    from pathlib import Path

    from simspec import __version__
    from simspec.atomic import atomic_dir, check_output_dir, check_output_file, write_json, write_text

    check_output_dir(out_dir, "validation", force=force)
    if fit_overhead_to:
        check_output_file(fit_overhead_to, force=True, what="--fit-overhead")
    from simspec.calibrate.validate import SPEC_METHODS, fit_overhead, prompt_ids_for_trace, scale_trace, \
        speed_probe, speed_scaled_profile, tokens_per_decode_step
    from simspec.calibrate.validate_cb import LoadSampler, load_now, other_cores_limit, overload_verdict
    from simspec.forced_acceptance import forced_pattern
    from simspec.policies import get_scheduler_class
    from simspec.profile import load_profile
    from simspec.simulator.config import ComponentSpec
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import get_method_class
    from simspec.simulator.run import bind_request_acceptance, canonical_order, simulate
    from simspec.simulator.state import RequestTable
    from simspec.traces.formats import resolve_trace_arg
    from simspec.traces.transforms import load_and_transform
    from simspec.validation_report import format_table, write_report

    # --- checks before anything slow -------------------------------------------------------------
    mspec = ComponentSpec.parse(method, "--method")
    if mspec.name not in SPEC_METHODS:
        raise ConfigError(f"--method {mspec.name!r}: unknown (choose from {', '.join(SPEC_METHODS)})")
    from simspec.calibrate.batched import BATCHED_METHODS

    if mspec.name not in BATCHED_METHODS:
        raise ConfigError(f"--method {mspec.name}: no batched runner (batched: {', '.join(BATCHED_METHODS)}); "
                          f"use --max-batch 1 without --forced-acceptance")
    sspec = ComponentSpec.parse(policy, "--policy")
    get_scheduler_class(sspec.name)
    if adapter is not None and not (Path(adapter) / "adapter.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter.json in it (train one with simspec calibrate adapter)")
    profile = load_profile(profile_arg)
    trace = scale_trace(load_and_transform(resolve_trace_arg(trace_arg), None, seed=seed), time_scale)
    cost = CostModel(profile)
    sim_method = get_method_class(mspec.name)(dict(mspec.params), profile, cost)
    k_max = int(sim_method.k_max)
    config = run_config_for_batched(sspec, mspec, settings, trace, k_max, seed)
    notes: list[str] = []
    # the real run's method object, bound as the simulated run binds its own (LAPS-SD's estimates)
    notes += bind_request_acceptance(config, RequestTable.from_trace(canonical_order(trace)), sim_method, profile)
    pattern = forced_pattern(config, trace, profile) if settings.forced else None
    dtype = dtype or str(profile.meta.get("dtype") or "fp32")

    # --- real run --------------------------------------------------------------------------------
    import torch

    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model

    threads = threads or profile.meta.get("threads")
    if threads and device == "cpu":
        torch.set_num_threads(int(threads))
    loaded = load_model(model, dtype=dtype, device=device)
    lm = LayeredLM(loaded.model)
    capacity = int((trace.prompt_tokens + trace.output_tokens).max()) + k_max + 2
    runner = build_batched_runner(lm, mspec, adapter, capacity, sim_method)
    if runner.k_max != k_max:
        raise ConfigError(f"--method {mspec}: the runner drafts up to {runner.k_max}, the simulator's method "
                          f"up to {k_max}; give the same parameters")
    prompt_ids, p_notes = prompt_ids_for_trace(loaded.tokenizer, trace)
    notes += p_notes
    warm = build_batched_runner(lm, mspec, adapter, capacity, sim_method)  # allocator and kernels, not timed
    from simspec.calibrate.batched import generate_batch

    generate_batch(warm, [p[:32] or [1] for p in prompt_ids[:2]], 4, admit_every=2)
    del warm
    probe_before = speed_probe(lm, cost) if speed_reference else None
    cpus = load_now()["cpus"]
    load_before = load_now()
    sampler = LoadSampler().start()
    echo(f"real run: {len(trace)} requests, method {mspec}, policy {sspec}, batch {settings.max_batch} "
         f"({settings.batching}){', forced acceptance' if settings.forced else ''}, {device} ({dtype}), "
         f"{torch.get_num_threads()} thread(s) ...")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trace), unit="req", desc="real run", mininterval=1.0, leave=False)
    try:
        real = batched_real_run(runner, trace, prompt_ids, config, settings, sim_method, pattern,
                                progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    load_during = sampler.stop()
    load_after = load_now()
    probe_after = speed_probe(lm, cost) if speed_reference else None
    echo(f"real run done in {real.wall_s:.1f} s; load 1m before {load_before['loadavg_1m']}, max during "
         f"{load_during['max_1m']}, after {load_after['loadavg_1m']} ({cpus} CPUs); other processes used "
         f"{load_during['other_processes_cores_mean']} cores on average")
    overloaded, why = overload_verdict(device, cpus, int(torch.get_num_threads()), load_before, load_during, load_after,
                                       max_other_cores)
    if overloaded and not allow_overload:
        raise SimspecError(f"machine too busy: {why} during the real run; timings are not representative, "
                           "not reporting (rerun on a quiet machine)")

    # --- simulated run and comparison --------------------------------------------------------------
    sim = simulate(config, trace, profile)
    notes += [x for x in sim.notes if x not in notes]
    steps = real.steps.copy()
    steps["model_ms"] = batched_model_step_ms(sim_method, cost, real.members)
    steps["model_with_overhead_ms"] = [cost.finish(x) for x in steps["model_ms"]]
    dec = steps[steps["prefills"] == 0]
    mix = steps[steps["prefills"] > 0]
    held: dict[str, Any] = {"steps": {
        "n_real": int(len(steps)), "n_sim": int(len(sim.steps)),
        "mean_batch_real": float(steps["batch_size"].mean()), "mean_batch_sim": float(sim.steps["batch_size"].mean()),
        "decode_only_real_ms_mean": float(dec["step_ms"].mean()) if len(dec) else None,
        "decode_only_model_ms_mean": float(dec["model_ms"].mean()) if len(dec) else None,
        "decode_real_over_model_median": float((dec["step_ms"] / dec["model_ms"]).median()) if len(dec) else None,
        "decode_cpu_over_model_median": float((dec["cpu_ms"] / dec["model_ms"]).median()) if len(dec) else None,
        "prefill_real_over_model_median": float((mix["step_ms"] / mix["model_ms"]).median()) if len(mix) else None,
        "real_over_model_median_by_10s_window": [round(float(v), 3) for v in steps.assign(
            w=(steps["start_s"] // 10).astype(int), r=steps["step_ms"] / steps["model_ms"]).groupby("w")["r"].median()],
        "real_busy_s": float(steps["step_ms"].sum() / 1e3), "sim_busy_s": float(sim.steps["step_ms"].sum() / 1e3),
        "model_busy_s_for_real_steps": float(steps["model_with_overhead_ms"].sum() / 1e3),
        "profile_overhead": dict(profile.overhead),
        "note": "model = the simulator's method charging each real step's exact shape (members, prefills, tokens, "
                "context, drafts), no overhead term; real = wall time of runner.step; cpu = CPU time of the "
                "serving thread in runner.step (1 torch thread: all its compute; time spent waiting for a "
                "CPU under contention excluded, cache contention not)",
    }}
    speed_run = None
    if speed_reference:
        # the machine's speed around the run (geometric mean of the probes before and after), and a
        # replay at that speed relative to the speed the profile's overhead was fitted at
        speed_run = math.sqrt(probe_before["speed"] * probe_after["speed"])
        sr: dict[str, Any] = {"probe_before": probe_before, "probe_after": probe_after, "speed_run": speed_run,
                              "note": "speed = median over fixed batch-1 target forwards of measured / model time, "
                                      "timed right before and after the real run; speed_calib = the same at the "
                                      "run that fitted the profile's overhead (--fit-overhead records it); the "
                                      "speed-referenced replay is the simulated run with every step "
                                      "speed_run / speed_calib times as long (a diagnostic of machine drift, "
                                      "not the simulator's prediction)"}
        speed_calib = (profile.meta.get("overhead_calibration") or {}).get("speed_reference")
        if isinstance(speed_calib, (int, float)) and speed_calib > 0:
            factor = speed_run / float(speed_calib)
            ref = simulate(config, trace, speed_scaled_profile(profile, factor))
            from simspec.validation_report import compare

            e = compare(real.requests, ref.requests)
            sr.update(speed_calib=float(speed_calib), factor=factor, errors={
                "latency_mape_pct": e["latency_mape_pct"], "latency_mean_err_pct": e["latency"]["mean"]["err_pct"],
                "latency_p99_err_pct": e["latency"]["p99"]["err_pct"], "ttft_mape_pct": e["ttft_mape_pct"]})
        held["speed_reference"] = sr
    model_tps, real_tps = tokens_per_decode_step(sim.requests), tokens_per_decode_step(real.requests)
    held["acceptance_model"] = {
        "model_tokens_per_step": model_tps, "real_tokens_per_step": real_tps,
        "err_pct": (100.0 * (model_tps - real_tps) / real_tps) if model_tps and real_tps else None,
        "note": "committed tokens per decode step, simulated vs real"}
    if pattern is not None:
        r = real.requests.set_index(real.requests["request_id"].astype(str))
        s = sim.requests.set_index(sim.requests["request_id"].astype(str))
        cols = ["decode_steps", "drafted", "accepted"]
        diff = [rid for rid in r.index if tuple(r.loc[rid, cols]) != tuple(s.loc[rid, cols])]
        held["forced_acceptance"] = {
            "requests": int(len(r)), "identical": int(len(r) - len(diff)), "differing": diff,
            "decisions": len(pattern.log), "accepted_real": int(r["accepted"].sum()),
            "accepted_sim": int(s["accepted"].sum()),
            "note": "per request: decode steps, drafts and accepted drafts of the real run (forced) and the "
                    "simulated run; identical by construction (simspec.forced_acceptance)"}
        if diff:
            notes.append(f"forced acceptance: {len(diff)} request(s) accepted differently from the simulated run "
                         f"(first {diff[0]}): a bug")
    if fit_overhead_to:
        from simspec.calibrate.profile_io import update_profile

        fitted = fit_overhead(steps["step_ms"].to_numpy(), steps["model_ms"].to_numpy())
        src, dst = Path(profile.path), Path(fit_overhead_to)
        if src.resolve() != dst.resolve():
            write_text(dst, src.read_text(encoding="utf-8"))
        lat = dict(profile.doc["latency"])
        lat["overhead"] = {"fraction": round(fitted["fraction"], 6), "fixed_ms": round(fitted["fixed_ms"], 6)}
        update_profile(dst, latency=lat, meta_updates={"overhead_calibration": {
            "method": "least squares real_step_ms = model_ms*(1+fraction) + fixed_ms over every step of a batched "
                      "simspec validate run, both terms >= 0",
            "trace": str(trace_arg), "time_scale": time_scale, "spec": str(mspec), "policy": str(sspec),
            "batch": asdict(settings), "seed": seed, "n_steps": fitted["n_steps"],
            "rms_residual_ms": round(fitted["rms_residual_ms"], 4), "machine_load_during": load_during,
            **({"speed_reference": round(speed_run, 6)} if speed_run is not None else {}),
            "simspec_version": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "caution": "validate on a different trace than this one"}})
        held["overhead_fit"] = {**fitted, "written_to": str(dst)}
        echo(f"overhead fitted: fraction {fitted['fraction']:.4f}, fixed {fitted['fixed_ms']:.3f} ms -> {dst}")
    meta = {
        "valid": not overloaded, "overload_allowed": bool(overloaded and allow_overload),
        "load_gate_max_other_cores": other_cores_limit(cpus, int(torch.get_num_threads()), max_other_cores),
        "simspec_version": __version__, "engine": "simspec-batched", "trace": str(trace_arg),
        "n_requests": len(trace), "time_scale": time_scale, "model": model, "model_id": loaded.model_id,
        "dtype": dtype, "device": device, "torch_version": torch.__version__,
        "torch_threads": int(torch.get_num_threads()), "method": str(mspec), "policy": str(sspec),
        "adapter": adapter, "batch": asdict(settings), "simulated_config": config.to_dict(),
        "profile": {"name": profile.name, "path": profile.path, "sha256": profile.sha256,
                    "overhead": dict(profile.overhead)},
        "seed": seed, "real_wall_s": round(real.wall_s, 2), "machine_load_before": load_before,
        "machine_load_during": load_during, "machine_load_after": load_after,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pauses_real": int(real.requests["pauses"].sum()) if "pauses" in real.requests else None,
        "pauses_sim": int(sim.requests["pauses"].sum()) if "pauses" in sim.requests else None,
        "notes": notes,
    }
    title = (f"{Path(str(trace_arg)).stem} x{time_scale:g} · {mspec} · {sspec} · batch {settings.max_batch} "
             f"{settings.batching}{' · forced acceptance' if settings.forced else ''} · {profile.name}")
    with atomic_dir(out_dir, overwrite=force, kind="validation") as out:
        doc = write_report(out, real.requests, sim.requests, meta=meta, heldout=held, title=title)
        write_json(out / "summary.json", {"meta": {k: meta[k] for k in ("trace", "method", "policy", "batch", "device",
                                                                         "dtype", "valid", "machine_load_during")},
                                          "profile": profile.name, **doc["errors"]})
        write_text(out / "real_requests.csv", real.requests.to_csv(index=False, float_format="%.6f"))
        write_text(out / "real_steps.csv", steps.to_csv(index=False, float_format="%.4f"))
        write_text(out / "sim_requests.csv", sim.requests.to_csv(index=False, float_format="%.6f"))
        write_text(out / "sim_steps.csv", sim.steps.to_csv(index=False, float_format="%.4f"))
        if pattern is not None:
            write_text(out / "forced_pattern.csv", pd.DataFrame(pattern.log_rows()).to_csv(index=False))
    echo(format_table(doc["errors"], title))
    st = held["steps"]
    echo(f"steps real/sim {st['n_real']}/{st['n_sim']}, mean batch {st['mean_batch_real']:.2f}/{st['mean_batch_sim']:.2f}; "
         f"real/model step time, median: decode {st['decode_real_over_model_median']:.3f} (CPU time "
         f"{st['decode_cpu_over_model_median']:.3f}), with prefills {st['prefill_real_over_model_median']:.3f}")
    if pattern is not None:
        fa = held["forced_acceptance"]
        echo(f"forced acceptance: {fa['identical']}/{fa['requests']} requests accepted identically")
    sr = held.get("speed_reference")
    if sr is not None:
        line = (f"machine speed vs the profile: {sr['probe_before']['speed']:.3f} before, "
                f"{sr['probe_after']['speed']:.3f} after the run")
        if "errors" in sr:
            e = sr["errors"]
            line += (f"; at the overhead fit {sr['speed_calib']:.3f}; replayed {sr['factor']:.3f}x slower: latency "
                     f"MAPE {e['latency_mape_pct']:.1f}%, mean {e['latency_mean_err_pct']:+.1f}%, "
                     f"p99 {e['latency_p99_err_pct']:+.1f}% (speed-referenced diagnostic)")
        echo(line)
    for x in notes:
        echo(f"note: {x}")
    return doc
