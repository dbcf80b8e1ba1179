"""Exit adapters: a few training steps lower the self-distillation loss; save/load round trip; bad
adapter directories are one-line errors."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from simspec.calibrate.adapter import (ExitAdapter, build_distill_data, load_adapters,  # noqa: E402
                                       read_adapter_info, save_adapters, train_exit)
from simspec.calibrate.early_exit import LayeredLM  # noqa: E402
from simspec.errors import SimspecError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20)
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(10)
            layer.mlp.down_proj.weight.mul_(10)
    for p in m.parameters():
        p.requires_grad_(False)
    return LayeredLM(m)


def _data(lm, seed, n=6, length=24):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        seqs.append((ids[:8], ids[8:]))
    return build_distill_data(lm, seqs, [1, 2], top_k=16)


def test_a_few_training_steps_lower_the_loss(lm):
    train, held = _data(lm, 1), _data(lm, 2)
    assert train.n_tokens == 6 * 24 and train.hidden[1][0].shape == (24, 64)
    ad = ExitAdapter(lm, 1, 4)
    rep = train_exit(lm, ad, train, held, steps=30, lr=3e-2, tokens_per_step=64, seed=0)
    assert rep.steps == 30 and len(rep.losses) == 30
    assert sum(rep.losses[-5:]) / 5 < 0.95 * sum(rep.losses[:5]) / 5
    assert rep.heldout_loss_after < rep.heldout_loss_before
    assert 0.0 <= rep.agreement_before <= 1.0 and 0.0 <= rep.agreement_after <= 1.0
    assert not any(p.requires_grad for p in ad.parameters())  # frozen again after training


def test_save_load_round_trip(lm, tmp_path):
    ads = {1: ExitAdapter(lm, 1, 4), 2: ExitAdapter(lm, 2, 5)}
    with torch.no_grad():
        for a in ads.values():
            a.attn.o_proj.weight.normal_()
    save_adapters(tmp_path, ads, {"num_layers": 4, "hidden_size": 64, "exits": {"1": {"agreement_after": 0.5}}},
                  dtype=torch.float32)
    info = read_adapter_info(tmp_path)
    assert sorted(info["exits"]) == ["1", "2"] and info["exits"]["1"]["agreement_after"] == 0.5
    assert (tmp_path / "exit2.safetensors").is_file()
    back = load_adapters(tmp_path, lm)
    assert sorted(back) == [1, 2] and back[1].slot == 4 and back[2].slot == 5
    h = torch.randn(1, 5, 64)
    with torch.no_grad():
        for e in (1, 2):
            assert torch.allclose(back[e](lm, h, 0, None), ads[e](lm, h, 0, None), atol=1e-6)
    only = load_adapters(tmp_path, lm, [2])
    assert list(only) == [2] and only[2].slot == 4


def test_bad_adapter_dirs(lm, tmp_path):
    with pytest.raises(SimspecError, match="no adapter.json"):
        read_adapter_info(tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(SimspecError, match="field format"):
        read_adapter_info(tmp_path)
    save_adapters(tmp_path, {1: ExitAdapter(lm, 1, 4)}, {"num_layers": 4, "hidden_size": 64})
    with pytest.raises(SimspecError, match="no adapter for exit layer 3"):
        load_adapters(tmp_path, lm, [3])
    doc = json.loads((tmp_path / "adapter.json").read_text())
    doc["num_layers"] = 30
    (tmp_path / "adapter.json").write_text(json.dumps(doc))
    with pytest.raises(SimspecError, match="30 layers"):
        load_adapters(tmp_path, lm)
    with pytest.raises(SimspecError, match="exit layer 4"):
        ExitAdapter(lm, 4, 4)


def test_adapter_cli_refuses_existing_dir(tmp_path, capsys):
    from simspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "adapter", "--exit", "2", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_train_adapters_end_to_end(lm, tmp_path):
    """Continuations, teacher pass, two exits, save: the whole `calibrate adapter` pipeline on a tiny model."""
    from simspec.calibrate.adapter import train_adapters

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 9, 12)]
    ads, reps, summary = train_adapters(lm, None, prompts[:2], prompts[2:], [1, 2], max_new_tokens=6, steps=4,
                                        tokens_per_step=16, top_k=8)
    assert sorted(ads) == [1, 2] and ads[1].slot == 4 and ads[2].slot == 5
    assert summary["train_tokens"] == 6 + 9 + 2 * 6 and summary["heldout_scored_tokens"] == 6
    assert all(len(r.losses) == 4 for r in reps.values())
    save_adapters(tmp_path / "ad", ads, {"num_layers": 4, "hidden_size": 64})
    assert sorted(load_adapters(tmp_path / "ad", lm)) == [1, 2]
