"""simspec capacity: bisection over the request rate against closed-form and scanned answers.

The synthetic case: one replica that runs one request at a time (max_batch 1), a linear step time
``10 ms + 0.1 ms/token`` with no overhead, n identical requests (prompt P, output O) arriving
exactly 1/r apart. A request then takes S = (10 + 0.1 P) + (O - 1)(10 + 0.1) ms, its TTFT is the
prefill step plus its wait, and request i waits i * max(0, S - 1/r). From that:

- p99 TTFT <= prefill + D  <=>  0.99 (n - 1) (S - 1/r) <= D  (numpy's linear-interpolated p99 of
  a linear sequence), so the capacity is r* = 1 / (S - D / (0.99 (n - 1)));
- attainment >= 0.9 with TTFT <= prefill + D  <=>  floor(D / g) + 1 >= 0.9 n with g = S - 1/r, so
  r* = 1 / (S - D / (0.9 n - 1)).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from simspec.capacity import SLO, evaluate_rate, search_capacity, split_components
from simspec.cli import main
from simspec.errors import ConfigError
from simspec.profile import profile_from_doc
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.trace import Trace

N, P, O = 50, 100, 10
C0, CT = 10.0, 0.1
PREFILL_MS = C0 + CT * P
SERVICE_S = (PREFILL_MS + (O - 1) * (C0 + CT)) / 1000.0
D_MS = 100.0  # TTFT slack above the prefill step


def linear_profile_doc(max_batch: int = 1) -> dict:
    return {
        "schema": "simspec-profile", "schema_version": 1,
        "meta": {"name": "linear-test", "source": "analytic"},
        "models": {"target": {"name": "test", "num_layers": 2}},
        "capacity": {"kv_budget_tokens": 1_000_000, "max_batch_size": max_batch},
        "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                    "stages": {"target_step": {"kind": "linear",
                                               "coef": {"c0": C0, "c_b": 0.0, "c_t": CT, "c_kv": 0.0}}}},
        "acceptance": {},
    }


def uniform_trace(n: int = N) -> Trace:
    return Trace.from_columns(request_id=[f"r{i}" for i in range(n)], arrival_s=np.arange(n, dtype=float),
                              prompt_tokens=np.full(n, P), output_tokens=np.full(n, O), source="uniform")


def r_star_p99() -> float:
    return 1.0 / (SERVICE_S - D_MS / 1000.0 / (0.99 * (N - 1)))


def r_star_attainment(target: float = 0.9) -> float:
    return 1.0 / (SERVICE_S - D_MS / 1000.0 / (target * N - 1))


@pytest.mark.parametrize("slo, expected", [
    (SLO(ttft_ms=PREFILL_MS + D_MS, tpot_ms=1000.0), r_star_p99()),
    (SLO(ttft_ms=PREFILL_MS + D_MS, tpot_ms=1000.0, attainment=0.9), r_star_attainment()),
])
def test_bisection_matches_the_closed_form(slo, expected):
    profile = profile_from_doc(linear_profile_doc(), "linear-test")
    tol = 0.01
    res = search_capacity(RunConfig(), uniform_trace(), profile, slo, 1.0, 20.0, tol)
    assert res.status == "ok"
    assert expected - tol <= res.capacity_rps <= expected + 1e-6
    lo, hi = res.bracket_rps
    assert hi - lo <= tol and lo == res.capacity_rps
    assert res.at_capacity.holds and len(res.evaluations) <= 2 + int(np.ceil(np.log2(19 / tol)))
    # the SLO really flips around the answer (independently of the search's own evaluations)
    assert evaluate_rate(RunConfig(), uniform_trace(), profile, expected * 0.999, slo).holds
    assert not evaluate_rate(RunConfig(), uniform_trace(), profile, expected * 1.001, slo).holds


def test_bisection_matches_a_dense_scan_with_batching():
    """No closed form with batching: compare with the highest rate of a dense scan."""
    profile = profile_from_doc(linear_profile_doc(max_batch=4), "linear-test")
    trace = uniform_trace(40)
    slo = SLO(ttft_ms=60.0, tpot_ms=30.0)
    grid = np.arange(5.0, 60.0 + 1e-9, 1.0)
    holds = [evaluate_rate(RunConfig(), trace, profile, r, slo).holds for r in grid]
    assert holds[0] and not holds[-1]
    first_fail = grid[holds.index(False)]
    assert all(holds[: holds.index(False)])
    res = search_capacity(RunConfig(), trace, profile, slo, 5.0, 60.0, 0.05)
    # the scan brackets the boundary in (first_fail - 1, first_fail]; bisection lands inside it
    assert first_fail - 1.0 - 0.05 <= res.capacity_rps <= first_fail


def test_out_of_range_answers():
    profile = profile_from_doc(linear_profile_doc(), "linear-test")
    slo = SLO(ttft_ms=PREFILL_MS + D_MS, tpot_ms=1000.0)
    below = search_capacity(RunConfig(), uniform_trace(), profile, slo, 15.0, 20.0, 0.1)
    assert below.status == "below-range" and below.capacity_rps is None and len(below.evaluations) == 1
    above = search_capacity(RunConfig(), uniform_trace(), profile, slo, 1.0, 5.0, 0.1)
    assert above.status == "above-range" and above.capacity_rps == 5.0 and len(above.evaluations) == 2
    with pytest.raises(ConfigError, match="--rate-hi"):
        search_capacity(RunConfig(), uniform_trace(), profile, slo, 5.0, 5.0, 0.1)
    with pytest.raises(ConfigError, match="slo-ttft-ms"):
        SLO(ttft_ms=None, tpot_ms=None)


def test_split_components():
    assert split_components("none,draft:k=4") == ["none", "draft:k=4"]
    assert split_components("kangaroo:exit=2,gamma=6,eta=0.6,none") == ["kangaroo:exit=2,gamma=6,eta=0.6", "none"]
    assert split_components("fcfs, srpt:predictor=lognormal,sigma=0.5") == ["fcfs", "srpt:predictor=lognormal,sigma=0.5"]


def run_cli(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


def test_cli_searches_each_policy_and_writes_json(tmp_path, capsys):
    prof = tmp_path / "linear.json"
    prof.write_text(json.dumps(linear_profile_doc()))
    trace = tmp_path / "uniform.csv"
    uniform_trace().to_frame()[["request_id", "arrival_s", "prompt_tokens", "output_tokens"]].to_csv(trace, index=False)
    out = tmp_path / "cap.json"
    args = ["capacity", "--trace", str(trace), "--profile", str(prof), "--policy", "fcfs,srpt:predictor=oracle",
            "--spec", "none", "--slo-ttft-ms", str(PREFILL_MS + D_MS), "--slo-tpot-ms", "1000", "--p99",
            "--rate-lo", "1", "--rate-hi", "20", "--tol", "0.02", "--workers", "2", "--out", str(out)]
    assert run_cli(args) == 0
    doc = json.loads(out.read_text())
    assert doc["slo"]["criterion"] == "p99" and doc["search"]["tol_rps"] == 0.02
    assert [r["policy"] for r in doc["results"]] == ["fcfs", "srpt:predictor=oracle"]
    for r in doc["results"]:
        assert r["status"] == "ok" and r_star_p99() - 0.02 <= r["capacity_rps"] <= r_star_p99() + 1e-6
        assert r["evaluations"][0]["rate_rps"] == 1.0 and r["evaluations"][0]["holds"]
    printed = capsys.readouterr().out
    assert "capacity (req/s)" in printed and "srpt:predictor=oracle" in printed
    # user mistakes: one line, exit 2
    assert run_cli(args) == 2  # --out exists
    assert run_cli(args[:-2] + ["--out", str(tmp_path / "x.json"), "--attainment", "0.9"]) == 2
    assert run_cli(args[:-2] + ["--out", str(tmp_path / "x.json"), "--rate-lo", "30"]) == 2
    assert run_cli(args[:-2] + ["--out", str(tmp_path / "x.json"), "--policy", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "choose one criterion" in err and "--rate-hi" in err and "nosuch" in err
    assert not (tmp_path / "x.json").exists()
