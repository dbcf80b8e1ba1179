"""``simulate``: run one configuration over one trace with one profile and return result tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from simspec import __version__
from simspec.errors import ConfigError, ProfileError
from simspec.policies import PolicyContext, get_scheduler_class, get_spec_len_class
from simspec.profile import Profile
from simspec.rng import request_bases, request_keys, stream, stream_key
from simspec.simulator.acceptance import resolve_classes
from simspec.simulator.config import DEFAULT_MAX_BATCHED_TOKENS, RunConfig
from simspec.simulator.cost import CostModel
from simspec.memory import release_free_memory
from simspec.simulator import fastlane, kernels
from simspec.simulator.engine import Capacity, Cluster
from simspec.simulator.methods import get_method_class
from simspec.simulator.metrics import requests_frame, steps_frame, summary
from simspec.simulator.state import RequestTable
from simspec.simulator.steplog import StepLog
from simspec.trace import Trace


@dataclass
class RunResult:
    """Outputs of one run: per-request and per-step tables, the summary, and notes for the user."""

    config: dict[str, Any]
    requests: pd.DataFrame
    steps: pd.DataFrame
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    #: how the run was simulated: ``"fast lane"`` (simulator/fastlane.py) or ``"simpy"`` (with the
    #: reason the fast lane did not apply); outputs do not depend on it
    engine: str = "simpy"


def resolve_capacity(config: RunConfig, profile: Profile) -> Capacity:
    cap = profile.capacity
    mb = config.max_batch_size if config.max_batch_size is not None else cap.get("max_batch_size")
    kv = config.kv_budget_tokens if config.kv_budget_tokens is not None else cap.get("kv_budget_tokens")
    if config.gpu_memory_utilization is not None:
        kv = kv_budget_from_memory(profile, config.gpu_memory_utilization)
    if mb is None:
        raise ConfigError(f"--max-batch: not given and profile {profile.name} has no capacity.max_batch_size")
    if kv is None:
        raise ConfigError(f"--kv-budget-tokens: not given and profile {profile.name} has no capacity.kv_budget_tokens")
    mt = config.max_batched_tokens if config.max_batched_tokens is not None else cap.get("max_batched_tokens")
    if mt is None:
        mt = DEFAULT_MAX_BATCHED_TOKENS
    if int(kv) < config.block_size:
        raise ConfigError(f"--kv-budget-tokens: {kv} tokens is less than one KV block of --block-size "
                          f"{config.block_size}")
    return Capacity(max_batch_size=int(mb), kv_budget_tokens=int(kv), max_batched_tokens=int(mt),
                    block_size=config.block_size, chunked_prefill=config.chunked_prefill,
                    long_prefill_token_threshold=config.long_prefill_token_threshold, watermark=config.watermark)


def kv_budget_from_memory(profile: Profile, utilisation: float) -> int:
    """KV-cache tokens per replica as vLLM sizes it: ``tp × GPU memory × utilisation − weights −
    tp × activation reserve``, over the KV bytes per token of the target (and draft) model. Needs
    the memory figures an analytic profile records (``meta.analytic.gpu.memory_bytes``,
    ``meta.analytic.tp``, ``meta.analytic.efficiency.activation_reserve_gib``,
    ``models.*.weights_bytes`` and ``models.*.kv_bytes_per_token``)."""
    where = f"--gpu-memory-utilization: profile {profile.name}"
    an = (profile.meta or {}).get("analytic") or {}
    try:
        mem = float(an["gpu"]["memory_bytes"])
        tp = int(an.get("tp", 1))
        reserve = float(an.get("efficiency", {}).get("activation_reserve_gib", 0.0)) * 2**30
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where} has no GPU memory figures (field meta.analytic.gpu.memory_bytes); "
                          f"give --kv-budget-tokens instead") from None
    weights = kv_per_token = 0.0
    for role, m in profile.models.items():
        if not isinstance(m, dict) or "weights_bytes" not in m or "kv_bytes_per_token" not in m:
            raise ConfigError(f"{where}: field models.{role}.weights_bytes / kv_bytes_per_token missing; "
                              f"give --kv-budget-tokens instead")
        weights += float(m["weights_bytes"])
        kv_per_token += float(m["kv_bytes_per_token"])
    usable = tp * mem * utilisation - weights - tp * reserve
    if usable <= 0 or kv_per_token <= 0:
        raise ConfigError(f"{where}: {weights / 1e9:.1f} GB of weights leave no KV cache at "
                          f"{utilisation:.0%} of {tp} x {mem / 2**30:.0f} GiB")
    return int(usable // kv_per_token)


def check_ranges(profile: Profile, capacity: Capacity, trace: Trace, stages: set[str] | None = None) -> list[str]:
    """Compare the run's largest shapes with the ``valid`` ranges of the stages it uses (all when
    ``stages`` is None). Returns the violations (empty when all lookups stay in range)."""
    # the longest request bounds both a request's context and the tokens it feeds in one step (its
    # prompt, or prompt + generated when re-prefilled after a recompute); the largest prompt plus
    # the largest output, of two different requests, would overstate it
    longest = int((trace.prompt_tokens + trace.output_tokens).max())
    worst = {"batch_size": capacity.max_batch_size, "tokens_per_request": longest, "context_tokens": longest}
    out = []
    for name, doc in profile.stages.items():
        if stages is not None and name not in stages:
            continue
        valid = doc.get("valid") or {}
        for axis, hi_needed in worst.items():
            rng = valid.get(axis)
            if isinstance(rng, (list, tuple)) and len(rng) == 2 and hi_needed > float(rng[1]):
                out.append(f"{name}.{axis} up to {hi_needed} > {rng[1]:g}")
    return out


def range_words(profile: Profile) -> str:
    """What a stage's ``valid`` range is, by the profile's source."""
    return {"measured": "measured range", "analytic": "range its analytic grid covers",
            "published": "range its published fit covers"}.get(profile.source, "valid range")


def canonical_order(trace: Trace) -> Trace:
    """The trace with requests of equal arrival time ordered by request id, so permuting rows with
    tied arrivals changes nothing (routing, FCFS ties, every output)."""
    a = trace.arrival_s
    if a.size < 2 or not bool((np.diff(a) == 0).any()):
        return trace
    order = np.lexsort((trace.request_id.astype(str), a))
    if bool((order == np.arange(order.size)).all()):
        return trace
    from dataclasses import replace

    return replace(trace, request_id=trace.request_id[order], arrival_s=a[order],
                   prompt_tokens=trace.prompt_tokens[order], output_tokens=trace.output_tokens[order],
                   acceptance_class=trace.acceptance_class[order], slo_class=trace.slo_class[order])


def bind_request_acceptance(config: RunConfig, table: RequestTable, method: Any, profile: Profile) -> list[str]:
    """Each request's random state as :func:`simulate` sets it: its counter-based stream
    (``table.rng_base``), and, for a speculative method, the method's acceptance model bound and
    each request's level α (``table.alpha``). ``table`` must be in canonical order. Returns notes."""
    keys = request_keys(table.request_id)
    table.rng_base[:] = request_bases(stream_key(config.seed, "acceptance-step"), keys)
    if not method.uses_acceptance:
        return []
    entries, notes = resolve_classes(profile, getattr(method, "acceptance_section", method.name),
                                     table.class_names)
    model = method.build_acceptance(entries)
    method.bind_acceptance(model)
    # drawn in the table's canonical order (arrival, then request id), so permuting trace rows
    # with tied arrivals changes nothing
    table.alpha[:] = model.draw_alphas(stream(config.seed, "acceptance-request"), table.class_idx)
    method.bind_requests(table.alpha, table.class_idx)
    return list(notes)


def simulate(config: RunConfig, trace: Trace, profile: Profile, progress: bool = False,
             audit: bool = False) -> RunResult:
    """Replay ``trace`` under ``config`` with ``profile``. Deterministic in (config, trace, profile).
    ``audit``: recount KV from the request table after every step (tests; see ``RunResult.audit``)."""
    notes: list[str] = list(trace.notes)
    trace = canonical_order(trace)
    table = RequestTable.from_trace(trace)
    kernels.select(len(table))  # compiled per-event loops for large runs (results identical either way)
    capacity = resolve_capacity(config, profile)
    cost = CostModel(profile)
    method = get_method_class(config.method.name)(dict(config.method.params), profile, cost)
    notes += bind_request_acceptance(config, table, method, profile)
    notes += list(getattr(method, "notes", []))
    ctx0 = PolicyContext(table=table, method=method, max_batch_size=capacity.max_batch_size,
                         kv_budget_tokens=capacity.kv_budget_tokens, seed=config.seed)
    scheduler = get_scheduler_class(config.scheduler.name)(dict(config.scheduler.params), ctx0)
    spec_len_cls = get_spec_len_class(config.spec_len.name)
    spec_len_params = dict(config.spec_len.params)
    probe = spec_len_cls(spec_len_params, ctx0)  # validates parameters before the run starts
    k_res = probe.k_reserve()
    need = table.prompt_tokens + table.output_tokens + np.minimum(k_res, table.output_tokens - 1)
    bs = capacity.block_size
    usable = capacity.kv_blocks * bs
    bad = np.flatnonzero(-(-need // bs) > capacity.kv_blocks)
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"{trace.source or 'trace'}: request {table.request_id[i]} (row {i + 1} after sorting) "
                          f"needs {int(need[i])} KV tokens (prompt {table.prompt_tokens[i]} + output "
                          f"{table.output_tokens[i]} + {min(k_res, int(table.output_tokens[i]) - 1)} drafts) but "
                          f"the KV cache holds {usable} tokens ({capacity.kv_blocks} blocks of {bs}): it can never "
                          f"run ({bad.size} such request(s))")
    if not capacity.chunked_prefill and capacity.max_batched_tokens is not None:
        big = np.flatnonzero(table.prompt_tokens + table.output_tokens > capacity.max_batched_tokens)
        if big.size:
            i = int(big[0])
            raise ConfigError(f"{trace.source or 'trace'}: request {table.request_id[i]} has a {table.prompt_tokens[i]}-"
                              f"token prompt (+{table.output_tokens[i]} output, re-prefilled after a preemption) "
                              f"but --max-batched-tokens is {capacity.max_batched_tokens} and chunked prefill is "
                              f"off: it may never run ({big.size} such request(s)); enable chunked prefill or "
                              f"raise the budget")
    stages = method.stages_used()
    out_of_range = check_ranges(profile, capacity, trace, stages)
    if out_of_range:
        msg = "; ".join(out_of_range)
        longest = int((trace.prompt_tokens + trace.output_tokens).max())
        for role in ("target", "draft") if "draft_step" in stages else ("target",):
            window = (profile.models.get(role) or {}).get("max_position_embeddings")
            if isinstance(window, (int, float)) and longest > window:
                msg += (f"; the longest request ({longest} tokens) is beyond the {role} model's context window "
                        f"of {int(window)}")
        if not config.allow_extrapolation:
            raise ProfileError(f"profile {profile.name}: this run needs latencies outside the {range_words(profile)} "
                               f"({msg}); cap the trace or pass --allow-extrapolation")
        notes.append(f"latency extrapolated beyond the profile's {range_words(profile)}: {msg}")
    if profile.source == "analytic":
        notes.append(f"profile {profile.name} is ANALYTIC (a roofline estimate, not a measurement)")

    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(table), unit="req", desc="replay", delay=2.0, mininterval=0.5, leave=False)
    # the fast lane (one compiled loop per replica) where it applies, else the SimPy cluster; the
    # outputs are the same either way (simulator/fastlane.py)
    lane = None
    why = "audit mode" if audit else fastlane.eligible(config, method, config.replicas)
    if why is None:
        lane, why = fastlane.run(config, table, method, capacity, probe, cost, config.replicas, scheduler)
    try:
        if lane is not None:
            logs, busy, itl = lane.logs, lane.busy_s, lane.itl
            if pbar is not None:
                pbar.update(len(table))
        else:
            cluster = Cluster(table, method, scheduler, lambda ctx: spec_len_cls(spec_len_params, ctx), capacity,
                              config.replicas, config.router, config.preempt_mode, config.seed,
                              on_complete=pbar.update if pbar is not None else None, batching=config.batching,
                              window_steps=config.window_steps, audit=audit, max_concurrency=config.max_concurrency)
            for r in cluster.replicas:  # before the first step: what the step log keeps (config.steps_log)
                r.log = StepLog(mode=config.steps_log, every=config.steps_log_every)
            cluster.run()
            logs, busy, itl = [r.log for r in cluster.replicas], [r.busy_s for r in cluster.replicas], cluster.itl
    finally:
        if pbar is not None:
            pbar.close()
    release_free_memory()  # what the engine freed (the lane's table backup, its buffers): simspec/memory.py
    unfinished = np.flatnonzero(np.isnan(table.completion_s))
    if unfinished.size:
        raise RuntimeError(f"simulation ended with {unfinished.size} unfinished request(s), first "
                           f"{table.request_id[unfinished[0]]}: a policy never scheduled it")
    requests = requests_frame(table, scheduler.extra_columns())
    steps = steps_frame(logs, consume=True)  # the logs' rows move into the steps table
    summ = summary(requests, steps, busy, config.slo_ttft_ms, config.slo_tpot_ms,
                   itl.samples(), n_steps=sum(lg.n_steps for lg in logs),
                   batch_size_sum=sum(lg.batch_size_sum for lg in logs))
    summ["profile_source"] = profile.source
    cfg = {
        "simspec_version": __version__,
        "run": config.to_dict(),
        "capacity": {"max_batch_size": capacity.max_batch_size, "kv_budget_tokens": capacity.kv_budget_tokens,
                     "max_batched_tokens": capacity.max_batched_tokens, "block_size": capacity.block_size,
                     "kv_blocks": capacity.kv_blocks, "chunked_prefill": capacity.chunked_prefill,
                     "long_prefill_token_threshold": capacity.long_prefill_token_threshold,
                     "watermark": capacity.watermark},
        "profile": {"name": profile.name, "path": profile.path, "sha256": profile.sha256, "source": profile.source},
        "trace": {"source": trace.source, "n_requests": len(trace)},
    }
    res = RunResult(config=cfg, requests=requests, steps=steps, summary=summ, notes=notes,
                    engine="fast lane" if lane is not None else f"simpy ({why})")
    if audit:
        res.audit = {"max_kv_tokens": [r.audit_max_kv_tokens for r in cluster.replicas],
                     "kv_capacity_tokens": capacity.kv_blocks * capacity.block_size}
    return res
