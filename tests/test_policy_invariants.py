"""Every scheduler × every speculation method × every speculation-length policy keeps the simulator's
invariants on random traces (property-based): each request completes exactly once with exactly its
output tokens, nothing starts before it arrives, batch size and KV budget are never exceeded, and
each replica's clock only moves forward."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simspec.errors import SimspecError
from simspec.policies import SCHEDULERS, SPEC_LEN_POLICIES
from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.methods import METHODS, get_method_class
from simspec.simulator.run import simulate
from tests.conftest import check_invariants, make_trace

# the registered policies (modules of simspec.policies), with their non-default variants
SCHED_VARIANTS = {
    "srpt": ["srpt", "srpt:predictor=lognormal,sigma=1.0"],
    "las": ["las", "las:within=arrival,service=time,q_ms=30"],
    "laps-sd": ["laps-sd", "laps-sd:service=time,q_ms=30,merge=ahead,m=2,w=3",
                "laps-sd:queues=1,m=1,predictor=class-mean", "laps-sd:queues=2,q=4,predictor=lognormal,eps=0.2"],
}
SPEC_LEN_VARIANTS = {
    "smartspec": ["smartspec", "smartspec:interval=3,estimator=ema,bonus=1.0,probe=2"],
    "smartspec-per-request": ["smartspec-per-request", "smartspec-per-request:interval=2,alpha0=0.3,probe=3"],
}
SCHEDULER_SPECS = [v for name in sorted(SCHEDULERS) if not name.startswith("test-")
                   for v in SCHED_VARIANTS.get(name, [name])]
SPEC_LEN_SPECS = [v for name in sorted(SPEC_LEN_POLICIES) if not name.startswith("test-")
                  for v in SPEC_LEN_VARIANTS.get(name, [name])]
METHOD_SPECS = {"none": "none", "draft": "draft:k=3",  # others: their defaults
                # the profile has no sections for the tree family: they borrow the draft section
                "tree": "tree:depth=3,topk=2,tokens=6,acceptance=draft,rank_hazard=0.4",
                "eagle": "eagle:depth=3,topk=3,tokens=8,acceptance=draft,rank_hazard=0.4",
                "eagle3": "eagle3:acceptance=draft",
                "mtp": "mtp:depth=2,acceptance=draft",
                "medusa": "medusa:depth=3,topk=2,tokens=6,acceptance=draft,rank_hazard=0.4",
                "ngram": "ngram:depth=3,acceptance=draft,hit_probability=0.7",
                "draft-dynamic": "draft-dynamic:k=3"}
PROFILE = "vicuna7b-a100-analytic"  # layer-level, with acceptance for draft, kangaroo and hispec


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 20))
    gaps = draw(st.lists(st.floats(0, 0.3), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 80), min_size=n, max_size=n))
    classes = draw(st.lists(st.sampled_from(["default", "code"]), min_size=n, max_size=n))
    spec_len = draw(st.sampled_from(SPEC_LEN_SPECS))
    replicas = draw(st.integers(1, 2))
    max_batch = draw(st.integers(1, 8))
    preempt = draw(st.sampled_from(["swap", "recompute"]))
    block = draw(st.sampled_from([1, 16]))
    need = max(p + o + 16 for p, o in zip(prompt, output)) + draw(st.sampled_from([0, 50, 400, 5000]))
    kv = -(-need // block) * block
    mbt = draw(st.sampled_from([None, 128]))
    seed = draw(st.integers(0, 3))
    batching = draw(st.sampled_from(["vllm", "preemptive"]))
    return (np.cumsum(gaps), prompt, output, classes, spec_len, replicas, max_batch, preempt, kv, mbt, seed,
            batching, block)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("policy", SCHEDULER_SPECS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(sc=scenarios())
def test_policy_invariants(policy, method, sc):
    arrival, prompt, output, classes, spec_len, replicas, max_batch, preempt, kv, mbt, seed, batching, block = sc
    trace = make_trace(arrival, prompt, output, classes)
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"),
                    method=ComponentSpec.parse(METHOD_SPECS.get(method, method), "s"),
                    spec_len=ComponentSpec.parse(spec_len, "l"), replicas=replicas, max_batch_size=max_batch,
                    kv_budget_tokens=kv, max_batched_tokens=mbt, preempt_mode=preempt, seed=seed,
                    allow_extrapolation=True, batching=batching, block_size=block)
    profile = load_profile(PROFILE)
    try:  # a method added later that this profile cannot run is skipped, not failed
        get_method_class(cfg.method.name)(dict(cfg.method.params), profile, CostModel(profile))
    except SimspecError as exc:
        pytest.skip(f"{method} on {PROFILE}: {exc}")
    res = simulate(cfg, trace, profile, audit=True)
    check_invariants(res, len(trace), max_batch, kv, mbt if mbt is not None else 8192)
    # the fast path (many decode steps per event) equals one step per event, byte for byte
    one = simulate(replace(cfg, window_steps=1), trace, profile)
    pd.testing.assert_frame_equal(res.requests, one.requests, check_exact=True)
    pd.testing.assert_frame_equal(res.steps, one.steps, check_exact=True)
    assert res.summary == one.summary


def test_fast_path_equals_one_step_when_smartspec_is_kv_bound():
    """Regression (found by the property test above): SmartSpec lowers a member's k to its
    reservation when the extra drafts do not fit the free KV, and that choice can flip from one
    step to the next (free KV and tokens left change every step). A window used the first step's
    choice for all its steps (eagle3 + smartspec-per-request + LAPS-SD by time, 320 KV tokens:
    two requests finished 8 ms apart); the policy now holds a KV-bound choice for one step."""
    arrival = np.array([0.0] * 9 + [0.28125, 0.34375] + [0.40625] * 6)
    prompt = [71, 89, 121, 1, 110, 1, 1, 1, 80, 1, 16, 192, 1, 112, 73, 1, 166]
    output = [19, 35, 18, 1, 67, 1, 1, 13, 26, 1, 1, 47, 1, 1, 45, 1, 27]
    classes = ["default", "default", "code", "default", "code", "default", "default", "code", "default",
               "default", "default", "code", "code", "code", "code", "code", "default"]
    trace = make_trace(arrival, prompt, output, classes)
    cfg = RunConfig(scheduler=ComponentSpec.parse("laps-sd:service=time,q_ms=30,merge=ahead,m=2,w=3", "p"),
                    method=ComponentSpec.parse(METHOD_SPECS.get("eagle3", "eagle3"), "s"),
                    spec_len=ComponentSpec.parse("smartspec-per-request", "l"), replicas=1, max_batch_size=4,
                    kv_budget_tokens=320, max_batched_tokens=None, preempt_mode="recompute", seed=1,
                    allow_extrapolation=True, batching="vllm", block_size=16)
    profile = load_profile(PROFILE)
    res = simulate(cfg, trace, profile, audit=True)
    one = simulate(replace(cfg, window_steps=1), trace, profile)
    pd.testing.assert_frame_equal(res.requests, one.requests, check_exact=True)
    pd.testing.assert_frame_equal(res.steps, one.steps, check_exact=True)
    assert res.summary == one.summary
