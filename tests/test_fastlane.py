"""The fast lane (simulator/fastlane.py) gives byte-identical outputs to the SimPy engine on every
configuration it takes, bails out (and the engine then runs) where it does not model the engine,
and takes exactly the configurations it says it takes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simspec.profile import load_profile
from simspec.simulator import fastlane, kernels
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.run import simulate
from tests.conftest import check_invariants, make_trace


def _cfg(method="draft:k=3", spec_len="fixed", **kw) -> RunConfig:
    base = dict(scheduler=ComponentSpec.parse("fcfs", "p"), method=ComponentSpec.parse(method, "s"),
                spec_len=ComponentSpec.parse(spec_len, "l"), allow_extrapolation=True)
    base.update(kw)
    return RunConfig(**base)


def _both(monkeypatch, cfg, trace, profile, jit="1"):
    """The run through the fast lane and through the SimPy engine (same process, same kernels)."""
    monkeypatch.setenv("SIMSPEC_JIT", jit)
    monkeypatch.setenv("SIMSPEC_FASTLANE", "1")
    lane = simulate(cfg, trace, profile)
    monkeypatch.setenv("SIMSPEC_FASTLANE", "0")
    ref = simulate(cfg, trace, profile)
    assert ref.engine.startswith("simpy")
    return lane, ref


def _same(a, b):
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    assert a.summary == b.summary


def _trace(n=60, seed=0, rate=8.0, prompt=(8, 400), output=(1, 120), tie_every=0):
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1.0 / rate, n))
    if tie_every:  # groups of requests arriving at the same instant
        arr = arr[(np.arange(n) // tie_every) * tie_every]
    classes = rng.choice(["default", "code"], n).tolist()
    return make_trace(arr, rng.integers(*prompt, n), rng.integers(*output, n), classes)


CASES = {
    # profile, config overrides
    "draft layer-level analytic, 2 replicas": ("vicuna7b-a100-analytic", dict(replicas=2)),
    "draft k=0": ("vicuna7b-a100-analytic", dict(method=ComponentSpec.parse("draft:k=0", "s"))),
    "fixed k below the method's": ("vicuna7b-a100-analytic", dict(spec_len=ComponentSpec.parse("fixed:k=1", "l"))),
    "none": ("vicuna7b-a100-analytic", dict(method=ComponentSpec.parse("none", "s"), replicas=3)),
    "token budget cuts (pauses), small batch": ("vicuna7b-a100-analytic", dict(max_batched_tokens=64,
                                                                                 max_batch_size=3)),
    "no chunked prefill": ("vicuna7b-a100-analytic", dict(chunked_prefill=False, max_batched_tokens=1024)),
    "long prefill threshold": ("vicuna7b-a100-analytic", dict(long_prefill_token_threshold=40)),
    "published per-step draft (whole model)": ("llama70b-4xh100-smartspec", dict(replicas=2)),
    "measured CPU profile, draft_layers": ("smollm2-135m-cpu-fp32",
                                           dict(method=ComponentSpec.parse("draft:k=4,draft_layers=5", "s"))),
    "measured CPU profile, none, sampled log": ("smollm2-135m-cpu-fp32",
                                                dict(method=ComponentSpec.parse("none", "s"), steps_log="sampled",
                                                     steps_log_every=7)),
    "no step log": ("vicuna7b-a100-analytic", dict(steps_log="none", replicas=2)),
    "smartspec": ("vicuna7b-a100-analytic", dict(spec_len=ComponentSpec.parse("smartspec", "l"), replicas=2)),
    "smartspec ema, probe, short interval, k_max 3": (
        "vicuna7b-a100-analytic", dict(spec_len=ComponentSpec.parse(
            "smartspec:estimator=ema,probe=3,interval=4,k_max=3,alpha0=0.2,bonus=1.3", "l"))),
    "smartspec, published per-step draft, KV-tight": ("llama70b-4xh100-smartspec", dict(
        spec_len=ComponentSpec.parse("smartspec:interval=5", "l"), kv_budget_tokens=2048, max_batched_tokens=256)),
    "laps-sd": ("vicuna7b-a100-analytic", dict(scheduler=ComponentSpec.parse("laps-sd", "p"), replicas=2,
                                               max_batch_size=4)),
    "laps-sd by time, merge ahead, lognormal predictor, KV-tight": ("vicuna7b-a100-analytic", dict(
        scheduler=ComponentSpec.parse("laps-sd:service=time,q_ms=30,merge=ahead,m=2,w=3,predictor=lognormal", "p"),
        kv_budget_tokens=2048, max_batch_size=6)),
    "laps-sd, queues=2, class-mean, eps 0.2, smartspec": ("llama70b-4xh100-smartspec", dict(
        scheduler=ComponentSpec.parse("laps-sd:queues=2,q=4,predictor=class-mean,eps=0.2", "p"),
        spec_len=ComponentSpec.parse("smartspec:interval=4", "l"), max_batch_size=5)),
    "las within attained": ("vicuna7b-a100-analytic", dict(
        scheduler=ComponentSpec.parse("las:within=attained", "p"), max_batch_size=3, max_batched_tokens=128)),
    "srpt, lognormal predictor": ("vicuna7b-a100-analytic", dict(
        scheduler=ComponentSpec.parse("srpt:predictor=lognormal,sigma=1.0", "p"), max_batch_size=3, replicas=2)),
    "srpt, KV-tight (preemption by SRPT order)": ("vicuna7b-a100-analytic", dict(
        scheduler=ComponentSpec.parse("srpt", "p"), kv_budget_tokens=1536)),
    "las by time": ("vicuna7b-a100-analytic", dict(scheduler=ComponentSpec.parse("las:service=time,q_ms=30", "p"),
                                                   max_batch_size=4)),
    "smartspec, measured CPU profile, none": ("smollm2-135m-cpu-fp32", dict(
        method=ComponentSpec.parse("none", "s"), spec_len=ComponentSpec.parse("smartspec", "l"))),
    "block size 1, watermark": ("vicuna7b-a100-analytic", dict(block_size=1, watermark=0.2)),
    # the early-exit methods (simulator/lane_methods.py)
    "kangaroo, 2 replicas": ("vicuna7b-a100-analytic", dict(method=ComponentSpec.parse("kangaroo", "s"), replicas=2)),
    "kangaroo measured CPU profile, gamma 3, eta 0.3, token budget": ("smollm2-135m-cpu-fp32", dict(
        method=ComponentSpec.parse("kangaroo:gamma=3,eta=0.3", "s"), max_batched_tokens=96)),
    "kangaroo without the confidence stop (eta 0), fixed k 2": ("vicuna7b-a100-analytic", dict(
        method=ComponentSpec.parse("kangaroo:eta=0", "s"), spec_len=ComponentSpec.parse("fixed:k=2", "l"))),
    "kangaroo laps-sd, KV-tight (preemption)": ("vicuna7b-a100-analytic", dict(
        method=ComponentSpec.parse("kangaroo", "s"), scheduler=ComponentSpec.parse("laps-sd:m=2,w=3", "p"),
        kv_budget_tokens=2048, max_batch_size=6)),
    "kangaroo las by time, eager profile": ("vicuna7b-a100-eager-analytic", dict(
        method=ComponentSpec.parse("kangaroo:exit=3", "s"), scheduler=ComponentSpec.parse("las:service=time,q_ms=30", "p"),
        max_batch_size=4)),
    "hispec two-level, 2 replicas": ("vicuna7b-a100-analytic", dict(method=ComponentSpec.parse("hispec", "s"),
                                                                    replicas=2)),
    "hispec nd 3, ni 2, fixed k 3, no chunked prefill": ("vicuna7b-a100-analytic", dict(
        method=ComponentSpec.parse("hispec:nd=3,ni=2", "s"), spec_len=ComponentSpec.parse("fixed:k=3", "l"),
        chunked_prefill=False, max_batched_tokens=1024)),
    "hispec single-level (inter_exit = N)": ("vicuna7b-a100-analytic", dict(
        method=ComponentSpec.parse("hispec:inter_exit=32", "s"), max_batched_tokens=128)),
    "hispec measured CPU profile, laps-sd, time service": ("smollm2-135m-cpu-fp32", dict(
        method=ComponentSpec.parse("hispec", "s"),
        scheduler=ComponentSpec.parse("laps-sd:service=time,q_ms=30,m=2,w=3", "p"), max_batch_size=5)),
    "hispec single-level laps-sd, srpt KV-tight": ("vicuna7b-a100-analytic", dict(
        method=ComponentSpec.parse("hispec:inter_exit=32,nd=3", "s"), scheduler=ComponentSpec.parse("laps-sd", "p"),
        kv_budget_tokens=1536, max_batch_size=5)),
    "hispec srpt, published 70B analytic profile": ("llama2-70b-h100x4-analytic", dict(
        method=ComponentSpec.parse("hispec", "s"), scheduler=ComponentSpec.parse("srpt", "p"), replicas=2)),
    # preemptive batching (simulator/lane_preemptive.py)
    "preemptive laps-sd, 2 replicas": ("vicuna7b-a100-analytic", dict(
        batching="preemptive", scheduler=ComponentSpec.parse("laps-sd", "p"), replicas=2, max_batch_size=4)),
    "preemptive srpt, small batch and budget (pauses)": ("vicuna7b-a100-analytic", dict(
        batching="preemptive", scheduler=ComponentSpec.parse("srpt", "p"), max_batch_size=3,
        max_batched_tokens=64)),
    "preemptive las, kangaroo, no chunked prefill": ("vicuna7b-a100-analytic", dict(
        batching="preemptive", scheduler=ComponentSpec.parse("las", "p"), method=ComponentSpec.parse("kangaroo", "s"),
        chunked_prefill=False, max_batched_tokens=1024, max_batch_size=4)),
    "preemptive fcfs, smartspec, measured CPU profile": ("smollm2-135m-cpu-fp32", dict(
        batching="preemptive", spec_len=ComponentSpec.parse("smartspec:interval=4", "l"), max_batch_size=5,
        method=ComponentSpec.parse("draft:k=4,draft_layers=5", "s"))),
    "preemptive laps-sd, hispec, long prefill threshold, watermark": ("vicuna7b-a100-analytic", dict(
        batching="preemptive", scheduler=ComponentSpec.parse("laps-sd:m=2,w=3", "p"),
        method=ComponentSpec.parse("hispec", "s"), long_prefill_token_threshold=40, watermark=0.1, max_batch_size=5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lane_equals_engine(monkeypatch, case):
    name, over = CASES[case]
    profile = load_profile(name)
    trace = _trace(n=80, seed=len(case), tie_every=3 if "2 replicas" in case else 0)
    cfg = replace(_cfg(), **over)
    lane, ref = _both(monkeypatch, cfg, trace, profile)
    assert lane.engine == "fast lane"
    _same(lane, ref)
    if cfg.steps_log == "full":  # the invariants sum the step log
            check_invariants(lane, len(trace), lane.config["capacity"]["max_batch_size"],
                         lane.config["capacity"]["kv_budget_tokens"], lane.config["capacity"]["max_batched_tokens"])


@pytest.mark.parametrize("method, batching", [("draft:k=3", "vllm"), ("kangaroo", "vllm"), ("hispec", "vllm"),
                                              ("draft:k=3", "preemptive")])
def test_lane_plain_kernels_equal_compiled(monkeypatch, method, batching):
    """The lane's loop as plain Python gives the same outputs as compiled (and as the engine)."""
    profile = load_profile("vicuna7b-a100-analytic")
    trace = _trace(n=25, seed=3)
    cfg = _cfg(method=method, replicas=2, max_batched_tokens=96, batching=batching, max_batch_size=4,
               scheduler=ComponentSpec.parse("laps-sd" if batching == "preemptive" else "fcfs", "p"))
    plain, ref = _both(monkeypatch, cfg, trace, profile, jit="0")
    assert kernels.MODE == "plain" and plain.engine == "fast lane"
    _same(plain, ref)
    comp, _ = _both(monkeypatch, cfg, trace, profile, jit="1")
    _same(comp, plain)


@pytest.mark.parametrize("batching, sched", [("vllm", "fcfs"), ("preemptive", "fcfs"), ("preemptive", "laps-sd"),
                                             ("preemptive", "srpt")])
def test_lane_preempts_like_the_engine(monkeypatch, batching, sched):
    """KV too small for the batch: the running pass preempts (recompute) the latest admitted
    requests (preemptive batching: paused residents, then the batch's tail), which re-prefill
    when readmitted — in the lane exactly as in the engine."""
    profile = load_profile("vicuna7b-a100-analytic")
    trace = _trace(n=40, seed=5, rate=50.0, prompt=(100, 300), output=(50, 200))
    cfg = _cfg(kv_budget_tokens=768 if batching == "preemptive" else 1024, block_size=16, replicas=2,
               batching=batching, scheduler=ComponentSpec.parse(sched, "p"),
               max_batch_size=4 if batching == "preemptive" else 256)
    lane, ref = _both(monkeypatch, cfg, trace, profile)
    assert lane.engine == "fast lane"
    assert int(lane.requests["preemptions"].sum()) > 0 and int(lane.requests["recomputed_tokens"].sum()) > 0
    _same(lane, ref)


def test_lane_bails_on_swap_preemption_and_the_engine_runs(monkeypatch):
    """Swap preemption is not in the lane: it stops, and the engine runs from a clean table."""
    profile = load_profile("vicuna7b-a100-analytic")
    trace = _trace(n=40, seed=5, rate=50.0, prompt=(100, 300), output=(50, 200))
    cfg = _cfg(kv_budget_tokens=1024, block_size=16, preempt_mode="swap")
    lane, ref = _both(monkeypatch, cfg, trace, profile)
    assert lane.engine.startswith("simpy (replica 0: a KV allocation failed (preemption) under --preempt-mode swap")
    assert int(lane.requests["preemptions"].sum()) > 0
    _same(lane, ref)


def test_lane_bails_on_an_arrival_at_a_step_end(monkeypatch):
    """An arrival exactly at a step's end: which side it lands on is SimPy's event order, so the
    lane leaves it to the engine."""
    doc_profile = load_profile("vicuna7b-a100-analytic")
    cfg = _cfg(method="none")
    monkeypatch.setenv("SIMSPEC_FASTLANE", "0")
    one = simulate(cfg, make_trace([0.5], [50], [20]), doc_profile)
    # a second request arriving exactly when the first request's first step ends
    end0 = float(one.steps["end_s"].iloc[0])
    t2 = make_trace([0.5, end0], [50, 50], [20, 20])
    lane, ref2 = _both(monkeypatch, cfg, t2, doc_profile)
    assert lane.engine.startswith("simpy (replica 0: an arrival within a few ulps")
    _same(lane, ref2)


def test_eligibility(monkeypatch):
    profile = load_profile("vicuna7b-a100-analytic")
    method = type("M", (), {"name": "draft"})()
    monkeypatch.setenv("SIMSPEC_FASTLANE", "1")
    assert fastlane.eligible(_cfg(), method, 1) is None
    assert fastlane.eligible(_cfg(replicas=4, router="round-robin"), method, 4) is None
    assert fastlane.eligible(_cfg(router="least-outstanding"), method, 2) == "router least-outstanding"
    assert fastlane.eligible(_cfg(router="least-outstanding"), method, 1) is None
    assert fastlane.eligible(_cfg(batching="preemptive"), method, 1) is None
    assert fastlane.eligible(_cfg(scheduler=ComponentSpec.parse("srpt", "p")), method, 1) is None
    assert fastlane.eligible(_cfg(scheduler=ComponentSpec.parse("laps-sd", "p"), batching="preemptive"), method,
                             1) is None
    assert fastlane.eligible(_cfg(spec_len="smartspec"), method, 1) is None
    assert fastlane.eligible(_cfg(spec_len="smartspec-per-request"), method, 1) == "spec-len smartspec-per-request"
    assert fastlane.eligible(_cfg(max_concurrency=4), method, 1).startswith("closed loop")
    assert fastlane.eligible(_cfg(), type("M", (), {"name": "medusa"})(), 1) == "method medusa"
    # the early-exit methods: any scheduler, fixed k; SmartSpec's estimates for them are not compiled
    cost = CostModel(profile)
    for spec in ("kangaroo", "hispec", "hispec:inter_exit=32"):
        m = _bound(spec, profile, cost)
        assert fastlane.eligible(_cfg(method=spec, scheduler=ComponentSpec.parse("laps-sd", "p")), m, 1) is None
        assert fastlane.eligible(_cfg(method=spec, spec_len="smartspec"), m, 1) == \
            f"spec-len smartspec with method {m.name}"
    m = _bound("kangaroo", profile, cost)
    m.acceptance = object.__new__(type("Forced", (type(m.acceptance),), {}))  # a substituted model
    assert fastlane.eligible(_cfg(method="kangaroo"), m, 1) == "method kangaroo with a substituted acceptance model"
    monkeypatch.setenv("SIMSPEC_FASTLANE", "0")
    assert fastlane.eligible(_cfg(), method, 1) == "SIMSPEC_FASTLANE=0"
    # audit mode recounts KV after every engine step: always the engine
    monkeypatch.setenv("SIMSPEC_FASTLANE", "1")
    res = simulate(_cfg(), _trace(n=5), profile, audit=True)
    assert res.engine == "simpy (audit mode)"


def test_compiled_cost_equals_cost_model():
    """The lane's compiled cost functions give CostModel's numbers bit for bit (grid, linear,
    scaled stages; layer-level and whole-model profiles)."""
    from simspec.simulator.methods.draft import draft_model_pass_ms

    k = kernels.compiled()
    rng = np.random.default_rng(0)
    for name in ("vicuna7b-a100-analytic", "llama70b-4xh100-smartspec", "smollm2-135m-cpu-fp32",
                 "llama2-70b-h100x4-analytic"):
        cost = CostModel(load_profile(name))
        p = fastlane.pack_cost(cost)
        for _ in range(300):
            b = int(rng.integers(0, 300))
            t = float(rng.integers(0, 5000))
            kv = float(rng.integers(0, 500000))
            lt = float(rng.integers(0, 3000))
            spec = bool(rng.integers(0, 2))
            want = cost.target_ms(b, t, kv, spec, logits_tokens=lt)
            got = k["target_ms"](p.ints, p.floats, float(b), t, kv, spec, lt)
            assert got == want, (name, b, t, kv)
            layers = 0 if cost.has("draft_step") else 3
            want = draft_model_pass_ms(cost, layers, b, t, kv, lt)
            got = k["draft_pass_ms"](p.ints, p.floats, layers, float(b), t, kv, lt)
            assert got == want, (name, b, t, kv)


def _bound(spec, profile, cost):
    """A method bound to its profile's acceptance (as ``simulate`` builds it)."""
    from simspec.simulator.methods import get_method_class
    from simspec.simulator.run import resolve_classes

    c = ComponentSpec.parse(spec, "s")
    m = get_method_class(c.name)(dict(c.params), profile, cost)
    entries, _ = resolve_classes(profile, m.name, ["default"])
    m.bind_acceptance(m.build_acceptance(entries))
    return m


def test_compiled_early_exit_costs_equal_the_methods():
    """The lane's slice/head costs equal CostModel's, and its Kangaroo/HiSpec estimates (LAPS-SD)
    the methods' ``stage_estimates_ms``, bit for bit."""
    from simspec.simulator import lane_methods

    k = kernels.compiled()
    rng = np.random.default_rng(1)
    for name in ("vicuna7b-a100-analytic", "smollm2-135m-cpu-fp32", "llama2-70b-h100x4-analytic"):
        profile = load_profile(name)
        cost = CostModel(profile)
        p = fastlane.pack_cost(cost)
        nl = cost.num_layers
        for _ in range(300):
            b = int(rng.integers(0, 300))
            t = float(rng.integers(0, 5000))
            kv = float(rng.integers(0, 500000))
            lt = float(rng.integers(0, 3000))
            first = int(rng.integers(0, nl))
            end = int(rng.integers(first, nl + 1))
            embed, head, adapter = (bool(x) for x in rng.integers(0, 2, 3))
            want = cost.slice_ms(first, end, b, t, kv, embed=embed, lm_head=head, adapter=adapter, logits_tokens=lt)
            got = k["slice_ms"](p.ints, p.floats, first, end, float(b), t, kv, embed, head, adapter, lt)
            assert got == want, (name, first, end, b, t, kv)
            assert k["head_ms"](p.ints, p.floats, float(b), t, kv) == cost.stage_ms("lm_head", b, t, kv)
        for spec in ("kangaroo", "kangaroo:exit=5", "hispec", "hispec:nd=3,ni=2", f"hispec:inter_exit={nl}"):
            m = _bound(spec, profile, cost)
            mp = lane_methods.method_pack(m, type("T", (), {"alpha": np.array([0.7]),
                                                            "class_idx": np.array([0])})())
            for _ in range(40):
                b = int(rng.integers(1, 64))
                kv = float(rng.integers(0, 100000))
                kk = int(rng.integers(0, m.k_max + 1))
                got = k["early_exit_estimates"](p.ints, p.floats, mp.ints, mp.floats, float(b), kv, kk)
                assert tuple(got) == tuple(m.stage_estimates_ms(b, kv, kk)), (name, spec, b, kv, kk)


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.2, 1.0]), min_size=n, max_size=n))
    prompt = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    output = draw(st.lists(st.integers(1, 60), min_size=n, max_size=n))
    method = draw(st.sampled_from(["none", "draft:k=3", "draft:k=5", "draft:k=0", "kangaroo", "kangaroo:gamma=3,eta=0.4",
                                   "hispec", "hispec:nd=3,ni=2", "hispec:inter_exit=32,nd=3"]))
    spec_len = draw(st.sampled_from(["fixed", "fixed", "smartspec", "smartspec:interval=3,probe=2",
                                     "smartspec:estimator=ema,interval=1,alpha0=0.3"]))
    replicas = draw(st.integers(1, 3))
    max_batch = draw(st.integers(1, 8))
    block = draw(st.sampled_from([1, 16]))
    need = max(p + o + 16 for p, o in zip(prompt, output)) + draw(st.sampled_from([0, 64, 400, 5000]))
    kv = -(-need // block) * block
    mbt = draw(st.sampled_from([None, 32, 128, 400]))
    chunked = draw(st.booleans()) or mbt is None
    seed = draw(st.integers(0, 3))
    preempt = draw(st.sampled_from(["recompute", "recompute", "swap"]))
    batching = draw(st.sampled_from(["vllm", "vllm", "preemptive"]))
    sched = draw(st.sampled_from(["fcfs", "fcfs", "srpt", "srpt:predictor=class-mean", "las", "las:within=attained,queues=3,q=8", "laps-sd",
                                  "laps-sd:service=time,q_ms=20,m=2,w=3,eps=0.3", "laps-sd:merge=ahead,queues=2,q=8,m=1"]))
    return (np.cumsum(gaps), prompt, output, method, replicas, max_batch, block, kv, mbt, chunked, seed, preempt,
            spec_len, sched, batching)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(sc=scenarios())
def test_lane_equals_engine_property(monkeypatch, sc):
    """Random traces, capacities and budgets: the lane (or its bail-out) equals the engine."""
    arrival, prompt, output, method, replicas, max_batch, block, kv, mbt, chunked, seed, preempt, spec_len, sched, batching = sc
    trace = make_trace(arrival, prompt, output)
    cfg = _cfg(method=method, spec_len=spec_len, replicas=replicas, scheduler=ComponentSpec.parse(sched, "p"), max_batch_size=max_batch, kv_budget_tokens=kv,
               max_batched_tokens=mbt, block_size=block, chunked_prefill=chunked, seed=seed, preempt_mode=preempt,
               batching=batching)
    profile = load_profile("vicuna7b-a100-analytic")
    try:
        lane, ref = _both(monkeypatch, cfg, trace, profile)
    except Exception as exc:  # a configuration the engine refuses is refused the same way by both
        monkeypatch.setenv("SIMSPEC_FASTLANE", "0")
        with pytest.raises(type(exc)):
            simulate(cfg, trace, profile)
        return
    _same(lane, ref)


def test_smartspec_decision_near_a_goodput_tie_is_left_to_the_engine():
    """Two compared goodputs within 1e-12: the lane's α̂^j (C library pow) and the policy's (numpy's
    power, SIMD on some CPUs) may differ in the last bit, so the lane returns −1 (bail out)."""
    k = kernels.compiled()
    p = fastlane.pack_cost(CostModel(load_profile("vicuna7b-a100-analytic")))
    B, kv, alpha = 4.0, 4000.0, 0.6
    pre = np.zeros(4, dtype=bool)
    res = np.full(4, 3, dtype=np.int64)
    left = np.full(4, 50, dtype=np.int64)
    step = [k["expected_step_ms"](p.ints, p.floats, 0, False, B, kv, j) for j in range(2)]
    g0, g1 = B * 1.0 / step[0], B * (1.0 + alpha) / step[1]
    args = (p.ints, p.floats, 0, False, B, kv, 10**9, alpha, 3)
    tie = k["smartspec_decide"](*args, g1 / g0, 4, pre, res, left, np.empty(4))  # bonus puts goodput(0) on goodput(1)
    assert tie == -1
    # away from ties it decides: a large bonus keeps k = 0, none keeps the improvements
    assert k["smartspec_decide"](*args, 100.0, 4, pre, res, left, np.empty(4)) == 0
    assert k["smartspec_decide"](*args, 0.01, 4, pre, res, left, np.empty(4)) >= 1
