"""Analytic drafter stages for EAGLE / EAGLE-3 heads, Medusa heads and MTP modules (from the bundled
public configs), and the tree methods pricing their passes with them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simspec.analytic import Roofline, build_profile, load_model_config
from simspec.analytic_heads import head_params, head_pass_ms, load_head
from simspec.errors import ConfigError
from simspec.profile import profile_from_doc
from simspec.simulator.cost import CostModel
from simspec.simulator.methods import get_method_class


@pytest.fixture(scope="module")
def vicuna():
    return load_model_config("vicuna-7b")


def test_head_params_from_the_public_configs(vicuna):
    h, v = 4096, 32000
    eagle = load_head("eagle", "eagle-vicuna-7b-v1.3", vicuna)
    # fc 2h×h + one Llama decoder layer (QKV, O, gate/up/down, 2 norms)
    assert head_params(vicuna, eagle) == 2 * h * h + vicuna.layer_params()
    medusa = load_head("medusa", "medusa-vicuna-7b-v1.3", vicuna)
    assert medusa.n_heads == 5 and head_params(vicuna, medusa) == 5 * (h * h + h * v)
    llama3 = load_model_config("llama-3-8b")
    e3 = load_head("eagle3", "eagle3-llama3.1-8b", llama3)
    assert e3.draft_vocab == 32000
    # fc 3h×h + a layer + the extra h×(q+2kv) of its 2h-wide QKV input + its own 32k LM head
    assert head_params(llama3, e3) == (3 * h * h + e3.config.layer_params() + h * (4096 + 2 * 1024) + 32000 * h)


def test_head_stage_composition(vicuna):
    rf = Roofline("a100-80gb", "fp16", 1)
    B, t, c = 8.0, 1.0, 512.0
    eagle = load_head("eagle", "eagle-vicuna-7b-v1.3", vicuna)
    mtp = load_head("mtp", None, vicuna)
    e = float(head_pass_ms(rf, vicuna, eagle, B, t, c))
    # at least one target layer + the LM head, at most that plus the fc and embedding and kernel gaps
    base = float(rf.layer_ms(vicuna, B, t, c) + rf.lm_head_ms(vicuna, B, t, c))
    assert base < e < base + 0.2
    assert float(head_pass_ms(rf, vicuna, mtp, B, t, c)) == pytest.approx(e)  # same shape for a dense target
    medusa = load_head("medusa", "medusa-vicuna-7b-v1.3", vicuna)
    one = float(rf.lm_head_ms(vicuna, B, t, c))
    assert 5 * one * 0.9 < float(head_pass_ms(rf, vicuna, medusa, B, t, c)) < 5 * one * 1.3
    # EAGLE-3's reduced vocabulary: its LM head part is a quarter of the full one's
    llama3 = load_model_config("llama-3-8b")
    e3 = load_head("eagle3", "eagle3-llama3.1-8b", llama3)
    full = e3.__class__(e3.kind, e3.config, 1, 128256, e3.source)
    assert float(head_pass_ms(rf, llama3, e3, B, t, c)) < float(head_pass_ms(rf, llama3, full, B, t, c))


def test_profile_with_heads_prices_the_methods(vicuna):
    heads = [load_head("eagle", "eagle-vicuna-7b-v1.3", vicuna), load_head("medusa", "medusa-vicuna-7b-v1.3", vicuna),
             load_head("mtp", None, vicuna)]
    doc = build_profile("a100-80gb", vicuna, heads=heads, date="2026-01-01", max_batch=16)
    prof = profile_from_doc(doc, "heads")
    cost = CostModel(prof)
    for method, stage in (("eagle", "eagle_head"), ("medusa", "medusa_heads"), ("mtp", "mtp_head")):
        m = get_method_class(method)({}, prof, cost)
        assert stage in m.stages_used()
        assert not m.composed
    m = get_method_class("eagle")({}, prof, cost)
    ms = m.drafter_pass_ms(4, 4, 4 * 512.0)
    assert ms == pytest.approx(cost.stage_compute_ms("eagle_head", 4, 4, 2048.0) + cost.forward_overhead_ms("draft"))
    assert doc["models"]["eagle_head"]["weights_bytes"] == 2 * head_params(vicuna, heads[0])
    assert doc["models"]["medusa_heads"]["kv_bytes_per_token"] == 0


def test_bad_head_configs_name_the_field(tmp_path, vicuna):
    p = tmp_path / "h.json"
    p.write_text(json.dumps({"medusa_num_heads": 0}))
    with pytest.raises(ConfigError, match="field medusa_num_heads"):
        load_head("medusa", str(p), vicuna)
    p.write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 2048, "intermediate_size": 8, "num_attention_heads": 16,
                             "vocab_size": 32000}))
    with pytest.raises(ConfigError, match="field hidden_size: 2048 does not match"):
        load_head("eagle", str(p), vicuna)
    with pytest.raises(ConfigError, match="no such file"):
        load_head("eagle3", str(tmp_path / "none.json"), vicuna)
    assert np.isfinite(float(head_pass_ms(Roofline("h100-sxm", "fp16", 2), vicuna, load_head("mtp", None, vicuna),
                                          4.0, 2.0, 100.0)))
