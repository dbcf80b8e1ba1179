"""The bad-input and everyday-use battery of issue 17: every mistake is one line on stderr, exit
status 2, nothing written and nothing touched; outputs are safe (marker, --force, umask, checked
before any work); vLLM's vocabulary.

Runs the CLI in-process (``simspec.cli.main``) on a three-request trace, so each case takes
milliseconds; ``simulate`` is replaced by a tripwire where a case must fail before simulating.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from simspec.cli import main
from tests.conftest import flat_profile_doc

SMALL = "request_id,arrival_s,prompt_tokens,output_tokens\nr0,0.0,100,20\nr1,0.5,50,10\nr2,0.7,80,30\n"


def cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    # click's own usage errors add the usage line and a hint before their one "Error:" line
    lines = [ln for ln in err.splitlines() if ln.strip() and "\r" not in ln
             and not ln.startswith(("Usage: ", "Try '"))]
    assert len(lines) == 1 and lines[0].startswith(("simspec: error: ", "Error: ")), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory with the small trace and a flat profile in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.csv").write_text(SMALL)
    (tmp_path / "flat.json").write_text(json.dumps(flat_profile_doc()))
    return tmp_path


@pytest.fixture
def no_simulation(monkeypatch):
    """Fail the test if anything is simulated."""
    import simspec.simulator.run as run

    def tripwire(*a, **k):
        raise AssertionError("simulated before the error was found")

    monkeypatch.setattr(run, "simulate", tripwire)


def _tree(p: Path) -> dict[str, bytes]:
    return {str(q.relative_to(p)): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}


# ---------------------------------------------------------------------------------------------
# 1. --force replaces only simspec outputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["user_file", "user_dir", "dot", "dev_null", "parent"])
def test_force_refuses_what_simspec_did_not_write(work, capsys, no_simulation, target):
    (work / "user_file").write_text("precious")
    (work / "user_dir").mkdir()
    (work / "user_dir" / "thesis.tex").write_text("precious")
    (work / "sub").mkdir()
    out = {"user_file": "user_file", "user_dir": "user_dir", "dot": ".", "dev_null": "/dev/null",
           "parent": ".."}[target]
    if target == "parent":
        os.chdir(work / "sub")
    before = _tree(work)
    code, _, err = cli(capsys, "replay", work / "small.csv", "--profile", work / "flat.json", "--out", out,
                       "--force", "-q")
    one_line_error(code, err)
    assert _tree(work) == before
    assert not [p for p in work.rglob(".*") if ".old-" in p.name or ".tmp-" in p.name]
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_force_replaces_a_simspec_run(work, capsys):
    args = ["replay", "small.csv", "--profile", "flat.json", "--out", "run", "-q"]
    assert cli(capsys, *args)[0] == 0
    marker = json.loads((work / "run" / ".simspec-output").read_text())
    assert marker["kind"] == "run" and marker["simspec_version"]
    code, _, err = cli(capsys, *args)
    assert "already exists" in one_line_error(code, err)
    assert cli(capsys, *args, "--force")[0] == 0
    # a report never replaces a run (nor a run a report), --force or not
    code, _, err = cli(capsys, "report", "run", "--out", "run", "--force", "--no-progress")
    assert "not a report" in one_line_error(code, err)
    assert json.loads((work / "run" / ".simspec-output").read_text())["kind"] == "run"


# ---------------------------------------------------------------------------------------------
# 2. every output location is checked before any work
# ---------------------------------------------------------------------------------------------

UNWRITABLE = "a_file/out"  # below a regular file: can never be created (root included)


@pytest.mark.parametrize("args", [
    ["replay", "small.csv", "--profile", "flat.json", "--out", UNWRITABLE],
    ["compare", "small.csv", "--profile", "flat.json", "--policies", "fcfs", "--out", UNWRITABLE],
    ["report", "run", "--out", UNWRITABLE],
    ["sweep", "grid.yaml", "--out", UNWRITABLE],
    ["capacity", "--trace", "small.csv", "--profile", "flat.json", "--slo-ttft-ms", "100", "--out",
     UNWRITABLE + ".json"],
    ["trace", "convert", "small.csv", UNWRITABLE + ".csv"],
    ["trace", "synth", "--n", "5", "--rate", "1", "--lengths", "fixed:10,10", "--out", UNWRITABLE + ".csv"],
    ["profile", "analytic", "--gpu", "h200", "--model", "llama-3-8b", "--out", UNWRITABLE + ".json"],
    ["calibrate", "acceptance", "--method", "draft", "--out", UNWRITABLE + ".json"],
    ["calibrate", "latency", "--out", UNWRITABLE + ".json"],
], ids=["replay", "compare", "report", "sweep", "capacity", "trace-convert", "trace-synth", "profile-analytic",
        "calibrate-acceptance", "calibrate-latency"])
def test_unwritable_output_is_refused_first(work, capsys, no_simulation, args):
    (work / "a_file").write_text("x")
    (work / "run").mkdir()
    (work / "grid.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\n")
    before = _tree(work)
    code, _, err = cli(capsys, *args)
    assert "a_file" in one_line_error(code, err)
    assert _tree(work) == before


@pytest.mark.parametrize("args", [
    ["profile", "analytic", "--gpu", "h200", "--model", "llama-3-8b", "--out", "user.json", "--force"],
    ["calibrate", "acceptance", "--method", "draft", "--out", "user.json"],
    ["calibrate", "latency", "--out", "user.json"],
], ids=["profile-analytic-force", "calibrate-acceptance", "calibrate-latency"])
def test_profile_writers_leave_a_user_file_alone(work, capsys, args):
    (work / "user.json").write_text('{"mine": true}')
    before = _tree(work)
    code, _, err = cli(capsys, *args)
    assert "user.json" in one_line_error(code, err)
    assert _tree(work) == before


def test_profile_analytic_force_replaces_a_profile(work, capsys):
    args = ["profile", "analytic", "--gpu", "h200", "--model", "llama-3-8b", "--out", "p.json"]
    assert cli(capsys, *args)[0] == 0
    assert "already exists" in one_line_error(*cli(capsys, *args)[:3:2])
    assert cli(capsys, *args, "--force")[0] == 0


# ---------------------------------------------------------------------------------------------
# 3. compare validates everything before the first simulation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policies, needle", [("fcfs,bogus", "--policies: unknown scheduler 'bogus'"),
                                              ("fcfs,fcfs", "twice"), ("fcfs,,srpt", "empty"),
                                              ("srpt,fcfs", "already exists"),
                                              ("fcfs,srpt:foo=1", "--policies srpt: unknown parameter(s) foo"),
                                              ("fcfs,srpt:foo=1", "--spec-len fixed: unknown parameter(s) bar")])
def test_compare_checks_all_up_front(work, capsys, monkeypatch, policies, needle):
    args = ["compare", "small.csv", "--profile", "flat.json", "--policies", policies]
    if "spec-len" in needle:
        args = ["compare", "small.csv", "--profile", "flat.json", "--spec-len", "fixed:bar=1", "--policies", "fcfs"]
    if needle == "already exists":  # fcfs was written by an earlier compare: found before srpt runs
        assert cli(capsys, *args[:-1], "fcfs", "--out", "cmp")[0] == 0
        args += ["--out", "cmp"]
    import simspec.simulator.run as run

    def tripwire(*a, **k):
        raise AssertionError("simulated before the error was found")

    monkeypatch.setattr(run, "simulate", tripwire)
    code, _, err = cli(capsys, *args)
    assert needle in one_line_error(code, err)
    assert not (work / "cmp" / "srpt").exists()


# ---------------------------------------------------------------------------------------------
# 4. profiles, run and sweep files that cannot be read
# ---------------------------------------------------------------------------------------------

def _negative_profile(path: Path) -> None:
    doc = flat_profile_doc()
    doc["latency"]["stages"]["target_step"]["coef"] = {"c0": 5.0, "c_b": -0.5, "c_t": 0.0, "c_kv": 0.0}
    path.write_text(json.dumps(doc))


def _pickle_profile(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"schema": "simspec-profile", "blob": b"\xff\xfe" * 10}))


@pytest.mark.parametrize("make, needle", [(_negative_profile, "coef.c_b"), (_pickle_profile, "not a JSON text file")],
                         ids=["negative-linear-coefficient", "pickle-renamed-json"])
def test_bad_profile_is_one_line(work, capsys, no_simulation, make, needle):
    make(work / "bad.json")
    code, _, err = cli(capsys, "replay", "small.csv", "--profile", "bad.json", "--out", "run")
    assert needle in one_line_error(code, err)
    assert not (work / "run").exists()


# the range check: only the stages the method evaluates, worded by the profile's source, every
# stage named, the context window said; the bundled analytic profile's target (Llama-2-70B) has a
# 4096-token window and grid, its draft (llama-68m) 2048
ANALYTIC = "llama2-70b-h100x4-analytic"


def _trace(work: Path, rows: list[tuple[int, int]]) -> str:
    body = "request_id,arrival_s,prompt_tokens,output_tokens\n" + "".join(
        f"r{i},{0.1 * i},{p},{o}\n" for i, (p, o) in enumerate(rows))
    (work / "long.csv").write_text(body)
    return "long.csv"


def test_range_check_ignores_stages_the_method_does_not_use(work, capsys):
    t = _trace(work, [(2900, 50)])  # beyond the draft's 2048, within the target's 4096
    code, _, err = cli(capsys, "replay", t, "--profile", ANALYTIC, "--spec", "none", "--out", "run", "-q")
    assert code == 0, err
    notes = json.loads((work / "run" / "config.json").read_text())["notes"]
    assert not any("extrapolated" in n for n in notes), notes
    code, _, err = cli(capsys, "replay", t, "--profile", ANALYTIC, "--spec", "draft:k=4", "--out", "run2")
    line = one_line_error(code, err)
    assert "draft_step.tokens_per_request up to 2950 > 2048" in line and "draft_step.context_tokens" in line
    assert "analytic grid" in line and "measured" not in line and "more)" not in line
    assert "draft model's context window of 2048" in line
    assert "layer." not in line  # the target's stages are in range


def test_range_check_uses_the_longest_request_not_two_maxima(work, capsys):
    # largest prompt + largest output = 7000 > 4096, but no request is longer than 3510 tokens
    t = _trace(work, [(3500, 10), (10, 3500)])
    code, _, err = cli(capsys, "replay", t, "--profile", ANALYTIC, "--spec", "none", "--out", "run", "-q")
    assert code == 0, err


def test_range_check_names_the_context_window(work, capsys):
    t = _trace(work, [(4000, 200)])
    code, _, err = cli(capsys, "replay", t, "--profile", ANALYTIC, "--spec", "none", "--out", "run")
    line = one_line_error(code, err)
    assert "target model's context window of 4096" in line and "longest request (4200 tokens)" in line
    assert not (work / "run").exists()


def test_negative_linear_coefficient_within_valid_range_only(tmp_path):
    from simspec.errors import ProfileError
    from simspec.profile import profile_from_doc

    doc = flat_profile_doc()
    stage = doc["latency"]["stages"]["target_step"]
    stage["coef"] = {"c0": 10.0, "c_b": -0.1, "c_t": 0.0, "c_kv": 0.0}
    stage["valid"] = {"batch_size": [1, 64]}  # 10 - 6.4 > 0: fine in range
    profile_from_doc(doc, "ok")
    stage["valid"] = {"batch_size": [1, 256]}  # 10 - 25.6 < 0 at batch 256
    with pytest.raises(ProfileError, match=r"coef\.c_b.*batch_size 256"):
        profile_from_doc(doc, "bad")


@pytest.mark.parametrize("victim, payload", [("requests.parquet", b"PAR1 not really"),
                                             ("steps.parquet", b"\x00" * 64),
                                             ("summary.json", b'{"n_requests": 3,'),
                                             ("config.json", b"\x80\x04\x95pickle")])
def test_report_on_a_corrupt_run_is_one_line(work, capsys, victim, payload):
    assert cli(capsys, "replay", "small.csv", "--profile", "flat.json", "--out", "run", "-q")[0] == 0
    (work / "run" / victim).write_bytes(payload)
    code, _, err = cli(capsys, "report", "run", "--out", "rep", "--no-progress")
    assert victim in one_line_error(code, err)
    assert not (work / "rep").exists()


def test_report_on_a_corrupt_sweep_table_is_one_line(work, capsys):
    (work / "sw").mkdir()
    (work / "sw" / "sweep.parquet").write_bytes(b"garbage")
    code, _, err = cli(capsys, "report", "sw", "--out", "rep")
    assert "sweep.parquet" in one_line_error(code, err)


# ---------------------------------------------------------------------------------------------
# 5. seeds, prompt files, compressed and huge traces
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["replay", "small.csv", "--profile", "flat.json", "--seed", "-5"],
    ["compare", "small.csv", "--profile", "flat.json", "--seed", "-1"],
    ["trace", "synth", "--n", "5", "--rate", "1", "--lengths", "fixed:10,10", "--seed", "-1", "--out", "s.csv"],
    ["trace", "stats", "small.csv", "--seed", "-1"],
], ids=["replay", "compare", "synth", "stats"])
def test_negative_seed_refused_at_parse_time(work, capsys, no_simulation, args):
    code, _, err = cli(capsys, *args)
    assert code == 2 and "--seed" in err and "Traceback" not in err
    assert not (work / "s.csv").exists()


def test_negative_seed_refused_by_grid_validation(work, capsys):
    (work / "g.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\naxes:\n  seed: [1, -1]\n")
    code, _, err = cli(capsys, "sweep", "g.yaml", "--out", "sw", "--dry-run")
    assert "axes.seed[1]" in one_line_error(code, err)


def test_non_utf8_prompts_is_one_line(work):
    from simspec.calibrate.prompts import load_prompts
    from simspec.errors import SimspecError

    (work / "p.jsonl").write_bytes(b'{"question_id": 1, "category": "x", "turns": ["caf\xe9"]}\n')
    with pytest.raises(SimspecError, match="not UTF-8") as exc:
        load_prompts(work / "p.jsonl")
    assert "\n" not in str(exc.value)


def test_gzip_trace_is_read(work, capsys):
    (work / "small.csv.gz").write_bytes(gzip.compress(SMALL.encode()))
    code, out, err = cli(capsys, "trace", "stats", "small.csv.gz", "--json")
    assert code == 0, err
    assert json.loads(out)["requests"] == 3
    assert cli(capsys, "replay", "small.csv.gz", "--profile", "flat.json", "--out", "run", "-q")[0] == 0


def test_corrupt_gzip_is_one_line(work, capsys):
    (work / "bad.csv.gz").write_bytes(gzip.compress(SMALL.encode())[:30])
    code, _, err = cli(capsys, "trace", "stats", "bad.csv.gz")
    assert "gzip" in one_line_error(code, err)


HEADER = "request_id,arrival_s,prompt_tokens,output_tokens\n"


@pytest.mark.parametrize("body, needle", [
    (HEADER + "r0," + "9" * 100_000 + "x,1,1\n", "not a number"),
    (HEADER + "x" * 5000 + ",0,1,1\n", "at most 1,024"),
    (HEADER + "y" * (3 << 20) + ",0,1,1\n", "line 2: longer than"),
    ("z" * (20 << 20), "line 1: longer than"),
    (HEADER + "r0,0,1,1\n" + "r0,1,1,1\n".replace("r0", "q" * 900) * 2, "duplicate id"),
], ids=["100k-field", "5k-request-id", "3MB-line", "20MB-single-line", "long-duplicate-id"])
def test_huge_fields_are_refused_and_not_echoed(work, capsys, body, needle):
    (work / "huge.csv").write_text(body)
    code, _, err = cli(capsys, "trace", "stats", "huge.csv", "--no-progress")
    line = one_line_error(code, err)
    assert needle in line
    assert len(line) < 400


# ---------------------------------------------------------------------------------------------
# 6. permissions follow the umask
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_outputs_honour_the_umask(work, capsys, mask):
    old = os.umask(mask)
    try:
        assert cli(capsys, "replay", "small.csv", "--profile", "flat.json", "--out", "run", "-q")[0] == 0
        assert cli(capsys, "report", "run", "--out", "rep", "--no-progress")[0] == 0
        assert cli(capsys, "trace", "convert", "small.csv", "c.csv")[0] == 0
    finally:
        os.umask(old)
    for d in ("run", "rep"):
        assert stat.S_IMODE((work / d).stat().st_mode) == 0o777 & ~mask
    for f in ("run/config.json", "run/summary.json", "run/requests.parquet", "rep/summary.csv", "c.csv"):
        assert stat.S_IMODE((work / f).stat().st_mode) == 0o666 & ~mask, f


# ---------------------------------------------------------------------------------------------
# 7. config.json is enough to rerun a replay
# ---------------------------------------------------------------------------------------------

def test_config_records_the_trace_and_transforms(work, capsys):
    args = ["replay", "small.csv", "--profile", "flat.json", "--rate", "2", "--first", "2",
            "--max-output-tokens", "15", "--window", "0:10", "--seed", "3", "--out", "run", "-q"]
    assert cli(capsys, *args)[0] == 0
    cfg = json.loads((work / "run" / "config.json").read_text())
    tr = cfg["trace"]
    assert Path(tr["path"]).is_absolute() and Path(tr["path"]) == (work / "small.csv").resolve()
    assert tr["sha256"] == hashlib.sha256((work / "small.csv").read_bytes()).hexdigest()
    assert tr["transforms"]["rate"] == 2.0 and tr["transforms"]["first"] == 2
    assert tr["transforms"]["max_output_tokens"] == 15 and tr["transforms"]["window"] == "0:10"
    # rerun from the record alone: the same requests, byte for byte
    t = tr["transforms"]
    rerun = ["replay", tr["path"], "--profile", cfg["profile"]["path"], "--seed", cfg["run"]["seed"],
             "--out", "rerun", "-q"]
    for k, v in t.items():
        if v not in (None, [], ()):
            rerun += [f"--{k.replace('_', '-')}", v]
    assert cli(capsys, *rerun)[0] == 0
    assert (work / "run" / "requests.parquet").read_bytes() == (work / "rerun" / "requests.parquet").read_bytes()


# ---------------------------------------------------------------------------------------------
# 8. validate --force, sweep --out, default names, capacity twice, -q, sweep.parquet base values
# ---------------------------------------------------------------------------------------------

def test_validate_refuses_to_overwrite(work, capsys):
    (work / "report").mkdir()
    (work / "report" / "mine.txt").write_text("precious")
    code, _, err = cli(capsys, "validate", "small.csv", "--profile", "flat.json", "--out", "report")
    assert "already exists" in one_line_error(code, err)
    code, _, err = cli(capsys, "validate", "small.csv", "--profile", "flat.json", "--out", "report", "--force")
    assert "not a simspec output" in one_line_error(code, err)
    assert (work / "report" / "mine.txt").read_text() == "precious"


def test_sweep_out_into_a_non_sweep_directory_is_refused(work, capsys):
    (work / "g.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\n")
    assert cli(capsys, "replay", "small.csv", "--profile", "flat.json", "--out", "run", "-q")[0] == 0
    before = _tree(work / "run")
    code, _, err = cli(capsys, "sweep", "g.yaml", "--out", "run", "-q")
    assert "not a sweep directory" in one_line_error(code, err)
    assert _tree(work / "run") == before


def test_default_run_names_do_not_collide(work, capsys):
    variants = [[], ["--replicas", "2"], ["--first", "2"], ["--rate", "3"], ["--spec-len", "smartspec"],
                ["--profile", "llama70b-4xh100-smartspec"]]
    for extra in variants:
        args = ["replay", "small.csv", "--profile", "flat.json", "-q", *extra]
        if "--profile" in extra:
            args = ["replay", "small.csv", "-q", *extra]
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert out.startswith("wrote runs/") and "=" not in out  # -q still says where
    names = [p.name for p in (work / "runs").iterdir()]
    assert len(names) == len(variants)
    assert any("-r2-" in n for n in names) and any("llama70b" in n for n in names)


def test_capacity_twice_with_force(work, capsys):
    args = ["capacity", "--trace", "small.csv", "--profile", "flat.json", "--slo-ttft-ms", "100",
            "--rate-lo", "0.5", "--rate-hi", "50", "-q"]
    assert cli(capsys, *args)[0] == 0
    doc = json.loads((work / "capacity.json").read_text())
    assert doc["simspec_output"]["kind"] == "capacity"
    code, _, err = cli(capsys, *args)
    assert "already exists" in one_line_error(code, err)
    code, out, _ = cli(capsys, *args, "--force")
    assert code == 0 and "wrote capacity.json" in out


def test_sweep_table_holds_base_values(work, capsys):
    (work / "g.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\n  spec: 'draft:k=2'\n"
                                 "  max_num_seqs: 4\n  goodput: 'ttft:100 e2el:5000'\naxes:\n  policy: [fcfs, srpt]\n")
    code, out, err = cli(capsys, "sweep", "g.yaml", "--out", "sw", "-q", "--workers", "1")
    assert code == 0, err
    df = pd.read_parquet(work / "sw" / "sweep.parquet")
    assert list(df["spec"]) == ["draft:k=2"] * 2 and list(df["profile"]) == ["flat.json"] * 2
    assert list(df["max_batch"]) == [4, 4] and list(df["policy"]) == ["fcfs", "srpt"]
    assert {"p99_ttft_ms", "mean_itl_ms", "request_throughput", "request_goodput"} <= set(df.columns)
    assert (df["request_goodput"] > 0).all()


def test_unknown_policy_parameter_is_a_grid_error(work, capsys):
    (work / "g.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\naxes:\n"
                                 "  policy: [fcfs, 'srpt:foo=1']\n  spec_len: [fixed, 'smartspec:bar=2']\n")
    code, _, err = cli(capsys, "sweep", "g.yaml", "--out", "sw", "--dry-run")
    assert "axes.policy[1]: unknown parameter(s) foo" in one_line_error(code, err)
    assert not (work / "sw").exists()


def test_bad_grid_goodput_is_a_grid_error(work, capsys):
    (work / "g.yaml").write_text("base:\n  trace: small.csv\n  profile: flat.json\n  goodput: 'foo:1'\n")
    code, _, err = cli(capsys, "sweep", "g.yaml", "--out", "sw", "--dry-run")
    assert "base.goodput" in one_line_error(code, err)


# ---------------------------------------------------------------------------------------------
# 10. notebook outside the repository
# ---------------------------------------------------------------------------------------------

def test_notebook_says_what_is_missing_outside_the_repo(tmp_path, monkeypatch):
    nb = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / "sweep_analysis.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIMSPEC_SWEEP", raising=False)
    ns: dict = {}
    exec(cells[0], ns)
    with pytest.raises(FileNotFoundError, match="SIMSPEC_SWEEP"):
        exec(cells[1], ns)


# ---------------------------------------------------------------------------------------------
# 11. help text
# ---------------------------------------------------------------------------------------------

def test_every_option_has_help_and_optional_trace_shows_so(capsys):
    import click

    from simspec.cli import cli as group

    def walk(cmd, name):
        ctx = click.Context(cmd)
        if isinstance(cmd, click.Group):
            for n in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, n), f"{name} {n}")
        else:
            yield name, cmd

    for name, cmd in walk(group, "simspec"):
        missing = [p.opts[0] for p in cmd.params if isinstance(p, click.Option) and not p.help]
        assert not missing, f"{name}: {missing}"
    for sub in ("replay", "compare"):
        code, out, _ = cli(capsys, sub, "--help")
        assert "[TRACE]" in out.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# 12. vLLM's vocabulary
# ---------------------------------------------------------------------------------------------

def test_vllm_aliases_equal_simspec_options(work, capsys):
    a = ["replay", "small.csv", "--profile", "flat.json", "-q"]
    assert cli(capsys, *a, "--max-batch", "1", "--max-batched-tokens", "200", "--rate", "3", "--out", "x")[0] == 0
    assert cli(capsys, *a, "--max-num-seqs", "1", "--max-num-batched-tokens", "200", "--request-rate", "3",
               "--out", "y")[0] == 0
    for f in ("requests.parquet", "steps.parquet", "summary.json"):
        assert (work / "x" / f).read_bytes() == (work / "y" / f).read_bytes()
    cfg = json.loads((work / "y" / "config.json").read_text())
    assert cfg["run"]["max_batch_size"] == 1 and cfg["run"]["max_batched_tokens"] == 200


def test_burstiness_is_gamma_with_vllm_parameters_and_seeded():
    from simspec.traces.transforms import gamma_burst_arrivals

    for b in (0.5, 1.0, 4.0):
        t = gamma_burst_arrivals(200_001, 5.0, b, seed=7)
        gaps = np.diff(t)
        assert t[0] == 0.0
        assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.02)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(b), rel=0.03)
    assert np.array_equal(gamma_burst_arrivals(100, 5.0, 2.0, 1), gamma_burst_arrivals(100, 5.0, 2.0, 1))
    assert not np.array_equal(gamma_burst_arrivals(100, 5.0, 2.0, 1), gamma_burst_arrivals(100, 5.0, 2.0, 2))


@pytest.mark.parametrize("args, needle", [
    (["--burstiness", "2"], "needs --rate"),
    (["--rate", "2", "--burstiness", "0"], "--burstiness"),
    (["--goodput", "ttft:abc"], "--goodput"),
    (["--goodput", "foo:10"], "--goodput"),
    (["--goodput", "ttft:10 ttft:20"], "twice"),
], ids=["burstiness-without-rate", "burstiness-zero", "goodput-nan", "goodput-key", "goodput-twice"])
def test_bad_vllm_options_are_one_line(work, capsys, no_simulation, args, needle):
    code, _, err = cli(capsys, "replay", "small.csv", "--profile", "flat.json", "--out", "run", *args)
    assert needle in one_line_error(code, err)
    assert not (work / "run").exists()


def test_vllm_metrics_by_hand(work, capsys):
    # flat 10 ms steps, batch 8, no speculation: r0 (out 20) first token at 10 ms, done at 200 ms
    args = ["replay", "small.csv", "--profile", "flat.json", "--out", "run", "--goodput", "ttft:15 e2el:250"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    s = json.loads((work / "run" / "summary.json").read_text())
    req = pd.read_parquet(work / "run" / "requests.parquet")
    e2el = req["latency_s"].to_numpy() * 1000
    ttft = req["ttft_s"].to_numpy() * 1000
    assert s["mean_e2el_ms"] == pytest.approx(e2el.mean()) and s["median_e2el_ms"] == pytest.approx(np.median(e2el))
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(ttft, 99))
    assert s["mean_tpot_ms"] == pytest.approx(10.0) and s["mean_itl_ms"] == pytest.approx(10.0)
    assert s["completed"] == 3 and s["total_output_tokens"] == 60
    assert s["request_throughput"] == pytest.approx(3 / s["duration"])
    assert s["output_throughput"] == pytest.approx(60 / s["duration"])
    good = int(((ttft <= 15) & (e2el <= 250)).sum())
    assert s["request_goodput"] == pytest.approx(good / s["duration"])
    assert s["goodput_slo_ms"] == {"ttft": 15.0, "e2el": 250.0}
    assert "draft_acceptance_rate" in s and "slo_goodput_requests_per_s" not in s  # no --slo-* given
    assert "mean_itl_ms" in out and "request_goodput" in out


def test_itl_percentiles_weight_requests_by_their_gaps():
    from simspec.vllm_metrics import _dist

    x, w = np.array([1.0, 10.0]), np.array([3, 1])
    d = _dist("itl", x, w)
    full = np.array([1.0, 1.0, 1.0, 10.0])
    assert d["median_itl_ms"] == pytest.approx(np.median(full))
    assert d["p90_itl_ms"] == pytest.approx(np.percentile(full, 90))
    assert d["std_itl_ms"] == pytest.approx(full.std())


# ---------------------------------------------------------------------------------------------
# 10. plots: nothing drawn over an axis label, titles inside the figure, one panel row per replica
# ---------------------------------------------------------------------------------------------

def _render(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def _requests(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lat = rng.gamma(2.0, 2.0, n)
    return pd.DataFrame({"latency_s": lat, "ttft_s": lat * 0.3, "mean_accepted_len": 1 + rng.random(n) * 3})


def test_latency_cdf_legend_clear_of_axis_labels():
    from simspec.report import plot_latency_cdf

    series = {f"policy p{i}, spec draft:k={i}, replicas {i}": _requests(seed=i) for i in range(5)}
    fig = plot_latency_cdf([("", series)], "Latency CDF per run")
    r = _render(fig)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for lg in legends:
        box = lg.get_window_extent(r)
        for ax in fig.axes:
            for label in (ax.xaxis.label, ax.yaxis.label):
                assert not _overlap(box, label.get_window_extent(r)), label.get_text()
            assert not _overlap(box, ax.get_window_extent(r))  # not over the data either


def test_accepted_hist_titles_do_not_overlap():
    from simspec.report import plot_accepted_hist

    series = {f"policy fcfs, spec draft:k=4, spec-len smartspec-per-request, replicas {i}": _requests(seed=i)
              for i in range(4)}
    fig = plot_accepted_hist(series, "Tokens committed per decode step — a sweep with a long name at 3 req/s")
    r = _render(fig)
    titles = [ax.title.get_window_extent(r) for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(titles) == 4
    for i in range(len(titles)):
        for j in range(i + 1, len(titles)):
            assert not _overlap(titles[i], titles[j])


def test_timeline_one_row_per_replica_and_title_inside():
    from simspec.report import RunInput, plot_timeline

    rows = []
    for rep in range(4):
        t = np.arange(50, dtype=float)
        rows.append(pd.DataFrame({"replica": rep, "start_s": t, "end_s": t + 0.5, "batch_size": (t % 7) + 1,
                                  "k_max": t % 4}))
    run = RunInput(path=Path("."), config={}, summary={}, _steps=pd.concat(rows, ignore_index=True))
    title = "Batch size and speculation length over time — " + "policy srpt:predictor=oracle, " * 6
    fig = plot_timeline(run, title)
    r = _render(fig)
    assert len(fig.axes) == 8  # (batch, k) per replica
    sup = fig._suptitle.get_window_extent(r)
    assert sup.x0 >= 0 and sup.x1 <= fig.bbox.width + 1


def test_report_file_names_have_no_equals_sign():
    from simspec.report import _slug

    assert "=" not in _slug("policy srpt:predictor=oracle, spec draft:k=4")


def test_quiet_calibration_silences_transformers_bars():
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from simspec.calibrate.models import silence_progress_bars

    hf_logging.enable_progress_bar()
    try:
        silence_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_warning()
        os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        try:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
        except ImportError:
            pass
