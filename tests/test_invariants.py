"""Simulator invariants on random traces (property-based)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from tests.conftest import make_trace


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
    preempt = draw(st.sampled_from(["keep", "recompute"]))
    # KV budget at least the largest single request (+ drafts) so every request can run
    kv = max(p + o + 8 for p, o in zip(prompt, output)) + draw(st.integers(0, 2000))
    mbt = draw(st.sampled_from([None, 64, 512]))
    seed = draw(st.integers(0, 3))
    return (np.cumsum(gaps), prompt, output, policy, spec, replicas, router, max_batch, preempt, kv, mbt, seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_invariants(sc):
    arrival, prompt, output, policy, spec, replicas, router, max_batch, preempt, kv, mbt, seed = sc
    trace = make_trace(arrival, prompt, output)
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                    replicas=replicas, router=router, max_batch_size=max_batch, kv_budget_tokens=kv,
                    max_batched_tokens=mbt, preempt_mode=preempt, seed=seed)
    res = simulate(cfg, trace, load_profile("llama70b-4xh100-smartspec"))
    req, steps = res.requests, res.steps
    # every request completes exactly once with exactly its output tokens
    assert len(req) == len(trace)
    assert (req["generated_tokens"].to_numpy() == req["output_tokens"].to_numpy()).all()
    assert np.isfinite(req["completion_s"].to_numpy()).all()
    assert int(steps["committed"].sum()) == int(req["output_tokens"].sum())
    # nothing starts before it arrives; first token before completion
    assert (req["start_s"] >= req["arrival_s"] - 1e-12).all()
    assert (req["first_token_s"] > req["start_s"]).all()
    assert (req["completion_s"] >= req["first_token_s"]).all()
    # capacity never exceeded
    assert (steps["batch_size"] <= max_batch).all()
    assert (steps["kv_tokens_used"] <= kv).all()
    if mbt is not None:
        over = steps["fed_tokens"] > mbt
        assert (steps.loc[over, "batch_size"] == 1).all()  # only a lone oversize prefill may exceed it
    # clock monotone per replica: each step starts no earlier than the previous one ended
    for _, g in steps.groupby("replica"):
        s = g.sort_values("step")
        assert (s["end_s"].to_numpy() >= s["start_s"].to_numpy()).all()
        assert (s["start_s"].to_numpy()[1:] >= s["end_s"].to_numpy()[:-1] - 1e-12).all()
    # accepted never exceeds drafted
    assert (req["accepted"] <= req["drafted"]).all()


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
