"""Golden cases worked out by hand on a flat profile: every target step takes 10 ms, every draft
pass 1 ms (10%), no overhead."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from tests.conftest import make_trace


def run(profile, trace, policy="fcfs", spec="none", **kw):
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"), **kw)
    return simulate(cfg, trace, profile)


def col(res, name):
    return res.requests[name].to_numpy()


def test_plain_decoding_two_requests(flat_profile):
    # Both arrive at 0, prompt 4, output 5. Step 1 prefills both (1 token each, ends 0.010);
    # steps 2-5 add one token each: both finish at 0.050.
    res = run(flat_profile(), make_trace([0, 0], [4, 4], [5, 5]))
    assert col(res, "first_token_s") == pytest.approx([0.010, 0.010])
    assert col(res, "completion_s") == pytest.approx([0.050, 0.050])
    assert col(res, "tpot_s") == pytest.approx([0.010, 0.010])
    assert list(col(res, "steps")) == [5, 5]


def test_draft_all_accepted(flat_profile):
    # Step 1: prefill 10 ms + draft-model prefill 1 ms = 11 ms → 1 token each.
    # Step 2: k = min(4, remaining 4 - 1) = 3: 3 draft passes (3 ms) + verify 10 ms = 13 ms; all 3
    # accepted + bonus = 4 tokens → done at 0.024.
    res = run(flat_profile(alpha=1.0), make_trace([0, 0], [4, 4], [5, 5]), spec="draft:k=4")
    assert col(res, "completion_s") == pytest.approx([0.024, 0.024])
    assert list(col(res, "drafted")) == [3, 3]
    assert list(col(res, "accepted")) == [3, 3]


def test_draft_nothing_accepted(flat_profile):
    # After the 11 ms prefill, each step commits 1 token with k = remaining - 1:
    # k=3: 13 ms, k=2: 12 ms, k=1: 11 ms, k=0: 10 ms → 11+13+12+11+10 = 57 ms.
    res = run(flat_profile(alpha=0.0), make_trace([0], [4], [5]), spec="draft:k=4")
    assert col(res, "completion_s") == pytest.approx([0.057])
    assert list(col(res, "drafted")) == [6]
    assert list(col(res, "accepted")) == [0]


def test_fcfs_vs_srpt_with_batch_of_one(flat_profile):
    # A (out 3) and B (out 2) arrive at 0; one request per step.
    # FCFS: A at 0.01, 0.02, 0.03; B at 0.04, 0.05.   SRPT: B first (0.01, 0.02), then A (…0.05).
    tr = make_trace([0, 0], [4, 4], [3, 2])
    fcfs = run(flat_profile(max_batch_size=1), tr, "fcfs")
    srpt = run(flat_profile(max_batch_size=1), tr, "srpt")
    assert col(fcfs, "completion_s") == pytest.approx([0.03, 0.05])
    assert col(srpt, "completion_s") == pytest.approx([0.05, 0.02])
    assert col(srpt, "start_s") == pytest.approx([0.02, 0.0])


def test_srpt_preempts_for_shorter_arrival(flat_profile):
    # A (out 5) runs alone from 0; B (out 1) arrives at 0.015 (during step 2).
    # preemptive mode: at the 0.020 boundary SRPT runs B (remaining 1 < 3): B completes at 0.030;
    # A sits one step out keeping its KV (a pause, not a preemption) and ends at 0.060.
    tr = make_trace([0, 0.015], [4, 4], [5, 1])
    res = run(flat_profile(max_batch_size=1), tr, "srpt", batching="preemptive")
    assert col(res, "completion_s") == pytest.approx([0.060, 0.030])
    assert list(col(res, "pauses")) == [1, 0]
    assert list(col(res, "preemptions")) == [0, 0]
    # vllm mode: a running request keeps its slot; B is admitted when A completes, under any order.
    for policy in ("srpt", "fcfs"):
        res = run(flat_profile(max_batch_size=1), tr, policy)
        assert col(res, "completion_s") == pytest.approx([0.050, 0.060])
        assert list(col(res, "preemptions")) == [0, 0]
        assert list(col(res, "pauses")) == [0, 0]


def test_arrival_during_step_joins_next_boundary(flat_profile):
    tr = make_trace([0, 0.004], [4, 4], [2, 1])
    res = run(flat_profile(), tr)
    # B arrives mid-step 1 and starts at the 0.010 boundary.
    assert col(res, "start_s") == pytest.approx([0.0, 0.010])
    assert col(res, "completion_s") == pytest.approx([0.020, 0.020])


def test_kv_pressure_recompute(flat_profile):
    # Block size 1. A step needs context + 1 slot per request. Budget 12: step 1 needs 5 + 5,
    # step 2 6 + 6 = 12: both fit; B finishes at 0.02, A at 0.04. No preemption.
    tr = make_trace([0, 0], [4, 4], [4, 2])
    res = run(flat_profile(kv_budget_tokens=12), tr, block_size=1, watermark=0.0)
    assert col(res, "completion_s") == pytest.approx([0.040, 0.020])
    # Budget 11: step 1 needs 5 + 5; step 2: A (first) grows to 6, B's growth to 6 fails (11 - 6 = 5
    # free... 1 short): B is the lowest-priority running request, so B itself is preempted (its
    # 5 tokens freed, vLLM V1 recompute). Steps 2-4 run A alone (it ends at 0.040). At 0.040 B is
    # re-admitted, re-prefills prompt + its 1 generated token (5 tokens) and samples its 2nd token
    # at 0.050.
    res = run(flat_profile(kv_budget_tokens=11), tr, block_size=1, watermark=0.0)
    assert col(res, "completion_s") == pytest.approx([0.040, 0.050])
    assert list(col(res, "preemptions")) == [0, 1]
    assert list(col(res, "recomputes")) == [0, 1]
    assert list(col(res, "recomputed_tokens")) == [0, 5]
    assert list(col(res, "pauses")) == [0, 0]


def test_layer_level_prefill_charges_lm_head_for_last_position_only():
    # 2 layers at 1 ms + 0.01 ms/token; LM head 0.1 ms per token with logits. One request, prompt
    # 100, output 2, plain decoding. Prefill: 2*(1 + 0.01*100) + 0.1*1 = 4.1 ms (not 0.1*100);
    # decode: 2*(1 + 0.01*1) + 0.1 = 2.12 ms. Completion at 6.22 ms.
    from simspec.profile import profile_from_doc

    lin = lambda c0, ct: {"kind": "linear", "coef": {"c0": c0, "c_b": 0.0, "c_t": ct, "c_kv": 0.0}}
    doc = {"schema": "simspec-profile", "schema_version": 1, "meta": {"source": "analytic"},
           "models": {"target": {"num_layers": 2}},
           "capacity": {"kv_budget_tokens": 1000, "max_batch_size": 4},
           "latency": {"stages": {"layer": lin(1.0, 0.01), "lm_head": lin(0.0, 0.1)}}}
    res = run(profile_from_doc(doc, "layer-test"), make_trace([0], [100], [2]))
    assert col(res, "first_token_s") == pytest.approx([0.0041])
    assert col(res, "completion_s") == pytest.approx([0.00622])
