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
