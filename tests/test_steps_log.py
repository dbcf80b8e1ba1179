"""--steps-log full|sampled|none: what steps.parquet keeps. Sampled rows are exactly the full log's
rows whose per-replica step index is a multiple of the period (whatever the window size); none
keeps the columns and no rows; requests.parquet and the summary are the same in every mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from simspec.errors import ConfigError
from simspec.profile import load_profile
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.output import read_run, write_run
from simspec.simulator.run import simulate
from simspec.simulator.steplog import COLUMNS, StepLog
from simspec.traces.formats import bundled_trace_path, load_trace
from simspec.traces.transforms import apply_transforms


@pytest.fixture(scope="module")
def trace():
    return apply_transforms(load_trace(bundled_trace_path("azure_code_2023")), first=600)


@pytest.fixture(scope="module")
def profile():
    return load_profile("llama70b-4xh100-smartspec")


def _cfg(**kw):
    base = dict(scheduler=ComponentSpec.parse("fcfs", "p"), method=ComponentSpec.parse("draft:k=4", "s"),
                spec_len=ComponentSpec.parse("smartspec", "l"), replicas=2)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("window_steps", [1, 256])
def test_sampled_is_every_nth_step_of_the_full_log(trace, profile, window_steps):
    full = simulate(_cfg(window_steps=window_steps), trace, profile)
    every = 7
    samp = simulate(_cfg(window_steps=window_steps, steps_log="sampled", steps_log_every=every), trace, profile)
    none = simulate(_cfg(window_steps=window_steps, steps_log="none"), trace, profile)
    want = full.steps[full.steps["step"] % every == 0].reset_index(drop=True)
    assert 0 < len(samp.steps) < len(full.steps)
    pd.testing.assert_frame_equal(samp.steps, want, check_exact=True)
    assert len(none.steps) == 0 and list(none.steps.columns) == list(full.steps.columns)
    assert list(none.steps.dtypes) == list(full.steps.dtypes)
    for other in (samp, none):
        pd.testing.assert_frame_equal(other.requests, full.requests, check_exact=True)
        assert other.summary == full.summary  # step count and mean batch size count every step
    assert full.summary["steps"] == len(full.steps)
    assert full.summary["mean_batch_size"] == float(full.steps["batch_size"].mean())


def test_the_sampled_rows_do_not_depend_on_the_window_size(trace, profile):
    a = simulate(_cfg(window_steps=1, steps_log="sampled", steps_log_every=5), trace, profile)
    b = simulate(_cfg(window_steps=64, steps_log="sampled", steps_log_every=5), trace, profile)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)


def test_steplog_window_sampling_matches_one_step_appends():
    rng = np.random.default_rng(0)
    for every in (1, 3, 10):
        one, win = StepLog(mode="sampled", every=every), StepLog(mode="sampled", every=every)
        step = 0
        for m in rng.integers(1, 12, size=40):
            starts = np.cumsum(rng.random(m)) + step
            ends = starts + 0.5
            ms = rng.random(m)
            bs = rng.integers(1, 9, size=m)
            kv = np.array([int(rng.integers(0, 100))])  # one value for the whole window (broadcast)
            win.append_window(1, step, starts, ends, ms, bs, bs + 1, bs * 2, bs, bs + 3, bs * 5, kv, 4, ms * 2)
            for j in range(m):
                one.append_one(1, step + j, starts[j], ends[j], ms[j], bs[j], 0, bs[j] + 1, bs[j] * 2, bs[j],
                               bs[j] + 3, bs[j] * 5, kv[0], 4, ms[j] * 2)
            step += int(m)
        assert one.n_steps == win.n_steps == step and one.batch_size_sum == win.batch_size_sum
        for c in COLUMNS:
            assert np.array_equal(one.columns()[c], win.columns()[c]), (every, c)
        assert win.n == len(range(0, step, every))


def test_bad_mode_and_period_are_config_errors():
    with pytest.raises(ConfigError, match="steps_log: unknown 'some'"):
        RunConfig(steps_log="some")
    with pytest.raises(ConfigError, match="steps_log_every: must be an integer >= 1"):
        RunConfig(steps_log="sampled", steps_log_every=0)


def test_identity_leaves_defaults_out_so_old_run_ids_stand():
    d = RunConfig().to_dict()
    assert d["steps_log"] == "full" and d["steps_log_every"] == 100
    ident = RunConfig().identity_dict()
    assert "steps_log" not in ident and "steps_log_every" not in ident
    assert RunConfig(steps_log="none").identity_dict()["steps_log"] == "none"
    assert "steps_log_every" not in RunConfig(steps_log="none").identity_dict()
    assert RunConfig(steps_log="sampled", steps_log_every=9).identity_dict()["steps_log_every"] == 9


def test_run_directory_records_the_mode_and_report_says_why_no_timeline(tmp_path, trace, profile):
    res = simulate(_cfg(steps_log="none"), trace, profile)
    write_run(res, tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert run["steps_log"] == "none" and len(run["steps"]) == 0 and list(run["steps"].columns) == list(COLUMNS)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["steps_log"] == "none"
    r = subprocess.run([sys.executable, "-m", "simspec.cli", "report", str(tmp_path / "run"), "--out",
                        str(tmp_path / "rep")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "no timeline for" in md and "--steps-log none" in md
    assert not list((tmp_path / "rep").glob("timeline_*.png"))


def test_cli_steps_log_options(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("request_id,arrival_s,prompt_tokens,output_tokens\n"
                   + "".join(f"r{i},{i * 0.2},{50 + i},{30 + i % 9}\n" for i in range(40)))
    outs = {}
    for mode in ("full", "sampled", "none"):
        out = tmp_path / mode
        r = subprocess.run([sys.executable, "-m", "simspec.cli", "replay", str(csv), "--spec", "draft:k=3",
                            "--steps-log", mode, "--steps-log-every", "4", "--out", str(out), "-q"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs[mode] = out
    assert (outs["full"] / "requests.parquet").read_bytes() == (outs["none"] / "requests.parquet").read_bytes()
    assert (outs["full"] / "summary.json").read_bytes() == (outs["sampled"] / "summary.json").read_bytes()
    full = pd.read_parquet(outs["full"] / "steps.parquet")
    samp = pd.read_parquet(outs["sampled"] / "steps.parquet")
    assert len(pd.read_parquet(outs["none"] / "steps.parquet")) == 0
    pd.testing.assert_frame_equal(samp, full[full["step"] % 4 == 0].reset_index(drop=True))
    r = subprocess.run([sys.executable, "-m", "simspec.cli", "replay", str(csv), "--steps-log", "most"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "most" in r.stderr


def test_sweep_grid_takes_steps_log_and_keeps_default_ids():
    from simspec.sweep import expand_grid

    base = {"trace": "azure_code_2023", "first": 50}
    plain = expand_grid({"base": base, "axes": {"seed": [0]}})
    spelled = expand_grid({"base": {**base, "steps_log": "full", "steps_log_every": 100}, "axes": {"seed": [0]}})
    none = expand_grid({"base": base, "axes": {"steps_log": ["none", "sampled"]}})
    assert plain.runs[0].run_id == spelled.runs[0].run_id  # the default spelled out: the same run
    assert plain.runs[0].run_config["steps_log"] == "full"
    assert [r.run_config["steps_log"] for r in none.runs] == ["none", "sampled"]
    assert len({plain.runs[0].run_id, *(r.run_id for r in none.runs)}) == 3
    with pytest.raises(ConfigError, match="steps_log"):
        expand_grid({"base": {**base, "steps_log": "all"}, "axes": {"seed": [0]}})


def test_steps_frame_consume_moves_the_rows_and_keeps_the_counters():
    """``steps_frame(logs, consume=True)`` (what ``simulate`` uses, so a long run's log is held
    about once) gives the same frame as copying, and leaves each log's step counters but no rows."""
    from simspec.simulator.metrics import steps_frame

    def logs():
        out = []
        for r in range(3):
            lg = StepLog(capacity=2)
            for s in range(5 + r):
                lg.append_one(r, s, 0.1 * s + 0.01 * r, 0.1 * s + 0.05, 40.0, 2, 0, 3, 6, 4, 6, 8, 512, 1, float("nan"))
            out.append(lg)
        return out

    ref = steps_frame(logs())
    moved_from = logs()
    got = steps_frame(moved_from, consume=True)
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert [lg.n for lg in moved_from] == [0, 0, 0]
    assert [lg.n_steps for lg in moved_from] == [5, 6, 7] and all(lg.columns()["step"].size == 0 for lg in moved_from)
