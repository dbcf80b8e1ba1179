"""Per-request and per-run metrics (algorithms.md §6). Times in seconds unless the name says ms."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from simspec.memory import release_free_memory
from simspec.simulator.engine import STEP_COLUMNS
from simspec.simulator.itl import ItlSamples
from simspec.simulator.state import RequestTable

PERCENTILES = (50, 90, 99)


def requests_frame(t: RequestTable, extra: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per request, in trace (arrival) order."""
    latency = t.completion_s - t.arrival_s
    ttft = t.first_token_s - t.arrival_s
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(t.output_tokens > 1, (t.completion_s - t.first_token_s) / (t.output_tokens - 1), np.nan)
        # tokens committed per verification step: a decode step commits accepted + 1 (k is capped
        # at remaining − 1, so the cap at the request's end never bites)
        decode_tokens = t.accepted + t.decode_steps
        mean_acc = np.where(t.decode_steps > 0, decode_tokens / np.maximum(t.decode_steps, 1), np.nan)
    cols: dict[str, Any] = {
        "request_id": t.request_id.astype(str),
        "replica": t.replica,
        "acceptance_class": np.asarray(t.class_names, dtype=object)[t.class_idx].astype(str),
        "slo_class": t.slo_class.astype(str),
        "arrival_s": t.arrival_s,
        "prompt_tokens": t.prompt_tokens,
        "output_tokens": t.output_tokens,
        "generated_tokens": t.generated,
        "start_s": t.start_s,
        "first_token_s": t.first_token_s,
        "completion_s": t.completion_s,
        "latency_s": latency,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "queueing_delay_s": t.start_s - t.arrival_s,
        "steps": t.steps,
        "decode_steps": t.decode_steps,
        "drafted": t.drafted,
        "accepted": t.accepted,
        "mean_accepted_len": mean_acc,
        "position_accepts": t.position_accepts,
        "pauses": t.pauses,
        "preemptions": t.preemptions,
        "recomputes": t.recomputes,
        "recomputed_tokens": t.recomputed_tokens,
        "alpha": t.alpha,
    }
    for name, arr in extra.items():
        cols[name] = arr
    return pd.DataFrame(cols, copy=False)  # the table's arrays as they are: no second copy of every column


def steps_frame(logs: list, consume: bool = False) -> pd.DataFrame:
    """All replicas' step logs (:class:`~simspec.simulator.steplog.StepLog`), ordered by start time.
    ``consume``: free each log column as soon as it is copied into the frame (the logs keep their
    step counters but no rows), so a long run's log is held about once, not twice."""
    parts = [log.columns() for log in logs]
    if not parts or not sum(len(p["step"]) for p in parts):
        return pd.DataFrame({c: np.concatenate([p[c] for p in parts]) if parts else np.empty(0)
                             for c in STEP_COLUMNS})
    # the order of a stable sort by (start_s, replica), then one gather per column: a single copy of
    # the log (sorting a DataFrame would hold the concatenated, the sorted and the frame's copies)
    order = np.lexsort((np.concatenate([p["replica"] for p in parts]),
                        np.concatenate([p["start_s"] for p in parts])))
    cols = {}
    for c in STEP_COLUMNS:
        cols[c] = np.concatenate([p[c] for p in parts])[order]
        if consume:
            for p, log in zip(parts, logs):
                del p[c]
                log.cols[c] = log.cols[c][:0].copy()
            release_free_memory()  # the freed log column's pages (simspec/memory.py)
    if consume:
        for log in logs:
            log.n = 0
    return pd.DataFrame(cols, copy=False)


def _stats(x: np.ndarray, prefix: str, scale: float = 1.0) -> dict[str, float | None]:
    x = x[~np.isnan(x)] * scale
    if x.size == 0:
        return {f"{prefix}_mean": None, **{f"{prefix}_p{p}": None for p in PERCENTILES}}
    out = {f"{prefix}_mean": float(x.mean())}
    for p in PERCENTILES:
        out[f"{prefix}_p{p}"] = float(np.percentile(x, p))
    return out


def summary(req: pd.DataFrame, steps: pd.DataFrame, busy_s: list[float], slo_ttft_ms: float | None,
            slo_tpot_ms: float | None, itl: ItlSamples, n_steps: int | None = None,
            batch_size_sum: int | None = None) -> dict[str, Any]:
    """Run-level metrics: latency/TTFT/TPOT/queueing percentiles (ms), throughput, goodput,
    acceptance, waste, preemptions, utilisation, SLO attainment; ``vllm bench serve``'s metrics
    (ITL from ``itl``, the run's pooled token-chunk gaps). ``n_steps`` / ``batch_size_sum``: the
    step count and the sum of batch sizes over every step (the step log's totals, which count the
    steps a sampled or absent ``steps`` table leaves out); by default taken from ``steps``."""
    first_arrival = float(req["arrival_s"].min())
    makespan = float(req["completion_s"].max()) - first_arrival
    tokens = int(req["output_tokens"].sum())
    drafted = int(req["drafted"].sum())
    accepted = int(req["accepted"].sum())
    s: dict[str, Any] = {"n_requests": int(len(req)), "output_tokens": tokens, "makespan_s": makespan}
    s.update(_stats(req["latency_s"].to_numpy(float), "latency_ms", 1000.0))
    s.update(_stats(req["ttft_s"].to_numpy(float), "ttft_ms", 1000.0))
    s.update(_stats(req["tpot_s"].to_numpy(float), "tpot_ms", 1000.0))
    s.update(_stats(req["queueing_delay_s"].to_numpy(float), "queueing_ms", 1000.0))
    s["throughput_tokens_per_s"] = tokens / makespan if makespan > 0 else None
    s["throughput_requests_per_s"] = len(req) / makespan if makespan > 0 else None
    total_busy = float(sum(busy_s))
    # SmartSpec's goodput: committed tokens per second of step time (per replica busy time)
    s["smartspec_goodput_tokens_per_busy_s"] = tokens / total_busy if total_busy > 0 else None
    s["drafted_tokens"] = drafted
    s["accepted_tokens"] = accepted
    # vLLM's spec-decode name: accepted draft positions per drafted position
    s["draft_acceptance_rate"] = accepted / drafted if drafted else None
    s["wasted_draft_tokens"] = drafted - accepted
    # drafted positions whose own draw was accepted, prefix or not (SmartSpec's per-position rate)
    s["position_acceptance_rate"] = int(req["position_accepts"].sum()) / drafted if drafted else None
    dsteps = int(req["decode_steps"].sum())
    decode_tokens = accepted + dsteps
    s["mean_tokens_per_decode_step"] = decode_tokens / dsteps if dsteps else None
    if n_steps is None:
        n_steps = int(len(steps))
        batch_size_sum = int(steps["batch_size"].sum()) if len(steps) else 0
    s["steps"] = int(n_steps)
    s["request_steps"] = int(req["steps"].sum())
    # an exact integer sum over a count: the same float as the mean of the full step table
    s["mean_batch_size"] = float(batch_size_sum) / n_steps if n_steps else None
    s["preemptions"] = int(req["preemptions"].sum())
    s["recomputes"] = int(req["recomputes"].sum())
    s["recomputed_tokens"] = int(req["recomputed_tokens"].sum())
    s["pauses"] = int(req["pauses"].sum())
    s["replica_utilisation"] = [b / makespan if makespan > 0 else None for b in busy_s]
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        ok = np.ones(len(req), dtype=bool)
        if slo_ttft_ms is not None:
            ok &= (req["ttft_s"].to_numpy(float) * 1000.0) <= slo_ttft_ms
        if slo_tpot_ms is not None:
            tp = req["tpot_s"].to_numpy(float) * 1000.0
            ok &= np.isnan(tp) | (tp <= slo_tpot_ms)
        s["slo_attainment"] = float(ok.mean())
        s["slo_goodput_requests_per_s"] = float(ok.sum()) / makespan if makespan > 0 else None
    from simspec.vllm_metrics import vllm_bench_metrics

    s.update(vllm_bench_metrics(req, makespan, itl))  # the same run under `vllm bench serve`'s names
    return s
