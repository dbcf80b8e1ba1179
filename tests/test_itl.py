"""ITL as ``vllm bench serve`` computes it: one sample per streamed chunk (per token-committing
step of a request), pooled over requests; exact mean, median, std and percentiles."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from simspec.policies.base import StepRecord, WindowRecord
from simspec.profile import load_profile
from simspec.simulator.itl import ItlLog
from simspec.simulator.run import simulate
from tests.test_engine_semantics import _random_trace, cfg


def _step(idx, committed, end_s, prefill=None):
    idx = np.asarray(idx)
    z = np.zeros(idx.size, dtype=np.int64)
    return StepRecord(idx=idx, prefill=np.zeros(idx.size, bool) if prefill is None else np.asarray(prefill),
                      drafted=z, accepted=z, committed=np.asarray(committed), step_ms=0.0, end_s=end_s)


def test_itl_log_by_hand():
    log = ItlLog(3)
    log.observe(_step([0, 1, 2], [1, 1, 0], 1.0))  # 0 and 1 finish their prompts (first chunk); 2 is mid-prompt
    committed = np.array([[3, 1], [2, 4], [5, 0]])  # three steps; member 1 finishes in step 2
    active = np.array([[True, True], [True, True], [True, False]])
    z = np.zeros_like(committed)
    log.observe_window(WindowRecord(idx=np.array([0, 1]), drafted=z, accepted=z, position_accepts=z,
                                    committed=committed, fed_tokens=z, step_ms=np.zeros(3),
                                    end_s=np.array([2.0, 3.0, 5.0]), active=active))
    log.observe(_step([0, 2], [1, 1], 9.0, prefill=[True, True]))  # 0 re-prefilled after a recompute: a chunk
    s = log.samples()
    # one sample per chunk after the first, several tokens in a chunk notwithstanding
    expanded = np.repeat(s.values_ms, s.counts)
    assert sorted(expanded.tolist()) == [1000.0, 1000.0, 1000.0, 1000.0, 2000.0, 4000.0]


def test_itl_is_pooled_chunk_gaps_rebuilt_from_the_step_log():
    # no pauses or preemptions: each request's chunks are exactly its replica's steps from its
    # first token to its completion, so the gaps can be rebuilt independently from steps.parquet
    tr = _random_trace(150, 7, rate=6.0, prompt=(50, 1500), output=(5, 300))
    prof = load_profile("llama70b-4xh100-smartspec")
    c = cfg("fcfs", "draft:k=4", replicas=2, max_batch_size=256, max_batched_tokens=2048)
    res = simulate(c, tr, prof)
    req, steps = res.requests, res.steps
    assert int(req["pauses"].sum()) == 0 and int(req["preemptions"].sum()) == 0
    gaps = []
    for r in req.itertuples():
        e = steps.loc[steps["replica"] == r.replica, "end_s"].to_numpy()
        ends = e[(e > r.first_token_s) & (e <= r.completion_s)]
        assert len(ends) == r.decode_steps
        gaps.append(np.diff(np.concatenate(([r.first_token_s], ends))))
    g = np.concatenate(gaps) * 1000.0
    s = res.summary
    want = {"mean": g.mean(), "median": np.median(g), "std": g.std(),
            **{f"p{p}": np.percentile(g, p) for p in (90, 95, 99)}}
    for k, v in want.items():
        assert s[f"{k}_itl_ms"] == pytest.approx(v, rel=1e-12), k
    # speculation: a step streams several tokens as one chunk, so ITL is a step time, above TPOT
    assert s["mean_itl_ms"] > 1.5 * s["mean_tpot_ms"]
    # the same with one step per event (the fast path groups steps differently)
    assert simulate(replace(c, window_steps=1), tr, prof).summary == s
