"""Forced acceptance (``simspec.forced_acceptance``): the per-request pattern is exactly what the
simulated run samples, at batch size > 1, under both batching modes (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.errors import ConfigError
from simspec.forced_acceptance import forced_pattern
from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.trace import Trace


def small_trace(n=12, seed=4):
    rng = np.random.default_rng(seed)
    classes = ["qa", "translation", "mt_bench", "math_reasoning"]
    return Trace.from_columns(request_id=np.array([f"r{i}" for i in range(n)]),
                              arrival_s=np.sort(rng.uniform(0, 3, n)), prompt_tokens=rng.integers(20, 120, n),
                              output_tokens=rng.integers(5, 40, n),
                              acceptance_class=np.array([classes[i % 4] for i in range(n)]), source="test")


def replay_pattern(pat, trace, k):
    """Each request's decode steps driven by the pattern alone: (decode steps, drafted, accepted)."""
    out = {}
    for rid, n_out in zip(trace.request_id.tolist(), trace.output_tokens.tolist()):
        gen, s, dr, ac = 1, 0, 0, 0
        while gen < n_out:
            rem = n_out - gen
            d, a = pat.decide(rid, s, min(k, rem - 1))
            gen += min(a + 1, rem)
            dr, ac, s = dr + d, ac + a, s + 1
        out[rid] = (s, dr, ac)
    return out


@pytest.mark.parametrize("method,k", [("draft:k=3,draft_layers=5", 3), ("kangaroo:exit=2,gamma=5,eta=0.6", 5),
                                      ("hispec:draft_exit=4,inter_exit=8,nd=2,ni=4", 5),
                                      ("hispec:draft_exit=2,inter_exit=6,nd=3,ni=2", 4),
                                      ("hispec:draft_exit=4,inter_exit=30,nd=3", 3)])
@pytest.mark.parametrize("scheduler,batching", [("fcfs", "vllm"), ("laps-sd", "preemptive")])
def test_pattern_is_what_the_simulator_samples(method, k, scheduler, batching):
    profile = load_profile("smollm2-135m-cpu-fp32")
    trace = small_trace()
    cfg = RunConfig(scheduler=ComponentSpec.parse(scheduler, "--policy"), method=ComponentSpec.parse(method, "--method"),
                    max_batch_size=4, kv_budget_tokens=100_000, batching=batching, seed=3, allow_extrapolation=True)
    sim = simulate(cfg, trace, profile)
    pat = forced_pattern(cfg, trace, profile)
    want = replay_pattern(pat, trace, k)
    req = sim.requests.set_index(sim.requests["request_id"].astype(str))
    assert sim.steps["batch_size"].max() > 1  # the batches really were shared
    for rid, (steps, drafted, accepted) in want.items():
        row = req.loc[rid]
        assert (int(row["decode_steps"]), int(row["drafted"]), int(row["accepted"])) == (steps, drafted, accepted), rid
    assert 0 < sum(a for _, _, a in want.values()) < sum(d for _, d, _ in want.values())
    if method.startswith("kangaroo"):  # the confidence stop made some steps draft fewer than the cap
        assert any(d < c for _, _, c, d, _, _ in pat.log if c > 0)


def test_hispec_pattern_carries_the_inner_iterations():
    """Two-level HiSpec: each decision's inner iterations append 1..N_d tokens each, sum to the buffer,
    and stop once it holds min(N_i, cap); the buffer never exceeds the cap."""
    profile = load_profile("smollm2-135m-cpu-fp32")
    trace = small_trace()
    cfg = RunConfig(scheduler=ComponentSpec("fcfs"), method=ComponentSpec.parse("hispec:nd=2,ni=4", "--method"),
                    max_batch_size=4, kv_budget_tokens=100_000, seed=3, allow_extrapolation=True)
    pat = forced_pattern(cfg, trace, profile)
    assert pat.draws_per_step == 4 * 2 + 5
    seen_short = False
    for rid in trace.request_id.tolist()[:6]:
        for s in range(12):
            for cap in (0, 1, 3, 5):
                f = pat.decide_step(rid, s, cap)
                assert f.drafts <= cap and 0 <= f.accepted <= f.drafts
                assert sum(f.inner) == f.drafts and all(1 <= x <= 2 for x in f.inner)
                if f.inner:
                    assert sum(f.inner[:-1]) < min(4, cap) <= f.drafts
                    seen_short = seen_short or min(f.inner) < min(2, cap)
                assert pat.decide(rid, s, cap) == (f.drafts, f.accepted)  # deterministic
    assert seen_short  # the intermediate verifier rejected some drafts


def test_pattern_refuses_a_method_without_one():
    profile = load_profile("smollm2-135m-cpu-fp32")
    cfg = RunConfig(scheduler=ComponentSpec("fcfs"), method=ComponentSpec("none"), max_batch_size=2,
                    kv_budget_tokens=100_000)
    with pytest.raises(ConfigError, match="--forced-acceptance: method none"):
        forced_pattern(cfg, small_trace(), profile)
