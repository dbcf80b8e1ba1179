"""Trace transformations: properties (hypothesis) and the documented order/notes of apply_transforms."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from simspec.errors import ConfigError
from simspec.trace import Trace
from simspec.traces.stats import mean_rate_rps
from simspec.traces.transforms import (apply_transforms, cap_lengths, filter_classes, first_n, load_and_transform,
                                       parse_window, rescale_rate, set_classes, time_window, transform_options)


def make_trace(arrivals, prompts=None, outputs=None, classes=None) -> Trace:
    n = len(arrivals)
    return Trace.from_columns(request_id=[f"r{i}" for i in range(n)], arrival_s=arrivals,
                              prompt_tokens=prompts if prompts is not None else [100 + i for i in range(n)],
                              output_tokens=outputs if outputs is not None else [10 + i for i in range(n)],
                              acceptance_class=classes, source="test")


# arrival times on a millisecond grid up to 1e5 s: spans are 0 or >= 1 ms, so float rounding of the scaled
# times stays far below the tolerances used (relative 1e-6)
arrival_lists = st.lists(st.integers(min_value=0, max_value=100_000_000), min_size=2, max_size=60).map(
    lambda xs: sorted(x / 1000 for x in xs))


@settings(max_examples=60, deadline=None)
@given(arrival_lists, st.floats(min_value=0.01, max_value=100))
def test_rate_scale_preserves_order_and_scales_span(arr, x):
    t = make_trace(arr)
    r = rescale_rate(t, scale=x)
    assert r.request_id.tolist() == t.request_id.tolist()
    assert np.all(np.diff(r.arrival_s) >= 0)
    span0, span1 = np.ptp(t.arrival_s), np.ptp(r.arrival_s)
    assert span1 == pytest.approx(span0 / x, rel=1e-6, abs=1e-12)
    assert np.array_equal(r.prompt_tokens, t.prompt_tokens)
    assert t.arrival_s.tolist() == arr  # input untouched


@settings(max_examples=60, deadline=None)
@given(arrival_lists, st.floats(min_value=0.01, max_value=1000))
def test_rate_target_is_hit(arr, rate):
    t = make_trace(arr)
    if mean_rate_rps(t.arrival_s) is None:
        with pytest.raises(ConfigError, match="mean rate is undefined"):
            rescale_rate(t, rate=rate)
        return
    r = rescale_rate(t, rate=rate)
    assert mean_rate_rps(r.arrival_s) == pytest.approx(rate, rel=1e-6)
    assert r.request_id.tolist() == t.request_id.tolist()
    assert np.ptp(r.arrival_s) == pytest.approx(np.ptp(t.arrival_s) * mean_rate_rps(t.arrival_s) / rate, rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(arrival_lists, st.floats(min_value=0, max_value=1e5), st.floats(min_value=1, max_value=1e5))
def test_window_keeps_exactly_the_rows_inside_and_rebases(arr, start, length):
    t = make_trace(arr)
    inside = [i for i, a in enumerate(arr) if start <= a < start + length]
    if not inside:
        with pytest.raises(ConfigError, match="contains no requests"):
            time_window(t, start, start + length)
        return
    w = time_window(t, start, start + length)
    assert w.request_id.tolist() == [f"r{i}" for i in inside]
    assert np.allclose(w.arrival_s, np.asarray(arr)[inside] - start)
    assert w.arrival_s.min() >= 0


@settings(max_examples=60, deadline=None)
@given(arrival_lists, st.integers(min_value=1, max_value=100))
def test_first_n(arr, n):
    t = make_trace(arr)
    f = first_n(t, n)
    assert f.request_id.tolist() == [f"r{i}" for i in range(min(n, len(arr)))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=50),
       st.integers(min_value=1, max_value=10_000))
def test_caps_clip_and_count(prompts, cap):
    t = make_trace([float(i) for i in range(len(prompts))], prompts=prompts)
    c = cap_lengths(t, max_prompt_tokens=cap)
    assert c.prompt_tokens.tolist() == [min(p, cap) for p in prompts]
    assert c.notes[-1] == f"capped prompt_tokens at {cap} for {sum(p > cap for p in prompts)} of {len(prompts)} request(s)"
    assert np.array_equal(c.output_tokens, t.output_tokens)


def test_filter_and_relabel_classes():
    t = make_trace([0.0, 1.0, 2.0, 3.0], classes=["qa", "math", "qa", "rag"])
    f = filter_classes(t, ["qa", "rag"])
    assert f.request_id.tolist() == ["r0", "r2", "r3"]
    with pytest.raises(ConfigError, match=r"no request has that class \(the trace has: math, qa, rag\)"):
        filter_classes(t, ["code"])
    m = set_classes(t, "map:qa=chat,math=code,*=chat")
    assert m.acceptance_class.tolist() == ["chat", "code", "chat", "chat"]
    assert t.acceptance_class.tolist() == ["qa", "math", "qa", "rag"]


def test_apply_transforms_order_and_notes():
    t = make_trace([float(i) for i in range(100)], prompts=[1000] * 100)
    r = apply_transforms(t, window="10:60", first=20, rate=2.0, max_prompt_tokens=500, relabel_classes="chat")
    assert r.request_id.tolist() == [f"r{i}" for i in range(10, 30)]
    assert r.arrival_s[0] == 0.0 and mean_rate_rps(r.arrival_s) == pytest.approx(2.0)
    assert set(r.prompt_tokens.tolist()) == {500} and set(r.acceptance_class) == {"chat"}
    assert r.notes == [
        "window [10, 60) s: kept 50 of 100 requests, times shifted by -10 s",
        "kept the first 20 of 50 requests",
        "rescaled arrival times by 1/2 to a mean rate of 2 req/s (was 1)",
        "capped prompt_tokens at 500 for 20 of 20 request(s)",
        "acceptance classes set to chat:1 (seed 0)",
    ]
    assert apply_transforms(t) is t
    with pytest.raises(ConfigError, match="not both"):
        apply_transforms(t, rate=1.0, rate_scale=2.0)


@pytest.mark.parametrize("text,expected", [("0:600", (0.0, 600.0)), ("600:", (600.0, None)), (":30", (None, 30.0))])
def test_parse_window(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text,msg", [("600", "expected START:END"), ("a:b", "must be numbers"),
                                      ("5:5", "greater than START"), ("inf:", "finite")])
def test_parse_window_errors(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_window(text)


@pytest.mark.parametrize("kw,msg", [(dict(rate_scale=0.0), "--rate-scale must be"), (dict(rate=-2.0), "--rate must be"),
                                    (dict(first=0), "--first must be"), (dict(max_output_tokens=0), "--max-output-tokens")])
def test_bad_transform_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        apply_transforms(make_trace([0.0, 1.0]), **kw)


def test_load_and_transform_length_table(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{i + 1},{i + 2}\n" for i in range(500)))
    with pytest.raises(ConfigError, match="give an arrival process: --rate R"):
        load_and_transform(p)
    t = load_and_transform(p, rate=5.0, seed=2, first=100)
    assert len(t) == 100 and t.prompt_tokens.tolist() == list(range(1, 101))
    assert t.notes[0] == "length-only table: arrivals drawn from Poisson arrivals at 5 req/s, seed 2"


def test_transform_options_decorator_collects_one_dict():
    seen = {}

    @click.command()
    @transform_options
    @click.option("--seed", type=int, default=0)
    def cmd(seed, transforms):
        seen.update(transforms, seed=seed)

    res = CliRunner().invoke(cmd, ["--rate", "3", "--window", "0:10", "--only-class", "a", "--only-class", "b",
                                   "--seed", "4"])
    assert res.exit_code == 0, res.output
    assert seen == {"rate": 3.0, "rate_scale": None, "window": "0:10", "first": None, "max_prompt_tokens": None,
                    "max_output_tokens": None, "only_class": ("a", "b"), "relabel_classes": None, "burstiness": None,
                    "seed": 4}
