"""``simspec validate --max-batch B`` / ``--forced-acceptance``: the batched real server against the
simulator, end to end on the bundled model (a tiny trace), and bad input as one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from importlib import resources
from pathlib import Path

from test_validate import _cli, _layer_profile, _tiny_trace

ADAPTER = Path(str(resources.files("simspec") / "data" / "adapters" / "smollm2-135m"))  # exits 2, 4, 8


def _spec_profile(path):
    """The tiny layer-level profile of test_validate plus an adapter stage and kangaroo acceptance."""
    _layer_profile(path, alpha=0.4)
    doc = json.loads(path.read_text())
    doc["latency"]["stages"]["adapter"] = {"kind": "linear", "coef": {"c0": 0.1, "c_b": 0.0, "c_t": 0.005, "c_kv": 0.0001}}
    doc["acceptance"]["kangaroo"] = {"default": {"alpha": {"kind": "fixed", "value": 0.4}}}
    doc["acceptance"]["hispec"] = {"default": {"alpha": {"kind": "fixed", "value": 0.5},
                                               "draft_vs_inter": {"alpha": {"kind": "fixed", "value": 0.6}}}}
    path.write_text(json.dumps(doc))
    return path


def test_stricter_load_gate_refuses_what_the_default_allows():
    """--max-other-cores: 0.3 cores of other processes pass the default gate of a 1-thread run on
    2 CPUs (1 core left free) but not a 0.1-core limit (a run that backs a 5 % figure)."""
    from simspec.calibrate.validate_cb import other_cores_limit, overload_verdict

    quiet = {"loadavg_1m": 0.5}
    during = {"max_1m": 0.8, "other_processes_cores_mean": 0.3}
    assert overload_verdict("cpu", 2, 1, quiet, during, quiet) == (False, "")
    bad, why = overload_verdict("cpu", 2, 1, quiet, during, quiet, max_other_cores=0.1)
    assert bad and "limit 0.1" in why
    assert other_cores_limit(2, 1) == 1.0 and other_cores_limit(2, 2) == 0.5 and other_cores_limit(2, 1, 0.1) == 0.1
    assert overload_verdict("cuda", 2, 1, quiet, during, quiet, max_other_cores=0.1) == (False, "")


@pytest.mark.parametrize("args, needle", [
    (["--max-batch", "2", "--method", "hispec:draft_exit=3,inter_exit=2"], "inter_exit (2) must be deeper than"),
    (["--max-batch", "2", "--method", "hispec:draft_exit=1,inter_exit=3,nd=0"], "--spec hispec: nd"),
    (["--forced-acceptance", "--method", "none"], "--forced-acceptance: method none has no per-request"),
    (["--batching", "preemptive"], "--batching / --max-batch-tokens / --allow-overload / --max-other-cores: only with"),
    (["--max-other-cores", "0.1"], "--max-other-cores: only with --max-batch > 1"),
    (["--max-batch", "3", "--max-batch-tokens", "40"], "--max-batch-tokens 40: a step of 3 requests"),
    (["--max-batch", "2", "--method", "draft:k=2"], "give draft_layers=L"),
    (["--engine", "transformers-cb", "--forced-acceptance"], "--batching / --forced-acceptance: only with"),
    (["--speed-reference"], "--speed-reference: only with --engine simspec and --max-batch > 1"),
    (["--engine", "transformers-cb", "--speed-reference"], "--speed-reference: only with --engine simspec"),
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
@pytest.mark.parametrize("method, policy, batching, forced, batch", [
    ("draft:k=2,draft_layers=4", "fcfs", "vllm", False, 3),
    ("kangaroo:exit=2,gamma=3,eta=0.6", "laps-sd", "preemptive", True, 3),
    ("draft:k=3,draft_layers=4", "laps-sd", "preemptive", True, 3),
    ("hispec:draft_exit=2,inter_exit=5,nd=2,ni=3", "fcfs", "vllm", False, 2),
    ("hispec:draft_exit=4,inter_exit=8,nd=2,ni=4+adapter", "laps-sd", "preemptive", True, 2),
    ("hispec:draft_exit=2,inter_exit=30,nd=3", "fcfs", "vllm", True, 3),
])
def test_batched_validation_end_to_end(tmp_path, method, policy, batching, forced, batch):
    pytest.importorskip("torch")
    prof = _spec_profile(tmp_path / "p.json")
    trace = _tiny_trace(tmp_path / "t.csv")
    out = tmp_path / "report"
    method, _, with_adapter = method.partition("+")
    args = ["validate", str(trace), "--profile", str(prof), "--method", method, "--policy", policy,
            "--max-batch", str(batch), "--batching", batching, "--device", "cpu", "--dtype", "fp32", "--threads", "1",
            "--out", str(out), "--allow-overload", "--no-progress", "--fit-overhead", str(tmp_path / "fitted.json"),
            "--speed-reference"]
    if with_adapter:
        args += ["--adapter", str(ADAPTER)]
    if forced:
        args.append("--forced-acceptance")
    assert _cli(args) == 0
    for name in ("validation.json", "summary.json", "per_request.csv", "report.txt", "real_requests.csv",
                 "real_steps.csv", "sim_requests.csv", "sim_steps.csv"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "validation.json").read_text())
    meta = doc["meta"]
    assert doc["errors"]["n_requests"] == 4 and isinstance(meta["valid"], bool)
    assert meta["batch"]["max_batch"] == batch and meta["simulated_config"]["max_batch_size"] == batch
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
    assert fitted["meta"]["overhead_calibration"]["batch"]["max_batch"] == batch
    sr = doc["heldout"]["speed_reference"]  # the machine's speed around the run, recorded with the fit
    assert sr["probe_before"]["speed"] > 0 and sr["probe_after"]["speed"] > 0
    assert fitted["meta"]["overhead_calibration"]["speed_reference"] == pytest.approx(sr["speed_run"], rel=1e-5)
    assert "errors" not in sr  # the input profile had no recorded speed
    if method.startswith("hispec") and "inter_exit=30" not in method:  # two-level: inner iterations were costed
        assert steps["drafted"].sum() > 0
        if forced:
            assert pat["inner"].notna().any()
            for _, row in pat[pat["drafts"] > 0].iterrows():
                assert sum(int(x) for x in str(row["inner"]).split("+")) == row["drafts"]


def test_speed_scaled_profile_scales_every_step():
    """A replay with the profile scaled by f has every step f times as long (per-step and
    per-forward overheads included), and the same schedule when nothing queues."""
    from simspec.calibrate.validate import speed_scaled_profile
    from simspec.profile import load_profile
    from simspec.simulator.config import ComponentSpec, RunConfig
    from simspec.simulator.cost import CostModel
    from simspec.simulator.run import simulate
    from tests.conftest import make_trace

    prof = load_profile("smollm2-135m-cpu-fp32")
    scaled = speed_scaled_profile(prof, 1.25)
    a, b = CostModel(prof), CostModel(scaled)
    for ms in (0.0, 3.0, 17.5):
        assert b.finish(ms) == pytest.approx(1.25 * a.finish(ms), rel=1e-12)
    cfg = RunConfig(scheduler=ComponentSpec.parse("fcfs", "p"), method=ComponentSpec.parse("kangaroo", "s"),
                    spec_len=ComponentSpec.parse("fixed", "l"))
    trace = make_trace([0.0], [40], [12])
    r1, r2 = simulate(cfg, trace, prof), simulate(cfg, trace, scaled)
    assert r1.steps["step_ms"].to_numpy() * 1.25 == pytest.approx(r2.steps["step_ms"].to_numpy(), rel=1e-12)
    assert prof.overhead != scaled.overhead and prof.sha256 != scaled.sha256


@pytest.mark.torch
def test_speed_referenced_replay_when_the_profile_records_its_fit_speed(tmp_path):
    """A profile whose overhead fit recorded the machine's speed: the report adds a replay at the
    run's speed relative to it (factor = speed_run / speed_calib), with its own errors."""
    pytest.importorskip("torch")
    prof = _spec_profile(tmp_path / "p.json")
    doc = json.loads(prof.read_text())
    doc["meta"]["overhead_calibration"] = {"speed_reference": 0.5}
    prof.write_text(json.dumps(doc))
    out = tmp_path / "report"
    args = ["validate", str(_tiny_trace(tmp_path / "t.csv")), "--profile", str(prof), "--method",
            "draft:k=2,draft_layers=4", "--max-batch", "2", "--device", "cpu", "--dtype", "fp32", "--threads", "1",
            "--out", str(out), "--allow-overload", "--no-progress"]
    assert _cli(args + ["--speed-reference"]) == 0
    sr = json.loads((out / "validation.json").read_text())["heldout"]["speed_reference"]
    assert sr["speed_calib"] == 0.5 and sr["factor"] == pytest.approx(sr["speed_run"] / 0.5)
    assert set(sr["errors"]) == {"latency_mape_pct", "latency_mean_err_pct", "latency_p99_err_pct", "ttft_mape_pct"}
    assert _cli(args + ["--force"]) == 0  # without the probes (the default): no section
    assert "speed_reference" not in json.loads((out / "validation.json").read_text())["heldout"]
