"""Fitting acceptance entries from per-step logs: the fitted entry reproduces the measured tokens per
step under the simulator's semantics (closed form and Monte Carlo), and validates as a profile."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.calibrate.acceptance import (RequestLog, alpha_mle, beta_mom, fit_entry, fit_section,
                                          measured_tau, position_conditional, split_heldout)
from simspec.calibrate.profile_io import merge_profile, validate_partial
from simspec.simulator.acceptance import AcceptanceModel
from simspec.simulator.acceptance_early_exit import KangarooAcceptance

TOKENS = 64


def _draft_logs(rng, n_req, k, a, b, shape, cls="x"):
    """Requests whose steps follow the simulator's model: α_r ~ Beta(a, b), accept draft i given
    drafts < i with min(1, α_r s_i); each request makes TOKENS tokens (the prefill token first)."""
    reqs = []
    s = np.asarray(shape, float)
    for _ in range(n_req):
        al = rng.beta(a, b)
        toks, off, acc = 1, [], []
        while toks < TOKENS:
            p = np.minimum(1.0, al * s[:k])
            m = 0
            while m < k and rng.random() < p[m]:
                m += 1
            off.append(k)
            acc.append(m)
            toks += m + 1
        reqs.append(RequestLog(cls, off, acc, [k] * len(off), tokens=toks))
    return reqs


def _mc_tau_draft(entry, k, rng, n_req=3000):
    """Pooled tokens per step when the simulator's AcceptanceModel drives n_req requests of TOKENS."""
    model = AcceptanceModel([entry])
    alpha = model.draw_alphas(rng, np.zeros(n_req, dtype=int))
    cls = np.zeros(n_req, dtype=int)
    left = np.full(n_req, TOKENS - 1)
    steps = tokens = 0
    while (left > 0).any():
        live = np.flatnonzero(left > 0)
        acc = model.sample_accepted(rng, alpha[live], cls[live], np.full(live.size, k))
        steps += live.size
        tokens += int((acc + 1).sum())
        left[live] -= acc + 1
    return tokens / steps


def test_position_conditional_by_hand():
    # k = 3; accepted 0, 1, 3, 2 → offered at 1: 4, accepted 3; at 2: 3, accepted 2; at 3: 2, accepted 1
    assert position_conditional([3, 3, 3, 3], [0, 1, 3, 2], 3) == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    # variable k: a position never offered is dropped
    assert position_conditional([1, 2, 1], [1, 1, 0], 3) == pytest.approx([2 / 3, 0.0])


def test_alpha_mle_recovers_a_fixed_level():
    rng = np.random.default_rng(1)
    off, acc = [], []
    for _ in range(4000):
        m = 0
        while m < 4 and rng.random() < 0.6:
            m += 1
        off.append(4)
        acc.append(m)
    assert alpha_mle(off, acc, np.ones(4)) == pytest.approx(0.6, abs=0.02)


def test_beta_mom_and_degenerate_spread():
    assert beta_mom([0.5, 0.5, 0.5]) == {"kind": "fixed", "value": 0.5}
    b = beta_mom(list(np.random.default_rng(0).beta(4, 2, 5000)))
    assert b["kind"] == "beta" and b["a"] == pytest.approx(4, rel=0.15) and b["b"] == pytest.approx(2, rel=0.15)


@pytest.mark.parametrize("shape", [[1.0, 1.0, 1.0, 1.0], [1.2, 1.0, 0.9, 0.8]])
def test_fitted_draft_entry_reproduces_measured_tau(shape):
    rng = np.random.default_rng(7)
    reqs = _draft_logs(rng, 120, 4, 5.0, 2.5, shape)
    entry = fit_entry("draft", reqs, {"k": 4})
    meas = measured_tau(reqs)
    assert entry["mean_tokens_per_step"] == pytest.approx(meas, abs=1e-6)
    assert entry["fit"]["tau_model"] == pytest.approx(meas, rel=1e-4)
    # Monte Carlo through the simulator's own acceptance sampler
    assert _mc_tau_draft(entry, 4, np.random.default_rng(3)) == pytest.approx(meas, rel=0.03)
    # raw per-request numbers are kept
    assert len(entry["per_request"]["alpha_mle"]) == 120
    assert entry["n_requests"] == 120 and entry["n_steps"] == sum(r.n_steps for r in reqs)


def test_heldout_prediction_is_close_on_same_distribution():
    rng = np.random.default_rng(11)
    fit = _draft_logs(rng, 200, 4, 6.0, 3.0, [1.1, 1.0, 0.95, 0.9])
    held = _draft_logs(rng, 200, 4, 6.0, 3.0, [1.1, 1.0, 0.95, 0.9])
    entry = fit_entry("draft", fit, {"k": 4}, heldout=held)
    h = entry["heldout"]
    assert h["measured"] == pytest.approx(measured_tau(held))
    assert h["abs_error_pct"] < 6.0


def _kangaroo_logs(rng, n_req, gamma, eta, a, b):
    """Kangaroo-like logs: acceptance as in the simulator; a draft's confidence is Beta(5,2) when it
    is accepted and Beta(2,3) otherwise; drafting stops after the first draft below eta."""
    reqs = []
    for _ in range(n_req):
        al = rng.beta(a, b)
        toks, off, acc, confs = 1, [], [], []
        while toks < TOKENS:
            m, ok, cs = 0, True, []
            for i in range(gamma):
                good = ok and rng.random() < al
                ok = good
                m += int(good)
                c = rng.beta(5, 2) if good else rng.beta(2, 3)
                cs.append(float(c))
                if c < eta:
                    break
            off.append(len(cs))
            acc.append(m)
            confs.append(cs)
            toks += m + 1
        reqs.append(RequestLog("x", off, acc, list(off), confidences=confs, tokens=toks))
    return reqs


def test_fitted_kangaroo_entry_reproduces_tau_and_drafts_in_simulation():
    rng = np.random.default_rng(5)
    gamma, eta = 6, 0.6
    reqs = _kangaroo_logs(rng, 150, gamma, eta, 6.0, 2.0)
    entry = fit_entry("kangaroo", reqs, {"gamma": gamma, "eta": eta})
    meas = measured_tau(reqs)
    assert entry["fit"]["tau_model"] == pytest.approx(meas, rel=1e-4)
    hist = entry["confidence"]
    assert len(hist["accepted"]) == gamma and len(hist["bin_edges"]) == 21
    assert sum(map(sum, hist["accepted"])) == sum(sum(r.accepted) for r in reqs)
    assert sum(map(sum, hist["accepted"])) + sum(map(sum, hist["rejected"])) == sum(sum(r.offered) for r in reqs)
    # simulate with the simulator's Kangaroo sampler
    model = KangarooAcceptance([entry], eta)
    n = 3000
    r2 = np.random.default_rng(9)
    alpha = model.draw_alphas(r2, np.zeros(n, dtype=int))
    cls = np.zeros(n, dtype=int)
    left = np.full(n, TOKENS - 1)
    steps = tokens = drafts = 0
    while (left > 0).any():
        live = np.flatnonzero(left > 0)
        d, acc = model.sample_drafts(r2, alpha[live], cls[live], np.full(live.size, gamma))
        steps += live.size
        tokens += int((acc + 1).sum())
        drafts += int(d.sum())
        left[live] -= acc + 1
    assert tokens / steps == pytest.approx(meas, rel=0.04)
    # the confidence model is a simplification (confidence independent of position history), so
    # drafts per step only roughly matches
    assert drafts / steps == pytest.approx(entry["drafts_per_step"], rel=0.15)


def _hispec_logs(rng, n_req, nd, ni, a, b, ratio=1.1):
    """HiSpec-like logs following the simulator's model: inner level min(1, α·ratio), full level α."""
    reqs = []
    for _ in range(n_req):
        al = rng.beta(a, b)
        ad = min(1.0, al * ratio)
        toks, off, acc, inner = 1, [], [], []
        while toks < TOKENS:
            buf, rounds = 0, []
            while buf < ni:
                j = 0
                while j < nd and rng.random() < ad:
                    j += 1
                app = nd if j == nd else j + 1
                rounds.append((nd, j))
                buf += app
            m = 0
            while m < buf and rng.random() < al:
                m += 1
            off.append(buf)
            acc.append(m)
            inner.append(rounds)
            toks += m + 1
        reqs.append(RequestLog("x", off, acc, [nd * len(r) for r in inner], inner=inner, tokens=toks))
    return reqs


def _mc_hispec(entry, nd, ni, rng, n_req=2000):
    from simspec.profile import alpha_mean
    from simspec.simulator.acceptance import position_shape

    s = position_shape(entry.get("position_conditional"))
    dvi = entry["draft_vs_inter"]
    sd = position_shape(dvi.get("position_conditional"))
    ratio = alpha_mean(dvi["alpha"]) / alpha_mean(entry["alpha"])
    model = AcceptanceModel([entry])
    alphas = model.draw_alphas(rng, np.zeros(n_req, dtype=int))
    steps = tokens = 0
    for al in alphas:
        ad = min(1.0, al * ratio)
        toks = 1
        while toks < TOKENS:
            buf = 0
            while buf < ni:
                j = 0
                while j < nd and rng.random() < min(1.0, ad * sd[j]):
                    j += 1
                buf += nd if j == nd else j + 1
            m = 0
            while m < buf and rng.random() < min(1.0, al * s[m]):
                m += 1
            steps += 1
            tokens += m + 1
            toks += m + 1
    return tokens / steps


def test_fitted_hispec_entry_reproduces_tau_in_simulation():
    rng = np.random.default_rng(21)
    reqs = _hispec_logs(rng, 150, 2, 4, 5.0, 2.0)
    entry = fit_entry("hispec", reqs, {"nd": 2, "ni": 4})
    meas = measured_tau(reqs)
    assert entry["fit"]["tau_model"] == pytest.approx(meas, rel=1e-4)
    dvi = entry["draft_vs_inter"]
    assert dvi["n_rounds"] == sum(len(s) for r in reqs for s in r.inner)
    assert len(entry["position_conditional"]) <= 5  # buffer of at most ni + nd - 1 tokens
    assert _mc_hispec(entry, 2, 4, np.random.default_rng(4)) == pytest.approx(meas, rel=0.04)


def test_section_has_default_and_validates_as_profile():
    rng = np.random.default_rng(2)
    by_cls = {"qa": _draft_logs(rng, 10, 3, 2, 2, [1, 1, 1], "qa"),
              "rag": _draft_logs(rng, 10, 3, 6, 2, [1, 1, 1], "rag")}
    section = fit_section("draft", by_cls, {"k": 3})
    assert set(section) == {"qa", "rag", "default"}
    assert section["default"]["n_requests"] == 20
    assert section["qa"]["mean_tokens_per_step"] < section["rag"]["mean_tokens_per_step"]
    doc = merge_profile(None, name="t", acceptance={"draft": section})
    validate_partial(doc, "t.json")


def test_no_acceptance_at_all_gives_fixed_zero():
    reqs = [RequestLog("x", [4] * 10, [0] * 10, [4] * 10, tokens=11)]
    e = fit_entry("draft", reqs, {"k": 4})
    assert e["alpha"] == {"kind": "fixed", "value": 0.0}
    assert "position_conditional" not in e
    assert e["mean_tokens_per_step"] == 1.0


def test_split_heldout_is_deterministic():
    assert split_heldout(list(range(8)), 0.25) == ([0, 1, 2, 4, 5, 6], [3, 7])
    assert split_heldout(list(range(3)), 0.25) == ([0, 1], [2])
    assert split_heldout([1], 0.25) == ([1], [])
    assert split_heldout(list(range(5)), 0.0) == (list(range(5)), [])
