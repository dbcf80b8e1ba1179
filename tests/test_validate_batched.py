"""``simspec validate --max-batch B`` / ``--forced-acceptance``: the batched real server against the
simulator, end to end on the bundled model (a tiny trace), and bad input as one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from test_validate import _cli, _layer_profile, _tiny_trace


def _spec_profile(path):
    """The tiny layer-level profile of test_validate plus an adapter stage and kangaroo acceptance."""
    _layer_profile(path, alpha=0.4)
    doc = json.loads(path.read_text())
    doc["latency"]["stages"]["adapter"] = {"kind": "linear", "coef": {"c0": 0.1, "c_b": 0.0, "c_t": 0.005, "c_kv": 0.0001}}
    doc["acceptance"]["kangaroo"] = {"default": {"alpha": {"kind": "fixed", "value": 0.4}}}
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "2", "--method", "hispec"], "--method hispec: no batched runner"),
    (["--forced-acceptance", "--method", "none"], "--forced-acceptance: method none has no per-request"),
    (["--batching", "preemptive"], "--batching / --max-batch-tokens / --allow-overload: only with --max-batch > 1"),
    (["--max-batch", "3", "--max-batch-tokens", "40"], "--max-batch-tokens 40: a step of 3 requests"),
    (["--max-batch", "2", "--method", "draft:k=2"], "give draft_layers=L"),
    (["--engine", "transformers-cb", "--forced-acceptance"], "--batching / --forced-acceptance: only with"),
])
def test_bad_batched_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    prof = _spec_profile(tmp_path / "p.json")
    trace = _tiny_trace(tmp_path / "t.csv")
    code = _cli(["validate", str(trace), "--profile", str(prof), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("simspec: error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.torch
@pytest.mark.parametrize("method, policy, batching, forced", [
    ("draft:k=2,draft_layers=4", "fcfs", "vllm", False),
    ("kangaroo:exit=2,gamma=3,eta=0.6", "laps-sd", "preemptive", True),
    ("draft:k=3,draft_layers=4", "laps-sd", "preemptive", True),
])
def test_batched_validation_end_to_end(tmp_path, method, policy, batching, forced):
    pytest.importorskip("torch")
    prof = _spec_profile(tmp_path / "p.json")
    trace = _tiny_trace(tmp_path / "t.csv")
    out = tmp_path / "report"
    args = ["validate", str(trace), "--profile", str(prof), "--method", method, "--policy", policy,
            "--max-batch", "3", "--batching", batching, "--device", "cpu", "--dtype", "fp32", "--threads", "1",
            "--out", str(out), "--allow-overload", "--no-progress", "--fit-overhead", str(tmp_path / "fitted.json")]
    if forced:
        args.append("--forced-acceptance")
    assert _cli(args) == 0
    for name in ("validation.json", "summary.json", "per_request.csv", "report.txt", "real_requests.csv",
                 "real_steps.csv", "sim_requests.csv", "sim_steps.csv"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "validation.json").read_text())
    meta = doc["meta"]
    assert doc["errors"]["n_requests"] == 4 and isinstance(meta["valid"], bool)
    assert meta["batch"]["max_batch"] == 3 and meta["simulated_config"]["max_batch_size"] == 3
    assert {"loadavg_1m", "cpus"} <= set(meta["machine_load_before"]) and "max_1m" in meta["machine_load_during"]
    real = pd.read_csv(out / "real_requests.csv")
    assert (real["generated_tokens"] == 8).all()  # EOS ignored: exactly the trace's output length
    steps = pd.read_csv(out / "real_steps.csv")
    assert steps["committed"].sum() == 32 and steps["batch_size"].max() > 1  # requests really shared steps
    assert (steps["model_ms"] > 0).all() and (steps["cpu_ms"] > 0).all()
    sim = pd.read_csv(out / "sim_requests.csv")
    if forced:
        fa = doc["heldout"]["forced_acceptance"]
        assert fa["identical"] == 4 and not fa["differing"]
        r, s = real.set_index("request_id"), sim.set_index("request_id")
        for col in ("decode_steps", "drafted", "accepted"):
            assert (r[col] == s.loc[r.index, col]).all(), col
        pat = pd.read_csv(out / "forced_pattern.csv")
        assert pat.groupby("request_id")["accepted"].sum().reindex(r.index).tolist() == r["accepted"].tolist()
        assert len(pat) == int(r["decode_steps"].sum())
    else:
        assert "forced_acceptance" not in doc["heldout"] and not (out / "forced_pattern.csv").exists()
    fitted = json.loads((tmp_path / "fitted.json").read_text())
    assert fitted["meta"]["overhead_calibration"]["batch"]["max_batch"] == 3
