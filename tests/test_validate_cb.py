"""Validation against transformers' continuous-batching engine: the engine->simulator mapping, the
load gate, and a real end-to-end run (a 2-layer random-weight model served by the engine on CPU,
simulated with a profile calibrated on the spot) that takes seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simspec.errors import ConfigError

TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 1024,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "_name_or_path": "tiny-random-llama"}


def _simspec(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "simspec.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_config_for_engine_mapping():
    from simspec.calibrate.validate_cb import EngineSettings, mapping_notes, run_config_for_engine

    s = EngineSettings(page_size_tokens=16, num_blocks=100, max_batch_tokens=256, max_requests_per_batch=6)
    c = run_config_for_engine(s, seed=3)
    assert str(c.scheduler) == "fcfs" and str(c.method) == "none"
    assert (c.max_batch_size, c.max_batched_tokens, c.kv_budget_tokens) == (6, 256, 1600)
    assert c.preempt_mode == "recompute" and c.seed == 3
    if hasattr(c, "batching"):  # the simulator's vLLM-faithful mode
        assert (c.batching, c.block_size, c.chunked_prefill) == ("vllm", 16, True)
        assert c.watermark == pytest.approx(0.15)
        assert any("chunked prefill on" in n for n in mapping_notes(s))
    else:
        assert any("chunked prefill" in n for n in mapping_notes(s))
    with pytest.raises(ConfigError):
        EngineSettings(page_size_tokens=2)
    with pytest.raises(ConfigError):
        run_config_for_engine(EngineSettings(scheduler="prefill_first"))


def test_load_sampler_reports_other_processes():
    import time

    from simspec.calibrate.validate_cb import LoadSampler

    s = LoadSampler(period_s=0.05).start()
    time.sleep(0.3)
    out = s.stop()
    assert out["n_samples"] >= 2 and out["max_1m"] is not None
    assert out["other_processes_cores_mean"] is None or out["other_processes_cores_mean"] >= 0


def test_engine_options_refused_with_simspec_engine(tmp_path):
    r = _simspec("validate", "validation_small", "--profile", "smollm2-135m-cpu-fp32", "--max-requests", "3",
                 "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "only with --engine transformers-cb" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.torch
@pytest.mark.slow
def test_transformers_cb_end_to_end_tiny_random(tmp_path):
    pytest.importorskip("torch")
    tr = pytest.importorskip("transformers")
    try:
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError:
        pytest.skip(f"transformers {tr.__version__} has no continuous batching")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    prof = tmp_path / "tiny.json"
    r = _simspec("calibrate", "latency", "--config", str(cfg), "--random-weights", "--dtype", "fp32",
                 "--grid", "dry-run", "--threads", "1", "--out", str(prof), "--no-progress")
    assert r.returncode == 0, r.stderr
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,prompt_tokens,output_tokens\nA,0.0,20,6\nB,0.05,33,4\nC,0.1,12,8\n")
    out = tmp_path / "rep"
    r = _simspec("validate", str(trace), "--engine", "transformers-cb", "--config", str(cfg), "--profile", str(prof),
                 "--threads", "1", "--max-batch", "4", "--max-batch-tokens", "64", "--page-size", "16",
                 "--num-blocks", "64", "--out", str(out), "--allow-overload")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "validation.json").read_text())
    m = doc["meta"]
    assert m["engine"] == "transformers-cb" and m["engine_version"].startswith("transformers ")
    assert m["engine_settings"]["max_requests_per_batch"] == 4
    assert m["simulated_config"]["max_batched_tokens"] == 64
    assert {"machine_load_before", "machine_load_during", "machine_load_after"} <= set(m)
    assert doc["errors"]["n_requests"] == 3 and doc["latency_mape_pct"] >= 0
    for f in ("per_request.csv", "real_requests.csv", "engine_steps.csv", "sim_requests.csv", "report.txt"):
        assert (out / f).is_file(), f
    import pandas as pd

    steps = pd.read_csv(out / "engine_steps.csv")
    assert len(steps) >= 8 and steps["step_ms"].gt(0).all()  # at least the 8 tokens of C
    real = pd.read_csv(out / "real_requests.csv")
    assert (real["generated_tokens"] == real["output_tokens"]).all()
    assert (real["first_token_s"] >= real["arrival_s"]).all() and (real["completion_s"] >= real["first_token_s"]).all()
    # re-simulating the committed real run with the same profile reproduces the report
    from simspec.calibrate.validate_cb import resimulate

    again = resimulate(str(out), str(prof), str(tmp_path / "resim"), echo=lambda *_: None)
    # (the CSV keeps times to the microsecond: equal to that precision)
    assert again["latency_mape_pct"] == pytest.approx(doc["latency_mape_pct"], rel=1e-3)
