"""simspec sweep: grid parsing, stable run ids, local vs Dask executors, restart, failed runs."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import yaml

from simspec.cli import main
from simspec.errors import ConfigError, SimspecError
from simspec.sweep import expand_grid, load_grid, read_sweep, run_sweep

# 2 policies x 2 methods x 2 rates on the first 40 requests of the bundled Azure trace: 8 quick runs
SMALL = {
    "name": "tiny",
    "base": {"trace": "azure_code_2023", "first": 40, "slo_ttft_ms": 3000, "slo_tpot_ms": 150},
    "axes": {"policy": ["fcfs", "srpt:predictor=oracle"], "spec": ["none", "draft:k=4"], "rate": [0.5, 2.0]},
}


def write_grid(tmp_path: Path, doc, name: str = "grid.yaml") -> Path:
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small grid run once with local processes: (grid path, sweep dir)."""
    d = tmp_path_factory.mktemp("ref")
    grid = write_grid(d, SMALL)
    res = run_sweep(load_grid(grid), d / "sweep", workers=2, progress=False)
    assert res.n_executed == 8 and res.n_failed == 0
    return grid, d / "sweep"


# --- grid ---------------------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_with_stable_ids(tmp_path):
    g = expand_grid(SMALL)
    assert len(g.runs) == 8
    assert [r.axes for r in g.runs[:2]] == [{"policy": "fcfs", "spec": "none", "rate": 0.5},
                                           {"policy": "fcfs", "spec": "none", "rate": 2.0}]
    assert len({r.run_id for r in g.runs}) == 8
    # the id hashes the resolved configuration: axis order and spelt-out defaults do not change it
    reordered = {"base": {**SMALL["base"], "replicas": 1, "spec_len": "fixed", "router": "round-robin"},
                 "axes": {"rate": [2.0, 0.5], "spec": ["draft:k=4", "none"],
                          "policy": ["srpt:predictor=oracle", "fcfs"]}}
    assert {r.run_id for r in expand_grid(reordered).runs} == {r.run_id for r in g.runs}
    # ... while any resolved change does
    other = {**SMALL, "base": {**SMALL["base"], "first": 41}}
    assert not {r.run_id for r in expand_grid(other).runs} & {r.run_id for r in g.runs}
    assert all(abs(r.offered_rate_rps - r.axes["rate"]) < 1e-9 for r in g.runs)


@pytest.mark.parametrize("text, needles", [
    ("axes:\n  polcy: [fcfs]\n", ["axes.polcy", "unknown axis"]),
    ("base:\n  trace_name: x\naxes:\n  seed: [0]\n", ["base.trace_name", "unknown option"]),
    ("axes:\n  policy: [fcfs, nosuch]\n", ["axes.policy[1]", "nosuch"]),
    ("axes:\n  spec: [none, 'warp:k=2']\n", ["axes.spec[1]", "warp"]),
    ("axes:\n  spec: [none, 'draft:kk=4']\n", ["axes.spec[1]", "unknown parameter(s) kk"]),
    ("axes:\n  seed: []\n", ["axes.seed", "empty axis"]),
    ("axes:\n  seed: 3\n", ["axes.seed", "list"]),
    ("axes:\n  replicas: [1, 0]\n", ["axes.replicas[1]", ">= 1"]),
    ("axes:\n  seed: [1, 1]\n", ["axes.seed[1]", "duplicate"]),
    ("axes:\n  policy: [fcfs\n  seed: [0]\n", ["YAML syntax error", "line"]),
    ("axis:\n  seed: [0]\n", ["'axis'", "unknown top-level key"]),
    ("base:\n  rate: 1.0\naxes:\n  rate_scale: [2]\n", ["rate_scale", "not both"]),
    ("base:\n  seed: 1\naxes:\n  seed: [0, 2]\n", ["axes.seed", "also set in base"]),
    ("base:\n  trace: no_such_trace\n", ["base.trace", "no_such_trace"]),
])
def test_bad_grid_is_one_line_naming_file_and_key(tmp_path, capsys, text, needles):
    grid = write_grid(tmp_path, text, "bad.yaml")
    with pytest.raises(ConfigError) as exc:
        load_grid(grid)
    msg = str(exc.value)
    assert "\n" not in msg and str(grid) in msg
    for n in needles:
        assert n in msg
    assert run_cli(["sweep", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simspec: error: ") and needles[0] in err[0]
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs(tmp_path, capsys):
    grid = write_grid(tmp_path, SMALL)
    assert run_cli(["sweep", str(grid), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 run(s)" in out and "policy=srpt:predictor=oracle, spec=draft:k=4, rate=2.0" in out
    assert not (tmp_path / "out").exists()


# --- executors ----------------------------------------------------------------------------------

def test_sweep_table_has_one_row_per_run(reference):
    grid, out = reference
    df = read_sweep(out)
    g = load_grid(grid)
    assert list(df["run_id"]) == [r.run_id for r in g.runs]
    assert list(df.columns[:3]) == ["policy", "spec", "rate"]
    assert (df["status"] == "ok").all() and df["error"].isna().all()
    for col in ("latency_ms_p99", "ttft_ms_p99", "slo_attainment", "throughput_tokens_per_s",
                "offered_rate_rps", "replica_utilisation_mean"):
        assert df[col].notna().all(), col
    for row in df.itertuples():
        run = out / row.run_dir
        assert json.loads((run / "config.json").read_text())["sweep"]["run_id"] == row.run_id
        req = pd.read_parquet(run / "requests.parquet")
        assert len(req) == 40
        assert (len(req) - 1) / (req["arrival_s"].max() - req["arrival_s"].min()) == pytest.approx(row.rate)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["axes"] == ["policy", "spec", "rate"] and manifest["n_ok"] == 8


def test_dask_cluster_gives_the_same_rows_as_local_processes(reference, tmp_path, capsys):
    distributed = pytest.importorskip("dask.distributed")
    grid, ref = reference
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        code = run_cli(["sweep", str(grid), "--out", str(tmp_path / "dask"), "-q",
                        "--scheduler-address", cluster.scheduler_address])
    assert code == 0
    assert "ran on dask cluster" in capsys.readouterr().out
    pd.testing.assert_frame_equal(read_sweep(tmp_path / "dask"), read_sweep(ref))
    assert (tmp_path / "dask" / "sweep.parquet").read_bytes() == (ref / "sweep.parquet").read_bytes()
    for rid in read_sweep(ref)["run_id"]:  # and the same run outputs
        for f in ("requests.parquet", "steps.parquet", "summary.json"):
            assert (tmp_path / "dask" / "runs" / rid / f).read_bytes() == (ref / "runs" / rid / f).read_bytes()


def test_unreachable_scheduler_is_a_clear_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dask.distributed")
    import simspec.sweep

    monkeypatch.setattr(simspec.sweep, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = write_grid(tmp_path, SMALL)
    assert run_cli(["sweep", str(grid), "--out", str(tmp_path / "out"), "-q",
                    "--scheduler-address", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("simspec: error: --scheduler-address") and "cannot connect" in err[-1]


# --- restart ------------------------------------------------------------------------------------

def test_restart_after_a_kill_runs_only_the_missing_runs(reference, tmp_path):
    grid, ref = reference
    ids = list(read_sweep(ref)["run_id"])
    out = tmp_path / "resumed"
    (out / "runs").mkdir(parents=True)
    # what a killed sweep leaves: three finished runs, one half-written temp dir, a stale lock
    for rid in ids[:3]:
        shutil.copytree(ref / "runs" / rid, out / "runs" / rid)
        (out / "runs" / rid / "marker").write_text("untouched")
    partial = out / "runs" / f".{ids[3]}.tmp-k1ll3d"
    partial.mkdir()
    (partial / "config.json").write_text("{")
    (out / ".sweep.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345}))
    res = run_sweep(load_grid(grid), out, workers=2, progress=False)
    assert (res.n_skipped, res.n_executed, res.n_failed) == (3, 5, 0)
    assert not partial.exists() and not (out / ".sweep.lock").exists()
    assert any("partial" in n for n in res.notes)
    for rid in ids[:3]:
        assert (out / "runs" / rid / "marker").read_text() == "untouched"
    assert (out / "sweep.parquet").read_bytes() == (ref / "sweep.parquet").read_bytes()
    # a third attempt has nothing left to do
    again = run_sweep(load_grid(grid), out, workers=2, progress=False)
    assert (again.n_skipped, again.n_executed) == (8, 0)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_really_killed_sweep_resumes(tmp_path, how):
    """Kill a running `simspec sweep` (the whole process group: driver, forkserver, worker) after
    two runs, then rerun it: only the missing runs are done and the table is the clean one."""
    import signal
    import subprocess
    import sys
    import time

    doc = {"base": {"trace": "azure_code_2023", "first": 120}, "axes": {"rate": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}}
    grid = write_grid(tmp_path, doc)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "simspec.cli", "sweep", str(grid), "--out", str(out), "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    done = lambda: [p for p in (out / "runs").glob("*") if not p.name.startswith(".")] if (out / "runs").is_dir() else []
    deadline = time.monotonic() + 120
    while len(done()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the sweep finished before it could be killed")
    n_done = len(done())
    assert 2 <= n_done < 6
    if how == "SIGINT":
        assert proc.returncode == 130 and b"run the same command to resume" in err
        assert not (out / ".sweep.lock").exists()
    else:
        assert proc.returncode == -signal.SIGKILL and (out / ".sweep.lock").exists()
    assert not (out / "sweep.parquet").exists()
    res = run_sweep(load_grid(grid), out, workers=2, progress=False)
    assert (res.n_skipped, res.n_executed, res.n_failed) == (n_done, 6 - n_done, 0)
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]
    clean = run_sweep(load_grid(grid), tmp_path / "clean", workers=2, progress=False)
    pd.testing.assert_frame_equal(res.table, clean.table)


def test_a_live_sweep_in_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".sweep.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(SimspecError, match="another sweep"):
        run_sweep(expand_grid(SMALL), out, workers=1, progress=False)


# --- failures -----------------------------------------------------------------------------------

def test_a_failing_run_is_recorded_and_the_others_finish(tmp_path):
    doc = {"base": {"trace": "azure_code_2023", "first": 30},
           "axes": {"kv_budget_tokens": [None, 500], "spec": ["none", "draft:k=2"]}}
    grid = write_grid(tmp_path, doc)
    out = tmp_path / "out"
    assert run_cli(["sweep", str(grid), "--out", str(out), "--workers", "2", "-q"]) == 0
    df = read_sweep(out)
    assert list(df["status"]) == ["ok", "ok", "failed", "failed"]
    bad = df[df["status"] == "failed"]
    assert bad["error"].str.contains("KV tokens").all() and bad["latency_ms_mean"].isna().all()
    for rid in bad["run_id"]:
        rec = json.loads((out / "failed" / f"{rid}.json").read_text())
        assert rec["axes"]["kv_budget_tokens"] == 500 and "Traceback" in rec["traceback"]
        assert not (out / "runs" / rid).exists()
    assert df[df["status"] == "ok"]["latency_ms_mean"].notna().all()
    # restart: failed runs are kept as failed unless asked to retry
    res = run_sweep(load_grid(grid), out, workers=1, progress=False)
    assert (res.n_executed, res.n_failed) == (0, 2)
    res = run_sweep(load_grid(grid), out, workers=1, progress=False, retry_failed=True)
    assert (res.n_executed, res.n_failed) == (2, 2)


def test_workers_and_scheduler_address_are_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="--workers"):
        run_sweep(expand_grid(SMALL), tmp_path / "o", workers=2, scheduler_address="tcp://127.0.0.1:1",
                  progress=False)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_grids_are_valid(path):
    g = load_grid(path)
    assert g.runs and len({r.run_id for r in g.runs}) == len(g.runs)


def test_a_worker_finds_bundled_files_by_name_and_checks_their_hash(tmp_path):
    """A Dask worker on another machine may have simspec installed elsewhere."""
    from simspec.sweep import execute_run

    task = expand_grid({"base": {"first": 20}}).runs[0].task(tmp_path)
    task["options"]["trace"] = "/elsewhere/azure_code_2023.csv"
    task["options"]["profile"] = "/elsewhere/llama70b-4xh100-smartspec.json"
    assert execute_run(task)["status"] == "ok"
    task = expand_grid({"base": {"first": 20}}).runs[0].task(tmp_path / "other")
    task["trace_sha256"] = "0" * 64
    res = execute_run(task)
    assert res["status"] == "failed" and "not the trace the sweep was planned with" in res["error"]
