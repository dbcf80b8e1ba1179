"""Synthetic workloads: arrival processes hit their target rate and CV, lengths and classes follow
their specs, everything is seeded per stream.

Statistical tolerances (n = 200,000 gaps, fixed seeds, so the tests are deterministic; the bounds are
what a correct generator passes with any seed):
  * rate: the mean gap has relative standard error CV/sqrt(n) (0.22% for CV 1, 0.45% for CV 2);
    we allow 1.5% (Poisson, CV 0.5) and 2% (CV 2), i.e. > 4 standard errors.
  * CV: the sample CV has relative standard error about sqrt((kurtosis - 1) / 4n) (0.32% for the
    exponential, 0.6% for Gamma with CV 2); we allow 2% and 3%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from simspec.errors import ConfigError
from simspec.rng import stream
from simspec.traces.stats import interarrival_cv, mean_rate_rps
from simspec.traces.synthetic import (ClassMapping, ClassMixture, EmpiricalLengths, FixedLengths, GammaArrivals,
                                      LognormalLengths, PoissonArrivals, ReplayedArrivals, arrival_times,
                                      assign_classes, parse_arrivals, parse_classes, parse_lengths, sample_lengths,
                                      synthesize)

N = 200_000


@pytest.mark.parametrize("process,rate,cv,rate_tol,cv_tol", [
    (PoissonArrivals(4.0), 4.0, 1.0, 0.015, 0.02),
    (GammaArrivals(4.0, 2.0), 4.0, 2.0, 0.02, 0.03),
    (GammaArrivals(10.0, 0.5), 10.0, 0.5, 0.015, 0.02),
    (GammaArrivals(2.5, 1.0), 2.5, 1.0, 0.015, 0.02),
])
def test_arrivals_hit_rate_and_cv(process, rate, cv, rate_tol, cv_tol):
    t = arrival_times(process, stream(7, "arrivals"), n=N)
    assert len(t) == N and np.all(np.diff(t) >= 0) and t[0] > 0
    assert abs(mean_rate_rps(t) / rate - 1) < rate_tol
    assert abs(interarrival_cv(t) / cv - 1) < cv_tol


def test_gamma_cv_zero_is_a_fixed_gap():
    t = arrival_times(GammaArrivals(2.0, 0.0), stream(0, "arrivals"), n=5)
    assert t.tolist() == [0.5, 1.0, 1.5, 2.0, 2.5]


def test_duration_mode_stays_inside_and_hits_rate():
    t = arrival_times(PoissonArrivals(50.0), stream(3, "arrivals"), duration_s=2000.0)
    assert t.max() < 2000.0
    # count in [0, D) is Poisson(rate*D = 100,000): sd 316 = 0.32%
    assert abs(len(t) / 100_000 - 1) < 0.015


def test_replayed_arrivals():
    p = ReplayedArrivals(np.array([0.0, 1.0, 2.0, 5.0]), "x")
    assert arrival_times(p, stream(0, "a")).tolist() == [0.0, 1.0, 2.0, 5.0]
    assert arrival_times(p, stream(0, "a"), n=2).tolist() == [0.0, 1.0]
    assert arrival_times(p, stream(0, "a"), duration_s=2.0).tolist() == [0.0, 1.0]
    with pytest.raises(ConfigError, match="only 4 arrivals"):
        arrival_times(p, stream(0, "a"), n=5)


def test_lognormal_from_moments_hits_mean_and_cv():
    spec = LognormalLengths.from_moments(2000, 1.0, 300, 0.5)
    pt, ot, acc = sample_lengths(spec, stream(1, "lengths"), N)
    assert acc is None and pt.dtype == np.int64 and pt.min() >= 1 and ot.min() >= 1
    assert abs(pt.mean() / 2000 - 1) < 0.02 and abs(ot.mean() / 300 - 1) < 0.02
    assert abs(pt.std() / pt.mean() - 1.0) < 0.05 and abs(ot.std() / ot.mean() / 0.5 - 1) < 0.05
    assert abs(np.corrcoef(np.log(pt), np.log(ot))[0, 1]) < 0.01


def test_lognormal_fit_recovers_parameters_and_correlation():
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([7.0, 5.0], [[1.0, 0.4], [0.4, 0.64]], size=N)
    spec = LognormalLengths.fit(np.exp(z[:, 0]), np.exp(z[:, 1]), source="test")
    assert spec.mu == pytest.approx((7.0, 5.0), abs=0.01)
    assert np.asarray(spec.cov) == pytest.approx(np.array([[1.0, 0.4], [0.4, 0.64]]), abs=0.01)
    pt, ot, _ = sample_lengths(spec, stream(0, "lengths"), N)
    assert np.corrcoef(np.log(pt), np.log(ot))[0, 1] == pytest.approx(0.5, abs=0.01)


def test_empirical_resamples_rows_and_classes():
    spec = EmpiricalLengths(np.array([10, 20, 30]), np.array([1, 2, 3]), np.array(["a", "b", "c"], dtype=object))
    pt, ot, acc = sample_lengths(spec, stream(0, "lengths"), 30_000)
    assert set(zip(pt.tolist(), ot.tolist(), acc.tolist())) == {(10, 1, "a"), (20, 2, "b"), (30, 3, "c")}
    assert np.bincount(pt // 10)[1:] / 30_000 == pytest.approx([1 / 3] * 3, abs=0.02)


def test_empirical_bundled_sharegpt_pairs():
    spec = parse_lengths("empirical:sharegpt")
    assert isinstance(spec, EmpiricalLengths) and len(spec.prompt_tokens) == 3842
    pt, ot, _ = sample_lengths(spec, stream(0, "lengths"), 1000)
    table = set(zip(spec.prompt_tokens.tolist(), spec.output_tokens.tolist()))
    assert set(zip(pt.tolist(), ot.tolist())) <= table


def test_parse_lengths_specs():
    assert parse_lengths("fixed:128,32") == FixedLengths(128, 32)
    ln = parse_lengths("lognormal:1000,1,200,2")
    assert ln.mu[0] == pytest.approx(math.log(1000) - math.log(2) / 2)
    assert ln.cov[1][1] == pytest.approx(math.log(5))
    fit = parse_lengths("lognormal:fit=arxiv")
    assert fit.source == "lognormal fitted to arxiv"
    for bad, msg in [("fixed:1", "expected fixed:PROMPT,OUTPUT"), ("fixed:0,3", "integer >= 1"),
                     ("lognormal:1,2", "expected lognormal:"), ("lognormal:-1,1,1,1", "must be > 0"),
                     ("empirical:", "needs a table"), ("empirical:no_such_table", "no such file or bundled"),
                     ("zipf:1", "unknown lengths spec")]:
        with pytest.raises(ConfigError, match=msg):
            parse_lengths(bad)


def test_class_mixture_frequencies():
    spec = parse_classes("code:0.3,chat:0.7")
    assert spec == ClassMixture(("code", "chat"), (0.3, 0.7))
    acc = assign_classes(spec, stream(0, "classes"), 100_000)
    # sd of the fraction: sqrt(0.21/1e5) = 0.0014; tolerance 0.01
    assert abs(np.mean(acc == "code") - 0.3) < 0.01


def test_class_specs():
    assert parse_classes("chat") == ClassMixture(("chat",), (1.0,))
    assert parse_classes("a:1,b:3").weights == (0.25, 0.75)
    m = parse_classes("map:translation=chat,math_reasoning=code,*=chat")
    assert m == ClassMapping({"translation": "chat", "math_reasoning": "code"}, "chat")
    out = assign_classes(m, stream(0, "c"), 3, np.array(["translation", "math_reasoning", "qa"], dtype=object))
    assert out.tolist() == ["chat", "code", "chat"]
    with pytest.raises(ConfigError, match=r"no entry for class 'qa' \(1 request\(s\)\); add qa=CLASS or \*=CLASS"):
        assign_classes(parse_classes("map:translation=chat"), stream(0, "c"), 2,
                       np.array(["translation", "qa"], dtype=object))
    for bad, msg in [("", "empty"), ("a:x", "not a number"), ("a:-1", "must be >= 0"), ("a:0,b:0", "sum to 0"),
                     ("a:1,a:2", "given twice"), ("a,b", "expected NAME:WEIGHT"), ("map:a", "expected SRC=DST"),
                     ("map:a=b,a=c", "mapped twice")]:
        with pytest.raises(ConfigError, match=msg):
            parse_classes(bad)


def test_parse_arrivals():
    assert parse_arrivals("poisson", 2.0) == PoissonArrivals(2.0)
    assert parse_arrivals("gamma", 2.0, 3.0) == GammaArrivals(2.0, 3.0)
    rep = parse_arrivals("replay:vidur_handmade")
    assert isinstance(rep, ReplayedArrivals) and len(rep.arrival_s) == 30
    for args, msg in [(("poisson",), "needs --rate"), (("gamma", 2.0), "needs --rate R .* and --cv"),
                      (("poisson", 2.0, 3.0), "use --arrivals gamma"), (("poisson", -1.0), "finite number > 0"),
                      (("gamma", 1.0, -1.0), "--cv must be"), (("uniform", 1.0), "unknown arrival process"),
                      (("replay:",), "needs a trace file")]:
        with pytest.raises(ConfigError, match=msg):
            parse_arrivals(*args)


def test_synthesize_is_seeded_and_streams_are_independent():
    kw = dict(n=500, seed=11)
    a = synthesize(GammaArrivals(3.0, 2.0), parse_lengths("empirical:sharegpt"), classes=parse_classes("chat"), **kw)
    b = synthesize(GammaArrivals(3.0, 2.0), parse_lengths("empirical:sharegpt"), classes=parse_classes("chat"), **kw)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    c = synthesize(GammaArrivals(3.0, 2.0), parse_lengths("empirical:sharegpt"),
                   classes=parse_classes("code:0.5,chat:0.5"), **kw)
    # changing the class mixture changes neither arrivals nor lengths
    assert np.array_equal(a.arrival_s, c.arrival_s) and np.array_equal(a.output_tokens, c.output_tokens)
    d = synthesize(GammaArrivals(3.0, 2.0), parse_lengths("empirical:sharegpt"), n=500, seed=12)
    assert not np.array_equal(a.arrival_s, d.arrival_s)
    assert a.request_id[0] == "syn-000" and len(set(a.request_id)) == 500
    assert set(a.acceptance_class) == {"chat"} and set(d.acceptance_class) == {"default"}
    assert a.notes == ["synthetic: Gamma arrivals at 3 req/s, CV 2; lengths resampled from sharegpt (3842 rows); "
                       "classes chat:1; seed 11"]


def test_synthesize_needs_a_size():
    with pytest.raises(ConfigError, match="give --n N"):
        synthesize(PoissonArrivals(1.0), FixedLengths(1, 1))
    with pytest.raises(ConfigError, match="not both"):
        synthesize(PoissonArrivals(1.0), FixedLengths(1, 1), n=3, duration_s=3.0)
    with pytest.raises(ConfigError, match="no arrivals within --duration-s"):
        synthesize(PoissonArrivals(1e-6), FixedLengths(1, 1), duration_s=1.0)
