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
