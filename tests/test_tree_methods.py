"""Tree speculation (``tree``, ``eagle``, ``eagle3``, ``mtp``, ``medusa``, ``ngram``): golden cases
worked by hand for the tree shape, the tree acceptance and the step cost; top-k 1 equals the chain
(``draft``) step for step; bad parameters fail with one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simspec.errors import ConfigError, ProfileError
from simspec.profile import load_profile, profile_from_doc
from simspec.simulator.acceptance_tree import TreeAcceptance, build_order, max_nodes
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.cost import CostModel
from simspec.simulator.methods import get_method_class
from simspec.simulator.run import simulate
from tests.conftest import flat_profile_doc, make_trace

ALPHA_08 = {"alpha": {"kind": "fixed", "value": 0.8}}


def cfg(spec, spec_len="fixed", policy="fcfs", **kw) -> RunConfig:
    return RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                     spec_len=ComponentSpec.parse(spec_len, "l"), **kw)


def layer_profile_doc(alpha: float = 1.0, **acceptance_extra) -> dict:
    """Layer-level profile, 2 layers: a layer costs 1 ms per token fed, the LM head 0.5 ms per
    logits position, nothing else (no embed, no overhead). Target over T tokens: 2.5·T ms."""
    lin = lambda ct: {"kind": "linear", "coef": {"c0": 0.0, "c_b": 0.0, "c_t": ct, "c_kv": 0.0}}  # noqa: E731
    entry = {"alpha": {"kind": "fixed", "value": alpha}, **acceptance_extra}
    return {"schema": "simspec-profile", "schema_version": 2,
            "meta": {"name": "layer-test", "source": "analytic"},
            "models": {"target": {"name": "t", "num_layers": 2, "hidden_size": 8, "vocab_size": 32}},
            "capacity": {"kv_budget_tokens": 10_000, "max_batch_size": 8},
            "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                        "stages": {"layer": lin(1.0), "lm_head": lin(0.5)}},
            "acceptance": {m: {"default": dict(entry)} for m in ("eagle", "eagle3", "mtp", "medusa", "ngram")}}


# ------------------------------------------------------------------------------- tree shape


def test_tree_order_golden():
    # p = (0.8, 0.7, 0.6), h = 0.5, top-2. Rank probabilities per depth: (0.8, 0.1), (0.7, 0.15),
    # (0.6, 0.2). Nodes by path probability: (1) .8, (1,1) .56, (1,1,1) .336, (1,2) .12,
    # (1,1,2) .112, (2) .1, (1,2,1) .072, (2,1) .07 — the frontier at depth 2 is (1,1), (1,2).
    o = build_order(np.array([0.8, 0.7, 0.6]), 0.5, 2, 8, frontier=True)
    assert o.value == pytest.approx([0.8, 0.56, 0.336, 0.12, 0.112, 0.1, 0.072, 0.07])
    assert list(o.depth) == [1, 2, 3, 2, 3, 1, 3, 2]
    assert list(o.rank) == [1, 1, 1, 2, 2, 2, 1, 1]
    assert list(o.parent) == [-1, 0, 1, 0, 1, -1, 3, 5]
    # without a frontier (Medusa) the same 8 best nodes (nothing here needs a non-frontier parent)
    m = build_order(np.array([0.8, 0.7, 0.6]), 0.5, 2, 8, frontier=False)
    assert list(m.parent) == list(o.parent)
    assert max_nodes(3, 2, True) == 2 + 2 * 4 and max_nodes(3, 2, False) == 2 + 4 + 8


def test_frontier_limits_expansion_to_the_top_k_of_each_depth():
    # top-2, p = 0.9, h = 1 (rank 2 takes all the rest). Depth 2: (1,1) .81, (1,2) .09, (2,1) .09,
    # (2,2) .01; the frontier is the top-2, (1,1) and (1,2) (the .09 tie goes by rank path), so no
    # depth-3 node starts with rank 2, whatever the budget. Medusa (no frontier) has (2,1,1) = .081.
    def starts(o):
        out = set()
        for i in range(len(o)):
            if o.depth[i] == 3:
                j = i
                while o.parent[j] >= 0:
                    j = o.parent[j]
                out.add(int(o.rank[j]))
        return out

    o = build_order(np.array([0.9, 0.9, 0.9]), 1.0, 2, max_nodes(3, 2, True), frontier=True)
    assert len(o) == 2 + 2 * 4 and starts(o) == {1}
    m = build_order(np.array([0.9, 0.9, 0.9]), 1.0, 2, max_nodes(3, 2, False), frontier=False)
    assert len(m) == 14 and starts(m) == {1, 2}


# ------------------------------------------------------------------------- tree acceptance


def _acc(topk=2, depth=3, nodes=8, h=0.5, alpha=0.8, frontier=True):
    return TreeAcceptance([{"alpha": {"kind": "fixed", "value": alpha}, "rank_hazard": h}], depth, topk, nodes,
                          frontier, ["test"])


def test_tree_walk_golden():
    # α = 0.8 at every depth, h = 0.5, top-2, depth 3. Ranks: u < .8 → 1, .8 ≤ u < .9 → 2, else none.
    # Order: (1) .8, (1,1) .64, (1,1,1) .512, (2) .1, (1,2) .08, (2,1) .08, (1,1,2) .064, (1,2,1) .064
    # (ties by depth, then by rank path: (1,2) before (2,1), (1,1,2) before (1,2,1)).
    acc = _acc()
    u = np.array([[0.85, 0.10, 0.10],   # (2) then (2,1)
                  [0.10, 0.85, 0.50],   # (1), (1,2), (1,2,1)
                  [0.10, 0.10, 0.10],   # (1,1,1)
                  [0.95, 0.10, 0.10]])  # nothing
    a = np.full(4, 0.8)
    c = np.zeros(4, dtype=np.int64)
    for budget, want in ((4, [1, 1, 3, 0]), (5, [1, 2, 3, 0]), (6, [2, 2, 3, 0]), (8, [2, 3, 3, 0]),
                         (1, [0, 1, 1, 0]), (0, [0, 0, 0, 0])):
        accepted, positions = acc.walk(u, a, c, np.full(4, budget))
        assert list(accepted) == want, budget
    # positions: rank-1 draws within the tree's depth (3 from budget 3 on: (1), (1,1), (1,1,1))
    _, positions = acc.walk(u, a, c, np.full(4, 4))
    assert list(positions) == [2, 2, 3, 2]
    assert list(acc.tree_depth(np.full(6, 0.8), np.zeros(6, dtype=np.int64), np.array([0, 1, 2, 3, 4, 8]))) == \
        [0, 1, 2, 3, 3, 3]
    # expectation: the sum of the tree's node probabilities
    assert acc.expected_accepted(0.8, 0, 4) == pytest.approx(0.8 + 0.64 + 0.512 + 0.1)
    assert acc.expected_accepted(0.8, 0, 8) == pytest.approx(0.8 + 0.64 + 0.512 + 0.1 + 0.08 + 0.08 + 0.064 + 0.064)


@pytest.mark.parametrize("topk,nodes,frontier", [(1, 4, True), (3, 10, True), (4, 12, False)])
def test_tree_walk_mean_matches_the_expectation(topk, nodes, frontier):
    acc = _acc(topk=topk, depth=4, nodes=nodes, h=0.4, alpha=0.7, frontier=frontier)
    rng = np.random.default_rng(5)
    n = 200_000
    accepted, _ = acc.walk(rng.random((n, 4)), np.full(n, 0.7), np.zeros(n, dtype=np.int64), np.full(n, nodes))
    want = acc.expected_accepted(0.7, 0, nodes)
    assert float(accepted.mean()) == pytest.approx(want, abs=4 * float(accepted.std()) / np.sqrt(n))
    if topk == 1:  # the chain: α + α² + α³ + α⁴
        assert want == pytest.approx(0.7 + 0.49 + 0.343 + 0.2401)


def test_more_branching_never_accepts_less():
    # the same draws through top-1, top-2, top-4 trees of growing budget: a bigger tree contains the
    # smaller one's nodes only when the budget grows with it; per-draw, top-k ≥ top-1 chain of the
    # same depth when the tree keeps the whole chain (it does: rank-1 paths score highest here)
    rng = np.random.default_rng(2)
    u = rng.random((5000, 4))
    a = np.full(5000, 0.6)
    c = np.zeros(5000, dtype=np.int64)
    chain, _ = _acc(topk=1, depth=4, nodes=4, h=0.5, alpha=0.6).walk(u, a, c, np.full(5000, 4))
    tree, _ = _acc(topk=4, depth=4, nodes=20, h=0.5, alpha=0.6).walk(u, a, c, np.full(5000, 20))
    assert (tree >= chain).all() and tree.mean() > chain.mean()


# ------------------------------------------------------------------------------- step cost


def test_eagle_tree_step_cost_golden():
    # layer-level test profile: target over T tokens 2.5·T ms; EAGLE head pass over t tokens
    # (1 layer + LM head) 1.5·t ms. α = 1: every draft accepted. Prompt 4, output 5.
    # Step 1 (prefill): target layers 2·4 + LM head over the last position 0.5 = 8.5 ms, the head
    # over the prompt (layer 4 + LM head 0.5) = 4.5 ms → 13 ms, first token.
    # Step 2: k = min(6, remaining 4 − 1) = 3 nodes: (1), (1,1), (1,1,1) (α = 1 scores rank-1 paths
    # 1, the rest 0), depth 3. Verify 4 tokens: 10 ms. Drafting: pass 0 one token 1.5, passes 1 and
    # 2 the top-2 frontier, 2 tokens each: 3 + 3 → 7.5 ms. 17.5 ms; 3 accepted + 1: done at 30.5 ms.
    prof = profile_from_doc(layer_profile_doc(1.0, rank_hazard=0.5), "layer-test")
    res = simulate(cfg("eagle:depth=3,topk=2,tokens=7", block_size=1), make_trace([0], [4], [5]), prof)
    r = res.requests.iloc[0]
    assert r["first_token_s"] == pytest.approx(0.013)
    assert r["completion_s"] == pytest.approx(0.0305)
    assert (r["drafted"], r["accepted"]) == (3, 3)
    assert list(res.steps["step_ms"]) == pytest.approx([13.0, 17.5])


def test_medusa_and_ngram_step_cost_golden():
    # Medusa, 3 heads composed as 3 × LM head × (1 + hidden/vocab) = 3 × 0.5 × 1.25 per token.
    # Prefill (prompt 4): 8.5 + heads on the last position 1.875 = 10.375 ms. Step 2: k = 3 nodes,
    # verify 4 tokens 10 ms + one heads pass over 1 token 1.875 = 11.875 ms.
    prof = profile_from_doc(layer_profile_doc(1.0, rank_hazard=0.5), "layer-test")
    res = simulate(cfg("medusa:depth=3,topk=2,tokens=5", block_size=1), make_trace([0], [4], [5]), prof)
    assert list(res.steps["step_ms"]) == pytest.approx([10.375, 11.875])
    # n-gram with hit probability 1: no draft cost, verify 4 tokens = 10 ms; with 0: never drafts,
    # plain decoding (2.5 ms per token), the same times as `none`
    res = simulate(cfg("ngram:depth=3,hit_probability=1.0", block_size=1), make_trace([0], [4], [5]), prof)
    assert list(res.steps["step_ms"]) == pytest.approx([8.5, 10.0])
    tr = make_trace([0, 0.001], [4, 9], [6, 3])
    miss = simulate(cfg("ngram:depth=3,hit_probability=0.0", block_size=1), tr, prof)
    none = simulate(cfg("none", block_size=1), tr, prof)
    assert (miss.requests["drafted"] == 0).all()
    pd.testing.assert_series_equal(miss.requests["completion_s"], none.requests["completion_s"])


def test_eagle3_draft_vocab_scales_the_composed_head():
    # draft vocabulary 16 of 32: the head's LM head costs half: pass over t tokens 1.25·t ms
    prof = profile_from_doc(layer_profile_doc(1.0), "layer-test")
    res = simulate(cfg("eagle3:depth=3,draft_vocab=16", block_size=1), make_trace([0], [4], [5]), prof)
    # step 2: chain of 3, verify 4 tokens 10 ms + 3 passes of one token 3.75 ms
    assert list(res.steps["step_ms"])[1] == pytest.approx(13.75)


# ---------------------------------------------------------------- top-k 1 is the chain method


@pytest.mark.parametrize("profile_name", ["vicuna7b-a100-analytic", "flat"])
@pytest.mark.parametrize("spec_len", ["fixed", "smartspec", "smartspec-per-request"])
def test_topk_1_tree_equals_the_chain_step_for_step(profile_name, spec_len):
    rng = np.random.default_rng(7)
    n = 40
    tr = make_trace(np.cumsum(rng.exponential(0.1, n)), rng.integers(10, 400, n), rng.integers(5, 200, n),
                    classes=list(rng.choice(["default", "code"], n)))
    if profile_name == "flat":
        prof = profile_from_doc(flat_profile_doc(alpha=None), "flat")
        prof.doc["acceptance"]["draft"] = {"default": {"alpha": {"kind": "beta", "a": 6.0, "b": 3.0},
                                                       "position_conditional": [0.8, 0.7, 0.65, 0.6]}}
        prof = profile_from_doc(prof.doc, "flat")
    else:
        prof = load_profile(profile_name)
    for depth in (1, 4):
        a = simulate(cfg(f"draft:k={depth}", spec_len, max_batch_size=8), tr, prof)
        b = simulate(cfg(f"tree:depth={depth},topk=1,acceptance=draft", spec_len, max_batch_size=8), tr, prof)
        pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
        pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)


def test_tree_acceptance_beats_the_chain_at_equal_depth():
    prof = load_profile("vicuna7b-a100-analytic")
    rng = np.random.default_rng(3)
    tr = make_trace(np.cumsum(rng.exponential(0.3, 30)), rng.integers(10, 300, 30), rng.integers(50, 200, 30))
    chain = simulate(cfg("eagle:depth=4,acceptance=draft", max_batch_size=8), tr, prof).requests
    tree = simulate(cfg("eagle:depth=4,topk=4,tokens=16,acceptance=draft,rank_hazard=0.3", max_batch_size=8),
                    tr, prof).requests
    tau = lambda r: r["generated_tokens"].sum() / r["decode_steps"].sum()  # noqa: E731
    assert tau(tree) > tau(chain)


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("spec,match", [
    ("eagle:topk=0", "topk must be an integer in 1..10"),
    ("eagle:depth=3,topk=2,tokens=12", "tokens must be an integer in 2..11"),
    ("eagle:depth=17", "depth must be an integer in 1..16"),
    ("eagle:rank_hazard=2", "rank_hazard must be a number in"),
    ("eagle3:draft_vocab=64", "exceeds the target's vocabulary of 32"),
    ("ngram:hit_probability=1.5", "hit_probability must be a number"),
    ("ngram:topk=2", "unknown parameter"),
    ("medusa:bogus=1", "unknown parameter"),
])
def test_bad_tree_parameters_fail_with_one_line(spec, match):
    prof = profile_from_doc(layer_profile_doc(1.0), "layer-test")
    c = ComponentSpec.parse(spec, "s")
    with pytest.raises(ConfigError, match=match) as exc:
        get_method_class(c.name)(dict(c.params), prof, CostModel(prof))
    assert "\n" not in str(exc.value)


def test_missing_rank_hazard_and_hit_probability_name_the_field():
    prof = profile_from_doc(layer_profile_doc(0.8), "layer-test")
    with pytest.raises(ProfileError, match=r"acceptance\.eagle\.default\.rank_hazard: missing"):
        simulate(cfg("eagle:topk=2"), make_trace([0], [4], [5]), prof)
    with pytest.raises(ProfileError, match=r"acceptance\.ngram\.default\.hit_probability: missing"):
        simulate(cfg("ngram"), make_trace([0], [4], [5]), prof)
    # a whole-model profile cannot compose an EAGLE head
    flat = profile_from_doc(flat_profile_doc(), "flat")
    with pytest.raises(ConfigError, match="no 'eagle_head' stage"):
        get_method_class("eagle")({}, flat, CostModel(flat))
    # a bad rank hazard in the profile is refused when it is loaded
    doc = layer_profile_doc(0.8, rank_hazard=1.5)
    with pytest.raises(ProfileError, match=r"acceptance\.eagle\.default\.rank_hazard: must be in \[0, 1\]"):
        profile_from_doc(doc, "bad")


@pytest.mark.parametrize("spec_len", ["smartspec", "smartspec-per-request"])
def test_smartspec_estimates_the_top1_rate_over_a_tree(spec_len):
    # α fixed at 0.6; a top-4 tree verifies many more nodes than positions: α̂ counts per depth,
    # so it ends near 0.6 (a per-node count would be far below)
    doc = layer_profile_doc(0.6, rank_hazard=0.3)  # memory-bound: 32 layers of 0.1 ms, LM head 0.2 ms
    doc["models"]["target"]["num_layers"] = 32
    doc["latency"]["stages"] = {name: {"kind": "linear", "coef": {"c0": c0, "c_b": 0.0, "c_t": 1e-4, "c_kv": 0.0}}
                                for name, c0 in (("layer", 0.1), ("lm_head", 0.2))}
    prof = profile_from_doc(doc, "layer-test")
    tr = make_trace(np.linspace(0, 0.5, 30), np.full(30, 50), np.full(30, 300))
    res = simulate(cfg("eagle:depth=4,topk=4,tokens=13", spec_len, max_batch_size=8), tr, prof)
    req = res.requests
    if spec_len == "smartspec":
        assert abs(float(res.steps["policy_value"].iloc[-1]) - 0.6) < 0.03
    assert req["drafted"].sum() > 2 * req["position_accepts"].sum() / 0.6 / 4  # nodes ≫ positions


def test_help_lists_the_tree_methods_with_parameters():
    from click.testing import CliRunner

    from simspec.cli import cli

    out = " ".join(CliRunner().invoke(cli, ["replay", "--help"], terminal_width=400).output.split())
    for text in ("tree:depth=4,topk=1,tokens=5", "eagle:depth=3", "eagle3:", "draft_vocab", "mtp:depth=1",
                 "medusa:depth=4,topk=4,tokens=17", "ngram:depth=4,hit_probability", "--speculative-config"):
        assert text in out, text


def test_tree_fit_round_trips_the_mean_accepted_length():
    from simspec.calibrate.tree_fit import beta_weights, fit_beta_mean, tau_curve

    a, tau = tau_curve(3, 1, 4, 0.0)
    assert tau[100] == pytest.approx(1 + a[100] + a[100] ** 2 + a[100] ** 3)  # a chain of 3
    curve = tau_curve(4, 3, 10, 0.4)
    m = fit_beta_mean(2.5, curve, 10.0, per_step=False)
    assert float((beta_weights(curve[0], m, 10.0) * curve[1]).sum()) == pytest.approx(2.5, abs=1e-6)
    m2 = fit_beta_mean(2.5, curve, 10.0)  # per step: the harmonic mean over requests is lower: a higher level
    assert 1.0 / float((beta_weights(curve[0], m2, 10.0) / curve[1]).sum()) == pytest.approx(2.5, abs=1e-6)
    assert m2 > m
    # a hit probability scales the accepted part
    half = tau_curve(3, 1, 4, 0.0, hit=0.5)
    assert half[1][100] - 1 == pytest.approx(0.5 * (tau[100] - 1))


def test_import_tree_log_recovers_the_levels_it_was_sampled_from(tmp_path):
    # a Spec-Bench-style log sampled from the tree model (depth 4, top-3, 10 tokens, h = 0.3) at
    # per-request levels 0.5 (class qa) and 0.8 (class rag): the import inverts each request's τ
    import json

    from simspec.calibrate.tree_fit import import_spec_bench_tree
    from simspec.cli import main

    acc = _acc(topk=3, depth=4, nodes=9, h=0.3, alpha=0.5)
    rng = np.random.default_rng(11)
    recs = []
    for qid, (cat, a) in enumerate([("qa", 0.5)] * 20 + [("rag", 0.8)] * 20):
        n = 400
        accepted, _ = acc.walk(rng.random((n, 4)), np.full(n, a), np.zeros(n, dtype=np.int64), np.full(n, 9))
        recs.append({"question_id": qid, "category": cat, "choices": [{"accept_lengths": (accepted + 1).tolist()}]})
    f = tmp_path / "answers.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    sec = import_spec_bench_tree(f, "eagle", 4, 3, 10, 0.3)
    for cls, a in (("qa", 0.5), ("rag", 0.8)):
        e = sec[cls]
        assert e["fit"]["alpha_levels_mean"] == pytest.approx(a, abs=0.02)
        assert e["fit"]["tau_model"] == pytest.approx(e["mean_tokens_per_step"], rel=0.02)
        assert e["rank_hazard"] == 0.3 and e["settings"]["topk"] == 3
    out = tmp_path / "p.json"
    out.write_text(json.dumps(flat_profile_doc()))
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "import-acceptance", str(f), "--out", str(out), "--method", "eagle", "--depth", "4",
              "--topk", "3", "--tokens", "10", "--rank-hazard", "0.3"])
    assert exc.value.code in (0, None)
    assert set(json.loads(out.read_text())["acceptance"]["eagle"]) == {"qa", "rag", "default"}
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "import-acceptance", str(f), "--out", str(out), "--method", "eagle", "--depth", "4",
              "--topk", "3"])
    assert exc.value.code == 2


def test_draft_dynamic_confidence_stop_golden(flat_profile):
    # flat profile: target 10 ms, a draft pass 1 ms, α = 1. Prompt 4, output 5.
    # Step 1: prefill 10 + draft prefill 1 = 11 ms. Without confidence histograms (or eta = 0) the
    # draft stops only at k: step 2 drafts min(8, 3) = 3 → 3 passes + verify = 13 ms, all accepted.
    res = simulate(cfg("draft-dynamic:k=8,eta=0.0"), make_trace([0], [4], [5]), flat_profile(alpha=1.0))
    assert list(res.steps["step_ms"]) == pytest.approx([11.0, 13.0])
    # eta = 1: every draft's top-1 probability is below it: one draft per step → 1 pass + verify
    # = 11 ms, 1 accepted + 1 committed each: steps 2, 3 commit 2 each (4 of 5 tokens), done
    doc = flat_profile_doc(alpha=1.0)
    doc["acceptance"]["draft"]["default"]["confidence"] = {"bin_edges": [0.0, 0.5, 1.0], "accepted": [[1, 1]],
                                                           "rejected": [[1, 1]]}
    res = simulate(cfg("draft-dynamic:k=8,eta=1.0"), make_trace([0], [4], [5]), profile_from_doc(doc, "flat"))
    assert list(res.steps["step_ms"]) == pytest.approx([11.0, 11.0, 11.0])
    assert int(res.requests["drafted"].iloc[0]) == 2
    # the stop at eta = 0.5 with half the mass below: D ~ 1 + Geometric, mean drafts < k
    res = simulate(cfg("draft-dynamic:k=8,eta=0.5"), make_trace([0] * 20, [4] * 20, [60] * 20),
                   profile_from_doc(doc, "flat"))
    r = res.requests
    assert 1.0 < r["drafted"].sum() / r["decode_steps"].sum() < 3.0
