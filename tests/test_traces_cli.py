"""``simspec trace stats|convert|synth`` end to end (through simspec.cli.main)."""

from __future__ import annotations

import json
import math

import pytest

from simspec.cli import main
from simspec.traces.formats import load_trace

SMALL = ("request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class,slo_class\n"
         "a,0,100,10,code,\n"
         "b,1,200,20,chat,\n"
         "c,3,300,30,code,\n"
         "d,4,400,40,chat,\n"
         "e,10,1000,100,code,\n")

# by hand: n = 5, span = 10 s, rate = (n-1)/span = 0.4 req/s; gaps 1,2,1,6: mean 2.5, population
# variance ((1.5)^2 + 0.5^2 + 1.5^2 + 3.5^2)/4 = 4.25, CV = sqrt(4.25)/2.5; prompts 100,200,300,400,1000:
# mean 400, p50 300, p90 = 400 + 0.6*600 = 760, p99 = 400 + 0.96*600 = 976 (linear interpolation).
HAND = {
    "requests": 5, "span_s": 10.0, "first_arrival_s": 0.0, "last_arrival_s": 10.0, "mean_rate_rps": 0.4,
    "interarrival_cv": math.sqrt(4.25) / 2.5,
    "prompt_tokens": {"mean": 400.0, "p50": 300.0, "p90": 760.0, "p99": 976.0, "min": 100.0, "max": 1000.0},
    "output_tokens": {"mean": 40.0, "p50": 30.0, "p90": 76.0, "p99": 97.6, "min": 10.0, "max": 100.0},
    "acceptance_classes": {"chat": 2, "code": 3}, "slo_classes": {"": 5}, "notes": [],
}


def run(capsys, *args):
    with pytest.raises(SystemExit) as ei:
        main(list(args))
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


def test_stats_json_matches_hand_computation(tmp_path, capsys):
    p = tmp_path / "small.csv"
    p.write_text(SMALL)
    code, out, err = run(capsys, "trace", "stats", str(p), "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st.pop("source") == f"{p} (canonical)"
    assert set(st) == set(HAND)
    for k, v in HAND.items():
        numeric = isinstance(v, float) or k in ("prompt_tokens", "output_tokens")
        assert st[k] == (pytest.approx(v, rel=1e-12) if numeric else v), k


def test_stats_text(tmp_path, capsys):
    p = tmp_path / "small.csv"
    p.write_text(SMALL)
    code, out, _ = run(capsys, "trace", "stats", str(p))
    assert code == 0
    lines = out.splitlines()
    assert "requests         5" in lines
    assert "span_s           10.000  (first 0.000, last 10.000)" in lines
    assert "mean_rate_rps    0.4" in lines
    assert "interarrival_cv  0.8246" in lines
    assert "prompt_tokens    mean 400.0  p50 300  p90 760  p99 976  min 100  max 1000" in lines
    assert "acceptance_class chat=2, code=3" in lines


def test_stats_with_transforms_and_bundled_name(capsys):
    code, out, err = run(capsys, "trace", "stats", "azure_code_2023", "--json", "--first", "100", "--rate-scale", "2")
    assert code == 0, err
    st = json.loads(out)
    assert st["requests"] == 100
    assert st["notes"] == ["kept the first 100 of 8819 requests",
                           "rescaled the arrival rate by 2x (arrival times divided by 2)"]


def test_stats_bundled_azure_matches_provenance(capsys):
    # shared/traces/public/PROVENANCE.md: span 3,435.9 s, 2.57 req/s, CV 13.2, prompt p50 1,469 / p99 7,436
    code, out, _ = run(capsys, "trace", "stats", "azure_code_2023", "--json")
    st = json.loads(out)
    assert st["requests"] == 8819 and round(st["span_s"], 3) == 3435.948
    assert round(st["mean_rate_rps"], 3) == 2.566 and round(st["interarrival_cv"], 3) == 13.151
    assert (st["prompt_tokens"]["p50"], st["prompt_tokens"]["p99"]) == (1469.0, 7436.0)
    assert round(st["output_tokens"]["p99"], 1) == 251.5


def test_convert_every_format_to_canonical(tmp_path, capsys):
    out = tmp_path / "b.csv"
    code, o, err = run(capsys, "trace", "convert", "burstgpt_handmade", str(out), "--window", "0:200")
    assert code == 0, err
    assert "note: dropped 3 failed request(s) (Response tokens = 0)" in err
    assert o.strip().startswith("wrote ")
    text = out.read_text()
    assert text.splitlines()[0] == "request_id,arrival_s,prompt_tokens,output_tokens,acceptance_class,slo_class"
    assert text.splitlines()[1] == "burstgpt-2,10.0,202,115,default,"
    back = load_trace(out)
    assert back.source.endswith("(canonical)") and back.arrival_s.max() < 200


def test_convert_length_table_needs_rate(tmp_path, capsys):
    code, _, err = run(capsys, "trace", "convert", "sharegpt", str(tmp_path / "x.csv"))
    assert code == 2
    assert err.startswith("simspec: error: ") and "give an arrival process: --rate R" in err
    assert not (tmp_path / "x.csv").exists()
    code, _, err = run(capsys, "trace", "convert", "sharegpt", str(tmp_path / "x.csv"), "--rate", "3", "--seed", "5")
    assert code == 0 and len(load_trace(tmp_path / "x.csv")) == 3842


def test_convert_bad_input_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.5,4808,-1\n")
    code, out, err = run(capsys, "trace", "convert", str(p), str(tmp_path / "o.csv"))
    assert code == 2
    assert err == f"simspec: error: {p}: line 2: column GeneratedTokens: must be >= 1, got -1\n"
    code, _, err = run(capsys, "trace", "stats", str(p), "--format", "nope")
    assert code == 2 and "unknown format 'nope'" in err


def test_synth_is_seeded_and_hits_its_spec(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    args = ["trace", "synth", "--arrivals", "gamma", "--rate", "4", "--cv", "2", "--n", "3000",
            "--lengths", "empirical:sharegpt", "--classes", "code:0.3,chat:0.7", "--seed", "1"]
    assert run(capsys, *args, "--out", str(a))[0] == 0
    assert run(capsys, *args, "--out", str(b))[0] == 0
    assert a.read_bytes() == b.read_bytes()
    t = load_trace(a)
    assert len(t) == 3000 and set(t.acceptance_class) == {"code", "chat"}


def test_synth_duration_fixed_and_caps(tmp_path, capsys):
    out = tmp_path / "s.csv"
    code, _, err = run(capsys, "trace", "synth", "--arrivals", "poisson", "--rate", "5", "--duration-s", "60",
                       "--lengths", "fixed:3000,50", "--max-prompt-tokens", "2048", "--slo-class", "interactive",
                       "--out", str(out))
    assert code == 0, err
    t = load_trace(out)
    assert t.arrival_s.max() < 60 and set(t.prompt_tokens.tolist()) == {2048}
    assert set(t.slo_class) == {"interactive"}


def test_synth_replay_rescaled(tmp_path, capsys):
    out = tmp_path / "r.csv"
    code, _, err = run(capsys, "trace", "synth", "--arrivals", "replay:vidur_handmade", "--rate", "1",
                       "--lengths", "lognormal:500,1,100,1", "--out", str(out))
    assert code == 0, err
    t = load_trace(out)
    assert len(t) == 30 and t.arrival_s.max() - t.arrival_s.min() == pytest.approx(29.0)


@pytest.mark.parametrize("args,msg", [
    (["--arrivals", "poisson", "--n", "5", "--lengths", "fixed:1,1"], "--arrivals poisson needs --rate"),
    (["--arrivals", "poisson", "--rate", "1", "--lengths", "fixed:1,1"], "give --n N"),
    (["--arrivals", "gamma", "--rate", "1", "--n", "3", "--lengths", "fixed:1,1"], "needs --rate R"),
    (["--arrivals", "poisson", "--rate", "1", "--n", "3", "--lengths", "fixed:1,1", "--classes", "a:x"],
     "not a number"),
    (["--arrivals", "poisson", "--rate", "1", "--n", "3", "--lengths", "empirical:nothing_here"], "no such file"),
])
def test_synth_errors(tmp_path, capsys, args, msg):
    out = tmp_path / "x.csv"
    code, _, err = run(capsys, "trace", "synth", *args, "--out", str(out))
    assert code == 2 and err.startswith("simspec: error: ") and msg in err
    assert not out.exists()
