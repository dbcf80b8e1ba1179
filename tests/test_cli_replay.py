"""End-to-end CLI runs, determinism, and bad input (one-line errors, exit 2, no output)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import flat_profile_doc

SMALL = "request_id,arrival_s,prompt_tokens,output_tokens\nr0,0.0,100,20\nr1,0.5,50,10\nr2,0.7,80,30\n"


def simspec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "simspec.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture
def small_trace(tmp_path):
    p = tmp_path / "small.csv"
    p.write_text(SMALL)
    return p


def test_replay_bundled_trace_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = simspec("replay", "--policy", "srpt", "--spec", "draft:k=4", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".simspec-output", "config.json", "requests.parquet",
                                                     "steps.parquet", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_requests"] == 8819
    assert summary["latency_ms_p99"] >= summary["latency_ms_p50"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["seed"] == 0 and len(config["profile"]["sha256"]) == 64
    assert not list(tmp_path.glob(".run.tmp-*"))


def test_same_seed_identical_bytes_and_seeds_differ(tmp_path, small_trace):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        r = simspec("replay", small_trace, "--spec", "draft:k=4", "--seed", seed, "--out", out, "-q")
        assert r.returncode == 0, r.stderr
        outs.append(out)
    for f in ("requests.parquet", "steps.parquet", "summary.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    assert (outs[0] / "requests.parquet").read_bytes() != (outs[2] / "requests.parquet").read_bytes()


def test_compare_prints_table(small_trace):
    r = simspec("compare", small_trace, "--policies", "fcfs,srpt", "--spec", "draft:k=2")
    assert r.returncode == 0, r.stderr
    assert "mean latency (ms)" in r.stdout and "fcfs" in r.stdout and "srpt" in r.stdout


def test_help_documents_units():
    r = simspec("replay", "--help")
    assert r.returncode == 0
    for word in ("--kv-budget-tokens", "in tokens", "--seed", "--spec", "--policy", "--replicas"):
        assert word in r.stdout


def test_profiles_lists_bundled():
    r = simspec("profiles")
    assert r.returncode == 0 and "llama70b-4xh100-smartspec" in r.stdout and "published" in r.stdout


BAD_TRACES = {
    "empty": ("", "empty file"),
    "header_only": ("request_id,arrival_s,prompt_tokens,output_tokens\n", "no requests"),
    "missing_column": ("request_id,arrival_s,prompt_tokens\nr0,0,1\n", "expected the canonical columns"),
    "extra_column": ("request_id,arrival_s,prompt_tokens,output_tokens,foo\nr0,0,1,1,2\n", "unexpected column 'foo'"),
    "negative": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,-5,1\n", "line 2: column prompt_tokens"),
    "non_numeric": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,abc,5,1\n", "line 2: column arrival_s"),
    "nan": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,5,1\nr1,nan,5,1\n", "line 3: column arrival_s"),
    "zero_output": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,5,0\n", "column output_tokens"),
    "duplicate": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,5,1\nr0,1,5,1\n", "duplicate id"),
    "ragged": ("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0,5\n", "line 2: expected 4 fields"),
    "unknown_header": ("a;b;c\n1;2;3\n", "unknown header"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_bad_trace(tmp_path, case):
    text, msg = BAD_TRACES[case]
    p = tmp_path / "bad.csv"
    p.write_text(text)
    out = tmp_path / "out"
    r = simspec("replay", p, "--out", out, "-q")
    assert r.returncode == 2
    assert msg in r.stderr, r.stderr
    assert str(p) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


def test_unsorted_arrivals_are_sorted_and_reported(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("request_id,arrival_s,prompt_tokens,output_tokens\nr0,1.0,5,2\nr1,0.5,5,2\n")
    r = simspec("replay", p, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "sorted 1 out-of-order arrival" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--policy", "nope"], "unknown scheduler 'nope'"),
    (["--spec", "magic:k=2"], "unknown method 'magic'"),
    (["--spec", "draft:q=2"], "unknown parameter(s) q"),
    (["--spec-len", "nope"], "unknown policy 'nope'"),
    (["--policy", "srpt:predictor=crystal-ball"], "unknown predictor"),
    (["--profile", "no-such-profile"], "no such file and no bundled profile"),
    (["--kv-budget-tokens", "50"], "can never run"),
    (["--spec", "draft:k=x"], "k must be an integer"),
])
def test_bad_options(tmp_path, small_trace, args, msg):
    out = tmp_path / "out"
    r = simspec("replay", small_trace, *args, "--out", out, "-q")
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(schema_version=3), "field schema_version"),
    (lambda d: d["latency"]["stages"].pop("target_step"), "missing stage"),
    (lambda d: d["latency"]["stages"]["target_step"]["coef"].update(c0="fast"), "coef.c0"),
    (lambda d: d["meta"].update(source="guess"), "meta.source"),
])
def test_bad_profile(tmp_path, small_trace, write_profile, profile_doc, mutate, msg):
    doc = profile_doc()
    mutate(doc)
    path = write_profile(doc)
    out = tmp_path / "out"
    r = simspec("replay", small_trace, "--profile", path, "--out", out, "-q")
    assert r.returncode == 2
    assert msg in r.stderr and str(path) in r.stderr, r.stderr
    assert not out.exists()


def test_profile_without_method_acceptance(tmp_path, small_trace, write_profile, profile_doc):
    path = write_profile(profile_doc(alpha=None))
    r = simspec("replay", small_trace, "--profile", path, "--spec", "draft:k=2", "--out", tmp_path / "o", "-q")
    assert r.returncode == 2 and "no acceptance for method 'draft'" in r.stderr


def test_existing_out_needs_force(tmp_path, small_trace):
    out = tmp_path / "o"
    assert simspec("replay", small_trace, "--out", out, "-q").returncode == 0
    r = simspec("replay", small_trace, "--out", out, "-q")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert simspec("replay", small_trace, "--out", out, "-q", "--force").returncode == 0


def test_replay_never_imports_torch(small_trace, tmp_path):
    code = ("import sys; from simspec.cli import main; sys.argv=['simspec','replay',%r,'--out',%r,'-q'];\n"
            "try:\n    main()\nexcept SystemExit: pass\n"
            "import simspec.simulator, simspec.policies\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
            % (str(small_trace), str(tmp_path / 'o')))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
