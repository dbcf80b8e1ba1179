"""SmartSpec goodput-based speculation length (algorithms.md §5.2), unit-tested without SimPy."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.errors import ConfigError
from simspec.policies import PolicyContext, StepRecord, get_spec_len_class
from simspec.policies.smartspec import choose_by_goodput, iid_tokens
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.methods.base import Method
from simspec.simulator.run import simulate
from simspec.simulator.state import RequestTable
from tests.conftest import make_trace


class StubMethod:
    """Step time = ``base_ms + per_k_ms * k`` (flat when per_k_ms = 0), or a given table."""

    name = "stub"
    expected_tokens = Method.expected_tokens

    def __init__(self, k_max=5, base_ms=10.0, per_k_ms=0.0, table=None):
        self.k_max = k_max
        self.default_k = k_max
        self.base_ms, self.per_k_ms, self.table = base_ms, per_k_ms, table
        self.calls = 0

    def expected_step_ms(self, batch_size, kv_tokens, k):
        self.calls += 1
        if self.table is not None:
            return float(self.table[k])
        return self.base_ms + self.per_k_ms * k

    def stage_estimates_ms(self, batch_size, kv_tokens, k):
        return self.per_k_ms, self.base_ms


def make_policy(name="smartspec", params=None, n=4, output=1000, **method_kw):
    tr = make_trace(np.zeros(n), np.full(n, 10), np.full(n, output))
    table = RequestTable.from_trace(tr)
    ctx = PolicyContext(table=table, method=StubMethod(**method_kw), max_batch_size=n, kv_budget_tokens=10**6, seed=0)
    return get_spec_len_class(name)(dict(params or {}), ctx)


def decide(pol, idx=None, kv_free=10**6, step=0):
    idx = np.arange(len(pol.ctx.table)) if idx is None else idx
    pol.k_reserve()
    return pol.choose_k(idx, 1000.0, kv_free, step)


def test_high_alpha_flat_time_picks_k_max():
    pol = make_policy(k_max=5)
    pol.alpha = 0.99
    assert (decide(pol) == 5).all()


def test_alpha_near_zero_picks_zero():
    pol = make_policy(k_max=5)
    pol.alpha = 0.01
    assert (decide(pol) == 0).all()


def test_bonus_of_1_1_for_k0():
    # flat step time, α = 0.05: goodput(1) = 1.05 × goodput(0) — better, but not by 10 %
    pol = make_policy(k_max=5)
    pol.alpha = 0.05
    assert (decide(pol) == 0).all()
    # without the bonus the same case speculates (flat time: goodput grows with k up to k_max)
    pol = make_policy(params={"bonus": 1.0}, k_max=5)
    pol.alpha = 0.05
    assert (decide(pol) == 5).all()
    # and with a 9 % win over plain decoding: still 0; with an 11 % win: speculate
    for alpha, want in ((0.09, 0), (0.11, 5)):
        pol = make_policy(k_max=5)
        pol.alpha = alpha
        assert (decide(pol) == want).all(), alpha


def test_early_stop_at_first_non_improving_k():
    # goodput with α = 0.8: k=1 improves, k=2 does not (a slow step), k=3 would improve again
    table = [10.0, 12.0, 30.0, 13.0, 13.0, 13.0]
    pol = make_policy(k_max=5, table=table)
    pol.alpha = 0.8
    tok = iid_tokens(np.array([0.8]), 5)[0]
    good = tok / np.array(table)
    assert good[1] > 1.1 * good[0] and good[2] < good[1] and good[3] > good[1]
    assert (decide(pol) == 1).all()


def test_choice_matches_brute_force_rule():
    rng = np.random.default_rng(1)
    for _ in range(200):
        kmax = int(rng.integers(1, 7))
        step = 10.0 + np.cumsum(rng.uniform(0, 8, kmax + 1))
        alpha = rng.uniform(0, 1, 5)
        got = choose_by_goodput(iid_tokens(alpha, kmax), step, np.ones((5, kmax + 1), bool), 1.1)
        for a, g in zip(alpha, got):
            best, choice = 1.1 * 1.0 / step[0], 0
            for k in range(1, kmax + 1):
                gk = ((1 - a ** (k + 1)) / (1 - a)) / step[k]
                if gk <= best:
                    break
                best, choice = gk, k
            assert g == choice


def test_decisions_every_20_steps():
    pol = make_policy(k_max=4)
    high = lambda step: (step // 7) % 2 == 0  # α̂ flips every 7 steps
    ks = []
    for step in range(60):
        pol.alpha = 0.99 if high(step) else 0.01
        ks.append(int(decide(pol, step=step)[0]))
    assert pol.n_decisions == 3
    for step in range(60):
        start = step - step % 20
        assert ks[step] == (4 if high(start) else 0), step


def test_decision_uses_estimate_at_window_start():
    pol = make_policy(k_max=4)
    seen = {}
    for step in range(0, 60):
        pol.alpha = 0.99 if step in (0, 40) else (0.01 if step == 20 else pol.alpha)
        seen[step] = int(decide(pol, step=step)[0])
    assert [seen[0], seen[20], seen[40]] == [4, 0, 4]
    assert seen[19] == 4 and seen[39] == 0 and seen[59] == 4


def test_window_without_decode_members_decides_at_next_call():
    pol = make_policy(k_max=4)
    pol.alpha = 0.99
    decide(pol, step=0)
    pol.alpha = 0.01
    decide(pol, step=25)  # steps 20..24 had no decode members: the first call of the window decides
    assert pol.n_decisions == 2 and pol.last_decision_step == 25 and pol.k == 0


def test_k0_holds_while_nothing_is_drafted_and_probe_escapes():
    # α̂ low at the first decision: k = 0; with no drafts α̂ does not move, so for this fixed batch
    # every revisited decision keeps k = 0 (with the unbiased estimator, α̂ is only this low when
    # the requests' acceptance really is)
    pol = make_policy(k_max=4)
    pol.alpha = 0.01
    ks = [int(decide(pol, step=s)[0]) for s in range(100)]
    assert ks == [0] * 100 and pol.alpha == 0.01
    # probe=5: steps 4, 9, 14, … draft one token while k = 0
    pol = make_policy(params={"probe": 5}, k_max=4)
    pol.alpha = 0.01
    ks = [int(decide(pol, step=s)[0]) for s in range(20)]
    assert [s for s, k in enumerate(ks) if k] == [4, 9, 14, 19] and max(ks) == 1
    # the probe's drafts update α̂, so the next decision can leave k = 0
    pol.observe(StepRecord(idx=np.arange(4), prefill=np.zeros(4, bool), drafted=np.ones(4, int),
                           accepted=np.ones(4, int), committed=np.full(4, 2), step_ms=1.0, end_s=1.0))
    pol.alpha = 0.99  # (as after several successful probes)
    assert (decide(pol, step=20) == 4).all()
    # per request: members at k_i = 0 probe, the others keep their k
    pol = make_policy("smartspec-per-request", params={"probe": 5, "estimator": "ema"}, k_max=4)
    pol.alpha_i[:] = [0.99, 0.01, 0.99, 0.01]
    assert list(decide(pol, step=0)) == [4, 0, 4, 0]
    assert list(decide(pol, step=4)) == [4, 1, 4, 1]


def test_cumulative_and_ema_updates():
    # accepted prefix 4, 0, 1 of 4, 4, 2 drafts; per-position accepts 4, 2, 1 (request 1's second
    # and third drafts matched after its first was rejected): the estimator counts positions
    rec = StepRecord(idx=np.arange(4), prefill=np.array([False, False, False, True]),
                     drafted=np.array([4, 4, 2, 0]), accepted=np.array([4, 0, 1, 0]),
                     committed=np.array([5, 1, 2, 1]), step_ms=10.0, end_s=1.0,
                     position_accepts=np.array([4, 2, 1, 0]))
    pol = make_policy()
    pol.observe(rec)
    assert pol.alpha == pytest.approx(7 / 10)  # Σ accepted positions / Σ drafted positions
    assert pol.log_value() == pytest.approx(pol.alpha)
    pol.observe(StepRecord(idx=np.arange(1), prefill=np.zeros(1, bool), drafted=np.array([10]),
                           accepted=np.array([0]), committed=np.array([1]), step_ms=10.0, end_s=2.0,
                           position_accepts=np.array([3])))
    assert pol.alpha == pytest.approx(10 / 20)  # cumulative, not the last step's rate
    # a step with no drafts leaves α̂ alone
    pol.observe(StepRecord(idx=np.arange(2), prefill=np.zeros(2, bool), drafted=np.zeros(2, int),
                           accepted=np.zeros(2, int), committed=np.ones(2, int), step_ms=10.0, end_s=3.0,
                           position_accepts=np.zeros(2, int)))
    assert pol.alpha == pytest.approx(0.5)
    # ema: α̂ ← 0.85·α̂ + 0.15·(step's accepted / drafted positions)
    pol = make_policy(params={"estimator": "ema"})
    pol.observe(rec)
    assert pol.alpha == pytest.approx(0.85 * 0.7 + 0.15 * 7 / 10)


def test_kv_guard_limits_k():
    # 4 members, nothing reserved (k was 0 when the batch formed), 9 free KV tokens:
    # k = 2 needs 8 extra tokens (fits), k = 3 needs 12 → goodput 0 → stop at 2
    pol = make_policy(k_max=5)
    pol.k = 0
    pol.alpha = 0.99
    assert (decide(pol, kv_free=9) == 2).all()


def test_kv_clip_never_exceeds_free_room():
    pol = make_policy(k_max=5)
    pol.alpha = 0.99
    decide(pol)  # k = 5 reserved from now on
    pol.k_reserve()
    pol.reserved = 0  # pretend this batch formed with nothing reserved
    k = pol.choose_k(np.arange(4), 1000.0, 7, 1)
    assert int(k.sum()) <= 7 and k[0] == 5


def test_remaining_caps_extra_need():
    # members with 2 tokens left draft at most 1: the KV check counts that
    pol = make_policy(k_max=5, output=2)
    pol.k = 0
    pol.alpha = 0.99
    assert (decide(pol, kv_free=4) == 5).all()  # engine caps to 1 each: 4 extra tokens fit


def test_k_max_parameter_and_validation():
    pol = make_policy(params={"k_max": 2}, k_max=5)
    pol.alpha = 0.99
    assert (decide(pol) == 2).all()
    for bad in ({"k_max": 6}, {"interval": 0}, {"alpha0": 1.5}, {"bonus": -1}, {"estimator": "x"}, {"probe": -1}, {"nope": 1}):
        with pytest.raises(ConfigError):
            make_policy(params=bad, k_max=5)


def test_per_request_chooses_per_request():
    pol = make_policy("smartspec-per-request", params={"estimator": "ema"}, k_max=5)
    pol.alpha_i[:] = [0.99, 0.01, 0.99, 0.05]
    assert list(decide(pol)) == [5, 0, 5, 0]
    # update from its own acceptance only
    pol.observe(StepRecord(idx=np.array([1, 2]), prefill=np.zeros(2, bool), drafted=np.array([4, 4]),
                           accepted=np.array([4, 0]), committed=np.array([5, 1]), step_ms=1.0, end_s=1.0))
    assert pol.alpha_i[1] == pytest.approx(0.85 * 0.01 + 0.15)
    assert pol.alpha_i[2] == pytest.approx(0.85 * 0.99)
    assert pol.alpha_i[0] == pytest.approx(0.99)
    # cumulative (default): each request's own engine counters, alpha0 before it drafted
    pol = make_policy("smartspec-per-request", k_max=5)
    t = pol.ctx.table
    t.drafted[:4] = [100, 100, 0, 100]
    t.position_accepts[:4] = [99, 1, 0, 5]
    assert list(pol._levels(np.arange(4))) == pytest.approx([0.99, 0.01, 0.7, 0.05])
    assert list(decide(pol)) == [5, 0, 5, 0]


def test_per_request_new_member_decided_between_windows():
    pol = make_policy("smartspec-per-request", params={"estimator": "ema"}, k_max=5)
    pol.alpha_i[:] = [0.99, 0.99, 0.01, 0.01]
    assert list(decide(pol, idx=np.array([0, 1]), step=0)) == [5, 5]
    assert list(decide(pol, idx=np.array([0, 1, 2]), step=3)) == [5, 5, 0]
    assert pol.n_decisions == 1


def _long_run(spec_len, seed=0, kv=None):
    from simspec.profile import load_profile

    n = 40
    tr = make_trace(np.linspace(0, 2, n), np.full(n, 100), np.full(n, 400))
    cfg = RunConfig(method=ComponentSpec.parse("draft:k=5", "s"), spec_len=ComponentSpec.parse(spec_len, "l"),
                    max_batch_size=16, kv_budget_tokens=kv, seed=seed)
    return simulate(cfg, tr, load_profile("llama70b-4xh100-smartspec"))


def test_engine_steps_log_records_choice_and_estimate():
    res = _long_run("smartspec")
    st = res.steps
    assert st["policy_value"].notna().all()
    assert st["policy_value"].iloc[0] == pytest.approx(0.7)
    # within a 20-step window the chosen k (k_max column) only drops at the end of a request
    # (k capped by remaining − 1); away from the tail it is constant per window
    body = st[(st["step"] < st["step"].max() - 200) & (st["prefills"] < st["batch_size"])]
    for _, g in body.groupby(body["step"] // 20):
        assert g["k_max"].nunique() == 1
    # the logged estimate is the replica's cumulative accepted / drafted positions after the step
    req = res.requests
    d_tot = int(st["drafted"].sum())
    assert st["policy_value"].iloc[-1] == pytest.approx(int(req["position_accepts"].sum()) / d_tot)
    assert (st["policy_value"].diff().abs().iloc[200:] < 0.01).all()  # stable, no drift


def test_engine_tight_kv_never_raises():
    # KV room for barely more than the batch's contexts: the guard must keep Σk within it
    for name in ("smartspec", "smartspec-per-request"):
        res = _long_run(name, kv=505 * 3)
        assert (res.steps["kv_tokens_used"] <= 505 * 3).all()
        assert (res.requests["generated_tokens"] == res.requests["output_tokens"]).all()
