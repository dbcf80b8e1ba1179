"""The analytic (roofline) profiles: plausible magnitudes, regimes, TP, capacity, bundled configs,
and the `simspec profile analytic` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simspec.analytic import (GPUS, Efficiency, ModelConfig, Roofline, build_profile, bundled_models,
                              load_model_config)
from simspec.errors import ConfigError
from simspec.profile import bundled_profiles, load_profile
from simspec.simulator.cost import CostModel


def test_llama2_7b_fp16_a100_decode_step_is_memory_bound_and_plausible():
    """Batch-1 decode of Llama-2-7B fp16 on one A100-80GB reads its weights once (13.5 GB in all;
    13.2 GB of layers and LM head — the embedding table is only gathered): 13.5 GB / 2.039 TB/s =
    6.6 ms is the hard floor at datasheet bandwidth; at the 80 % achievable bandwidth assumed here
    it is 8.1 ms, plus ~0.65 ms of kernel launches (32 layers x 10 kernels x 2 us). Published batch-1
    decode latencies of 7B fp16 models on A100 (vLLM, TensorRT-LLM) sit around 7-10 ms. The band
    6-12 ms accepts any sane efficiency assumption and rejects unit mistakes (x2 bytes, /TP, GB vs
    GiB, forgetting the weights or counting them per token) which land outside it."""
    m = load_model_config("llama-2-7b")
    assert 2 * m.params() == pytest.approx(13.48e9, rel=0.01)
    rf = Roofline(GPUS["a100-80gb"], "fp16")
    for ctx in (0, 128, 512):
        ms = float(rf.model_step_ms(m, 1, 1, ctx))
        assert 6.0 <= ms <= 12.0, ms
        assert ms >= 2 * m.params() / 2.039e12 * 1e3  # never faster than datasheet bandwidth allows
    # the same number through a built profile and the simulator's cost model
    cost = CostModel(_profile("a100-80gb", "llama-2-7b"))
    assert 6.0 <= cost.target_ms(1, 1, 0) <= 12.0
    # the cost model adds the engine's per-forward overhead (cuda-graph by default) to the stages
    assert cost.target_ms(1, 1, 0) == pytest.approx(float(rf.forward_ms(m, 1, 1, 0)), rel=1e-3)
    assert float(rf.forward_ms(m, 1, 1, 0)) - float(rf.model_step_ms(m, 1, 1, 0)) == pytest.approx(0.045)


def _profile(gpu, model, **kw):
    from simspec.profile import profile_from_doc

    return profile_from_doc(build_profile(gpu, load_model_config(model), **kw), "t")


def test_regimes_decode_memory_bound_prefill_compute_bound():
    m = load_model_config("llama-2-7b")
    rf = Roofline(GPUS["a100-80gb"])
    one, sixteen = float(rf.model_step_ms(m, 1, 1, 256)), float(rf.model_step_ms(m, 16, 1, 256))
    assert sixteen < 1.3 * one  # decode: weights dominate, batching is nearly free
    prefill = float(rf.model_step_ms(m, 1, 2048, 0))
    flops_floor = 2 * m.params() * 2048 / (312e12 * rf.eff.compute) * 1e3
    assert flops_floor <= prefill <= 1.5 * flops_floor  # prefill: compute dominates
    # a verification of k+1 tokens costs about one decode step while memory-bound
    assert float(rf.model_step_ms(m, 1, 5, 256)) < 1.1 * one
    # long context makes decode slower (KV reads), roughly by the KV bytes over bandwidth
    long = float(rf.model_step_ms(m, 32, 1, 4000))
    kv_ms = 32 * 4000 * m.kv_bytes_per_token(2) / (2.039e12 * 0.8) * 1e3
    assert long - float(rf.model_step_ms(m, 32, 1, 0)) == pytest.approx(kv_ms, rel=0.1)


def test_gpu_ordering_and_tensor_parallelism():
    m7 = load_model_config("llama-2-7b")
    t = {g: float(Roofline(GPUS[g]).model_step_ms(m7, 1, 1, 0)) for g in GPUS}
    assert t["h200"] < t["h100-sxm"] < t["a100-80gb"]
    m70 = load_model_config("llama-2-70b")
    tp1 = float(Roofline(GPUS["h100-sxm"], tp=1).layer_ms(m70, 1, 1, 0))
    tp4 = float(Roofline(GPUS["h100-sxm"], tp=4).layer_ms(m70, 1, 1, 0))
    assert tp1 / 4 < tp4 < tp1 / 2  # split weights, plus two all-reduces per layer
    step = float(Roofline(GPUS["h100-sxm"], tp=4).model_step_ms(m70, 1, 1, 0))
    assert 12.0 <= step <= 25.0  # ~138 GB / 4 GPUs / (0.8 x 3.35 TB/s) = 12.9 ms + launches, all-reduces
    # 8 KV heads over TP 8 → one each; over TP 16 they would be replicated (never fewer than one)
    assert m70.kv_bytes_per_token(2, 8) == m70.kv_bytes_per_token(2, 1)


def test_capacity_from_memory_minus_weights():
    doc = build_profile("a100-80gb", load_model_config("llama-2-7b"))
    eff = Efficiency.for_gpu(GPUS["a100-80gb"])
    usable = 80 * 2**30 * eff.memory_utilization - 2 * load_model_config("llama-2-7b").params() \
        - eff.activation_reserve_gib * 2**30
    assert doc["capacity"]["kv_budget_tokens"] == int(usable // (2 * 32 * 4096 * 2))
    assert doc["capacity"]["max_batch_size"] == 256
    with pytest.raises(ConfigError, match="does not fit"):
        build_profile("a100-80gb", load_model_config("llama-2-70b"))
    doc4 = build_profile("h100-sxm", load_model_config("llama-2-70b"), tp=4)
    assert 300_000 < doc4["capacity"]["kv_budget_tokens"] < 600_000


def test_bundled_model_configs():
    names = set(bundled_models())
    assert {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "vicuna-7b-v1.3", "llama-68m"} <= names
    want = {"llama-2-7b": (32, 6.74e9), "llama-2-13b": (40, 13.0e9), "llama-2-70b": (80, 69.0e9),
            "llama-3-8b": (32, 8.03e9), "vicuna-7b": (32, 6.74e9), "llama-68m": (2, 68e6)}
    for name, (layers, params) in want.items():
        m = load_model_config(name)
        assert m.num_layers == layers
        assert m.params() == pytest.approx(params, rel=0.02), name


def test_model_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="field hidden_size: missing"):
        ModelConfig.from_hf({"num_hidden_layers": 2}, "c.json")
    with pytest.raises(ConfigError, match="field num_hidden_layers: expected a positive integer"):
        ModelConfig.from_hf({"num_hidden_layers": -2}, "c.json")
    with pytest.raises(ConfigError, match="no bundled model"):
        load_model_config(str(tmp_path / "nope.json"))
    cfg = json.loads(bundled_models()["llama-3-8b"].read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert load_model_config(str(tmp_path / "m")).num_kv_heads == 8


def test_bundled_analytic_profiles():
    names = [n for n in bundled_profiles() if "analytic" in n]
    assert {"vicuna7b-a100-analytic", "llama2-70b-h100x4-analytic"} <= set(names)
    for name in names:
        p = load_profile(name)
        assert p.source == "analytic" and "ANALYTIC" in p.meta["description"] and "analytic" in p.meta["device"]
        assert {"layer", "lm_head", "embed", "adapter", "draft_step"} <= set(p.stages)
        assert "target_step" not in p.stages
        assert {"draft", "kangaroo", "hispec"} <= set(p.acceptance)
        for method in ("draft", "kangaroo", "hispec"):
            entry = p.acceptance[method]["default"]
            assert entry["note"] and entry["source"]
        assert 2.0 <= p.acceptance["kangaroo"]["default"]["mean_tokens_per_step"] <= 2.5
        for stage, doc in p.stages.items():
            ms = np.asarray(doc["ms"])
            assert (np.diff(ms, axis=0) >= 0).all() and (np.diff(ms, axis=1) >= 0).all() \
                and (np.diff(ms, axis=2) >= 0).all(), (name, stage)


@pytest.mark.parametrize("method", ["kangaroo", "hispec"])
def test_default_tau_is_what_the_simulator_produces(method):
    """The documented mean tokens per verification of the bundled defaults is what sampling gives
    (per-request Beta spread included), at the method's default k."""
    from simspec.simulator.methods import BatchStep, get_method_class

    p = load_profile("vicuna7b-a100-analytic")
    m = get_method_class(method)({}, p, CostModel(p))
    model = m.build_acceptance([p.acceptance[method]["default"]])
    m.bind_acceptance(model)
    n = 200_000
    cls = np.zeros(n, dtype=np.int64)
    alpha = model.draw_alphas(np.random.default_rng(0), cls)
    k = np.full(n, m.default_k)
    b = BatchStep(idx=np.arange(n), prefill=np.zeros(n, bool), fed_tokens=k + 1, ctx_tokens=np.full(n, 100),
                  k=k, remaining=np.full(n, 100), alpha=alpha, class_idx=cls)
    out = m.step(np.random.default_rng(1), b)
    assert np.mean(out.accepted + 1) == pytest.approx(p.acceptance[method]["default"]["mean_tokens_per_step"],
                                                      rel=0.01)


def _cli(capsys, *args):
    from simspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_profile_analytic_command(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, err = _cli(capsys, "profile", "analytic", "--gpu", "h200", "--model", "llama-3-8b", "--draft",
                             "llama-68m", "--dtype", "bf16", "--out", out)
    assert code == 0, err
    assert "analytic" in stdout
    p = load_profile(str(out))
    assert p.source == "analytic" and p.meta["dtype"] == "bf16"
    assert p.models["target"]["num_layers"] == 32 and p.models["draft"]["num_layers"] == 2
    assert p.stages["layer"]["axes"]["context_tokens"][-1] == 8192
    # refuses to overwrite; bad inputs are one-line errors
    code, _, err = _cli(capsys, "profile", "analytic", "--gpu", "h200", "--model", "llama-3-8b", "--out", out)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    for args, msg in ((["--model", tmp_path / "missing.json"], "no bundled model"),
                      (["--model", "llama-2-70b"], "does not fit"),
                      (["--model", "llama-2-7b", "--tp", "3"], "does not divide")):
        code, _, err = _cli(capsys, "profile", "analytic", "--gpu", "a100-80gb", *args, "--out", tmp_path / "x.json")
        assert code == 2 and msg in err and err.count("\n") == 1, err
    # the new profile replays every method
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,100,30\nr1,0.01,300,12\n")
    for spec in ("none", "draft:k=4", "kangaroo", "hispec"):
        code, stdout, err = _cli(capsys, "replay", trace, "--profile", out, "--spec", spec, "--out",
                                 tmp_path / f"run-{spec}", "-q")
        assert code == 0, err
