"""The real tree runner (calibrate/tree_runner.py) is lossless: its tokens equal plain greedy
decoding's (transformers' own generate), chain and tree, with and without an adapter; the tree mask
lets a node see only the context and its ancestors; its logs add up."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from simspec.calibrate.early_exit import LayeredLM  # noqa: E402
from simspec.calibrate.runners import greedy_reference  # noqa: E402
from simspec.calibrate.tree_runner import TreeRunner, tree_mask  # noqa: E402
from tests.test_runners import random_adapter, tiny_model  # noqa: E402

NEW = 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tree_mask_sees_context_and_ancestors_only():
    # context 2, nodes: 0 (depth 1), 1 (depth 1), 2 (child of 0), 3 (child of 2)
    m = tree_mask(2, [-1, -1, 0, 2], torch.float32, "cpu")[0, 0] == 0
    assert m[:2, :2].tolist() == [[True, False], [True, True]]
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert m[3].tolist() == [True, True, False, True, False, False]
    assert m[4].tolist() == [True, True, True, False, True, False]
    assert m[5].tolist() == [True, True, True, False, True, True]


@pytest.mark.parametrize("depth,topk,tokens,adapter", [(3, 1, 4, False), (3, 3, 8, True), (4, 2, 9, False)])
def test_tree_runner_is_lossless(depth, topk, tokens, adapter):
    model = tiny_model()
    lm = LayeredLM(model)
    ad = random_adapter(lm, 2, lm.num_layers, 5) if adapter else None
    runner = TreeRunner(lm, 2, ad, depth, topk, tokens)
    g = torch.Generator().manual_seed(3)
    accepted = 0
    for i in range(3):
        prompt = torch.randint(0, 256, (6 + 3 * i,), generator=g).tolist()
        res = runner.generate(prompt, NEW)
        assert res.tokens == greedy_reference(model, prompt, NEW)
        assert sum(s.committed for s in res.steps) == len(res.tokens) - 1
        assert all(s.drafts == tokens - 1 and 0 <= s.accepted <= depth for s in res.steps)
        accepted += sum(s.accepted for s in res.steps)
    assert accepted > 0  # the drafter agrees sometimes: the walk is exercised


def test_bundled_model_tree_runner_is_lossless():
    from simspec.calibrate import prompts as P
    from simspec.calibrate.adapter import load_adapters
    from simspec.calibrate.models import load_model

    loaded = load_model("smollm2-135m", "fp32", "cpu")
    lm = LayeredLM(loaded.model)
    ad = load_adapters(P.bundled_prompts_path().parent.parent / "adapters" / "smollm2-135m", lm, [2])[2]
    runner = TreeRunner(lm, 2, ad, 3, 3, 8, eos_token_id=loaded.tokenizer.eos_token_id)
    prompts = P.select(P.load_prompts(P.bundled_prompts_path()), 1, 0, ["qa", "mt_bench"])
    for cls, (pr,) in prompts.items():
        ids = P.encode(loaded.tokenizer, pr.text, 256)
        res = runner.generate(ids, 16)
        assert res.tokens == greedy_reference(loaded.model, ids, 16, loaded.tokenizer.eos_token_id), cls
