"""Batched real runners (``simspec.calibrate.batched``): lossless against plain greedy decoding with
several requests per step (all admitted at once, or staggered so prefills share steps with decodes),
and forced acceptance honoured exactly."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from simspec.calibrate.batched import (BatchedDraft, BatchedGreedy, BatchedHiSpec, BatchedHiSpecSingle,  # noqa: E402
                                       BatchedKangaroo, generate_batch, packed_mask)
from simspec.forced_acceptance import ForcedStep  # noqa: E402
from simspec.calibrate.early_exit import LayeredLM  # noqa: E402
from simspec.calibrate.runners import greedy_reference  # noqa: E402
from simspec.errors import SimspecError  # noqa: E402
from test_runners import random_adapter, tiny_model  # noqa: E402

NEW = 24
CAP = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 41, 9)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [greedy_reference(model, p, NEW) for p in prompts]


def make(name, m):
    lm = LayeredLM(m)
    return {
        "none": lambda: BatchedGreedy(lm, CAP),
        "draft-prefix": lambda: BatchedDraft(lm, 4, CAP, draft_layers=2),
        "draft-self": lambda: BatchedDraft(lm, 3, CAP, draft=LayeredLM(m)),
        "kangaroo-lens": lambda: BatchedKangaroo(lm, 2, None, CAP, gamma=5, eta=0.0),
        "kangaroo-adapter": lambda: BatchedKangaroo(lm, 2, random_adapter(lm, 2, 6, 0), CAP, gamma=4, eta=0.05),
        "hispec-lens": lambda: BatchedHiSpec(lm, 1, 3, {}, CAP),
        "hispec-adapters": lambda: BatchedHiSpec(lm, 2, 4, {2: random_adapter(lm, 2, 6, 1),
                                                            4: random_adapter(lm, 4, 7, 2)}, CAP, n_draft=3, n_inter=2),
        "hispec-draft-adapter": lambda: BatchedHiSpec(lm, 1, 4, {1: random_adapter(lm, 1, 6, 3)}, CAP, n_draft=1,
                                                      n_inter=5),
        "hispec-single": lambda: BatchedHiSpecSingle(lm, 2, random_adapter(lm, 2, 6, 4), CAP, n_draft=3),
    }[name]


@pytest.mark.parametrize("name", ["none", "draft-prefix", "draft-self", "kangaroo-lens", "kangaroo-adapter",
                                  "hispec-lens", "hispec-adapters", "hispec-draft-adapter", "hispec-single"])
@pytest.mark.parametrize("admit_every", [0, 3])
def test_batched_runner_is_lossless(model, prompts, reference, name, admit_every):
    runner = make(name, model)()
    got = generate_batch(runner, prompts, NEW, admit_every=admit_every)
    for p, g, ref in zip(prompts, got, reference):
        assert g == ref, f"{name}: differs from plain greedy on a {len(p)}-token prompt (admit_every={admit_every})"
    assert not runner.reqs and not runner.kv.len  # every request released, its KV freed


@pytest.mark.parametrize("name", ["kangaroo-adapter", "hispec-lens", "hispec-adapters", "hispec-draft-adapter"])
def test_batched_runner_is_lossless_with_different_output_lengths(model, prompts, reference, name):
    """Requests of different output lengths, admitted one every 2 steps: requests finish at different
    steps (caps shrink to remaining − 1 near each end) while newcomers prefill beside decodes."""
    lengths = [NEW, 5, 17, 1]
    runner = make(name, model)()
    got = generate_batch(runner, prompts, lengths, admit_every=2)
    for p, g, ref, n in zip(prompts, got, reference, lengths):
        assert g == ref[:n], f"{name}: differs from plain greedy on a {len(p)}-token prompt ({n} new tokens)"
    assert not runner.reqs and not runner.kv.len


def test_packed_mask_is_block_diagonal_causal():
    m = packed_mask([2, 0], [1, 3], torch.float32, "cpu")[0, 0]
    ok = m == 0
    # member 0: one query at position 2 sees its keys 0..2 (columns 0..2), nothing of member 1
    assert ok[0].tolist() == [True, True, True, False, False, False]
    # member 1: queries at positions 0, 1, 2 see their own keys causally (columns 3..5)
    assert ok[1].tolist() == [False, False, False, True, False, False]
    assert ok[3].tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("name", ["draft-prefix", "kangaroo-adapter"])
def test_forced_acceptance_is_honoured_exactly(model, prompts, name):
    """Forced (drafts, accepted) per step: the runner drafts and commits exactly that, whatever the
    target says — even accepting drafts the target rejects."""
    runner = make(name, model)()
    runner.add("a", prompts[1])
    runner.add("b", prompts[2])
    runner.step(["a", "b"], [])
    k = runner.k_max
    pattern = [(k, k), (k, 0), (k, 2), (1, 1), (2, 0), (k, k - 1)]
    for s, (d, a) in enumerate(pattern):
        d = k if name.startswith("draft") else d
        a = min(a, d)
        before = len(runner.tokens("a"))
        out = runner.step([], [("a", k), ("b", k)], forced={"a": (d, a), "b": (d, 0)})
        assert out["a"].drafts == d and out["a"].accepted == a and len(out["a"].tokens) == a + 1
        assert out["b"].accepted == 0 and len(out["b"].tokens) == 1
        assert len(runner.tokens("a")) == before + a + 1
    # the KV stays consistent: a lossless step afterwards continues greedily from what was committed
    seq = prompts[1] + runner.tokens("a")
    nxt = greedy_reference(model, seq, 1)[0]
    out = runner.step([], [("a", 0), ("b", 0)])
    assert out["a"].tokens == [nxt]


def test_bad_steps_are_refused(model, prompts):
    r = make("draft-prefix", model)()
    r.add("a", prompts[0])
    with pytest.raises(SimspecError, match="decode before its prefill"):
        r.step([], [("a", 1)])
    r.step(["a"], [])
    with pytest.raises(SimspecError, match="prefilled twice"):
        r.step(["a"], [])
    with pytest.raises(SimspecError, match="draft cap 9"):
        r.step([], [("a", 9)])
    with pytest.raises(SimspecError, match="added twice"):
        r.add("a", prompts[0])


def _inner_plan(cap, nd, ni, rng):
    """A random valid two-level HiSpec plan for one step at ``cap``: appended tokens per inner iteration."""
    plan, m = [], 0
    while m < min(ni, cap):
        d = min(nd, cap - m)
        a = int(rng.integers(1, d + 1))
        plan.append(a)
        m += a
    return tuple(plan)


def test_hispec_forced_acceptance_reproduces_a_pattern(model, prompts):
    """Forced ForcedStep(drafts, accepted, inner) per member and step: every inner iteration appends
    exactly the planned count (with real draft and intermediate passes: d = min(N_d, cap − m)), the full
    verifier accepts exactly ``accepted`` buffer tokens — also ones the target rejects — and a lossless
    step afterwards continues greedily from what was committed."""
    import numpy as np

    rng = np.random.default_rng(5)
    runner = make("hispec-adapters", model)()  # N_d 3, N_i 2: caps 0..4
    nd, ni, k = runner.nd, runner.ni, runner.k_max
    assert k == 4
    for rid, p in (("a", prompts[1]), ("b", prompts[2]), ("c", prompts[0])):
        runner.add(rid, p)
    runner.step(["a", "b"], [])
    forced_accepts = 0
    for s in range(10):
        caps = {"a": k, "b": [4, 3, 1, 2, 0][s % 5], "c": k}
        pre = ["c"] if s == 2 else []  # a newcomer's prefill shares a forced step
        dec = [(r, caps[r]) for r in ("a", "b", "c") if r not in pre and (r != "c" or s > 2)]
        plans = {}
        for rid, cap in dec:
            inner = _inner_plan(cap, nd, ni, rng)
            m = sum(inner)
            acc = m if s % 3 == 0 else int(rng.integers(0, m + 1))
            plans[rid] = ForcedStep(drafts=m, accepted=acc, inner=inner)
        before = {rid: len(runner.tokens(rid)) for rid, _ in dec}
        out = runner.step(pre, dec, forced=plans)
        for rid, cap in dec:
            f, o = plans[rid], out[rid]
            assert [a for _, a in o.inner] == list(f.inner)
            want_d, m = [], 0
            for a in f.inner:
                want_d.append(min(nd, cap - m))
                m += a
            assert [d for d, _ in o.inner] == want_d
            assert o.drafts == f.drafts and o.accepted == f.accepted and len(o.tokens) == f.accepted + 1
            assert len(runner.tokens(rid)) == before[rid] + f.accepted + 1
            forced_accepts += f.accepted
        if pre:
            assert len(out["c"].tokens) == 1
    assert forced_accepts > 0
    for rid, p in (("a", prompts[1]), ("b", prompts[2]), ("c", prompts[0])):
        nxt = greedy_reference(model, p + runner.tokens(rid), 3)
        got = []
        while len(got) < 3:
            got += runner.step([], [(rid, 0)])[rid].tokens
        assert got == nxt, rid


def test_hispec_forced_plan_must_fit_the_cap(model, prompts):
    runner = make("hispec-lens", model)()  # N_d 2, N_i 4
    runner.add("a", prompts[1])
    runner.step(["a"], [])
    with pytest.raises(SimspecError, match="forced inner iterations"):
        runner.step([], [("a", 5)], forced={"a": ForcedStep(drafts=3, accepted=1, inner=(3,))})  # 3 > N_d
    runner = make("hispec-lens", model)()
    runner.add("a", prompts[1])
    runner.step(["a"], [])
    with pytest.raises(SimspecError, match="does not match its cap"):
        runner.step([], [("a", 5)], forced={"a": ForcedStep(drafts=6, accepted=1, inner=(2, 2, 1, 1))})
    with pytest.raises(SimspecError, match="bad forced step"):
        runner.step([], [("a", 5)], forced={"a": (2, 3)})  # accepted > drafts
