"""`simspec profile show` / `diff`, and the bundled measured CPU profiles: they load, list, show
and compare without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from simspec.calibrate.profile_io import update_profile
from simspec.cli import cli
from simspec.profile import bundled_profiles, load_profile
from simspec.simulator.latency_models import compile_stages

MEASURED = ("smollm2-135m-cpu-bf16", "smollm2-135m-cpu-fp32")


def _run(*args):
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output


@pytest.mark.parametrize("name", MEASURED)
def test_bundled_measured_profile(name):
    assert name in bundled_profiles()
    p = load_profile(name)
    assert p.source == "measured" and p.name == name
    assert {"embed", "layer", "lm_head", "adapter"} <= set(p.stages)
    assert p.acceptance == {} or isinstance(p.acceptance, dict)
    assert p.meta["dtype"] in name and p.models["target"]["num_layers"] == 30
    for stage, doc in p.stages.items():
        fit = doc["fit"]
        assert fit["heldout_mape_pct"] is not None and fit["n_heldout"] > 0, stage
        assert doc["samples"] and all(len(s) == 5 for s in doc["samples"])
    fns = compile_stages(p.stages)
    # decode on one layer is positive; a batch of 8 and verifying 4 or 8 drafts cost more than
    # one decode token (the curve in between is measured as is: CPU GEMM kernels are not monotone
    # in the number of rows)
    decode = fns["layer"](1, 1, 512)
    assert 0 < decode < fns["layer"](8, 8, 8 * 512)
    assert decode < fns["layer"](1, 5, 512) and decode < fns["layer"](1, 9, 512)


@pytest.mark.parametrize("name", MEASURED)
def test_bundled_measured_profile_replays(tmp_path, name):
    """The bundled CPU profiles replay the bundled validation trace (prompts up to 128 tokens,
    outputs up to 40) inside their measured ranges: no --allow-extrapolation needed."""
    r = CliRunner().invoke(cli, ["replay", "validation_small", "--profile", name, "--out",
                                 str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary  # the run finished and wrote its summary


def test_profiles_lists_measured():
    out = _run("profiles")
    for name in MEASURED:
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert "measured" in line


def test_show_measured():
    out = _run("profile", "show", MEASURED[0])
    assert "source       MEASURED" in out
    for stage in ("layer:", "lm_head:", "embed:", "adapter:"):
        assert stage in out
    assert "held-out error" in out and "valid:" in out and "samples (" in out
    assert "kv_budget_tokens=" in out
    acc = load_profile(MEASURED[0]).acceptance  # filled later by `simspec calibrate acceptance`
    if not acc:
        assert "(none: run `simspec calibrate acceptance" in out
    for method, classes in acc.items():
        for cls in classes:
            assert f"{method}/{cls}: mean alpha" in out


def test_show_published():
    out = _run("profile", "show", "llama70b-4xh100-smartspec")
    assert "PUBLISHED" in out and "target_step: linear" in out and "draft/default: mean alpha 0.700" in out


def test_show_acceptance_classes(tmp_path):
    out_file = tmp_path / "acc.json"
    stages = {"layer": {"kind": "linear", "coef": {"c0": 1.0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}},
              "lm_head": {"kind": "linear", "coef": {"c0": 2.0, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}}}
    acc = {"draft": {"code": {"alpha": {"kind": "beta", "a": 3.0, "b": 1.0}, "mean_tokens_per_step": 2.5,
                              "position_conditional": [0.9, 0.8, 0.7], "n_requests": 12}},
           "kangaroo": {"chat": {"alpha": {"kind": "empirical", "values": [0.5, 0.7]},
                                 "confidence": {"bin_edges": [0, 1], "accepted": [[1]], "rejected": [[1]]}}},
           "hispec": {"chat": {"alpha": {"kind": "fixed", "value": 0.9},
                               "draft_vs_inter": {"alpha": {"kind": "fixed", "value": 0.6}}}}}
    update_profile(out_file, latency={"unit": "ms", "stages": stages},
                   models={"target": {"name": "m", "num_layers": 2}}, acceptance=acc)
    out = _run("profile", "show", str(out_file))
    assert "draft/code: mean alpha 0.750 (beta), mean tokens/step 2.500" in out
    assert "position_conditional [0.90, 0.80, 0.70]" in out and "n_requests 12" in out
    assert "kangaroo/chat: mean alpha 0.600 (empirical)" in out and "confidence bins" in out
    assert "hispec/chat: mean alpha 0.900" in out and "draft_vs_inter mean alpha 0.600" in out
    # composed step: 2 layers x 1 ms + 2 ms head = 4 ms
    assert "decode B=1 C=128: 4.000" in out


def test_diff_ratios(tmp_path):
    out = _run("profile", "diff", MEASURED[1], MEASURED[0], "--shape", "1,1,512", "--shape", "8,5,512")
    assert "layer (ms)" in out and "B/A" in out and "target step (composed)" in out
    assert "meta.dtype: \"fp32\" -> \"bf16\"" in out
    a, b = (compile_stages(load_profile(n).stages)["layer"] for n in MEASURED[::-1])
    want = f"{b(1, 1, 512) / a(1, 1, 512):.3f}"
    line = next(ln for ln in out.split("layer (ms)")[1].splitlines() if "B=1 T=1 C=512" in ln)
    assert line.split()[-1] == want
    # a whole-model profile against a layer-level one: compared through the composed target step
    out = _run("profile", "diff", "llama70b-4xh100-smartspec", MEASURED[0])
    assert "target_step: only in A" in out and "layer: only in B" in out
    assert "target step (composed)" in out


def test_bad_shape_and_missing_profile():
    r = CliRunner().invoke(cli, ["profile", "diff", MEASURED[0], MEASURED[1], "--shape", "1,2"])
    assert r.exit_code != 0
    r = subprocess.run([sys.executable, "-m", "simspec.cli", "profile", "show", "no-such-profile"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no-such-profile" in r.stderr and "Traceback" not in r.stderr


def test_show_and_diff_never_import_torch():
    code = (
        "import sys\n"
        "from simspec.cli import main\n"
        "for args in (['profile', 'show', 'smollm2-135m-cpu-bf16'],\n"
        "             ['profile', 'diff', 'smollm2-135m-cpu-fp32', 'smollm2-135m-cpu-bf16'],\n"
        "             ['profiles']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, e.code\n"
        "from simspec.profile import load_profile\n"
        "load_profile('smollm2-135m-cpu-fp32')\n"
        "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "TORCH False False"


def test_measured_profile_json_is_canonical():
    # written by simspec.atomic.write_json: sorted keys, 2-space indent, trailing newline
    for name in MEASURED:
        text = bundled_profiles()[name].read_text()
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
