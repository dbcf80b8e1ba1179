"""simspec report: tables and plots from a finished sweep and from run directories."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from simspec.cli import main
from simspec.errors import SimspecError
from simspec.report import build_report, markdown_table, text_table
from simspec.sweep import load_grid, read_sweep, run_sweep

GRID = {
    "name": "rep",
    "base": {"trace": "azure_code_2023", "first": 40, "slo_ttft_ms": 3000, "slo_tpot_ms": 150},
    "axes": {"spec": ["none", "draft:k=4"], "rate": [0.5, 2.0], "seed": [0, 1]},
}
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(args):
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    (d / "grid.yaml").write_text(yaml.safe_dump(GRID))
    run_sweep(load_grid(d / "grid.yaml"), d / "sweep", workers=2, progress=False)
    return d / "sweep"


def test_report_on_a_sweep_writes_tables_and_plots(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert run_cli(["report", str(sweep_dir), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    expected = {"summary.csv", "summary.md", "report.md", "latency_cdf.png", "latency_vs_rate.png",
                "goodput_vs_rate.png", "accepted_per_step.png"}
    assert expected <= files
    timelines = sorted(f for f in files if f.startswith("timeline_"))
    assert timelines == ["timeline_draft_k4.png", "timeline_none.png"]  # one per series, no "=" in names
    for f in files:
        if f.endswith(".png"):
            data = (out / f).read_bytes()
            assert data.startswith(PNG) and len(data) > 10_000, f
    csv = pd.read_csv(out / "summary.csv")
    assert len(csv) == 8 and {"spec", "rate", "seed", "latency_ms_p99", "label"} <= set(csv.columns)
    assert set(csv["label"]) == {"none", "draft:k=4"}
    md = (out / "report.md").read_text()
    assert "![latency vs rate](latency_vs_rate.png)" in md and "| rate | seed | spec | status |" in md
    printed = capsys.readouterr().out
    assert "sweep rep" in printed and "p99 latency (ms)" in printed and "wrote" in printed
    # --out exists: refused without --force
    assert run_cli(["report", str(sweep_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_report_on_runs_and_a_sweep_with_failures(sweep_dir, tmp_path):
    df = read_sweep(sweep_dir)
    pick = df[(df["rate"] == 2.0) & (df["seed"] == 0)]
    runs = [sweep_dir / r for r in pick["run_dir"]]
    doc = {"name": "kv", "base": {"trace": "azure_code_2023", "first": 20},
           "axes": {"kv_budget_tokens": [None, 500]}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(doc))
    run_sweep(load_grid(tmp_path / "g.yaml"), tmp_path / "s", workers=1, progress=False)
    rep = build_report(runs + [tmp_path / "s"])
    names = set(rep.files)
    # two groups: the runs given directly and the sweep, each with its own file prefix
    assert {"runs_latency_cdf.png", "runs_accepted_per_step.png", "runs_timeline_spec_none.png",
            "runs_timeline_spec_draft_k4.png", "kv_latency_cdf.png", "kv_timeline_default.png"} <= names
    assert "kv_latency_vs_rate.png" not in names  # that sweep has no rate axis
    table = "\n".join(rep.terminal)
    assert "runs (2):" in table and "draft:k=4" in table and "1 failed" in table
    md = rep.files["report.md"].decode()
    assert "Failed runs" in md and "KV tokens" in md
    csv = rep.files["summary.csv"].decode().splitlines()
    assert len(csv) == 1 + 2 + 2


def test_report_refuses_what_is_not_a_run_or_sweep(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimspecError, match="neither a run directory"):
        build_report([tmp_path / "empty"])
    with pytest.raises(SimspecError, match="no such run or sweep"):
        build_report([tmp_path / "missing"])


def test_tables_render():
    df = pd.DataFrame({"policy": ["fcfs", "a|b"], "mean latency (ms)": ["1,234.5", "-"]})
    md = markdown_table(df)
    assert md.splitlines()[0] == "| policy | mean latency (ms) |" and "a\\|b" in md
    txt = text_table(df).splitlines()
    assert txt[2].endswith("1,234.5") and len(txt) == 4
