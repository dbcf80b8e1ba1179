"""``simspec validate``: serve a trace for real, simulate it, and report the simulator's error
(torch + transformers; reached only from ``simspec validate``).

**Real run** (:func:`real_run`): one replica, batch size 1, on the calibration device. Requests are
admitted at their trace arrival times on the wall clock (``time.perf_counter`` from the run start;
the trace's arrivals are multiplied by ``time_scale`` first, and both runs use the scaled trace).
At every step boundary the server asks the *same* scheduler object the simulator uses
(:mod:`simspec.policies`, over a :class:`~simspec.simulator.state.RequestTable` kept with the
engine's bookkeeping: ``generated``, ``in_batch``, ``kv_resident``, ``preemptions``, … and
:class:`~simspec.policies.base.StepRecord` after every step) for its order, and runs one step of the
first request: its prefill (which yields the first token) or one speculative step. A request pushed
off the top keeps its runner — KV cache and all — and resumes where it stopped (the simulator's
``preempt=keep`` with an unbounded budget). The step's drafts are capped at ``remaining − 1`` as the
simulator's engine caps ``k``. EOS is ignored: each request generates exactly its ``output_tokens``.

Prompts: the bundled Spec-Bench prompt set; request ``i`` of acceptance class ``c`` gets the
``j``-th prompt of class ``c`` (``j`` counts that class's requests, cycling), in the model's chat
template, cut or repeated (the prompt text appended again) to exactly ``prompt_tokens`` tokens. A
class the prompt set lacks (e.g. ``default``) falls back to cycling over all prompts, in file order;
the report's notes name such classes.

**Simulated run**: :func:`simspec.simulator.run.simulate` on the same (scaled) trace with the same
scheduler, method and seed, ``max_batch_size=1`` and a KV budget no request can exceed.

**Held-out checks**: whole target forwards timed at a few shapes off the profile's grid against the
latency model (:func:`heldout_latency`); the acceptance model's tokens per decode step (from the
simulated run) against the real run's; the real per-step wall time against the latency model's
prediction for the same step (the overhead outside the model).

**Overhead calibration** (:func:`fit_overhead`): least-squares ``real = model·(1 + fraction) +
fixed_ms`` over a run's steps (both ≥ 0), written into a profile copy's ``latency.overhead`` with
:func:`simspec.calibrate.profile_io.update_profile`. Validate on a *different* trace afterwards.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from simspec.errors import ConfigError, SimspecError
from simspec.trace import Trace

SPEC_METHODS = ("none", "draft", "kangaroo", "hispec")


# ------------------------------------------------------------------------------------ inputs


def scale_trace(trace: Trace, time_scale: float) -> Trace:
    """``trace`` with every arrival multiplied by ``time_scale``."""
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ConfigError(f"--time-scale {time_scale}: must be a finite number > 0")
    if time_scale == 1.0:
        return trace
    return Trace.from_columns(request_id=trace.request_id, arrival_s=trace.arrival_s * time_scale,
                              prompt_tokens=trace.prompt_tokens, output_tokens=trace.output_tokens,
                              acceptance_class=trace.acceptance_class, slo_class=trace.slo_class,
                              source=trace.source)


def prompt_ids_for_trace(tokenizer: Any, trace: Trace, prompts_path: str | None = None) -> tuple[list[list[int]], list[str]]:
    """Token ids of each request's prompt (see the module docstring) and notes on fallbacks."""
    from simspec.calibrate.prompts import _encode, bundled_prompts_path, by_class, load_prompts

    prompts = load_prompts(prompts_path or bundled_prompts_path())
    groups = by_class(prompts)
    used: dict[str, int] = {}
    fallback: set[str] = set()
    out: list[list[int]] = []
    cache: dict[Any, tuple[list[int], list[int]]] = {}
    for cls, n in zip(trace.acceptance_class.tolist(), trace.prompt_tokens.tolist()):
        pool = groups.get(cls)
        if not pool:
            fallback.add(cls)
            pool = prompts
        j = used.get(cls, 0)
        used[cls] = j + 1
        pr = pool[j % len(pool)]
        if pr.question_id not in cache:
            cache[pr.question_id] = (_encode(tokenizer, pr.text),
                                     list(tokenizer("\n" + pr.text, add_special_tokens=False)["input_ids"]))
        ids, body = cache[pr.question_id]
        ids = list(ids)
        while len(ids) < n:
            ids += body
        out.append(ids[: int(n)])
    notes = []
    if fallback:
        notes.append(f"acceptance class(es) not in the prompt set, prompts drawn from all classes: "
                     f"{', '.join(sorted(fallback))}")
    return out, notes


# ------------------------------------------------------------------------------------ runners


@dataclass
class MethodSetup:
    """A real runner factory for one method (``make()`` → a fresh runner with its own KV state)."""

    name: str
    params: dict[str, Any]
    make: Any
    k_attr: str | None  # runner attribute holding the draft cap (k / gamma), None for none/hispec


def build_method(lm: Any, spec: Any, adapter_dir: str | None) -> MethodSetup:
    """Runner factory for ``spec`` (a :class:`~simspec.simulator.config.ComponentSpec` whose params
    use the simulator's names: draft ``k``, ``draft_layers``; kangaroo ``exit``, ``gamma``, ``eta``;
    hispec ``draft_exit``, ``inter_exit``, ``nd``, ``ni``). EOS is disabled (``eos_token_id=None``)."""
    from simspec.calibrate import runners as R

    p = dict(spec.params)
    n = lm.num_layers
    if spec.name == "none":
        return MethodSetup("none", p, lambda: R.GreedyRunner(lm, eos_token_id=None), None)
    if spec.name == "draft":
        k, dl = int(p.get("k", 4)), int(p.get("draft_layers", 0))
        if dl <= 0:
            raise ConfigError("--method draft: give draft_layers=L (the draft is the target's first L layers), "
                              "e.g. draft:k=4,draft_layers=8")
        return MethodSetup("draft", p, lambda: R.DraftRunner(lm, k, draft_layers=dl, eos_token_id=None), "k")
    if spec.name == "kangaroo":
        ex, gamma, eta = int(p.get("exit", max(1, n // 16))), int(p.get("gamma", 6)), float(p.get("eta", 0.6))
        ads = _adapters(lm, adapter_dir, [ex])
        return MethodSetup("kangaroo", p, lambda: R.KangarooRunner(lm, ex, ads.get(ex), gamma=gamma, eta=eta,
                                                                   eos_token_id=None), "gamma")
    if spec.name == "hispec":
        ld, li = int(p.get("draft_exit", max(1, n // 8))), int(p.get("inter_exit", max(2, n // 4)))
        nd, ni = int(p.get("nd", 2)), int(p.get("ni", 4))
        ads = _adapters(lm, adapter_dir, [ld, li])
        return MethodSetup("hispec", p, lambda: R.HiSpecRunner(lm, ld, li, ads, n_draft=nd, n_inter=ni,
                                                               eos_token_id=None), None)
    raise ConfigError(f"--method {spec.name!r}: expected one of {', '.join(SPEC_METHODS)}")


def _adapters(lm: Any, adapter_dir: str | None, exits: list[int]) -> dict[int, Any]:
    if adapter_dir is None:
        return {}  # logit lens
    from simspec.calibrate.adapter import load_adapters, read_adapter_info

    have = sorted(int(k) for k in read_adapter_info(adapter_dir)["exits"])
    return load_adapters(adapter_dir, lm, [e for e in exits if e in have])


# ------------------------------------------------------------------------------------ real server


@dataclass
class RealRun:
    """Per-request and per-step tables of a real run (times in seconds from the run start)."""

    requests: pd.DataFrame
    steps: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def real_run(lm: Any, setup: MethodSetup, trace: Trace, prompt_ids: list[list[int]], scheduler_spec: Any,
             sim_method: Any, seed: int, progress: Any = None) -> RealRun:
    """Serve ``trace`` for real (see the module docstring). ``sim_method`` is the simulator's method
    object for the same profile (LAPS-SD asks it for stage-time estimates, as in the simulator)."""
    import torch

    from simspec.policies import PolicyContext, StepRecord, get_scheduler_class
    from simspec.simulator.state import RequestTable

    t = RequestTable.from_trace(trace)
    n = len(t)
    ctx = PolicyContext(table=t, method=sim_method, max_batch_size=1, kv_budget_tokens=10**12, seed=seed)
    sched = get_scheduler_class(scheduler_spec.name)(dict(scheduler_spec.params), ctx)
    runners: list[Any] = [None] * n
    seqs: list[list[int] | None] = [None] * n
    base_cap = getattr(setup.make(), setup.k_attr) if setup.k_attr else None
    steps: list[tuple] = []
    active = np.empty(0, dtype=np.int64)
    nxt = 0
    last = -1
    arrivals = t.arrival_s
    t0 = time.perf_counter()
    with torch.no_grad():
        while True:
            now = time.perf_counter() - t0
            j = nxt
            while j < n and arrivals[j] <= now:
                j += 1
            if j > nxt:
                active = np.concatenate([active, np.arange(nxt, j, dtype=np.int64)])
                nxt = j
            if active.size == 0:
                if nxt >= n:
                    break
                time.sleep(max(0.0, float(arrivals[nxt]) - (time.perf_counter() - t0)))
                continue
            order = sched.order(active, now)
            i = int(order[0])
            # engine bookkeeping (batch size 1): in_batch flags; a resident (it holds KV) that sits
            # this step out pauses, as in the simulator's preemptive batching (its KV is kept)
            if last >= 0 and last != i:
                t.in_batch[last] = False
            for j_ in active.tolist():
                if j_ != i and runners[j_] is not None:
                    t.pauses[j_] += 1
            t.in_batch[i] = True
            last = i
            remaining = int(t.output_tokens[i] - t.generated[i])
            prefill = runners[i] is None
            k_cap = 0
            if prefill:
                t.start_s[i] = now
                r = setup.make()
                runners[i] = r
                ts = time.perf_counter()
                r._reset()
                first = r._prefill(list(prompt_ids[i]))
                te = time.perf_counter()
                seqs[i] = list(prompt_ids[i]) + [first]
                drafted = accepted = 0
                committed = 1
                fed, ctx_tok = int(t.prompt_tokens[i]), 0
            else:
                r = runners[i]
                if setup.k_attr:
                    k_cap = max(0, min(base_cap, remaining - 1))
                    setattr(r, setup.k_attr, max(1, k_cap) if setup.k_attr == "gamma" else k_cap)
                ctx_tok = len(seqs[i]) - 1
                ts = time.perf_counter()
                new, log = r._step(seqs[i])
                te = time.perf_counter()
                new = new[:remaining]
                seqs[i].extend(new)
                drafted, accepted = int(log.drafts), int(log.accepted)
                committed = len(new)
                fed = int(log.drafts) + 1
            end = te - t0
            step_ms = (te - ts) * 1e3
            t.generated[i] += committed
            t.steps[i] += 1
            t.drafted[i] += drafted
            t.accepted[i] += accepted
            if prefill:
                t.kv_resident[i] = True
                t.first_token_s[i] = end
            else:
                t.decode_steps[i] += 1
            if t.generated[i] >= t.output_tokens[i]:
                t.completion_s[i] = end
                t.kv_resident[i] = False
                t.in_batch[i] = False
                runners[i] = None  # free its KV
                seqs[i] = None
                active = active[active != i]
                last = -1
                if progress is not None:
                    progress(1)
            idx = np.array([i], dtype=np.int64)
            sched.observe(StepRecord(idx=idx, prefill=np.array([prefill]), drafted=np.array([drafted]),
                                     accepted=np.array([accepted]), committed=np.array([committed]),
                                     step_ms=step_ms, end_s=end))
            steps.append((str(t.request_id[i]), len(steps), ts - t0, end, step_ms, bool(prefill), k_cap,
                          drafted, accepted, committed, fed, ctx_tok, int(active.size)))
    wall = time.perf_counter() - t0
    from simspec.simulator.metrics import requests_frame

    req = requests_frame(t, sched.extra_columns())
    st = pd.DataFrame.from_records(steps, columns=["request_id", "step", "start_s", "end_s", "step_ms", "prefill",
                                                   "k_cap", "drafted", "accepted", "committed", "fed_tokens",
                                                   "ctx_tokens", "queue_len"])
    return RealRun(requests=req, steps=st, wall_s=wall)


# ------------------------------------------------------------------------------------ model vs steps


def model_step_ms(sim_method: Any, cost: Any, steps: pd.DataFrame) -> np.ndarray:
    """The latency model's compute time (ms, no overhead) of each real step at batch size 1,
    charged exactly as the simulator's method charges a step of that shape."""
    from simspec.simulator.methods.base import BatchStep

    out = np.empty(len(steps))
    rng = np.random.default_rng(0)
    if getattr(sim_method, "uses_acceptance", False):  # costs never depend on acceptance: bind a dummy
        sim_method = type(sim_method)(dict(sim_method.params), sim_method.profile, cost)
        sim_method.bind_acceptance(sim_method.build_acceptance([{"alpha": {"kind": "fixed", "value": 0.5}}]))
    fo, ff = cost.overhead_fraction, cost.overhead_fixed_ms
    cost.overhead_fraction, cost.overhead_fixed_ms = 0.0, 0.0
    try:
        for j, row in enumerate(steps.itertuples(index=False)):
            pre = bool(row.prefill)
            k = 0 if pre else int(row.drafted)
            b = BatchStep(idx=np.array([0]), prefill=np.array([pre]), fed_tokens=np.array([int(row.fed_tokens)]),
                          ctx_tokens=np.array([0 if pre else int(row.ctx_tokens)]), k=np.array([k]),
                          remaining=np.array([10**6]), alpha=np.array([0.5]), class_idx=np.array([0]))
            out[j] = sim_method.step(rng, b).step_ms
    finally:
        cost.overhead_fraction, cost.overhead_fixed_ms = fo, ff
    return out


def fit_overhead(real_ms: np.ndarray, model_ms: np.ndarray) -> dict[str, float]:
    """Least squares ``real = model·(1 + fraction) + fixed_ms`` with both terms ≥ 0 (``validate`` passes
    the decode steps only)."""
    x, y = np.asarray(model_ms, float), np.asarray(real_ms, float)
    a = np.stack([x, np.ones_like(x)], axis=1)
    (slope, icpt), *_ = np.linalg.lstsq(a, y, rcond=None)
    if slope < 1.0:  # fraction would be negative: fixed term only
        slope, icpt = 1.0, float(np.mean(y - x))
    if icpt < 0:  # fixed would be negative: fraction only
        icpt, slope = 0.0, float((x @ y) / (x @ x))
    resid = y - (x * slope + icpt)
    return {"fraction": max(0.0, float(slope - 1.0)), "fixed_ms": max(0.0, float(icpt)),
            "rms_residual_ms": float(np.sqrt(np.mean(resid ** 2))), "n_steps": int(len(x))}


def heldout_latency(lm: Any, cost: Any, grid: dict[str, Any] | None, repeats: int = 7) -> dict[str, Any]:
    """Time whole target forwards (embedding + every layer + final norm + LM head, batch 1) at a few
    shapes off the profile's grid, against the latency model's ``target_ms``."""
    import torch

    from simspec.calibrate.early_exit import LayeredLM

    shapes = [(1, 40), (1, 150), (3, 90), (5, 210), (7, 60), (48, 0), (100, 0)]
    if grid:
        on = {(t, c) for t in grid.get("tokens_per_request", []) for c in grid.get("context_tokens", [])}
        shapes = [s for s in shapes if s not in on]
    layered = lm if isinstance(lm, LayeredLM) else LayeredLM(lm)
    vocab_tok = 100
    points = []
    with torch.no_grad():
        for tok, c in shapes:
            kv = layered.new_kv()
            if c:
                layered.run(layered.embed([vocab_tok + (p % 500) for p in range(c)]), 0, layered.num_layers, kv)
            ids = [vocab_tok + 7 * p % 900 for p in range(tok)]
            times = []
            for rep in range(repeats + 1):
                kv.crop(range(layered.num_layers), c)
                t0 = time.perf_counter()
                h = layered.run(layered.embed(ids), 0, layered.num_layers, kv)
                layered.head(h)  # over every fed token, as the lm_head stage is defined
                times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times[1:])
            model = cost.target_ms(1, tok, c)
            points.append({"what": "target forward", "batch_size": 1, "tokens": tok, "context_tokens": c,
                           "measured_ms": ms, "model_ms": model, "err_pct": 100.0 * (model - ms) / ms})
    errs = [abs(p["err_pct"]) for p in points]
    return {"points": points, "mean_abs_err_pct": float(np.mean(errs)) if errs else None,
            "max_abs_err_pct": float(np.max(errs)) if errs else None,
            "note": "model = profile latency stages composed as a layer-level replay charges a full target "
                    "step (no overhead term); measured = median wall time of a real forward"}


def speed_probe(lm: Any, cost: Any, repeats: int = 5) -> dict[str, Any]:
    """The machine's speed now, relative to the latency model: the median over a fixed set of
    whole target forwards (:func:`heldout_latency`'s shapes, batch 1) of measured / model time.
    1.0 = as fast as the profile's grid was measured; timed right before and after a validation
    run, it tells how fast the machine ran then (this shared CPU drifts by ±10 % between runs of
    the same work: docs/validation/README.md)."""
    doc = heldout_latency(lm, cost, None, repeats=repeats)
    ratios = [p["measured_ms"] / p["model_ms"] for p in doc["points"] if p["model_ms"] > 0]
    return {"speed": float(np.median(ratios)), "ratios": [round(r, 4) for r in ratios],
            "shapes": [(p["tokens"], p["context_tokens"]) for p in doc["points"]]}


def speed_scaled_profile(profile: Any, factor: float) -> Any:
    """``profile`` with every step ``factor`` times as long: the per-step overhead rescaled so that
    ``finish(ms) = factor · (ms · (1 + fraction) + fixed_ms)`` (per-forward overheads are inside
    ``ms``, so they scale too). For a what-if replay at a measured machine speed."""
    import copy
    import hashlib

    from simspec.profile import Profile

    doc = copy.deepcopy(profile.doc)
    ov = dict(doc["latency"].get("overhead") or {})
    frac, fixed = float(ov.get("fraction", 0.0)), float(ov.get("fixed_ms", 0.0))
    ov["fraction"] = factor * (1.0 + frac) - 1.0
    ov["fixed_ms"] = factor * fixed
    doc["latency"]["overhead"] = ov
    sha = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    return Profile(doc=doc, path=profile.path, sha256=sha)


def tokens_per_decode_step(requests: pd.DataFrame) -> float | None:
    """Tokens committed per decode (verification) step over a run (the prefill's token excluded)."""
    dec = requests["decode_steps"].sum()
    if dec <= 0:
        return None
    toks = (requests["generated_tokens"] - (requests["steps"] - requests["decode_steps"])).sum()
    return float(toks / dec)


def load_info() -> dict[str, Any]:
    """Machine load for the report: 1/5/15-minute load averages and the CPU count."""
    try:
        la = os.getloadavg()
    except OSError:
        la = (float("nan"),) * 3
    return {"loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "loadavg_15m": round(la[2], 2),
            "cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------ orchestration


def run_validation(trace_arg: str, *, model: str, method: str, adapter: str | None, policy: str, profile_arg: str,
                   device: str, out_dir: str, time_scale: float = 1.0, seed: int = 0, dtype: str | None = None,
                   threads: int | None = None, fit_overhead_to: str | None = None, heldout: bool = True,
                   echo: Any = print, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """The whole of ``simspec validate``: checks, real run, simulated run, held-out checks, report.

    Returns the ``validation.json`` document. With ``fit_overhead_to``, also fits the per-step
    overhead on this run and writes a copy of the profile there with it (see :func:`fit_overhead`).
    ``out_dir`` is checked first (an existing one is replaced only with ``force``, and only if
    simspec wrote it) and written atomically at the end.
    """
    from pathlib import Path

    from simspec import __version__
    from simspec.atomic import atomic_dir, check_output_dir, check_output_file, write_json, write_text

    check_output_dir(out_dir, "validation", force=force)
    if fit_overhead_to:
        check_output_file(fit_overhead_to, force=True, what="--fit-overhead")
    from simspec.policies import get_scheduler_class
    from simspec.profile import load_profile
    from simspec.simulator.acceptance import resolve_classes
    from simspec.simulator.config import ComponentSpec, RunConfig
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import METHODS, get_method_class
    from simspec.simulator.run import simulate
    from simspec.traces.formats import resolve_trace_arg
    from simspec.traces.transforms import load_and_transform
    from simspec.validation_report import format_heldout, format_table, write_report

    # --- checks before anything slow -------------------------------------------------------------
    mspec = ComponentSpec.parse(method, "--method")
    if mspec.name not in SPEC_METHODS:
        raise ConfigError(f"--method {mspec.name!r}: unknown (choose from {', '.join(SPEC_METHODS)})")
    if mspec.name not in METHODS:
        raise ConfigError(f"--method {mspec.name}: the simulator has no such method yet (has "
                          f"{', '.join(sorted(METHODS))})")
    sspec = ComponentSpec.parse(policy, "--policy")
    get_scheduler_class(sspec.name)
    if adapter is not None and not Path(adapter).is_dir():
        raise ConfigError(f"--adapter {adapter}: no such directory")
    if adapter is not None and not (Path(adapter) / "adapter.json").is_file():
        raise ConfigError(f"--adapter {adapter}: no adapter.json in it (train one with simspec calibrate adapter)")
    profile = load_profile(profile_arg)
    trace = scale_trace(load_and_transform(resolve_trace_arg(trace_arg), None, seed=seed), time_scale)
    cost = CostModel(profile)
    sim_method = get_method_class(mspec.name)(dict(mspec.params), profile, cost)
    notes: list[str] = []
    if sim_method.uses_acceptance:
        _, acc_notes = resolve_classes(profile, mspec.name, sorted(set(trace.acceptance_class.tolist())))
        notes += acc_notes
    # the real server runs the top of the policy's order every step and a displaced request keeps its
    # KV: the simulator's preemptive batching with a KV budget no run can fill (in vllm mode a
    # running request would never be displaced at batch size 1)
    kv_all = int((trace.prompt_tokens + trace.output_tokens).sum()) + 64 * len(trace)
    config = RunConfig(scheduler=sspec, method=mspec, max_batch_size=1, kv_budget_tokens=max(4 * kv_all, 4096),
                       seed=seed, allow_extrapolation=True, batching="preemptive")
    dtype = dtype or str(profile.meta.get("dtype") or "bf16")

    # --- real run --------------------------------------------------------------------------------
    import torch

    from simspec.calibrate.early_exit import LayeredLM
    from simspec.calibrate.models import load_model

    threads = threads or profile.meta.get("threads")
    if threads and device == "cpu":
        torch.set_num_threads(int(threads))
    loaded = load_model(model, dtype=dtype, device=device)
    lm = LayeredLM(loaded.model)
    setup = build_method(lm, mspec, adapter)
    prompt_ids, p_notes = prompt_ids_for_trace(loaded.tokenizer, trace)
    notes += p_notes
    with torch.no_grad():  # warm-up (allocator, kernels), not timed
        setup.make().generate(prompt_ids[0][:32] or [1], 4)
    load_before = load_info()
    echo(f"real run: {len(trace)} requests, method {mspec}, policy {sspec}, {device} ({dtype}) ...")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trace), unit="req", desc="real run", mininterval=1.0, leave=False)
    try:
        real = real_run(lm, setup, trace, prompt_ids, sspec, sim_method, seed,
                        progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    load_after = load_info()
    echo(f"real run done in {real.wall_s:.1f} s")

    # --- simulated run ---------------------------------------------------------------------------
    sim = simulate(config, trace, profile)
    notes += [n for n in sim.notes if n not in notes]

    # --- per-step residuals (time outside the latency model) and held-out checks ------------------
    steps = real.steps.copy()
    steps["model_ms"] = model_step_ms(sim_method, cost, steps)
    steps["model_with_overhead_ms"] = [cost.finish(m) for m in steps["model_ms"]]
    dec = steps[~steps["prefill"]]
    pre = steps[steps["prefill"]]
    held: dict[str, Any] = {
        "step_overhead": {
            "n_steps": int(len(dec)),
            "median_residual_ms": float((dec["step_ms"] - dec["model_ms"]).median()) if len(dec) else None,
            "decode_real_ms_mean": float(dec["step_ms"].mean()) if len(dec) else None,
            "decode_model_ms_mean": float(dec["model_ms"].mean()) if len(dec) else None,
            "decode_model_with_profile_overhead_ms_mean": float(dec["model_with_overhead_ms"].mean()) if len(dec) else None,
            "prefill_real_ms_mean": float(pre["step_ms"].mean()) if len(pre) else None,
            "prefill_model_ms_mean": float(pre["model_ms"].mean()) if len(pre) else None,
            "decode_real_over_model_median": float((dec["step_ms"] / dec["model_ms"]).median()) if len(dec) else None,
            "prefill_real_over_model_median": float((pre["step_ms"] / pre["model_ms"]).median()) if len(pre) else None,
            "profile_overhead": dict(profile.overhead),
        }
    }
    model_tps = tokens_per_decode_step(sim.requests)
    real_tps = tokens_per_decode_step(real.requests)
    held["acceptance_model"] = {
        "model_tokens_per_step": model_tps, "real_tokens_per_step": real_tps,
        "err_pct": (100.0 * (model_tps - real_tps) / real_tps) if model_tps and real_tps else None,
        "real_acceptance_rate": (float(real.requests["accepted"].sum() / real.requests["drafted"].sum())
                                 if real.requests["drafted"].sum() else None),
        "model_acceptance_rate": (float(sim.requests["accepted"].sum() / sim.requests["drafted"].sum())
                                  if sim.requests["drafted"].sum() else None),
        "note": "model = the simulated run's committed tokens per decode step (acceptance model sampled "
                "with the same k caps); real = the real run's",
    }
    if heldout:
        held["latency_model"] = heldout_latency(lm, cost, profile.meta.get("grid"))

    fitted = None
    if fit_overhead_to:
        from simspec.calibrate.profile_io import update_profile

        fitted = fit_overhead(dec["step_ms"].to_numpy(), dec["model_ms"].to_numpy())
        src = Path(profile.path)
        dst = Path(fit_overhead_to)
        if src.resolve() != dst.resolve():
            write_text(dst, src.read_text(encoding="utf-8"))
        lat = dict(profile.doc["latency"])
        lat["overhead"] = {"fraction": round(fitted["fraction"], 6), "fixed_ms": round(fitted["fixed_ms"], 6)}
        update_profile(dst, latency=lat, meta_updates={"overhead_calibration": {
            "method": "least squares real_step_ms = model_ms*(1+fraction) + fixed_ms over the decode steps of a "
                      "real batch-1 run (prefills excluded: see validation docs), both terms >= 0",
            "trace": str(trace_arg), "time_scale": time_scale, "spec": str(mspec), "policy": str(sspec),
            "seed": seed, "n_steps": fitted["n_steps"], "rms_residual_ms": round(fitted["rms_residual_ms"], 4),
            "machine_load": load_after, "simspec_version": __version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "caution": "validate on a different trace than this one"}})
        held["overhead_fit"] = {**fitted, "written_to": str(dst)}
        echo(f"overhead fitted: fraction {fitted['fraction']:.4f}, fixed {fitted['fixed_ms']:.3f} ms -> {dst}")

    meta = {
        "simspec_version": __version__, "trace": str(trace_arg), "n_requests": len(trace), "time_scale": time_scale,
        "model": model, "model_id": loaded.model_id, "dtype": dtype, "device": device,
        "torch_threads": int(torch.get_num_threads()), "method": str(mspec), "policy": str(sspec),
        "adapter": adapter, "profile": {"name": profile.name, "path": profile.path, "sha256": profile.sha256,
                                        "overhead": dict(profile.overhead)},
        "seed": seed, "real_wall_s": round(real.wall_s, 2), "machine_load_before": load_before,
        "machine_load_after": load_after, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "preemptions_real": int(real.requests["preemptions"].sum()),
        "preemptions_sim": int(sim.requests["preemptions"].sum()),
        "pauses_real": int(real.requests["pauses"].sum()) if "pauses" in real.requests else None,
        "pauses_sim": int(sim.requests["pauses"].sum()) if "pauses" in sim.requests else None, "notes": notes,
    }
    title = f"{Path(str(trace_arg)).stem} · {mspec} · {sspec} · {profile.name}"
    with atomic_dir(out_dir, overwrite=force, kind="validation") as out:
        doc = write_report(out, real.requests, sim.requests, meta=meta, heldout=held, title=title)
        write_json(out / "summary.json", {"meta": {k: meta[k] for k in ("trace", "method", "policy", "device",
                                                                         "dtype", "machine_load_after")},
                                          "profile": profile.name, **doc["errors"]})
        write_text(out / "real_requests.csv", real.requests.to_csv(index=False, float_format="%.6f"))
        write_text(out / "real_steps.csv", steps.to_csv(index=False, float_format="%.4f"))
        write_text(out / "sim_requests.csv", sim.requests.to_csv(index=False, float_format="%.6f"))
    echo(format_table(doc["errors"], title))
    echo(format_heldout(held))
    for n in notes:
        echo(f"note: {n}")
    return doc
