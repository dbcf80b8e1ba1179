"""Engine semantics (vLLM-style batching, chunked prefill, preemption) and the fast path's
equivalence: golden cases worked by hand, scheduler-independence when nothing saturates, no
starvation, no recompute storm, SmartSpec's estimator, row-order invariance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from simspec.errors import ConfigError
from simspec.profile import load_profile, profile_from_doc
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from tests.conftest import flat_profile_doc, make_trace


def cfg(policy="fcfs", spec="none", spec_len="fixed", **kw) -> RunConfig:
    return RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                     spec_len=ComponentSpec.parse(spec_len, "l"), **kw)


def col(res, name):
    return res.requests[name].to_numpy()


def test_chunked_prefill_golden(flat_profile):
    # Flat 10 ms steps, token budget 8, block size 1. B (prompt 4, output 10) and A (prompt 20,
    # output 2) arrive at 0; B is first (ties by request id: B is r0).
    # step 1: B prefills 4, A gets the 4 tokens left          → B's first token at 0.01
    # step 2: B decodes 1 (decodes first), A chunk 7 (11 done)
    # step 3: B 1, A 7 (18 done); step 4: B 1, A 2 → A's prompt completes: first token at 0.04
    # step 5: B 1, A 1 → A done at 0.05; B decodes every step: done at 0.10
    tr = make_trace([0, 0], [4, 20], [10, 2])
    res = simulate(cfg(max_batched_tokens=8, block_size=1), tr, flat_profile())
    assert col(res, "first_token_s") == pytest.approx([0.01, 0.04])
    assert col(res, "completion_s") == pytest.approx([0.10, 0.05])
    assert list(col(res, "pauses")) == [0, 0]
    assert list(res.steps["fed_tokens"][:6]) == [8, 8, 8, 3, 2, 1]
    assert list(res.steps["prefills"][:5]) == [2, 1, 1, 1, 0]
    # without chunked prefill the 20-token prompt can never fit an 8-token step: refused up front
    with pytest.raises(ConfigError, match="chunked prefill is off"):
        simulate(cfg(max_batched_tokens=8, block_size=1, chunked_prefill=False), tr, flat_profile())
    # long_prefill_token_threshold caps a prompt's chunk even when the budget has room
    res = simulate(cfg(max_batched_tokens=64, block_size=1, long_prefill_token_threshold=5),
                   make_trace([0], [20], [1]), flat_profile())
    assert col(res, "first_token_s") == pytest.approx([0.04])  # chunks 5, 5, 5, 5


def test_kv_allocation_preempts_the_lowest_priority_running_request(flat_profile):
    # Block size 4, 5 blocks, no watermark, FCFS (admission order A, B, C). Prompts 4, 7, 1;
    # outputs 3, 3, 2. Step 1 prefills all: A needs 5 slots (2 blocks), B 8 (2), C 2 (1): full.
    # Step 2: A needs 6 slots (still 2 blocks); B needs 9 slots → a 3rd block, none free: the
    # victim is the lowest-priority running request, C (not B, which asked): C's block is freed and
    # C goes back to waiting (recompute). A and B finish at 0.03; C re-prefills prompt + its one
    # generated token (2 tokens) at 0.04 and samples its 2nd token: done at 0.04.
    tr = make_trace([0, 0, 0], [4, 7, 1], [3, 3, 2])
    res = simulate(cfg(block_size=4, kv_budget_tokens=20, watermark=0.0), tr, flat_profile())
    assert col(res, "completion_s") == pytest.approx([0.03, 0.03, 0.04])
    assert list(col(res, "preemptions")) == [0, 0, 1]
    assert list(col(res, "recomputes")) == [0, 0, 1]
    assert list(col(res, "recomputed_tokens")) == [0, 0, 2]
    assert col(res, "first_token_s") == pytest.approx([0.01, 0.01, 0.01])
    # swap: C comes back with its KV, no recompute
    res = simulate(cfg(block_size=4, kv_budget_tokens=20, watermark=0.0, preempt_mode="swap"), tr, flat_profile())
    assert list(col(res, "preemptions")) == [0, 0, 1]
    assert list(col(res, "recomputes")) == [0, 0, 0]
    assert col(res, "completion_s") == pytest.approx([0.03, 0.03, 0.04])


def _random_trace(n, seed, rate=2.0, prompt=(10, 400), output=(5, 300)):
    rng = np.random.default_rng(seed)
    return make_trace(np.cumsum(rng.exponential(1 / rate, n)), rng.integers(*prompt, n), rng.integers(*output, n))


SCHEDULERS = ["fcfs", "srpt", "las", "laps-sd"]
CORE = ["request_id", "start_s", "first_token_s", "completion_s", "steps", "drafted", "accepted", "pauses",
        "preemptions"]


@pytest.mark.parametrize("batching", ["vllm", "preemptive"])
def test_schedulers_coincide_when_nothing_saturates(batching):
    # batch cap, token budget and KV never bind: order has nothing to act on
    tr = _random_trace(40, 1)
    prof = load_profile("llama70b-4xh100-smartspec")
    frames = [simulate(cfg(p, "draft:k=4", batching=batching, max_batch_size=256), tr, prof).requests[CORE]
              for p in SCHEDULERS]
    for f in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], f)


@pytest.mark.parametrize("policy", SCHEDULERS)
def test_running_decodes_are_never_starved_in_vllm_mode(policy):
    # long prompts, a tight token budget: every decoding request still runs in every step from its
    # first token to its completion (its decode steps = its replica's steps in that interval)
    tr = _random_trace(30, 2, rate=20.0, prompt=(200, 1500), output=(5, 60))
    res = simulate(cfg(policy, "draft:k=3", max_batched_tokens=256, max_batch_size=16),
                   tr, load_profile("llama70b-4xh100-smartspec"))
    st = res.steps
    for _, r in res.requests.iterrows():
        mine = st[(st["replica"] == r["replica"]) & (st["start_s"] >= r["first_token_s"] - 1e-12)
                  & (st["end_s"] <= r["completion_s"] + 1e-12)]
        assert len(mine) == r["decode_steps"], r["request_id"]


@pytest.mark.parametrize("batching", ["vllm", "preemptive"])
def test_no_recompute_storm_on_the_demo_trace(batching):
    from simspec.traces.formats import load_trace

    tr = load_trace("traces/data/azure_code_2023.csv")
    prof = load_profile("llama70b-4xh100-smartspec")
    for policy in ("las", "laps-sd", "srpt"):
        res = simulate(cfg(policy, "draft:k=4", replicas=2, batching=batching), tr, prof)
        s = res.summary
        assert s["recomputes"] <= 0.01 * len(tr), (policy, s["recomputes"])
        assert s["latency_ms_mean"] < 60_000, (policy, s["latency_ms_mean"])


def test_smartspec_estimate_converges_to_the_true_acceptance():
    # per-request α ~ Beta(7, 3); the replica's α̂ (cumulative accepted / drafted positions) ends
    # within 5 % of the true mean acceptance over the positions it drafted
    tr = make_trace(np.linspace(0, 5, 60), np.full(60, 100), np.full(60, 600))
    res = simulate(cfg("fcfs", "draft:k=5", "smartspec", max_batch_size=16), tr, load_profile("llama70b-4xh100-smartspec"))
    req = res.requests
    true = float((req["alpha"] * req["drafted"]).sum() / req["drafted"].sum())
    est = float(res.steps["policy_value"].iloc[-1])
    assert abs(est - true) / true < 0.05
    assert res.steps["k_max"].mean() > 1.0  # no k = 0 trap
    # fixed α = 0.6 on a flat profile: the estimate is 0.6 within 5 %
    prof = profile_from_doc(flat_profile_doc(alpha=0.6, max_batch_size=16), "flat")
    res = simulate(cfg("fcfs", "draft:k=4", "smartspec", max_batch_size=16), tr, prof)
    assert abs(float(res.steps["policy_value"].iloc[-1]) - 0.6) < 0.03


def test_permuting_rows_with_tied_arrivals_changes_nothing():
    arrival = np.repeat([0.0, 0.5, 1.0, 1.5], 6)
    rng = np.random.default_rng(3)
    prompt, output = rng.integers(10, 300, arrival.size), rng.integers(5, 200, arrival.size)
    ids = [f"q{i:02d}" for i in range(arrival.size)]
    perm = np.concatenate([rng.permutation(np.flatnonzero(arrival == a)) for a in np.unique(arrival)])
    from simspec.trace import Trace

    def trace(order):
        return Trace.from_columns(request_id=[ids[i] for i in order], arrival_s=arrival[order],
                                  prompt_tokens=prompt[order], output_tokens=output[order], source="t")

    prof = load_profile("llama70b-4xh100-smartspec")
    for policy in ("fcfs", "laps-sd"):
        c = cfg(policy, "draft:k=4", replicas=2, max_batch_size=4)
        a = simulate(c, trace(np.arange(arrival.size)), prof).requests
        b = simulate(c, trace(perm), prof).requests
        pd.testing.assert_frame_equal(a.sort_values("request_id").reset_index(drop=True),
                                      b.sort_values("request_id").reset_index(drop=True))


@pytest.mark.parametrize("profile_name,spec", [
    ("llama70b-4xh100-smartspec", "draft:k=4"),
    # the tree family (acceptance borrowed from the profile's draft section; trees need a rank hazard)
    ("vicuna7b-a100-analytic", "tree:depth=4,topk=3,tokens=9,acceptance=draft,rank_hazard=0.4"),
    ("vicuna7b-a100-analytic", "eagle3:depth=5,topk=4,tokens=12,acceptance=draft,rank_hazard=0.4"),
    ("vicuna7b-a100-analytic", "medusa:acceptance=draft,rank_hazard=0.4"),
    ("vicuna7b-a100-analytic", "ngram:acceptance=draft,hit_probability=0.6"),
])
def test_fast_path_equals_one_step_per_event_on_a_saturated_run(profile_name, spec):
    # a run with every kind of event: chunked prefills, preemptions, completions, arrivals
    prof = load_profile(profile_name)
    window = (prof.models.get("target") or {}).get("max_position_embeddings", 4096)  # vicuna: 2048
    tr = _random_trace(120, 4, rate=30.0, prompt=(50, min(2000, window - 400)), output=(5, 400))
    for batching in ("vllm", "preemptive"):
        c = cfg("laps-sd", spec, "smartspec", replicas=2, max_batch_size=8, kv_budget_tokens=6000,
                max_batched_tokens=1024, batching=batching)
        a, b = simulate(c, tr, prof), simulate(replace(c, window_steps=1), tr, prof)
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
        pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
        assert a.summary == b.summary
        assert a.summary["preemptions"] > 0 or batching == "preemptive"


def test_fast_path_equals_one_step_per_event_under_least_outstanding_routing():
    # the router reads each replica's outstanding tokens at every arrival, in the middle of a
    # window in flight: it must see what a one-step engine would (a step's tokens count as done
    # when the step is computed, at its start) — a wrong count sent requests elsewhere
    tr = _random_trace(300, 6, rate=40.0, prompt=(20, 1500), output=(5, 300))
    prof = load_profile("llama70b-4xh100-smartspec")
    for policy, spec_len in (("fcfs", "fixed"), ("srpt", "smartspec")):
        c = replace(cfg(policy, "draft:k=4", spec_len, replicas=3, max_batch_size=16), router="least-outstanding")
        a, b = simulate(c, tr, prof), simulate(replace(c, window_steps=1), tr, prof)
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
        pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
        assert a.summary == b.summary

@pytest.mark.parametrize("spec", ["kangaroo", "kangaroo:eta=0", "hispec", "hispec:inter_exit=32"])
@pytest.mark.parametrize("policy", ["fcfs", "srpt", "laps-sd"])
@pytest.mark.parametrize("spec_len", ["fixed", "smartspec"])
@pytest.mark.parametrize("batching", ["vllm", "preemptive"])
def test_early_exit_fast_path_equals_one_step_per_event(spec, policy, spec_len, batching):
    # kangaroo (its vectorised decode window) and hispec on a run with chunked prefills,
    # preemptions, completions mid-window and arrivals: byte-identical to one step per event
    tr = _random_trace(60, 7, rate=20.0, prompt=(20, 1500), output=(3, 300))
    prof = load_profile("vicuna7b-a100-analytic")
    c = cfg(policy, spec, spec_len, replicas=2, max_batch_size=12, kv_budget_tokens=12000,
            max_batched_tokens=1024, batching=batching, allow_extrapolation=True)
    a, b = simulate(c, tr, prof), simulate(replace(c, window_steps=1), tr, prof)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    assert a.summary == b.summary
    assert len(a.steps) > 100


def test_smartspec_within_5_percent_of_the_best_fixed_k_at_every_load():
    # the "when speculation hurts" study (benchmarks/study_when_speculation_hurts.py): same trace
    # shape, profile and seed, at its lowest, middle and highest loads
    import sys

    sys.path.insert(0, "benchmarks")
    from study_when_speculation_hurts import run_one

    from simspec.traces.synthetic import FixedLengths, PoissonArrivals, synthesize

    prof = load_profile("llama70b-4xh100-smartspec")
    for rate in (1.0, 12.0, 20.0, 40.0):
        tr = synthesize(PoissonArrivals(rate), FixedLengths(128, 256), n=800, seed=0, source="t")
        fixed = min(run_one(tr, prof, spec, "fixed", 0)["latency_ms_mean"]
                    for spec in ("none", "draft:k=1", "draft:k=3", "draft:k=5"))
        smart = run_one(tr, prof, "draft:k=5", "smartspec", 0)["latency_ms_mean"]
        assert smart <= 1.05 * fixed, (rate, smart, fixed)


def test_gpu_memory_utilization_derives_the_kv_budget_like_vllm():
    from simspec.simulator.run import kv_budget_from_memory

    prof = load_profile("vicuna7b-a100-analytic")
    # the analytic profile sized its own budget at 0.9: the same formula gives the same tokens
    assert kv_budget_from_memory(prof, 0.9) == prof.capacity["kv_budget_tokens"]
    assert kv_budget_from_memory(prof, 0.5) < kv_budget_from_memory(prof, 0.9)
    res = simulate(cfg(gpu_memory_utilization=0.5, allow_extrapolation=True), make_trace([0], [10], [5]), prof)
    assert res.config["capacity"]["kv_budget_tokens"] == kv_budget_from_memory(prof, 0.5)
    with pytest.raises(ConfigError, match="memory_bytes"):
        simulate(cfg(gpu_memory_utilization=0.9), make_trace([0], [10], [5]), load_profile("llama70b-4xh100-smartspec"))
    with pytest.raises(ConfigError, match="not both"):
        cfg(gpu_memory_utilization=0.9, kv_budget_tokens=1000)


def test_range_check_looks_only_at_stages_the_method_uses():
    from simspec.errors import ProfileError

    doc = flat_profile_doc()
    doc["latency"]["stages"]["draft_step"] = {"kind": "linear", "coef": {"c0": 1.0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0},
                                              "valid": {"context_tokens": [0, 100]}}
    prof = profile_from_doc(doc, "ranges")
    tr = make_trace([0], [500], [5])
    simulate(cfg(spec="none"), tr, prof)  # draft_step is never evaluated: no complaint
    with pytest.raises(ProfileError, match=r"draft_step\.context_tokens up to 505 > 100"):
        simulate(cfg(spec="draft:k=2"), tr, prof)
    res = simulate(cfg(spec="draft:k=2", allow_extrapolation=True), tr, prof)
    assert any("draft_step" in n for n in res.notes)
    assert not any("draft_step" in n for n in simulate(cfg(spec="none", allow_extrapolation=True), tr, prof).notes)


def test_max_concurrency_holds_requests_until_one_completes(flat_profile):
    # three requests due at 0, two output tokens each, flat 10 ms steps, at most one in flight:
    # each is sent when the previous completes (its arrival_s is the send time, as vllm bench)
    tr = make_trace([0, 0, 0], [4, 4, 4], [2, 2, 2])
    res = simulate(cfg(max_concurrency=1), tr, flat_profile())
    assert col(res, "arrival_s") == pytest.approx([0.0, 0.02, 0.04])
    assert col(res, "completion_s") == pytest.approx([0.02, 0.04, 0.06])
    assert col(res, "latency_s") == pytest.approx([0.02, 0.02, 0.02])
    # two in flight: the third waits for the first completion
    res = simulate(cfg(max_concurrency=2), tr, flat_profile())
    assert col(res, "arrival_s") == pytest.approx([0.0, 0.0, 0.02])
    # the fast path agrees with one step per event, closed loop too
    trr = _random_trace(60, 5, rate=50.0)
    prof = load_profile("llama70b-4xh100-smartspec")
    c = cfg("srpt", "draft:k=4", replicas=2, max_concurrency=6)
    a, b = simulate(c, trr, prof), simulate(replace(c, window_steps=1), trr, prof)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    in_flight = [((a.requests["arrival_s"] <= t) & (a.requests["completion_s"] > t)).sum()
                 for t in a.requests["arrival_s"]]
    assert max(in_flight) <= 6
