"""Vectorised decode windows of the early-exit methods equal :meth:`Method.step` one step at a time.

The reference is the generic :meth:`Method.decode_window` of the base class (it calls ``step()``
once per step with the engine's counter-based draws); the method's own ``decode_window`` must give
the same steps with byte-identical arrays (the engine may stop a window early; the methods never
do: kangaroo's changes of the batch cap and completions mid-window included)."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.analytic import KANGAROO_CONFIDENCE
from simspec.profile import load_profile
from simspec.rng import request_bases, stream_key
from simspec.simulator.methods.base import DecodeWindow, Method
from tests.test_early_exit import N_LAYERS, fixed, layer_doc, make_method

FIELDS = ("step_ms", "k", "drafted", "accepted", "position_accepts", "committed", "fed_tokens", "draws")


def random_window(rng: np.random.Generator, n: int, kmax: int, through: bool, steps: int,
                  short: bool = False) -> DecodeWindow:
    """A decode window of ``n`` members with random k (0..kmax), context, remaining tokens
    (``short``: a few tokens, so members complete and caps shrink inside the window), acceptance
    levels and draw counters."""
    rem = rng.integers(1, 12 if short else 400, n)
    return DecodeWindow(idx=np.arange(n), ctx_tokens=rng.integers(1, 3000, n), k=rng.integers(0, kmax + 1, n),
                        remaining=rem, alpha=rng.uniform(0.0, 1.0, n), class_idx=np.zeros(n, dtype=np.int64),
                        rng_base=request_bases(stream_key(int(rng.integers(1 << 30)), "acceptance"),
                                               rng.integers(0, 1 << 40, n).astype(np.uint64)),
                        draws=rng.integers(0, 1000, n).astype(np.uint64), n_steps=steps, through=through)


def assert_prefix_equal(fast, ref) -> int:
    """Every array of ``fast`` equals the first steps of ``ref`` exactly; returns its step count."""
    s = fast.n_steps
    assert 1 <= s <= ref.n_steps
    for f in FIELDS:
        a, b = getattr(fast, f), getattr(ref, f)[:s]
        assert a.shape == b.shape, f
        assert a.dtype.kind == b.dtype.kind, f
        assert np.array_equal(a, b), (f, a, b)
    act_f = fast.active if fast.active is not None else np.ones(fast.k.shape, bool)
    act_r = ref.active[:s] if ref.active is not None else np.ones(fast.k.shape, bool)
    assert np.array_equal(act_f, act_r)
    return s


def run_both(m, w: DecodeWindow) -> int:
    """Compare the method's window with the generic one, step by step and in length."""
    ref = Method.decode_window(m, w)
    fast = m.decode_window(w)
    assert type(m).decode_window is not Method.decode_window
    s = assert_prefix_equal(fast, ref)
    assert s == ref.n_steps
    return s


KANGAROO_DOCS = {
    "confidence": layer_doc(kangaroo={"alpha": fixed(0.7), "confidence": KANGAROO_CONFIDENCE}, ct=0.01, ckv=1e-4),
    "no-confidence": layer_doc(kangaroo={"alpha": fixed(0.7)}, ct=0.01, ckv=1e-4),
}


@pytest.mark.parametrize("spec,doc", [("kangaroo:exit=2,gamma=6,eta=0.6", "confidence"),
                                      ("kangaroo:exit=3,gamma=4,eta=0.3", "confidence"),
                                      ("kangaroo:exit=2,gamma=5,eta=0", "confidence"),
                                      ("kangaroo:exit=2,gamma=6,eta=1", "confidence"),
                                      ("kangaroo:exit=2,gamma=6,eta=0.6", "no-confidence")])
@pytest.mark.parametrize("through", [False, True])
def test_kangaroo_window_equals_one_step_at_a_time(spec, doc, through):
    m = make_method(spec, KANGAROO_DOCS[doc])
    assert m.acceptance.stops_early == (doc == "confidence" and "eta=0," not in spec + ",")
    rng = np.random.default_rng(11)
    steps_seen, partial = 0, 0
    for trial in range(60):
        w = random_window(rng, int(rng.integers(1, 20)), 8, through, int(rng.integers(1, 40)),
                          short=trial % 2 == 0)
        s = run_both(m, w)
        steps_seen += s
        partial += Method.decode_window(m, w).active is not None and s > 1
    assert steps_seen > 100
    if through:  # members completed mid-window and the window ran on with the others
        assert partial > 0


def test_kangaroo_window_on_the_analytic_profile():
    """Grid stages (interpolated): the arrays must still match the scalar calls bit for bit."""
    prof = load_profile("vicuna7b-a100-analytic")
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import get_method_class

    m = get_method_class("kangaroo")({}, prof, CostModel(prof))
    m.bind_acceptance(m.build_acceptance([prof.acceptance["kangaroo"][c] for c in sorted(prof.acceptance["kangaroo"])][:1]))
    assert m.acceptance.stops_early
    rng = np.random.default_rng(5)
    for trial in range(30):
        w = random_window(rng, int(rng.integers(1, 64)), 6, trial % 3 == 0, 32, short=trial % 4 == 0)
        run_both(m, w)


def test_kangaroo_window_runs_on_where_the_batch_cap_changes():
    """Member 0 holds the largest cap and nearly finishes: the batch's kmax (and so every member's
    draws per step) drops mid-window, then member 0 completes; the window runs through both."""
    m = make_method("kangaroo:exit=2,gamma=6,eta=0.6", KANGAROO_DOCS["confidence"])
    w = DecodeWindow(idx=np.arange(3), ctx_tokens=np.array([10, 20, 30]), k=np.array([6, 2, 2]),
                     remaining=np.array([9, 500, 500]), alpha=np.full(3, 0.9), class_idx=np.zeros(3, np.int64),
                     rng_base=request_bases(stream_key(1, "acceptance"), np.arange(3, dtype=np.uint64)),
                     draws=np.zeros(3, np.uint64), n_steps=50, through=True)
    ref = Method.decode_window(m, w)
    fast = m.decode_window(w)
    assert assert_prefix_equal(fast, ref) == ref.n_steps == 50
    per_step = set(np.unique(fast.draws[:, 1]).tolist())
    assert per_step == {12}  # 2 * gamma every step whatever the batch cap (a fixed width)
    assert fast.active is not None and not fast.active[-1, 0]


HISPEC_DOC = layer_doc(hispec={"alpha": fixed(0.7), "draft_vs_inter": {"alpha": fixed(0.8)}}, ct=0.01, ckv=1e-4)


@pytest.mark.parametrize("spec", ["hispec:draft_exit=1,inter_exit=3,nd=2,ni=4", "hispec:draft_exit=2,inter_exit=5,nd=3,ni=2",
                                  "hispec:draft_exit=1,inter_exit=4,nd=1,ni=6",
                                  f"hispec:draft_exit=2,inter_exit={N_LAYERS},nd=3"])
@pytest.mark.parametrize("through", [False, True])
def test_hispec_window_equals_one_step_at_a_time(spec, through):
    m = make_method(spec, HISPEC_DOC)
    rng = np.random.default_rng(13)
    steps_seen, partial = 0, 0
    for trial in range(60):
        w = random_window(rng, int(rng.integers(1, 20)), m.k_max, through, int(rng.integers(1, 40)),
                          short=trial % 2 == 0)
        w.alpha = rng.uniform(0.0, 1.0, w.idx.shape[0])
        s = run_both(m, w)
        steps_seen += s
        partial += Method.decode_window(m, w).active is not None and s > 1
    assert steps_seen > 100
    if through:
        assert partial > 0


def test_hispec_window_on_the_analytic_profile():
    prof = load_profile("vicuna7b-a100-analytic")
    from simspec.simulator.cost import CostModel
    from simspec.simulator.methods import get_method_class

    m = get_method_class("hispec")({}, prof, CostModel(prof))
    m.bind_acceptance(m.build_acceptance([prof.acceptance["hispec"][c] for c in sorted(prof.acceptance["hispec"])][:1]))
    rng = np.random.default_rng(6)
    for trial in range(30):
        w = random_window(rng, int(rng.integers(1, 64)), m.k_max, trial % 3 == 0, 32, short=trial % 4 == 0)
        run_both(m, w)
