"""``simspec validate``: the error computation on hand-made tables, the report files, bad input, and
a short end-to-end real-vs-simulated validation on CPU (torch)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from simspec.errors import SimspecError
from simspec.validation_report import compare, format_table, per_request, write_report


def _tables():
    # latency real (ms): 1000, 1000, 1000, 2000; simulated: 1100, 900, 1000, 2200
    # TTFT real (ms): 100, 200, 500, 400; simulated: 100, 100, 500, 500
    real = pd.DataFrame({"request_id": ["a", "b", "c", "d"], "arrival_s": [0.0, 1.0, 2.0, 3.0],
                         "first_token_s": [0.1, 1.2, 2.5, 3.4], "completion_s": [1.0, 2.0, 3.0, 5.0]})
    sim = pd.DataFrame({"request_id": ["d", "c", "b", "a"], "arrival_s": [3.0, 2.0, 1.0, 0.0],
                        "first_token_s": [3.5, 2.5, 1.1, 0.1], "completion_s": [5.2, 3.0, 1.9, 1.1]})
    return real, sim


def test_per_request_errors_by_hand():
    real, sim = _tables()
    pr = per_request(real, sim)
    assert list(pr["request_id"]) == ["a", "b", "c", "d"]
    assert pr["latency_err_pct"].round(9).tolist() == [10.0, -10.0, 0.0, 10.0]
    assert pr["ttft_err_pct"].round(9).tolist() == [0.0, -50.0, 0.0, 25.0]


def test_aggregate_errors_by_hand():
    real, sim = _tables()
    e = compare(real, sim)
    approx = pytest.approx
    assert e["latency_mape_pct"] == approx(7.5)  # (10 + 10 + 0 + 10) / 4
    assert e["ttft_mape_pct"] == approx(18.75)  # (0 + 50 + 0 + 25) / 4
    lat = e["latency"]
    assert lat["mean"]["real_ms"] == approx(1250.0) and lat["mean"]["sim_ms"] == approx(1300.0)
    assert lat["mean"]["err_pct"] == approx(4.0)
    # linear-interpolation percentiles over 4 values: p50 at rank 1.5, p90 at 2.7, p99 at 2.97
    assert lat["p50"]["real_ms"] == approx(1000.0) and lat["p50"]["sim_ms"] == approx(1050.0)
    assert lat["p50"]["err_pct"] == approx(5.0)
    assert lat["p90"]["real_ms"] == approx(1700.0) and lat["p90"]["sim_ms"] == approx(1870.0)
    assert lat["p90"]["err_pct"] == approx(10.0)
    assert lat["p99"]["real_ms"] == approx(1970.0) and lat["p99"]["sim_ms"] == approx(2167.0)
    assert lat["p99"]["err_pct"] == approx(10.0)
    assert e["ttft"]["mean"]["err_pct"] == approx(0.0)
    assert e["makespan"] == {"real_s": approx(5.0), "sim_s": approx(5.2), "err_pct": approx(4.0)}
    assert e["target"]["met"] is False  # MAPE 7.5% > 5%
    text = format_table(e)
    assert "latency MAPE" in text and "7.5%" in text and "+4.0%" in text


def test_identical_tables_have_zero_error():
    real, _ = _tables()
    e = compare(real, real.copy())
    assert e["latency_mape_pct"] == 0.0 and e["makespan"]["err_pct"] == 0.0 and e["target"]["met"]


def test_mismatched_tables_are_refused():
    real, sim = _tables()
    with pytest.raises(SimspecError, match="different requests"):
        compare(real, sim.iloc[:3])
    bad = sim.copy()
    bad.loc[0, "completion_s"] = float("nan")
    with pytest.raises(SimspecError, match="did not complete"):
        compare(real, bad)
    with pytest.raises(SimspecError, match="missing column first_token_s"):
        compare(real.drop(columns=["first_token_s"]), sim)


def test_report_files(tmp_path):
    real, sim = _tables()
    doc = write_report(tmp_path, real, sim, meta={"method": "none"}, title="hand-made")
    for name in ("validation.json", "per_request.csv", "latency_scatter.png", "report.txt"):
        assert (tmp_path / name).is_file()
    on_disk = json.loads((tmp_path / "validation.json").read_text())
    assert on_disk["latency_mape_pct"] == pytest.approx(7.5)
    assert on_disk == json.loads(json.dumps(doc))
    assert (tmp_path / "latency_scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ CLI and end to end


def _layer_profile(path, alpha=0.5):
    """A hand-made layer-level profile for the bundled 30-layer model (numbers need not be right:
    the end-to-end test checks the pipeline, not the error figures)."""
    lin = lambda c0, c_t=0.0, c_kv=0.0: {"kind": "linear", "coef": {"c0": c0, "c_b": 0.0, "c_t": c_t, "c_kv": c_kv}}
    doc = {"schema": "simspec-profile", "schema_version": 1,
           "meta": {"name": path.stem, "source": "measured", "dtype": "fp32", "threads": 1},
           "models": {"target": {"name": "smollm2-135m", "num_layers": 30}},
           "capacity": {"kv_budget_tokens": 8192, "max_batch_size": 1},
           "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                       "stages": {"layer": lin(0.4, 0.01, 0.0005), "lm_head": lin(1.5, 0.5), "embed": lin(0.05)}},
           "acceptance": {"draft": {"default": {"alpha": {"kind": "fixed", "value": alpha}}}}}
    path.write_text(json.dumps(doc))
    return path


def _tiny_trace(path, classes=("qa", "translation", "rag", "mt_bench")):
    rows = ["request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class"]
    for i, c in enumerate(classes):
        rows.append(f"t{i},{0.02 * i:.2f},{20 + 5 * i},8,{c}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _cli(args):
    from simspec.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


@pytest.mark.parametrize("args, needle", [
    (["--method", "medusa"], "--method 'medusa': unknown"),
    (["--method", "kangaroo", "--adapter", "/nonexistent/adapter"], "--adapter /nonexistent/adapter: no such directory"),
    (["--policy", "lottery"], "--policy: unknown scheduler 'lottery'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    prof = _layer_profile(tmp_path / "p.json")
    trace = _tiny_trace(tmp_path / "t.csv")
    code = _cli(["validate", str(trace), "--profile", str(prof), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("simspec: error: ") and needle in err and err.count("\n") == 1


def test_prompt_fallback_for_unknown_class():
    """A class the prompt set lacks draws from all prompts, and the fallback is noted."""
    from simspec.calibrate.validate import prompt_ids_for_trace
    from simspec.trace import Trace

    class Tok:  # whitespace "tokenizer": enough to check cutting and repeating
        chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    tr = Trace.from_columns(request_id=["a", "b"], arrival_s=[0.0, 1.0], prompt_tokens=[3, 400],
                            output_tokens=[4, 4], acceptance_class=["default", "qa"])
    ids, notes = prompt_ids_for_trace(Tok(), tr)
    assert [len(x) for x in ids] == [3, 400]
    assert notes and "default" in notes[0] and "qa" not in notes[0]


@pytest.mark.torch
@pytest.mark.parametrize("method, policy", [("none", "fcfs"), ("draft:k=2,draft_layers=4", "laps-sd")])
def test_short_validation_end_to_end(tmp_path, method, policy):
    pytest.importorskip("torch")
    prof = _layer_profile(tmp_path / "p.json")
    trace = _tiny_trace(tmp_path / "t.csv")
    out = tmp_path / "report"
    code = _cli(["validate", str(trace), "--profile", str(prof), "--method", method, "--policy", policy,
                 "--device", "cpu", "--dtype", "fp32", "--out", str(out), "--no-heldout",
                 "--fit-overhead", str(tmp_path / "fitted.json")])
    assert code == 0
    for name in ("validation.json", "summary.json", "per_request.csv", "latency_scatter.png", "report.txt",
                 "real_requests.csv", "real_steps.csv", "sim_requests.csv"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "validation.json").read_text())
    assert doc["errors"]["n_requests"] == 4 and doc["latency_mape_pct"] >= 0
    assert len(doc["per_request"]) == 4
    assert "loadavg_1m" in doc["meta"]["machine_load_after"]
    real = pd.read_csv(out / "real_requests.csv")
    assert (real["generated_tokens"] == 8).all()  # EOS ignored: exactly the trace's output length
    assert (real["first_token_s"] <= real["completion_s"]).all()
    assert (real["first_token_s"] > real["arrival_s"]).all()
    steps = pd.read_csv(out / "real_steps.csv")
    assert steps["committed"].sum() == 32
    if method.startswith("draft"):
        acc = doc["heldout"]["acceptance_model"]
        assert acc["real_tokens_per_step"] >= 1.0 and acc["model_tokens_per_step"] >= 1.0
    fitted = json.loads((tmp_path / "fitted.json").read_text())
    assert "overhead_calibration" in fitted["meta"] and fitted["latency"]["overhead"]["fixed_ms"] >= 0
