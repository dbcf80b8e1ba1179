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
from simspec.rng import stream
from simspec.simulator.acceptance import resolve_classes
from simspec.simulator.config import RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.engine import Capacity, Cluster
from simspec.simulator.methods import get_method_class
from simspec.simulator.metrics import requests_frame, steps_frame, summary
from simspec.simulator.state import RequestTable
from simspec.trace import Trace


@dataclass
class RunResult:
    """Outputs of one run: per-request and per-step tables, the summary, and notes for the user."""

    config: dict[str, Any]
    requests: pd.DataFrame
    steps: pd.DataFrame
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def resolve_capacity(config: RunConfig, profile: Profile) -> Capacity:
    cap = profile.capacity
    mb = config.max_batch_size if config.max_batch_size is not None else cap.get("max_batch_size")
    kv = config.kv_budget_tokens if config.kv_budget_tokens is not None else cap.get("kv_budget_tokens")
    if mb is None:
        raise ConfigError(f"--max-batch: not given and profile {profile.name} has no capacity.max_batch_size")
    if kv is None:
        raise ConfigError(f"--kv-budget-tokens: not given and profile {profile.name} has no capacity.kv_budget_tokens")
    mt = config.max_batched_tokens if config.max_batched_tokens is not None else cap.get("max_batched_tokens")
    return Capacity(max_batch_size=int(mb), kv_budget_tokens=int(kv),
                    max_batched_tokens=int(mt) if mt is not None else None)


def check_ranges(profile: Profile, capacity: Capacity, trace: Trace) -> list[str]:
    """Compare the run's largest shapes with each stage's measured ``valid`` ranges.

    Returns the violations (empty when all lookups stay in range)."""
    worst = {"batch_size": capacity.max_batch_size,
             "tokens_per_request": int(trace.prompt_tokens.max() + trace.output_tokens.max()),
             "context_tokens": int(trace.prompt_tokens.max() + trace.output_tokens.max())}
    out = []
    for name, doc in profile.stages.items():
        valid = doc.get("valid") or {}
        for axis, hi_needed in worst.items():
            rng = valid.get(axis)
            if isinstance(rng, (list, tuple)) and len(rng) == 2 and hi_needed > float(rng[1]):
                out.append(f"{name}.{axis} up to {hi_needed} > measured {rng[1]:g}")
    return out


def simulate(config: RunConfig, trace: Trace, profile: Profile, progress: bool = False) -> RunResult:
    """Replay ``trace`` under ``config`` with ``profile``. Deterministic in (config, trace, profile)."""
    notes: list[str] = list(trace.notes)
    table = RequestTable.from_trace(trace)
    capacity = resolve_capacity(config, profile)
    cost = CostModel(profile)
    method = get_method_class(config.method.name)(dict(config.method.params), profile, cost)
    if method.uses_acceptance:
        entries, acc_notes = resolve_classes(profile, method.name, table.class_names)
        notes += acc_notes
        model = method.build_acceptance(entries)
        method.bind_acceptance(model)
        table.alpha[:] = model.draw_alphas(stream(config.seed, "acceptance-request"), table.class_idx)
    notes += list(getattr(method, "notes", []))
    ctx0 = PolicyContext(table=table, method=method, max_batch_size=capacity.max_batch_size,
                         kv_budget_tokens=capacity.kv_budget_tokens, seed=config.seed)
    scheduler = get_scheduler_class(config.scheduler.name)(dict(config.scheduler.params), ctx0)
    spec_len_cls = get_spec_len_class(config.spec_len.name)
    spec_len_params = dict(config.spec_len.params)
    probe = spec_len_cls(spec_len_params, ctx0)  # validates parameters before the run starts
    k_res = probe.k_reserve()
    need = table.prompt_tokens + table.output_tokens + np.minimum(k_res, table.output_tokens - 1)
    bad = np.flatnonzero(need > capacity.kv_budget_tokens)
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"{trace.source or 'trace'}: request {table.request_id[i]} (row {i + 1} after sorting) "
                          f"needs {int(need[i])} KV tokens (prompt {table.prompt_tokens[i]} + output "
                          f"{table.output_tokens[i]} + {min(k_res, int(table.output_tokens[i]) - 1)} drafts) but "
                          f"--kv-budget-tokens is {capacity.kv_budget_tokens}: it can never run "
                          f"({bad.size} such request(s))")
    out_of_range = check_ranges(profile, capacity, trace)
    if out_of_range:
        msg = "; ".join(out_of_range[:3]) + (f" (+{len(out_of_range) - 3} more)" if len(out_of_range) > 3 else "")
        if not config.allow_extrapolation:
            raise ProfileError(f"profile {profile.name}: this run needs latencies outside the measured range "
                               f"({msg}); cap the trace or pass --allow-extrapolation")
        notes.append(f"latency extrapolated beyond the profile's measured range: {msg}")
    if profile.source == "analytic":
        notes.append(f"profile {profile.name} is ANALYTIC (a roofline estimate, not a measurement)")

    pbar = None
    if progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(table), unit="req", desc="replay", delay=2.0, mininterval=0.5, leave=False)
    cluster = Cluster(table, method, scheduler, lambda ctx: spec_len_cls(spec_len_params, ctx), capacity,
                      config.replicas, config.router, config.preempt_mode, config.seed,
                      on_complete=pbar.update if pbar is not None else None)
    try:
        cluster.run()
    finally:
        if pbar is not None:
            pbar.close()
    unfinished = np.flatnonzero(np.isnan(table.completion_s))
    if unfinished.size:
        raise RuntimeError(f"simulation ended with {unfinished.size} unfinished request(s), first "
                           f"{table.request_id[unfinished[0]]}: a policy never scheduled it")
    requests = requests_frame(table, scheduler.extra_columns())
    steps = steps_frame([r.steps_log for r in cluster.replicas])
    summ = summary(requests, steps, [r.busy_s for r in cluster.replicas], config.slo_ttft_ms, config.slo_tpot_ms)
    summ["profile_source"] = profile.source
    cfg = {
        "simspec_version": __version__,
        "run": config.to_dict(),
        "capacity": {"max_batch_size": capacity.max_batch_size, "kv_budget_tokens": capacity.kv_budget_tokens,
                     "max_batched_tokens": capacity.max_batched_tokens},
        "profile": {"name": profile.name, "path": profile.path, "sha256": profile.sha256, "source": profile.source},
        "trace": {"source": trace.source, "n_requests": len(trace)},
    }
    return RunResult(config=cfg, requests=requests, steps=steps, summary=summ, notes=notes)
