"""vLLM's ``--speculative-config`` on replay, compare and sweep: every modelled field mapped to the
spec, every other field refused with one line naming it (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simspec.errors import ConfigError
from simspec.speculative_config import spec_from_speculative_config
from simspec.sweep import expand_grid
from tests.conftest import flat_profile_doc


@pytest.mark.parametrize("doc,spec", [
    ({"method": "eagle3", "num_speculative_tokens": 3}, "eagle3:depth=3"),
    ({"method": "eagle", "num_speculative_tokens": 5, "model": "yuhuili/EAGLE-LLaMA3-Instruct-8B"}, "eagle:depth=5"),
    ({"method": "eagle3", "num_speculative_tokens": 5, "speculative_eagle_topk": 4,
      "speculative_num_draft_tokens": 16}, "eagle3:depth=5,topk=4,tokens=16"),
    ({"method": "deepseek_mtp", "num_speculative_tokens": 1}, "mtp:depth=1"),
    ({"method": "mtp", "num_speculative_tokens": 2, "speculative_num_steps": 2}, "mtp:depth=2"),
    ({"method": "medusa", "num_speculative_tokens": 4}, "medusa:depth=4"),
    ({"method": "ngram", "num_speculative_tokens": 4}, "ngram:depth=4"),
    ({"model": "JackFram/llama-68m", "num_speculative_tokens": 4}, "draft:k=4"),
    ({"method": "draft_model", "model": "x", "num_speculative_tokens": 2}, "draft:k=2"),
])
def test_vllm_fields_map_to_the_spec(doc, spec):
    assert spec_from_speculative_config(json.dumps(doc)) == spec
    assert spec_from_speculative_config(doc) == spec


@pytest.mark.parametrize("text,needle", [
    ('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}', "field prompt_lookup_max"),
    ('{"method": "eagle", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1}',
     "field draft_tensor_parallel_size"),
    ('{"method": "eagle", "num_speculative_tokens": 3, "speculative_token_tree": "[(0,)]"}',
     "field speculative_token_tree"),
    ('{"method": "suffix", "num_speculative_tokens": 3}', "field method"),
    ('{"method": "eagle"}', "field num_speculative_tokens: missing"),
    ('{"method": "eagle", "num_speculative_tokens": 0}', "field num_speculative_tokens"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "speculative_eagle_topk": 2}', "field speculative_eagle_topk"),
    ('{"method": "mtp", "num_speculative_tokens": 3, "speculative_num_steps": 2}', "field speculative_num_steps"),
    ('{"num_speculative_tokens": 3}', "field method"),
    ('[1, 2]', "expected a JSON object"),
    ('{"method": ', "not valid JSON"),
])
def test_unmodelled_fields_are_refused_naming_the_field(text, needle):
    with pytest.raises(ConfigError, match=needle) as exc:
        spec_from_speculative_config(text)
    assert "\n" not in str(exc.value)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "simspec.cli", *map(str, args)], capture_output=True, text=True)


def test_replay_and_compare_take_the_vllm_config(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("request_id,arrival_s,prompt_tokens,output_tokens\nr0,0.0,100,20\nr1,0.5,50,10\n")
    doc = flat_profile_doc(alpha=0.7)
    doc["acceptance"]["ngram"] = {"default": {"alpha": {"kind": "fixed", "value": 0.7}, "hit_probability": 0.5}}
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps(doc))
    cfg = '{"method": "ngram", "num_speculative_tokens": 3}'
    r = _cli("replay", trace, "--profile", prof, "--speculative-config", cfg, "--out", tmp_path / "a", "-q")
    assert r.returncode == 0, r.stderr
    r2 = _cli("replay", trace, "--profile", prof, "--spec", "ngram:depth=3", "--out", tmp_path / "b", "-q")
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "a" / "summary.json").read_text() == (tmp_path / "b" / "summary.json").read_text()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["run"]["method"] == "ngram:depth=3"
    r = _cli("compare", trace, "--profile", prof, "--policies", "fcfs,srpt", "--speculative-config", cfg)
    assert r.returncode == 0, r.stderr
    # refused: one line, exit 2, nothing written
    bad = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}'
    r = _cli("replay", trace, "--profile", prof, "--speculative-config", bad, "--out", tmp_path / "c")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "simspec: error: --speculative-config: field prompt_lookup_min: not modelled by simspec (it models: "
        "method, num_speculative_tokens, model, speculative_eagle_topk, speculative_num_draft_tokens, "
        "speculative_num_steps)"]
    assert not (tmp_path / "c").exists()
    r = _cli("replay", trace, "--profile", prof, "--spec", "draft:k=2", "--speculative-config", cfg)
    assert r.returncode == 2 and "not both" in r.stderr


def test_sweep_grid_takes_the_vllm_config_as_a_mapping():
    g = expand_grid({"base": {"trace": "azure_code_2023", "profile": "llama70b-4xh100-smartspec", "first": 5},
                     "axes": {"spec": ["none", {"method": "draft_model", "model": "m", "num_speculative_tokens": 4}]}})
    assert [r.axes["spec"] for r in g.runs] == ["none", "draft:k=4"]
    with pytest.raises(ConfigError, match="field prompt_lookup_max"):
        expand_grid({"base": {"trace": "azure_code_2023", "profile": "llama70b-4xh100-smartspec"},
                     "axes": {"spec": [{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}]}})
