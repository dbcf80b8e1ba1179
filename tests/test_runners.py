"""Real speculative runners: lossless (tokens equal plain greedy decoding), logs that add up, and early-exit
adapters whose incremental KV bookkeeping matches a whole-sequence forward."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from simspec.calibrate.adapter import ExitAdapter  # noqa: E402
from simspec.calibrate.early_exit import LayeredLM  # noqa: E402
from simspec.calibrate.runners import (DraftRunner, GreedyRunner, HiSpecRunner, KangarooRunner,  # noqa: E402
                                       greedy_reference)

NEW = 40


def tiny_model(seed: int = 0, layers: int = 6, deep_scale: float = 20.0):
    """A random 6-layer Llama (hidden 64, vocab 256) whose layers after the first are scaled so that
    early exits agree with the full model some of the time (acceptance neither 0 nor 1)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(50)
        for i, layer in enumerate(m.model.layers):
            f = 10.0 if i == 0 else deep_scale
            layer.self_attn.o_proj.weight.mul_(f)
            layer.mlp.down_proj.weight.mul_(f)
    return m


def random_adapter(lm, exit_layer, slot, seed):
    """An adapter with a non-zero attention output, so its KV cache actually matters."""
    ad = ExitAdapter(lm, exit_layer, slot)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = ad.attn.o_proj.weight
        w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    return ad


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core CI box OpenMP's spinning
    threads make them far slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 41)]


def make_runners(m):
    lm = LayeredLM(m)
    return {
        "none": GreedyRunner(lm),
        "draft-prefix": DraftRunner(lm, k=4, draft_layers=2),
        "draft-self": DraftRunner(lm, k=3, draft=LayeredLM(m)),
        "draft-other": DraftRunner(lm, k=2, draft=LayeredLM(tiny_model(seed=5, layers=2))),
        "kangaroo-lens": KangarooRunner(lm, 2, None, gamma=5, eta=0.0),
        "kangaroo-adapter": KangarooRunner(lm, 2, random_adapter(lm, 2, 6, 0), gamma=4, eta=0.05),
        "hispec-lens": HiSpecRunner(lm, 1, 3, {}),
        "hispec-adapters": HiSpecRunner(lm, 2, 4, {2: random_adapter(lm, 2, 6, 1), 4: random_adapter(lm, 4, 7, 2)},
                                        n_draft=3, n_inter=4),
    }


@pytest.mark.parametrize("name", ["none", "draft-prefix", "draft-self", "draft-other", "kangaroo-lens",
                                  "kangaroo-adapter", "hispec-lens", "hispec-adapters"])
def test_runner_is_lossless_and_logs_add_up(model, prompts, name):
    runner = make_runners(model)[name]
    accepted_any = rejected_any = False
    for p in prompts:
        ref = greedy_reference(model, p, NEW)
        res = runner.generate(p, NEW)
        assert res.tokens == ref, f"{name}: differs from plain greedy on a {len(p)}-token prompt"
        # committed tokens = accepted + 1 per verification, the last step capped; prefill gives the first
        assert sum(s.committed for s in res.steps) + 1 == len(res.tokens) == NEW
        for i, s in enumerate(res.steps):
            assert 0 <= s.accepted <= s.offered
            if i < len(res.steps) - 1:
                assert s.committed == s.accepted + 1
            else:
                assert 1 <= s.committed <= s.accepted + 1
            assert len(s.confidences) == s.drafts
            assert all(0.0 <= c <= 1.0 for c in s.confidences)
            assert s.stages_ms and all(v >= 0 for v in s.stages_ms.values())
            accepted_any |= s.accepted > 0
            rejected_any |= s.accepted < s.offered
        if name == "none":
            assert all(s.drafts == 0 and s.committed == 1 for s in res.steps)
    if name == "draft-self":
        assert not rejected_any  # the target drafting for itself is always right
    elif name not in ("none", "draft-other"):
        assert accepted_any and rejected_any  # both paths exercised


def test_kangaroo_confidence_stop_and_gamma(model, prompts):
    lm = LayeredLM(model)
    eta, gamma = 0.05, 4
    r = KangarooRunner(lm, 2, random_adapter(lm, 2, 6, 0), gamma=gamma, eta=eta)
    res = r.generate(prompts[1], NEW)
    for s in res.steps:
        assert 1 <= s.drafts <= gamma and s.offered == s.drafts
        assert all(c >= eta for c in s.confidences[:-1])  # drafting went on only after confident drafts
        assert s.confidences[-1] < eta or s.drafts == gamma  # stopped by η (still verified) or by γ
        assert s.rejected_by == (None if s.accepted == s.drafts else "target")
        assert set(s.stages_ms) >= {"shallow_ms", "adapter_head_ms", "deep_ms"}


def test_hispec_inner_rounds_add_up(model, prompts):
    lm = LayeredLM(model)
    nd, ni = 3, 4
    r = HiSpecRunner(lm, 2, 4, {2: random_adapter(lm, 2, 6, 1)}, n_draft=nd, n_inter=ni)
    res = r.generate(prompts[2], NEW)
    for s in res.steps:
        assert ni <= s.offered <= ni + nd - 1
        assert s.drafts == nd * len(s.inner)
        assert sum(x["appended"] for x in s.inner) == s.offered
        for x in s.inner:
            assert x["appended"] == (nd if x["inter_accepted"] == nd else x["inter_accepted"] + 1)
        levels = (["inter"] if any(x["inter_accepted"] < nd for x in s.inner) else []) + \
                 (["full"] if s.accepted < s.offered else [])
        assert s.rejected_by == ("+".join(levels) or None)


def test_eos_stops_like_greedy(model, prompts):
    p = prompts[0]
    free = greedy_reference(model, p, NEW)
    eos = free[len(free) // 2]
    ref = greedy_reference(model, p, NEW, eos_token_id=eos)
    assert ref[-1] == eos and len(ref) < NEW
    lm = LayeredLM(model)
    for r in (GreedyRunner(lm, eos), DraftRunner(lm, 4, draft_layers=2, eos_token_id=eos),
              KangarooRunner(lm, 2, None, gamma=5, eta=0.0, eos_token_id=eos), HiSpecRunner(lm, 1, 3, eos_token_id=eos)):
        res = r.generate(p, NEW)
        assert res.tokens == ref and res.stop == "eos"
        assert sum(s.committed for s in res.steps) + 1 == len(ref)


@pytest.mark.parametrize("kind", ["kangaroo", "hispec"])
def test_adapter_drafts_match_a_whole_sequence_forward(model, prompts, kind):
    """Each step's first draft is the exit head's prediction after the committed prefix; recomputing it
    over the whole final sequence (no KV cache) must give the same top-1 probability — this checks the
    adapter's KV catch-up and cropping across rejections."""
    lm = LayeredLM(model)
    ad = random_adapter(lm, 2, 6, 3)
    if kind == "kangaroo":
        r = KangarooRunner(lm, 2, ad, gamma=4, eta=0.0)
    else:
        r = HiSpecRunner(lm, 2, 4, {2: ad, 4: random_adapter(lm, 4, 7, 4)}, n_draft=2, n_inter=4)
    p = prompts[1]
    res = r.generate(p, NEW)
    seq = p + res.tokens
    with torch.no_grad():
        h = lm.run(lm.embed(seq), 0, 2, lm.new_kv())
        probs = torch.softmax(lm.head(ad(lm, h, 0, None), normed=True)[0], -1)
    pos = len(p)  # the first step drafts after prompt + prefill token
    for s in res.steps:
        top = float(probs[pos].max())
        assert s.confidences[0] == pytest.approx(top, abs=1e-4)
        pos += s.committed


def test_untrained_adapter_is_the_logit_lens(model):
    lm = LayeredLM(model)
    ad = ExitAdapter(lm, 3, 6)
    with torch.no_grad():
        h = lm.run(lm.embed(list(range(10))), 0, 3, lm.new_kv())
        a = lm.head(ad(lm, h, 0, None), normed=True)
        b = lm.head(h)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.torch
def test_bundled_model_runners_are_lossless():
    """A short check on the bundled SmolLM2-135M (fp32) with the bundled adapters."""
    from simspec.calibrate import prompts as P
    from simspec.calibrate.adapter import load_adapters
    from simspec.calibrate.models import load_model
    from simspec.commands.calibrate_acceptance import _bundled_adapter_dir

    loaded = load_model("smollm2-135m", "fp32", "cpu")
    lm = LayeredLM(loaded.model)
    tok = loaded.tokenizer
    eos = tok.eos_token_id
    adir = _bundled_adapter_dir("smollm2-135m")
    ads = load_adapters(adir, lm) if adir else {}
    ex = sorted(ads)
    k_ad = ads.get(ex[0]) if ex else None
    runners = [DraftRunner(lm, 4, draft_layers=5, eos_token_id=eos),
               KangarooRunner(lm, ex[0] if ex else 2, k_ad, gamma=6, eta=0.6, eos_token_id=eos),
               HiSpecRunner(lm, ex[-2] if len(ex) >= 2 else 4, ex[-1] if len(ex) >= 2 else 8, ads, eos_token_id=eos)]
    text = "Translate German to English: Das Wetter ist heute schön, und wir gehen in den Park."
    ids = P.encode(tok, text)
    ref = greedy_reference(loaded.model, ids, 16, eos)
    for r in runners:
        res = r.generate(ids, 16)
        assert res.tokens == ref, f"{r.method} differs from greedy on the bundled model"
        assert sum(s.committed for s in res.steps) + 1 == len(ref)


@pytest.mark.torch
def test_calibrate_acceptance_cli_on_the_bundled_model(tmp_path):
    """`simspec calibrate acceptance` end to end: two qa prompts, a few tokens, one method."""
    import json

    from simspec.calibrate.profile_io import validate_partial
    from simspec.cli import main

    out = tmp_path / "p.json"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "acceptance", "--method", "kangaroo", "--category", "qa", "--limit-per-category", "2",
              "--max-new-tokens", "6", "--dtype", "fp32", "--threads", "1", "--check-lossless", "1",
              "--log-steps", str(tmp_path / "steps.jsonl"), "--out", str(out), "-q"])
    assert exc.value.code == 0
    doc = json.loads(out.read_text())
    validate_partial(doc, str(out))
    sec = doc["acceptance"]["kangaroo"]
    assert set(sec) == {"qa", "default"}
    e = sec["qa"]
    assert e["n_requests"] == 1 and e["heldout"]["n_requests"] == 1  # 2 prompts: one fitted, one held out
    assert e["settings"]["exit"] == 2 and e["settings"]["lossless_check"] == {"requests": 1, "mismatches": 0}
    assert len(e["confidence"]["accepted"]) == 6
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(len(json.loads(x)["tokens"]) == 6 for x in lines)
