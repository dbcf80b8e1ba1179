"""Kangaroo and HiSpec: progress sampling against exact expectations, stage-cost accounting, the
degenerate cases, and end-to-end runs (simulate() and the CLI) on layer-level profiles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simspec.analytic import KANGAROO_CONFIDENCE
from simspec.errors import ConfigError, ProfileError
from simspec.profile import load_profile, profile_from_doc
from simspec.simulator.acceptance import AcceptanceModel, expected_tokens_iid
from simspec.simulator.acceptance_early_exit import (confidence_at_least, hispec_buffer_expectations,
                                                     kangaroo_expectations)
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.methods import BatchStep, get_method_class
from simspec.simulator.methods.kangaroo import early_exit_step_ms
from simspec.simulator.run import simulate
from tests.conftest import make_trace

N_LAYERS = 8
LAYER_MS, HEAD_MS, EMBED_MS, ADAPTER_MS = 1.0, 0.5, 0.125, 0.25


def _linear(c0, ct=0.0, ckv=0.0):
    return {"kind": "linear", "coef": {"c0": c0, "c_b": 0.0, "c_t": ct, "c_kv": ckv}}


def layer_doc(kangaroo=None, hispec=None, adapter_ms=ADAPTER_MS, ct=0.0, ckv=0.0) -> dict:
    """A layer-level profile with constant per-stage costs (or linear in tokens/context);
    ``adapter_ms=0`` gives a free adapter."""
    acc = {}
    if kangaroo is not None:
        acc["kangaroo"] = {"default": kangaroo}
    if hispec is not None:
        acc["hispec"] = {"default": hispec}
    return {
        "schema": "simspec-profile", "schema_version": 1,
        "meta": {"name": "layers-test", "source": "analytic", "description": "test"},
        "models": {"target": {"name": "test", "num_layers": N_LAYERS}},
        "capacity": {"kv_budget_tokens": 10**7, "max_batch_size": 64},
        "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                    "stages": {"layer": _linear(LAYER_MS, ct, ckv), "lm_head": _linear(HEAD_MS, ct),
                               "embed": _linear(EMBED_MS), "adapter": _linear(adapter_ms, ct, ckv) if adapter_ms else _linear(0.0)}},
        "acceptance": acc,
    }


def fixed(a):
    return {"kind": "fixed", "value": a}


def make_method(spec: str, doc: dict, classes=("default",)):
    prof = profile_from_doc(doc, "test")
    cs = ComponentSpec.parse(spec, "--spec")
    m = get_method_class(cs.name)(dict(cs.params), prof, CostModel(prof))
    if m.uses_acceptance:
        m.bind_acceptance(m.build_acceptance([prof.acceptance[m.name][c] for c in classes]))
    return m


def decode_batch(n, k, ctx=100, alpha=None, remaining=10**6, acc=None) -> BatchStep:
    k = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,)).copy()
    return BatchStep(idx=np.arange(n), prefill=np.zeros(n, bool), fed_tokens=k + 1,
                     ctx_tokens=np.full(n, ctx, dtype=np.int64), k=k,
                     remaining=np.full(n, remaining, dtype=np.int64),
                     alpha=np.full(n, alpha if alpha is not None else 0.0), class_idx=np.zeros(n, dtype=np.int64))


# ----------------------------------------------------------------- progress vs closed forms
# Monte Carlo over 200,000 request-steps (one vectorised batch). The standard error of the mean
# tokens per step is below 0.005 for these settings, so a 1 % relative tolerance is > 5 SE:
# a correct sampler fails it with probability < 1e-6, a biased one (e.g. off by one position) misses
# by 5-30 %.
MC_N = 200_000
MC_REL_TOL = 0.01


@pytest.mark.parametrize("alpha,k", [(0.5, 1), (0.6, 4), (0.8, 6), (0.9, 3)])
def test_kangaroo_mc_tokens_per_step_matches_closed_form(alpha, k):
    """η = 0 (never stops early): E[accepted + 1] = (1 − α^(k+1)) / (1 − α)."""
    m = make_method(f"kangaroo:exit=2,gamma={k},eta=0", layer_doc(kangaroo={"alpha": fixed(alpha)}))
    out = m.step(np.random.default_rng(1), decode_batch(MC_N, k, alpha=alpha))
    assert (out.drafted == k).all()
    assert np.mean(out.accepted + 1) == pytest.approx(expected_tokens_iid(alpha, k), rel=MC_REL_TOL)


@pytest.mark.parametrize("alpha,nd", [(0.6, 2), (0.8, 5)])
def test_hispec_single_level_mc_matches_closed_form(alpha, nd):
    doc = layer_doc(hispec={"alpha": fixed(0.5), "draft_vs_inter": {"alpha": fixed(alpha)}})
    m = make_method(f"hispec:draft_exit=2,inter_exit={N_LAYERS},nd={nd}", doc)
    out = m.step(np.random.default_rng(2), decode_batch(MC_N, nd, alpha=0.5))
    assert np.mean(out.accepted + 1) == pytest.approx(expected_tokens_iid(alpha, nd), rel=MC_REL_TOL)


@pytest.mark.parametrize("eta", [0.3, 0.6, 0.85])
def test_kangaroo_confidence_mc_matches_exact(eta):
    """With the confidence stop: tokens per step and drafts per step match the exact recursion."""
    alpha, gamma = 0.65, 6
    doc = layer_doc(kangaroo={"alpha": fixed(alpha), "confidence": KANGAROO_CONFIDENCE})
    m = make_method(f"kangaroo:exit=2,gamma={gamma},eta={eta}", doc)
    out = m.step(np.random.default_rng(3), decode_batch(MC_N, gamma, alpha=alpha))
    ca, cr = confidence_at_least(KANGAROO_CONFIDENCE, eta, "t")
    e_acc, reach = kangaroo_expectations(alpha, gamma, ca, cr)
    assert np.mean(out.accepted + 1) == pytest.approx(1 + e_acc, rel=MC_REL_TOL)
    assert np.mean(out.drafted) == pytest.approx(reach.sum(), rel=MC_REL_TOL)
    assert out.drafted.min() >= 1 and out.drafted.max() <= gamma
    assert (out.accepted <= out.drafted).all()


@pytest.mark.parametrize("a_d,a_f,nd,ni", [(0.8, 0.65, 2, 4), (0.5, 0.9, 3, 5), (0.95, 0.3, 1, 2)])
def test_hispec_mc_matches_exact(a_d, a_f, nd, ni):
    doc = layer_doc(hispec={"alpha": fixed(a_f), "draft_vs_inter": {"alpha": fixed(a_d)}})
    m = make_method(f"hispec:draft_exit=2,inter_exit=4,nd={nd},ni={ni}", doc)
    k = m.k_max
    assert k == ni + nd - 1
    out = m.step(np.random.default_rng(4), decode_batch(MC_N, k, alpha=a_f))
    tokens, _, buffer = hispec_buffer_expectations(a_d, a_f, nd, ni, k)
    assert np.mean(out.accepted + 1) == pytest.approx(tokens, rel=MC_REL_TOL)
    assert np.mean(out.drafted) == pytest.approx(buffer, rel=MC_REL_TOL)
    assert out.drafted.min() >= ni and out.drafted.max() <= k
    assert m.expected_tokens(a_f, k) == pytest.approx(tokens)


def test_confidence_histogram_interpolates_inside_bins():
    ca, cr = confidence_at_least(KANGAROO_CONFIDENCE, 0.6, "t")
    assert ca[0] == pytest.approx(0.79) and cr[0] == pytest.approx(0.25)
    assert ca[40] == ca[0]  # positions past the rows reuse the last row
    ca2, _ = confidence_at_least(KANGAROO_CONFIDENCE, 0.65, "t")  # half of bin [0.6, 0.7) above
    assert ca2[0] == pytest.approx(0.79 - 0.09 / 2)
    with pytest.raises(ProfileError, match="bin_edges"):
        confidence_at_least({"bin_edges": [0.5, 0.2], "accepted": [[1]], "rejected": [[1]]}, 0.6, "x")
    with pytest.raises(ProfileError, match="accepted"):
        confidence_at_least({"bin_edges": [0, 0.5, 1], "accepted": [[1, 2, 3]], "rejected": [[1, 1]]}, 0.6, "x")


# ----------------------------------------------------------------- Kangaroo's two limits


def test_kangaroo_eta0_equals_fixed_gamma_drafting():
    """η = 0: every request drafts min(γ, k), accepted prefixes are exactly those of fixed-k
    sampling with the same random stream, and the cost is that of uniform drafting."""
    entry = {"alpha": {"kind": "beta", "a": 6, "b": 4}, "confidence": KANGAROO_CONFIDENCE}
    m = make_method("kangaroo:exit=2,gamma=5,eta=0", layer_doc(kangaroo=entry))
    plain = AcceptanceModel([entry])
    rng_a = np.random.default_rng(7)
    alphas = rng_a.beta(6, 4, 64)
    k = np.where(np.arange(64) % 4 == 0, 2, 5)  # some requests capped below γ
    b = decode_batch(64, k)
    b.alpha = alphas
    out = m.step(np.random.default_rng(11), b)
    ref = plain.sample_accepted(np.random.default_rng(11), alphas, b.class_idx, np.minimum(k, 5))
    assert (out.drafted == np.minimum(k, 5)).all()
    assert (out.accepted == ref).all()
    assert out.step_ms == pytest.approx(early_exit_step_ms(m.cost, b, np.minimum(k, 5), 2, N_LAYERS, True))
    # a profile without confidence histograms behaves the same at any η
    no_conf = make_method("kangaroo:exit=2,gamma=5,eta=0.6", layer_doc(kangaroo={"alpha": entry["alpha"]}))
    out2 = no_conf.step(np.random.default_rng(11), b)
    assert (out2.drafted == out.drafted).all() and (out2.accepted == out.accepted).all()


def test_kangaroo_eta1_drafts_exactly_one_token_per_step():
    entry = {"alpha": fixed(0.9), "confidence": KANGAROO_CONFIDENCE}
    m = make_method("kangaroo:exit=2,gamma=6,eta=1", layer_doc(kangaroo=entry))
    out = m.step(np.random.default_rng(0), decode_batch(1000, 6, alpha=0.9))
    assert (out.drafted == 1).all()
    assert set(np.unique(out.accepted)) == {0, 1}
    # cost: one drafting round, the draft's shallow round, verification over 2 tokens per request
    assert out.step_ms == pytest.approx(early_exit_step_ms(m.cost, decode_batch(1000, 1), np.ones(1000, int), 2,
                                                           N_LAYERS, True))
    # end to end: every decode step that may speculate drafts exactly one token
    prof = profile_from_doc(layer_doc(kangaroo=entry), "t")
    trace = make_trace(np.linspace(0, 0.2, 12), np.full(12, 30), np.arange(5, 17))
    res = simulate(RunConfig(method=ComponentSpec.parse("kangaroo:exit=2,eta=1", "s")), trace, prof)
    req = res.requests
    # the last decode step of a request has k = 0 when one token remains
    assert (req["drafted"] <= req["decode_steps"]).all()
    assert (req["drafted"] >= req["decode_steps"] - 1).all()
    assert (res.steps["drafted"] <= res.steps["batch_size"]).all()


# ----------------------------------------------------------------- cost accounting (exact)


def test_kangaroo_step_cost_composition():
    """B = 1, α = 1, η = 0, γ = 4 on constant stage costs: 5 shallow rounds (2 layers + embed),
    4 adapter + LM-head passes, then layers 2..7 + LM head."""
    m = make_method("kangaroo:exit=2,gamma=4,eta=0", layer_doc(kangaroo={"alpha": fixed(1.0)}))
    out = m.step(np.random.default_rng(0), decode_batch(1, 4, alpha=1.0))
    want = 5 * (2 * LAYER_MS + EMBED_MS) + 4 * (ADAPTER_MS + HEAD_MS) + (N_LAYERS - 2) * LAYER_MS + HEAD_MS
    assert out.step_ms == pytest.approx(want)
    assert out.drafted[0] == 4 and out.accepted[0] == 4
    # k = 0 (one token left): exactly one full target forward
    out0 = m.step(np.random.default_rng(0), decode_batch(1, 0, alpha=1.0))
    assert out0.step_ms == pytest.approx(m.cost.target_ms(1, 1, 100))
    assert out0.drafted[0] == 0


def test_kangaroo_idle_requests_follow_longest_drafter():
    """Two requests drafting 1 and 4 tokens cost the rounds of the longest, with the short one
    idling (rounds 2.. run over one request)."""
    m = make_method("kangaroo:exit=2,gamma=4,eta=0", layer_doc(kangaroo={"alpha": fixed(1.0)}, ct=0.1))
    b = decode_batch(2, np.array([1, 4]), alpha=1.0)
    out = m.step(np.random.default_rng(0), b)
    assert list(out.drafted) == [1, 4]
    # with costs linear in tokens, each request's shallow/adapter/head token counts add up
    shallow_tokens = 2 + 5  # D_i + 1 rounds each
    head_tokens = 1 + 4
    deep_tokens = 2 + 5
    c0 = LAYER_MS
    rounds_shallow = 5  # rounds 0..4 run (some request is in each)
    rounds_head = 4
    want = (rounds_shallow * (2 * c0 + EMBED_MS) + 2 * 0.1 * shallow_tokens
            + rounds_head * (ADAPTER_MS + HEAD_MS) + 2 * 0.1 * head_tokens
            + (N_LAYERS - 2) * (c0 + 0.1 * deep_tokens) + HEAD_MS + 0.1 * deep_tokens)
    assert out.step_ms == pytest.approx(want)


def test_hispec_step_cost_composition_all_agree_and_none_agree():
    """nd = 2, ni = 4, k = k_max = 5, exits 2 / 4 of 8 layers, constant costs.
    All agree (α = 1): two inner iterations append 2 drafts each, buffer 4, all accepted (commit 5).
    None agree (α = 0): four iterations append L_i's own token each, buffer 4, none accepted (commit 1).
    An inner iteration: 2 drafting rounds (layers 0..1 + embedding + LM head), then layers 2..3 + LM
    head over the 2 tokens; the full pass: layers 0..3 over the frontier token, layers 4..7 + LM head."""
    it = 2 * (2 * LAYER_MS + EMBED_MS + HEAD_MS) + (4 - 2) * LAYER_MS + HEAD_MS
    full = 4 * LAYER_MS + EMBED_MS + (N_LAYERS - 4) * LAYER_MS + HEAD_MS
    for a, iters, buf, acc in ((1.0, 2, 4, 4), (0.0, 4, 4, 0)):
        doc = layer_doc(hispec={"alpha": fixed(a), "draft_vs_inter": {"alpha": fixed(a)}})
        m = make_method("hispec:draft_exit=2,inter_exit=4,nd=2,ni=4", doc)
        assert m.k_max == 5
        out = m.step(np.random.default_rng(0), decode_batch(1, 5, alpha=a))
        assert out.drafted[0] == buf and out.accepted[0] == acc
        assert out.step_ms == pytest.approx(iters * it + full)
    # the buffer never exceeds k: with k = 3 (< ni) and α = 1 it is filled with 2 + 1 drafts
    m = make_method("hispec:draft_exit=2,inter_exit=4,nd=2,ni=4",
                    layer_doc(hispec={"alpha": fixed(1.0), "draft_vs_inter": {"alpha": fixed(1.0)}}))
    out = m.step(np.random.default_rng(0), decode_batch(1, 3, alpha=1.0))
    assert out.drafted[0] == 3 and out.accepted[0] == 3
    it1 = (2 * LAYER_MS + EMBED_MS + HEAD_MS) + (4 - 2) * LAYER_MS + HEAD_MS
    assert out.step_ms == pytest.approx(it + it1 + full)
    # a buffer of ni − 1 = 3 gains at most nd = 2: the largest buffer is k_max = 5
    m2 = make_method("hispec:draft_exit=2,inter_exit=4,nd=2,ni=4",
                     layer_doc(hispec={"alpha": fixed(1.0), "draft_vs_inter": {"alpha": {"kind": "fixed",
                                                                                          "value": 0.5}}}))
    out = m2.step(np.random.default_rng(0), decode_batch(20_000, 5, alpha=1.0))
    assert out.drafted.max() == 5 and out.drafted.min() == 4


@pytest.mark.parametrize("spec", ["hispec:draft_exit=2,inter_exit=4,nd=2,ni=4",
                                  "hispec:draft_exit=1,inter_exit=6,nd=3,ni=2"])
def test_hispec_plan_ms_is_the_step_cost_of_its_inner_iterations(spec):
    """``HiSpec.plan_ms`` (what ``validate --max-batch`` charges a real step, from its logged inner
    iterations) equals :meth:`step`'s cost for the iterations the step sampled, to the last bit, on
    mixed batches (prefills, caps 0..k_max, contexts); and every step's ``inner`` adds up to its
    buffer, each iteration appending 1..min(N_d, k − m) tokens."""
    doc = layer_doc(hispec={"alpha": fixed(0.6), "draft_vs_inter": {"alpha": fixed(0.7)}}, ct=0.01, ckv=1e-4)
    m = make_method(spec, doc)
    rng = np.random.default_rng(4)
    n_iter_seen = set()
    for _ in range(40):
        n = int(rng.integers(1, 9))
        pre = rng.random(n) < 0.25
        k = np.where(pre, 0, rng.integers(0, m.k_max + 1, n)).astype(np.int64)
        ctx = np.where(pre, 0, rng.integers(1, 400, n)).astype(np.int64)
        fed = np.where(pre, rng.integers(5, 60, n), k + 1).astype(np.int64)
        batch = BatchStep(idx=np.arange(n), prefill=pre, fed_tokens=fed, ctx_tokens=ctx, k=k,
                          remaining=np.full(n, 1000), alpha=np.full(n, 0.6), class_idx=np.zeros(n, np.int64))
        out = m.step(rng, batch)
        inner_a = out.inner
        assert (inner_a.sum(axis=1) == out.drafted).all()
        inner_d = np.zeros_like(inner_a)
        for i in range(n):
            mm = 0
            for t in range(inner_a.shape[1]):
                if inner_a[i, t] == 0:
                    assert (inner_a[i, t:] == 0).all()
                    break
                inner_d[i, t] = min(m.nd, k[i] - mm)
                assert 1 <= inner_a[i, t] <= inner_d[i, t]
                mm += inner_a[i, t]
            used = inner_a[i][inner_a[i] > 0]
            assert mm >= min(m.ni, k[i])  # the buffer is full ...
            assert used.size == 0 or mm - used[-1] < min(m.ni, k[i])  # ... only after its last iteration
        n_iter_seen.add(int((inner_a > 0).sum(axis=1).max()))
        assert m.cost.finish(m.plan_ms(batch, inner_d, inner_a)) == out.step_ms
    assert len(n_iter_seen) > 2


def test_prefill_members_run_the_whole_model():
    """A batch of prefills only: every method costs one full target forward over the prompts, with
    logits for each prompt's last position, as `none` (+ Kangaroo's adapter over them, which builds
    the adapter's KV)."""
    doc = layer_doc(kangaroo={"alpha": fixed(0.7)},
                    hispec={"alpha": fixed(0.7), "draft_vs_inter": {"alpha": fixed(0.7)}}, ct=0.01)
    n = 3
    b = BatchStep(idx=np.arange(n), prefill=np.ones(n, bool), fed_tokens=np.array([100, 200, 50]),
                  ctx_tokens=np.zeros(n, dtype=np.int64), k=np.zeros(n, dtype=np.int64),
                  remaining=np.full(n, 10), alpha=np.full(n, 0.7), class_idx=np.zeros(n, dtype=np.int64))
    kg = make_method("kangaroo", doc)
    hs = make_method("hispec:draft_exit=2,inter_exit=4", doc)
    full = kg.cost.target_ms(n, 350, 0, logits_tokens=n)  # logits for each prompt's last position
    assert full == pytest.approx(kg.cost.target_ms(n, 350, 0) - 0.01 * (350 - n))
    assert kg.step(np.random.default_rng(0), b).step_ms == pytest.approx(full + ADAPTER_MS + 0.01 * 350)
    assert hs.step(np.random.default_rng(0), b).step_ms == pytest.approx(full)
    assert make_method("none", doc).step(np.random.default_rng(0), b).step_ms == pytest.approx(full)


# ----------------------------------------------------------------- HiSpec's degenerate case


def test_hispec_with_inter_exit_last_layer_is_single_level_early_exit():
    """inter_exit = N: HiSpec is single-level early exit — identical, step for step, to Kangaroo
    with η = 0, γ = nd, the same exit, a zero-cost adapter and the same acceptance."""
    acc = {"alpha": {"kind": "beta", "a": 7, "b": 3}}
    doc = layer_doc(kangaroo=dict(acc), hispec={**acc, "draft_vs_inter": dict(acc)}, adapter_ms=0.0,
                    ct=0.05, ckv=0.001)
    hs = make_method(f"hispec:draft_exit=3,inter_exit={N_LAYERS},nd=4,ni=3", doc)
    kg = make_method("kangaroo:exit=3,gamma=4,eta=0", doc)
    assert hs.k_max == kg.k_max == 4
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        b = decode_batch(n, rng.integers(0, 5, n), ctx=0)
        b.ctx_tokens = rng.integers(10, 2000, n)
        b.alpha = rng.beta(7, 3, n)
        b.prefill = rng.random(n) < 0.2
        b.k[b.prefill] = 0
        b.fed_tokens = np.where(b.prefill, b.ctx_tokens, b.k + 1)
        b.ctx_tokens[b.prefill] = 0
        seed = int(rng.integers(1 << 30))
        o1, o2 = hs.step(np.random.default_rng(seed), b), kg.step(np.random.default_rng(seed), b)
        assert o1.step_ms == pytest.approx(o2.step_ms)
        assert (o1.drafted == o2.drafted).all() and (o1.accepted == o2.accepted).all()
    # end to end, the runs are the same
    prof = profile_from_doc(doc, "t")
    trace = make_trace(np.linspace(0, 1, 20), np.full(20, 40), np.arange(10, 30))
    r1 = simulate(RunConfig(method=ComponentSpec.parse(f"hispec:draft_exit=3,inter_exit={N_LAYERS},nd=4", "s")),
                  trace, prof)
    r2 = simulate(RunConfig(method=ComponentSpec.parse("kangaroo:exit=3,gamma=4,eta=0", "s")), trace, prof)
    assert r1.summary["latency_ms_mean"] == pytest.approx(r2.summary["latency_ms_mean"])
    assert (r1.requests["accepted"] == r2.requests["accepted"]).all()


# ----------------------------------------------------------------- monotone costs


def test_step_costs_monotone_in_tokens_and_context():
    prof = load_profile("vicuna7b-a100-analytic")
    cost = CostModel(prof)
    for stage in ("layer", "lm_head", "embed", "adapter", "draft_step"):
        for b in (1, 3, 16, 100):
            prev_t = None
            for t in (1, 2, 3, 5, 7, 12, 30, 100, 700, 2000):
                row = [cost.stage_ms(stage, b, b * t, b * c) for c in (0, 10, 300, 1000, 1900)]
                assert all(x <= y + 1e-12 for x, y in zip(row, row[1:])), (stage, b, t)
                if prev_t is not None:
                    assert all(x <= y + 1e-12 for x, y in zip(prev_t, row)), (stage, b, t)
                prev_t = row
    # whole steps: more drafts or more context never makes a step cheaper
    kg = make_method("kangaroo:eta=0", prof.doc)
    hs = make_method("hispec", prof.doc)
    for m in (kg, hs):
        for n in (1, 8, 64):
            by_k = [m.expected_step_ms(n, n * 500, k) for k in range(m.k_max + 1)]
            by_ctx = [m.expected_step_ms(n, n * c, m.k_max) for c in (0, 100, 500, 1500)]
            assert all(x <= y + 1e-9 for x, y in zip(by_ctx, by_ctx[1:]))
            assert all(x <= y + 1e-9 for x, y in zip(by_k, by_k[1:])), (m.name, n, by_k)
    costs = [early_exit_step_ms(kg.cost, decode_batch(8, d), np.full(8, d), 2, 32, True) for d in range(7)]
    assert all(x < y for x, y in zip(costs, costs[1:]))


# ----------------------------------------------------------------- end to end


def _capture(monkeypatch, cls):
    seen = []
    orig = cls.step

    def step(self, rng, batch):
        out = orig(self, rng, batch)
        seen.append((batch, out))
        return out

    monkeypatch.setattr(cls, "step", step)
    return seen


@pytest.mark.parametrize("spec", ["kangaroo", "kangaroo:eta=0.3,gamma=8", "hispec", "hispec:nd=3,ni=2",
                                  "hispec:draft_exit=2,inter_exit=32"])
def test_committed_never_exceeds_remaining_under_every_scheduler(monkeypatch, spec):
    from simspec.policies import SCHEDULERS

    prof = load_profile("vicuna7b-a100-analytic")
    cs = ComponentSpec.parse(spec, "s")
    seen = _capture(monkeypatch, get_method_class(cs.name))
    rng = np.random.default_rng(3)
    n = 30
    trace = make_trace(np.sort(rng.uniform(0, 2, n)), rng.integers(5, 400, n), rng.integers(1, 40, n))
    for policy in sorted(SCHEDULERS):
        seen.clear()
        cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=cs, max_batch_size=6,
                        kv_budget_tokens=3000, seed=1)
        res = simulate(cfg, trace, prof)
        req = res.requests
        assert (req["generated_tokens"] == req["output_tokens"]).all(), policy
        assert int(res.steps["committed"].sum()) == int(req["output_tokens"].sum())
        for batch, out in seen:
            dec = ~batch.prefill
            assert (out.drafted <= batch.k).all() and (out.accepted <= out.drafted).all()
            # uncapped commitment (accepted + 1) never exceeds what the request still needs
            assert (out.accepted[dec] + 1 <= batch.remaining[dec]).all(), policy
            assert (out.drafted[batch.prefill] == 0).all()
            assert out.step_ms > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 30), st.integers(0, 2**31 - 1), st.sampled_from(["kangaroo", "hispec", "hispec:nd=1,ni=6"]))
def test_random_batches_respect_k(n, seed, spec):
    rng = np.random.default_rng(seed)
    prof = load_profile("vicuna7b-a100-analytic")
    m = _METHODS.setdefault(spec, make_method(spec, prof.doc))
    rem = rng.integers(1, 50, n)
    k = np.minimum(rng.integers(0, m.k_max + 1, n), rem - 1)
    pre = rng.random(n) < 0.3
    k[pre] = 0
    ctx = rng.integers(1, 1500, n)
    b = BatchStep(idx=np.arange(n), prefill=pre, fed_tokens=np.where(pre, ctx, k + 1),
                  ctx_tokens=np.where(pre, 0, ctx), k=k, remaining=rem, alpha=rng.beta(6, 4, n),
                  class_idx=np.zeros(n, dtype=np.int64))
    out = m.step(np.random.default_rng(seed), b)
    again = m.step(np.random.default_rng(seed), b)
    assert out.step_ms == again.step_ms and (out.accepted == again.accepted).all()  # deterministic
    assert (out.drafted <= k).all() and (out.accepted >= 0).all() and (out.accepted <= out.drafted).all()
    # never cheaper than one plain forward of the batch (each member feeds at least one token)
    floor = m.cost.target_ms(n, float(b.fed_tokens[pre].sum()) + (~pre).sum(), 0, logits_tokens=n)
    assert out.step_ms >= floor * 0.99 - 1e-9


_METHODS: dict = {}


def test_whole_model_profile_is_refused_for_early_exit_methods():
    prof = load_profile("llama70b-4xh100-smartspec")
    trace = make_trace([0.0], [10], [5])
    for spec in ("kangaroo", "hispec"):
        with pytest.raises(ConfigError, match="whole-model"):
            simulate(RunConfig(method=ComponentSpec.parse(spec, "s")), trace, prof)
    # none and draft keep working on it, and on analytic (layer-level) profiles
    for name in ("llama70b-4xh100-smartspec", "vicuna7b-a100-analytic", "llama2-70b-h100x4-analytic"):
        for spec in ("none", "draft:k=3"):
            res = simulate(RunConfig(method=ComponentSpec.parse(spec, "s")), trace, load_profile(name))
            assert res.summary["n_requests"] == 1


def test_parameters_default_from_profile_settings_and_validate():
    prof = load_profile("llama2-70b-h100x4-analytic")
    kg = make_method("kangaroo", prof.doc)
    hs = make_method("hispec", prof.doc)
    assert (kg.exit_layer, kg.gamma, kg.eta) == (5, 6, 0.6)  # 80 layers: exit round(80/16)
    assert (hs.draft_exit, hs.inter_exit, hs.nd, hs.ni) == (10, 20, 2, 4)
    for bad, msg in (("kangaroo:exit=80", "exit must be"), ("kangaroo:gamma=0", "gamma"),
                     ("kangaroo:eta=-0.1", "eta"), ("hispec:draft_exit=20,inter_exit=10", "deeper"),
                     ("hispec:inter_exit=81", "inter_exit"), ("hispec:nd=0", "nd"), ("hispec:ni=1.5", "ni")):
        with pytest.raises(ConfigError, match=msg):
            make_method(bad, prof.doc)
    assert kg.notes == [] and hs.notes == []
    # an exit other than the one the acceptance is for is run, with a note saying so
    assert "acceptance is for exit=5" in make_method("kangaroo:exit=3", prof.doc).notes[0]
    notes = make_method("hispec:draft_exit=8,inter_exit=16", prof.doc).notes
    assert len(notes) == 2 and "draft_exit=10" in notes[0] and "inter_exit=20" in notes[1]
    assert "stops only at gamma" in make_method("kangaroo:eta=0.5", layer_doc(kangaroo={"alpha": fixed(0.5)})).notes[0]
    doc = copy.deepcopy(prof.doc)
    del doc["acceptance"]["hispec"]["default"]["draft_vs_inter"]
    with pytest.raises(ProfileError, match="draft_vs_inter"):
        make_method("hispec", doc)


def _cli(capsys, *args):
    from simspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_replay_cli_runs_kangaroo_and_hispec_on_analytic_profile(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,prompt_tokens,output_tokens\n"
                     + "".join(f"r{i},{i * 0.05:.2f},{50 + 10 * i},{20 + i}\n" for i in range(15)))
    for spec in ("kangaroo", "kangaroo:exit=2,gamma=6,eta=0.6", "hispec",
                 "hispec:draft_exit=4,inter_exit=8,nd=2,ni=4"):
        code, out, err = _cli(capsys, "replay", trace, "--profile", "vicuna7b-a100-analytic", "--spec", spec,
                              "--out", tmp_path / "run", "--force")
        assert code == 0, err
        assert "ANALYTIC" in err
        assert "tokens / decode step" in out
    for spec, msg in (("kangaroo:exit=99", "exit must be an integer in 1..31"),
                      ("hispec:inter_exit=2,draft_exit=4", "inter_exit (2) must be deeper than draft_exit (4)")):
        code, out, err = _cli(capsys, "replay", trace, "--profile", "vicuna7b-a100-analytic", "--spec", spec,
                              "--out", tmp_path / "bad")
        assert code == 2
        assert err.count("\n") == 1 and err.startswith("simspec: error: --spec") and msg in err
        assert not (tmp_path / "bad").exists()
