"""Cost-model fidelity (issue 14): each new cost term pinned by a hand-worked case — per-forward
overhead in the profile and the cost model, numpy-array cost evaluation, engine modes, the smooth
roofline, GPUs as data (--gpu-spec), draft placement and capacity, the calibrated intercept, the
draft_layers refusal, and --explain."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from simspec.analytic import (ENGINES, GPUS, Efficiency, Roofline, build_profile, kv_capacity, load_model_config,
                              smooth_max)
from simspec.errors import ConfigError, ProfileError
from simspec.profile import load_profile, profile_from_doc
from simspec.simulator.cost import CostModel


def _lin(c0: float) -> dict:
    return {"kind": "linear", "coef": {"c0": c0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}}


def _doc(version: int = 2, forward: dict | None = None, draft_step: bool = True) -> dict:
    stages = {"layer": _lin(1.0), "lm_head": _lin(0.5), "embed": _lin(0.25), "adapter": _lin(0.3)}
    if draft_step:
        stages["draft_step"] = _lin(0.2)
    lat = {"unit": "ms", "overhead": {"fraction": 0.1, "fixed_ms": 1.0}, "stages": stages}
    if forward is not None:
        lat["forward_overhead"] = forward
    return {"schema": "simspec-profile", "schema_version": version,
            "meta": {"name": "fwd-test", "source": "analytic"},
            "models": {"target": {"num_layers": 4}}, "latency": lat,
            "acceptance": {"draft": {"default": {"alpha": {"kind": "fixed", "value": 0.5}}}}}


FWD = {"target_ms": 2.0, "draft_ms": 0.7, "early_exit_ms": 0.4}


# ------------------------------------------------------------------ per-forward overhead


def test_per_forward_overhead_hand_worked():
    cost = CostModel(profile_from_doc(_doc(forward=FWD)))
    # target: 4 layers x 1 + lm_head 0.5 + embed 0.25 + per-forward 2.0
    assert cost.target_ms(1, 1, 0) == pytest.approx(6.75)
    assert cost.forward_overhead_ms("target") == 2.0 and cost.forward_overhead_ms("draft") == 0.7
    # a draft pass is the draft_step stage + the draft's per-forward overhead
    assert cost.stage_ms("draft_step", 1, 1, 0) == pytest.approx(0.9)
    assert cost.draft_ms(3, 3, 30) == pytest.approx(0.9)
    assert cost.stage_compute_ms("draft_step", 1, 1, 0) == pytest.approx(0.2)
    # early-exit head pass (HiSpec draft): layers 0..1 + embed + head + early-exit overhead
    assert cost.slice_ms(0, 2, 1, 1, 0, embed=True, lm_head=True) == pytest.approx(2 + 0.25 + 0.5 + 0.4)
    # a slice ending at the last layer with the head is a verification: the target's overhead
    assert cost.slice_ms(2, 4, 1, 5, 0, lm_head=True) == pytest.approx(2 + 0.5 + 2.0)
    # a slice without the head ends no forward; a direct lm_head is an early-exit head (Kangaroo round)
    assert cost.slice_ms(0, 2, 1, 1, 0, embed=True) == pytest.approx(2.25)
    assert cost.stage_ms("lm_head", 1, 1, 0) == pytest.approx(0.9)
    # nothing runs, nothing is paid
    assert cost.target_ms(0, 0, 0) == 0.0 and cost.stage_ms("draft_step", 0, 0, 0) == 0.0
    # per step: scheduler overhead on top (fraction 0.1, fixed 1 ms), separate from per forward
    assert cost.finish(cost.target_ms(1, 1, 0)) == pytest.approx(6.75 * 1.1 + 1.0)


def test_draft_method_pays_the_draft_overhead_per_pass_without_method_changes():
    from simspec.simulator.methods import get_method_class

    p = profile_from_doc(_doc(forward=FWD))
    m = get_method_class("draft")({"k": 3}, p, CostModel(p))
    draft, verify = m.stage_estimates_ms(1, 0.0, 3)
    assert draft == pytest.approx(0.9) and verify == pytest.approx(6.75)
    # 3 draft passes of 0.9 + verification 6.75, then x1.1 + 1 ms per step
    assert m.expected_step_ms(1, 0.0, 3) == pytest.approx((3 * 0.9 + 6.75) * 1.1 + 1.0)


def test_early_exit_role_defaults_to_target():
    cost = CostModel(profile_from_doc(_doc(forward={"target_ms": 1.5})))
    assert cost.forward_overhead_ms("early_exit") == 1.5 and cost.forward_overhead_ms("draft") == 0.0


def test_version_1_profiles_load_with_zero_overhead_and_cannot_carry_it():
    cost = CostModel(profile_from_doc(_doc(version=1)))
    assert cost.target_ms(1, 1, 0) == pytest.approx(4.75)
    assert cost.stage_ms("draft_step", 1, 1, 0) == pytest.approx(0.2)
    with pytest.raises(ProfileError, match="latency.forward_overhead: needs schema_version 2"):
        profile_from_doc(_doc(version=1, forward=FWD))
    with pytest.raises(ProfileError, match=r"latency.forward_overhead.draft_ms: must be >= 0"):
        profile_from_doc(_doc(forward={"draft_ms": -1}))
    with pytest.raises(ProfileError, match=r"latency.forward_overhead.verify_ms: unknown field"):
        profile_from_doc(_doc(forward={"verify_ms": 1}))
    with pytest.raises(ProfileError, match="schema_version"):
        profile_from_doc({**_doc(), "schema_version": 3})


# ------------------------------------------------------------------ numpy arrays


def test_cost_model_accepts_arrays_elementwise_bit_for_bit():
    p = load_profile("vicuna7b-a100-eager-analytic")
    cost = CostModel(p)
    rng = np.random.default_rng(0)
    B = rng.integers(0, 40, 200).astype(float)
    B[:5] = 0
    T = B * rng.integers(1, 9, 200)
    KV = B * rng.integers(0, 1900, 200)
    spec = rng.random(200) < 0.5
    arr = cost.target_ms(B, T, KV, spec)
    assert arr.shape == (200,)
    for i in range(200):
        assert arr[i] == cost.target_ms(float(B[i]), float(T[i]), float(KV[i]), bool(spec[i]))
    assert (arr[:5] == 0).all()
    for fn in (lambda b, t, k: cost.stage_ms("draft_step", b, b, k), lambda b, t, k: cost.layers_ms(3, b, t, k),
               lambda b, t, k: cost.slice_ms(0, 2, b, b, k, embed=True, lm_head=True, adapter=True),
               lambda b, t, k: cost.slice_ms(2, 32, b, t, k, lm_head=True), lambda b, t, k: cost.finish(
                   cost.target_ms(b, t, k))):
        got = fn(B, T, KV)
        want = [fn(float(b), float(t), float(k)) for b, t, k in zip(B, T, KV)]
        assert np.array_equal(got, np.asarray(want)), fn
    # linear stages, broadcasting a scalar against an array
    lin = CostModel(profile_from_doc(_doc(forward=FWD)))
    got = lin.target_ms(np.array([0.0, 1.0, 2.0]), 4.0, 0.0)
    assert np.array_equal(got, [0.0, 6.75, 6.75])


# ------------------------------------------------------------------ smooth roofline


def test_smooth_max_shape():
    assert float(smooth_max(1.0, 1.0, 3.0)) == pytest.approx(2 ** (1 / 3))  # the ridge: 1.26x either roof
    assert float(smooth_max(2.0, 0.0, 3.0)) == 2.0  # a pure memory (or compute) operator is unchanged
    assert float(smooth_max(3.0, 4.0, 2.0)) == pytest.approx(5.0)
    assert float(smooth_max(3.0, 4.0, math.inf)) == 4.0  # p = inf is the hard max
    a = np.linspace(0.0, 4.0, 401)
    y = smooth_max(a, 1.0, 3.0)
    assert (np.diff(y) > 0).all()  # monotone
    ratio = y / np.maximum(a, 1.0)
    assert ratio.max() == pytest.approx(2 ** (1 / 3)) and a[ratio.argmax()] == pytest.approx(1.0)
    assert (ratio >= 1.0).all()
    # 2x away from the ridge the bend is small: (1 + 2^-3)^(1/3) = 1.04
    assert float(smooth_max(2.0, 1.0, 3.0)) / 2.0 == pytest.approx((1 + 0.125) ** (1 / 3))
    # slope continuous through the ridge (no kink): finite differences either side agree
    h = 1e-4
    left = (float(smooth_max(1.0, 1.0, 3.0)) - float(smooth_max(1.0 - h, 1.0, 3.0))) / h
    right = (float(smooth_max(1.0 + h, 1.0, 3.0)) - float(smooth_max(1.0, 1.0, 3.0))) / h
    assert left == pytest.approx(right, rel=1e-3)


def test_gemm_time_hand_worked_and_gradual_knee():
    rf = Roofline("a100-80gb", "fp16")  # hbm-ampere class: compute 0.70, bandwidth 0.80, p = 3
    assert rf.flops_per_s == pytest.approx(312e12 * 0.70) and rf.bytes_per_s == pytest.approx(2.039e12 * 0.80)
    W, din, dout = 4096 * 12288, 4096, 12288
    for T in (1.0, 64.0, 512.0):
        tc = 2 * T * W / (312e12 * 0.70)
        tm = 2 * (W + T * (din + dout)) / (2.039e12 * 0.80)
        assert float(rf._gemm(T, W, din, dout)) == pytest.approx((tc ** 3 + tm ** 3) ** (1 / 3), rel=1e-12)
    # the per-token cost of a decode GEMM rises gradually: no T where a hard max's kink shows
    Ts = np.arange(1, 1025, dtype=float)
    t = rf._gemm(Ts, W, din, dout)
    slope = np.diff(t)
    assert (np.diff(slope) > -1e-12).all()  # convex, smooth: the slope only grows
    hard = np.maximum(2 * Ts * W / rf.flops_per_s, 2 * (W + Ts * (din + dout)) / rf.bytes_per_s)
    assert (t >= hard).all() and (t / hard).max() <= 2 ** (1 / 3) + 1e-9


def test_efficiency_per_gpu_class():
    assert Efficiency.for_gpu(GPUS["a100-80gb"]).compute == 0.70
    assert Efficiency.for_gpu(GPUS["h100-sxm"]).compute == 0.65
    assert Efficiency.for_gpu(GPUS["mi300x"]).bandwidth == 0.70
    assert Efficiency.for_gpu(GPUS["l4"], compute=0.5).compute == 0.5


# ------------------------------------------------------------------ engine modes


def test_engine_modes_hand_worked_on_a_small_draft():
    d = load_model_config("llama-68m")
    eager = Roofline("a100-80gb", "fp16", engine="eager")
    graph = Roofline("a100-80gb", "fp16", engine="cuda-graph")
    # a 68M layer at batch 1 is ~12 us of GPU work: eager is host-bound at 36 x 8.4 us
    assert float(eager.layer_ms(d, 1, 1, 0)) == pytest.approx(36 * 8.4e-3)
    gpu = float(sum(graph.layer_parts(d, 1, 1, 0).values())) * 1e3
    assert float(graph.layer_ms(d, 1, 1, 0)) == pytest.approx(gpu + 10 * 2e-3)
    # eager draft forward: embed 10 x 8.4 us + 2 layers + head 7 x 8.4 us (host-bound) + 0.265 ms
    assert float(eager.forward_ms(d, 1, 1, 0)) == pytest.approx(0.084 + 2 * 0.3024 + 0.0588 + 0.265, abs=1e-9)
    # a 7B layer is GPU-bound even eager: 36 kernels add only their gaps
    m = load_model_config("llama-2-7b")
    gpu7 = float(sum(eager.layer_parts(m, 1, 1, 0).values())) * 1e3
    assert float(eager.layer_ms(m, 1, 1, 0)) == pytest.approx(gpu7 + 36 * 2e-3)
    assert ENGINES["eager"].per_forward_ms == 0.265 and ENGINES["cuda-graph"].per_forward_ms == 0.045


def test_issue_case_7b_target_68m_draft_a100_batch1_k4():
    """The closing note of issue 14: speculative/plain step-time ratio and predicted speedup at
    tau = 2.3 for a 7B target with a 68M draft on A100, batch 1, k = 4 (context 0), per engine."""
    m, d = load_model_config("llama-2-7b"), load_model_config("llama-68m")
    got = {}
    for eng in ("eager", "cuda-graph"):
        rf = Roofline("a100-80gb", "fp16", engine=eng)
        plain = float(rf.forward_ms(m, 1, 1, 0))
        spec = 4 * float(rf.forward_ms(d, 1, 1, 0)) + float(rf.forward_ms(m, 1, 5, 0))
        got[eng] = spec / plain
    assert got["eager"] == pytest.approx(1.378, abs=2e-3)
    assert got["cuda-graph"] == pytest.approx(1.069, abs=2e-3)
    assert 2.3 / got["eager"] == pytest.approx(1.67, abs=0.01)
    assert 2.3 / got["cuda-graph"] == pytest.approx(2.15, abs=0.01)
    # the same through a built profile and the simulator's draft method
    from simspec.simulator.methods import get_method_class

    for eng in ("eager", "cuda-graph"):
        p = profile_from_doc(build_profile("a100-80gb", m, draft=d, engine=eng), "t")
        cost = CostModel(p)
        spec = get_method_class("draft")({"k": 4}, p, cost).expected_step_ms(1, 0.0, 4)
        plain = get_method_class("none")({}, p, cost).expected_step_ms(1, 0.0, 0)
        assert spec / plain == pytest.approx(got[eng], rel=2e-3)


# ------------------------------------------------------------------ GPUs as data


def test_bundled_gpu_table():
    want = {"h100-sxm", "h200", "a100-80gb", "a100-40gb", "l4", "l40s", "rtx-4090", "rtx-3090", "a10g", "h20",
            "b200", "mi300x"}
    assert want <= set(GPUS)
    for g in GPUS.values():
        assert g.source and g.peak_tflops > 0 and g.hbm_tb_s > 0 and g.memory_bytes > 0 and g.nvlink_gb_s > 0
    assert GPUS["a100-40gb"].hbm_tb_s == 1.555 and GPUS["mi300x"].peak_tflops == 1307.4
    assert GPUS["h100-sxm"].peak_for("fp8") == 1979.0 and GPUS["a100-80gb"].peak_for("fp8") is None
    with pytest.raises(ConfigError, match="no fp8 tensor-core peak"):
        Roofline("a100-80gb", "fp8")
    # fp8 halves the bytes: a batch-1 decode on H100 is ~half the time
    m = load_model_config("llama-2-7b")
    r16 = float(Roofline("h100-sxm", "fp16").model_step_ms(m, 1, 1, 0))
    r8 = float(Roofline("h100-sxm", "fp8").model_step_ms(m, 1, 1, 0))
    assert 0.45 < r8 / r16 < 0.65
    # a slower GPU gives a different answer (the issue: identical answers on two GPUs)
    t = {g: float(Roofline(g).forward_ms(m, 1, 1, 0)) for g in ("l4", "rtx-4090", "a100-40gb", "a100-80gb")}
    assert t["l4"] > t["a100-40gb"] > t["a100-80gb"] and t["rtx-4090"] > t["a100-80gb"]


def _cli(capsys, *args):
    from simspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


def test_gpu_spec_file(tmp_path, capsys):
    table = json.loads((__import__("importlib").resources.files("simspec") / "data" / "gpus.json").read_text())
    entry = copy.deepcopy(table["gpus"]["l4"])
    spec = tmp_path / "my-l4.json"
    spec.write_text(json.dumps(entry))
    out = tmp_path / "p.json"
    code, stdout, err = _cli(capsys, "profile", "analytic", "--gpu-spec", spec, "--model", "llama-2-7b", "--out", out)
    assert code == 0, err
    ref = build_profile("l4", load_model_config("llama-2-7b"))
    assert json.loads(out.read_text())["latency"]["stages"]["layer"]["ms"] == ref["latency"]["stages"]["layer"]["ms"]
    for field in ("memory_bandwidth_tb_s", "peak_tflops_fp8", "class"):
        bad = dict(entry)
        del bad[field]
        spec.write_text(json.dumps(bad))
        code, _, err = _cli(capsys, "profile", "analytic", "--gpu-spec", spec, "--model", "llama-2-7b", "--out",
                            tmp_path / "x.json")
        assert code == 2 and f"field {field}: missing" in err and err.count("\n") == 1, err
    spec.write_text(json.dumps({**entry, "memory_gib": -1}))
    code, _, err = _cli(capsys, "profile", "analytic", "--gpu-spec", spec, "--model", "llama-2-7b", "--out",
                        tmp_path / "x.json")
    assert code == 2 and "field memory_gib: expected a number > 0" in err
    code, _, err = _cli(capsys, "profile", "analytic", "--model", "llama-2-7b", "--out", tmp_path / "x.json")
    assert code == 2 and "--gpu NAME or --gpu-spec FILE" in err


# ------------------------------------------------------------------ draft placement and capacity


def test_draft_placement_and_capacity_hand_worked():
    h = GPUS["h100-sxm"]
    eff = Efficiency.for_gpu(h)
    m70, d7 = load_model_config("llama-2-70b"), load_model_config("llama-2-7b")
    # draft on all 4 GPUs: the pooled formula
    per_gpu = 80 * 2**30 * 0.9 - 2 * 2**30
    pooled = (4 * per_gpu - 2 * m70.params() - 2 * d7.params()) // (
        m70.kv_bytes_per_token(2, 4) + d7.kv_bytes_per_token(2, 4))
    assert kv_capacity(h, eff, "fp16", m70, 4, d7, 4) == int(pooled)
    # draft on 1 GPU: that GPU holds the whole draft, so it bounds the budget
    one = (per_gpu - 2 * m70.params() / 4 - 2 * d7.params()) // (
        m70.kv_bytes_per_token(2, 4) / 4 + d7.kv_bytes_per_token(2, 1))
    assert kv_capacity(h, eff, "fp16", m70, 4, d7, 1) == int(one) < int(pooled)
    # defaults: the draft takes the target's TP
    doc = build_profile("h100-sxm", m70, draft=d7, tp=4)
    assert doc["meta"]["analytic"]["draft_tp"] == 4 and doc["models"]["draft"]["placement"]["gpus"] == 4
    rf = Roofline("h100-sxm", tp=4)
    # a 7B draft for a 70B TP4 target: sharded it costs far less than unsharded
    t1 = float(rf.model_step_ms(d7, 1, 1, 0, tp=1))
    t4 = float(rf.model_step_ms(d7, 1, 1, 0, tp=4))
    target = float(rf.model_step_ms(m70, 1, 1, 0))
    assert t4 < 0.5 * t1 and t1 / target > 0.3 > t4 / target
    # pipeline: the unsharded forward plus (p-1) hops of B*t*h*s bytes
    hop = eff.allreduce_us * 1e-3 + 2 * 4096 / (450e9 * 0.7) * 1e3
    assert float(rf.model_step_ms(d7, 1, 1, 0, tp=4, pipeline=True)) == pytest.approx(t1 + 3 * hop)
    with pytest.raises(ConfigError, match="shares the target's 4 GPU"):
        build_profile("h100-sxm", m70, draft=d7, tp=4, draft_tp=8)
    with pytest.raises(ConfigError, match="does not divide the 12 attention heads"):
        build_profile("h100-sxm", m70, draft=load_model_config("llama-68m"), tp=8, draft_tp=8)
    with pytest.raises(ConfigError, match="pipeline stages"):
        build_profile("h100-sxm", m70, draft=load_model_config("llama-68m"), tp=4, draft_parallel="pipeline")


def test_capacity_error_names_target_and_draft(tmp_path, capsys):
    code, _, err = _cli(capsys, "profile", "analytic", "--gpu", "a100-40gb", "--model", "llama-2-13b", "--draft",
                        "llama-2-7b", "--out", tmp_path / "x.json")
    assert code == 2 and err.count("\n") == 1
    assert "target meta-llama/Llama-2-13b-hf" in err and "draft meta-llama/Llama-2-7b-hf" in err
    code, _, err = _cli(capsys, "profile", "analytic", "--gpu", "a100-40gb", "--model", "llama-2-70b", "--draft",
                        "llama-68m", "--out", tmp_path / "x.json")
    assert code == 2 and "Llama-2-70b-hf" in err and "does not fit" in err and "draft" not in err


# ------------------------------------------------------------------ calibrate, draft_layers, explain


def test_fit_forward_overhead_hand_worked():
    from simspec.calibrate.fit import fit_forward_overhead

    fit = fit_forward_overhead([10.0, 12.0, 11.0], [9.0, 10.5, 10.2])  # differences 1.0, 1.5, 0.8
    assert fit["target_ms"] == pytest.approx(1.0) and fit["n"] == 3
    assert fit["residuals_ms"] == pytest.approx([0.0, 0.5, -0.2])
    assert fit["with_overhead_mape_pct"] < fit["composed_mape_pct"]
    assert fit_forward_overhead([5.0], [6.0])["target_ms"] == 0.0  # parts overstate the whole: clipped
    from simspec.calibrate.latency import forward_overhead_doc

    comp = {"points": [[1, 1, 0, 10.0, 9.0], [1, 5, 0, 12.0, 10.5], [4, 4, 0, 11.0, 10.2]]}
    doc = forward_overhead_doc(comp)
    assert doc["target_ms"] == pytest.approx(1.0) and doc["draft_ms"] == 0.0
    p = _doc()
    p["latency"]["forward_overhead"] = doc
    assert CostModel(profile_from_doc(p)).target_ms(1, 1, 0) == pytest.approx(5.75)


def test_draft_layers_with_a_draft_step_stage_is_refused():
    from simspec.simulator.methods import get_method_class

    p = profile_from_doc(_doc())
    with pytest.raises(ConfigError, match="draft_layers=2 would be ignored") as exc:
        get_method_class("draft")({"k": 4, "draft_layers": 2}, p, CostModel(p))
    assert "\n" not in str(exc.value)
    get_method_class("draft")({"k": 4}, p, CostModel(p))  # fine without it
    q = profile_from_doc(_doc(draft_step=False))
    get_method_class("draft")({"k": 4, "draft_layers": 2}, q, CostModel(q))  # used when there is no draft_step


def test_explain_prints_the_per_operator_breakdown(capsys):
    code, out, err = _cli(capsys, "profile", "analytic", "--gpu", "a100-80gb", "--model", "llama-2-7b", "--draft",
                          "llama-68m", "--engine", "eager", "--explain", "--context", "0", "--k", "4")
    assert code == 0, err
    for needle in ("target.layer / qkv_gemm", "target.layer / attention", "target.lm_head / vocab_gemm",
                   "per-forward overhead", "draft.layer / 36 kernels: host issue (eager)", "speculative/plain = 1.378"):
        assert needle in out, needle
    # the breakdown adds up to the plain step the profile charges
    line = next(ln for ln in out.splitlines() if ln.startswith("plain step"))
    plain = float(line.split(":")[1].split()[0])
    p = profile_from_doc(build_profile("a100-80gb", load_model_config("llama-2-7b"), engine="eager"))
    assert CostModel(p).target_ms(1, 1, 0) == pytest.approx(plain, rel=1e-3)
