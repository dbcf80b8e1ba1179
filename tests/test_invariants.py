"""Simulator invariants on random traces (property-based)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from tests.conftest import check_invariants, make_trace


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0, 0.5), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    policy = draw(st.sampled_from(["fcfs", "srpt", "srpt:predictor=lognormal,sigma=1.0"]))
    spec = draw(st.sampled_from(["none", "draft:k=1", "draft:k=4", "draft:k=8"]))
    replicas = draw(st.integers(1, 3))
    router = draw(st.sampled_from(["round-robin", "least-outstanding"]))
    max_batch = draw(st.integers(1, 16))
    preempt = draw(st.sampled_from(["swap", "recompute"]))
    batching = draw(st.sampled_from(["vllm", "preemptive"]))
    block = draw(st.sampled_from([1, 16]))
    chunked = draw(st.booleans())
    # KV budget at least the largest single request (+ drafts) so every request can run
    need = max(p + o + 8 for p, o in zip(prompt, output))
    kv = (-(-need // block) + draw(st.integers(0, 120))) * block
    mbt = draw(st.sampled_from([None, 64, 512])) if chunked else draw(st.sampled_from([None, 512]))
    seed = draw(st.integers(0, 3))
    return (np.cumsum(gaps), prompt, output, policy, spec, replicas, router, max_batch, preempt, kv, mbt, seed,
            batching, block, chunked)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants(sc):
    (arrival, prompt, output, policy, spec, replicas, router, max_batch, preempt, kv, mbt, seed, batching, block,
     chunked) = sc
    trace = make_trace(arrival, prompt, output)
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                    replicas=replicas, router=router, max_batch_size=max_batch, kv_budget_tokens=kv,
                    max_batched_tokens=mbt, preempt_mode=preempt, seed=seed, batching=batching, block_size=block,
                    chunked_prefill=chunked or mbt is None)
    res = simulate(cfg, trace, load_profile("llama70b-4xh100-smartspec"), audit=True)
    check_invariants(res, len(trace), max_batch, kv, mbt if mbt is not None else 8192)


def test_acceptance_matches_closed_form(flat_profile):
    """Mean committed tokens per decode step with i.i.d. α equals (1−α^(k+1))/(1−α)."""
    from simspec.profile import profile_from_doc
    from tests.conftest import flat_profile_doc

    alpha, k = 0.6, 4
    doc = flat_profile_doc(alpha=alpha, max_batch_size=64)
    prof = profile_from_doc(doc, "t")
    n = 200
    trace = make_trace(np.zeros(n), np.full(n, 8), np.full(n, 2000))
    cfg = RunConfig(method=ComponentSpec.parse(f"draft:k={k}", "s"), max_batch_size=64, kv_budget_tokens=10**7)
    res = simulate(cfg, trace, prof)
    # exclude the last steps of each request, where k is capped by the remaining tokens
    tau = res.summary["mean_tokens_per_decode_step"]
    expected = (1 - alpha ** (k + 1)) / (1 - alpha)
    assert abs(tau - expected) / expected < 0.02
