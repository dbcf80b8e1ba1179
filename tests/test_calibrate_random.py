"""Random-weight latency calibration from a model config (no weights, no tokenizer, no network):
config resolution, a tiny 2-layer config profiled on CPU in seconds, shape skipping (token budget,
window) with filled grid nodes, one-line errors, the numpy-only NNLS fallback, and the CUDA paths
(eager and CUDA graphs), which run only where CUDA is present."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from simspec.calibrate.fit import Point, _nnls_small, fit_stage
from simspec.profile import load_profile

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 300,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "_name_or_path": "tiny-random-llama",
               "_simspec_source": "test"}
GRID = {"batch_sizes": [1, 4], "tokens_per_request": [1, 5, 64], "context_tokens": [0, 128, 512],
        "heldout": [[2, 3, 100], [3, 1, 200]], "warmup": 1, "min_repeats": 2, "max_repeats": 3,
        "target_s": 0.01, "composition_check": [[1, 1, 128]]}


def _simspec(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "simspec.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tiny_files(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps(GRID))
    return cfg, grid


def test_config_resolution_bundled_and_errors(tmp_path):
    pytest.importorskip("transformers")
    from simspec.calibrate.models import config_from_json, resolve_config_path
    from simspec.errors import SimspecError

    for name, kvh in (("llama-2-7b", 32), ("llama2-7b", 32), ("llama-3-8b", 8)):
        cfg, path = config_from_json(name)
        assert cfg.hidden_size == 4096 and cfg.num_hidden_layers == 32 and cfg.num_key_value_heads == kvh
        assert path.name.startswith("llama-")
    with pytest.raises(SimspecError, match="no such file"):
        resolve_config_path(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(SimspecError, match="model_type"):
        config_from_json(str(bad))


@pytest.mark.parametrize("args, needle", [
    (["--random-weights"], "--random-weights: give the model's --config"),
    (["--config", "llama-2-7b"], "--config: only with --random-weights"),
    (["--config", "no-such-model", "--random-weights"], "--config 'no-such-model'"),
    (["--config", "llama-2-7b", "--random-weights", "--cuda-graphs"], "--cuda-graphs: needs --device cuda"),
])
def test_bad_random_options_one_line_exit_2(tmp_path, args, needle):
    r = _simspec("calibrate", "latency", *args, "--out", str(tmp_path / "x.json"))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_fill_missing_nodes_and_numpy_nnls():
    pts = [Point(b, t, c, 1.0 + 0.5 * b + 0.1 * b * t + 0.001 * b * c, 0.0, 3)
           for b in (1, 2) for t in (1, 4) for c in (0, 100) if (b, t) != (2, 4)]
    doc = fit_stage(pts, [], [1, 2], [1, 4], [0, 100], fill_missing=True)
    assert doc["kind"] == "grid"
    assert doc["fit"]["filled_nodes"] == [[2, 4, 0], [2, 4, 100]]
    assert doc["ms"][1][1][0] == pytest.approx(1.0 + 1.0 + 0.8, rel=1e-6)  # the exact linear law
    with pytest.raises(ValueError):
        fit_stage(pts, [], [1, 2], [1, 4], [0, 100])
    from scipy.optimize import nnls

    rng = np.random.default_rng(0)
    for _ in range(10):
        a, y = rng.random((20, 4)), rng.random(20) - 0.4
        assert _nnls_small(a, y)[1] == pytest.approx(nnls(a, y)[1], abs=1e-9)


@pytest.mark.torch
def test_random_weight_calibration_cpu(tiny_files, tmp_path):
    """A 2-layer hidden-64 random-weight model on CPU: a valid measured profile in seconds, the
    grid cut to the model's window (512 > 300 dropped), B*T above the token budget skipped and
    filled, nothing downloaded."""
    pytest.importorskip("torch")
    cfg, grid = tiny_files
    out = tmp_path / "tiny.json"
    r = _simspec("calibrate", "latency", "--config", str(cfg), "--random-weights", "--dtype", "fp32",
                 "--grid", str(grid), "--threads", "1", "--max-batched-tokens", "128", "--out", str(out),
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    p = load_profile(out)
    assert p.source == "measured" and set(p.stages) == {"embed", "layer", "lm_head", "adapter"}
    assert p.models["target"]["num_layers"] == 2 and p.models["target"]["hidden_size"] == 64
    assert "random weights" in p.meta["model_ids"]["target"] and "random" in p.meta["weights"]["target"]
    lc = p.meta["latency_calibration"]
    assert lc["mode"] == "eager" and lc["window_tokens"] == 300
    assert p.meta["grid"]["context_tokens"] == [0, 128]  # the grid as measured (cut to the window)
    assert p.stages["layer"].get("axes", {}).get("context_tokens", [0, 128]) == [0, 128]
    assert any("window of 300" in n for n in lc["notes"])
    assert lc["skipped"]["counts"]["layer: token budget"] == 2  # B=4, T=64 at C=0 and 128
    assert p.stages["layer"]["fit"]["filled_nodes"] == [[4, 64, 0], [4, 64, 128]]
    assert p.capacity["max_batched_tokens"] == 128
    assert all(s[3] > 0 for s in p.stages["layer"]["samples"])


@pytest.mark.torch
def test_cuda_graphs_refused_on_cpu_in_library():
    pytest.importorskip("torch")
    from simspec.calibrate.latency import calibrate_latency, load_grid
    from simspec.errors import SimspecError

    class _Fake:
        device = "cpu"

    with pytest.raises(SimspecError, match="--cuda-graphs"):
        calibrate_latency(_Fake(), load_grid("tiny"), cuda_graphs=True)


def _need_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the CUDA-event and CUDA-graph timing paths need one")


@pytest.mark.torch
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_random_weight_calibration_cuda(tiny_files, tmp_path, graphs):
    _need_cuda()
    cfg, grid = tiny_files
    out = tmp_path / f"cuda-{graphs}.json"
    r = _simspec("calibrate", "latency", "--config", str(cfg), "--random-weights", "--device", "cuda",
                 "--dtype", "bf16", "--grid", str(grid), "--out", str(out), "--no-progress",
                 *(["--cuda-graphs"] if graphs else []))
    assert r.returncode == 0, r.stderr
    p = load_profile(out)
    lc = p.meta["latency_calibration"]
    assert p.meta["device_type"] == "cuda" and "cuda events" in lc["timer"]
    assert lc["mode"].startswith("cuda graphs" if graphs else "eager")
    if graphs:  # decoder layers and the LM head must capture (the embed stage may fall back)
        assert "layer" not in lc["cuda_graphs_failed"] and "lm_head" not in lc["cuda_graphs_failed"]
    assert all(s[3] > 0 for s in p.stages["layer"]["samples"])


@pytest.mark.torch
def test_memory_estimate_skips_what_cannot_fit():
    pytest.importorskip("transformers")
    from simspec.calibrate.latency import point_memory_bytes
    from simspec.calibrate.models import config_from_json

    cfg, _ = config_from_json("llama-3-8b")
    small = point_memory_bytes("layer", 1, 1, 1024, cfg, 2)
    big = point_memory_bytes("layer", 256, 9, 8000, cfg, 2)
    # KV of one layer: 2 (K,V) x 8 heads x 128 x 2 bytes = 4 KiB per token; 256 x 8009 tokens twice
    assert big > 2 * 256 * 8000 * 4096 and small < 64 * 2**20
    assert point_memory_bytes("lm_head", 64, 1, 0, cfg, 2) >= 64 * 128256 * 4


@pytest.mark.torch
def test_time_limit_skips_and_fills(tmp_path):
    """--max-wall-s: points left when the time is up are skipped (listed with the reason) and their
    nodes filled; with no time at all, a one-line error instead of an empty profile."""
    pytest.importorskip("torch")
    from simspec.calibrate.latency import calibrate_latency, load_grid
    from simspec.calibrate.models import random_model
    from simspec.errors import SimspecError

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    lm = random_model(str(cfg), "fp32", "cpu")
    with pytest.raises(SimspecError, match="no stage could be measured .*time limit"):
        calibrate_latency(lm, load_grid("dry-run"), threads=1, progress=False, max_wall_s=0.0,
                          stages=["layer"])
    import simspec.calibrate.latency as lat

    calls = {"n": 0}
    real = lat.Timer.measure

    def slow_after_five(self, *a, **k):  # the 6th measured point onwards is over the limit
        calls["n"] += 1
        if calls["n"] == 5:
            import time
            time.sleep(3.5)
        return real(self, *a, **k)

    lat.Timer.measure = slow_after_five
    try:
        res = calibrate_latency(lm, load_grid("dry-run"), threads=1, progress=False, max_wall_s=3.0,
                                stages=["layer"])
    finally:
        lat.Timer.measure = real
    lc = res.meta["latency_calibration"]
    assert lc["skipped"]["counts"].get("layer: time limit", 0) > 0
    assert res.latency["stages"]["layer"]["fit"].get("filled_nodes")
