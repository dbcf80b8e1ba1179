"""LAPS-SD and LAS (algorithms.md §4.3-4.4), unit-tested on hand-made request tables without SimPy,
plus a few end-to-end runs."""

from __future__ import annotations

import numpy as np
import pytest

from simspec.errors import ConfigError
from simspec.policies import PolicyContext, StepRecord, get_scheduler_class
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from simspec.simulator.state import RequestTable
from tests.conftest import make_trace


class StubMethod:
    """T_draft = ``draft_ms`` per draft token, T_verify = ``verify_ms + per_k_ms·k``."""

    name = "stub"
    k_max = 4
    default_k = 4

    def __init__(self, draft_ms=1.0, verify_ms=10.0, per_k_ms=0.0):
        self.draft_ms, self.verify_ms, self.per_k_ms = draft_ms, verify_ms, per_k_ms
        self.calls = []

    def stage_estimates_ms(self, batch_size, kv_tokens, k):
        self.calls.append((batch_size, kv_tokens, k))
        return self.draft_ms, self.verify_ms + self.per_k_ms * k


def make(name="laps-sd", params=None, output=(1000, 1000), arrival=None, prompt=None, method=None, max_batch=8):
    n = len(output)
    tr = make_trace(np.zeros(n) if arrival is None else arrival, np.full(n, 10) if prompt is None else prompt,
                    np.asarray(output))
    table = RequestTable.from_trace(tr)
    ctx = PolicyContext(table=table, method=method or StubMethod(), max_batch_size=max_batch,
                        kv_budget_tokens=10**6, seed=0)
    return get_scheduler_class(name)(dict(params or {}), ctx)


def step(pol, idx, committed, drafted=None, accepted=None, step_ms=10.0, end_s=0.0, prefill=None):
    idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
    b = idx.size
    bc = lambda v, d: np.broadcast_to(np.asarray(d if v is None else v), (b,)).astype(np.int64)
    rec = StepRecord(idx=idx, prefill=np.zeros(b, bool) if prefill is None else np.asarray(prefill),
                     drafted=bc(drafted, 0), accepted=bc(accepted, 0), committed=bc(committed, 1),
                     step_ms=step_ms, end_s=end_s)
    pol.observe(rec)
    # keep the request table consistent with what the engine would have done
    t = pol.table
    t.generated[idx] += rec.committed
    t.drafted[idx] += rec.drafted
    t.accepted[idx] += rec.accepted


# --------------------------------------------------------------------------- queues and demotion


@pytest.mark.parametrize("name", ["laps-sd", "las"])
def test_demotion_exactly_at_thresholds(name):
    pol = make(name, output=[10_000])
    seen = []
    for _ in range(300):
        step(pol, 0, committed=1)
        seen.append((int(pol.attained[0]), int(pol.queue[0])))
    q = dict(seen)
    # thresholds 32, 64, 128 (q = 32, 4 queues): demoted the moment attained service reaches one
    assert [q[31], q[32], q[63], q[64], q[127], q[128], q[300]] == [0, 1, 1, 2, 2, 3, 3]
    assert pol.extra_columns()["queue_changes"][0] == 3
    assert pol.extra_columns()["final_queue"][0] == 3


def test_demotion_with_multi_token_steps_and_custom_thresholds():
    pol = make("laps-sd", {"queues": 3, "q": 10}, output=[10_000])
    step(pol, 0, committed=9)
    assert pol.queue[0] == 0
    step(pol, 0, committed=1)  # 10: reaches the first threshold
    assert pol.queue[0] == 1
    step(pol, 0, committed=15)  # 25 ≥ 20: last queue (no further threshold)
    assert pol.queue[0] == 2
    step(pol, 0, committed=1000)
    assert pol.queue[0] == 2 and pol.queue_changes[0] == 2
    pol = make("laps-sd", {"queues": 3, "q": 10}, output=[10_000])
    step(pol, 0, committed=25)  # jumps two queues in one step: counted as two demotions
    assert pol.queue[0] == 2 and pol.queue_changes[0] == 2


def test_demotion_on_gpu_time():
    pol = make("laps-sd", {"service": "time", "q_ms": 50}, output=[10_000])
    for _ in range(4):
        step(pol, 0, committed=5, step_ms=12.5)  # 50 ms after 4 steps
    assert pol.queue[0] == 1 and pol.attained[0] == pytest.approx(50.0)
    for _ in range(4):
        step(pol, 0, committed=5, step_ms=12.5)  # 100 ms
    assert pol.queue[0] == 2


def test_parameters_validated():
    for bad in ({"queues": 0}, {"q": -1}, {"service": "x"}, {"m": 0}, {"w": 0}, {"eps": -0.1},
                {"predictor": "x"}, {"merge": "x"}, {"within": "x"}, {"nope": 1}):
        with pytest.raises(ConfigError):
            make("laps-sd", bad)
    with pytest.raises(ConfigError):
        make("las", {"m": 5})


# --------------------------------------------------------------------------- preemption


def test_new_arrival_preempts_long_running_non_perceptible():
    pol = make("laps-sd", output=[1000, 50])
    # request 0 runs 10 steps with unstable acceptance (4/4, 0/4, …): 30 tokens, never perceptible
    for s in range(10):
        step(pol, 0, committed=5 if s % 2 == 0 else 1, drafted=4, accepted=4 if s % 2 == 0 else 0)
    assert not pol.perceptible[0]
    assert pol.queue[0] == 0
    step(pol, 0, committed=5, drafted=4, accepted=4)  # 35 tokens → queue 1
    assert pol.queue[0] == 1 and not pol.perceptible[0]
    # request 1 arrives: top queue, ahead of the long-running request
    assert list(pol.order(np.array([0, 1]), 1.0)) == [1, 0]
    # LAS does the same
    las = make("las", output=[1000, 50])
    step(las, 0, committed=35)
    assert list(las.order(np.array([0, 1]), 1.0)) == [1, 0]


def test_new_arrival_preempts_in_the_engine(flat_profile):
    # one request per step, preemptive batching: the long request is displaced at the first step
    # boundary after the short one arrives, under LAPS-SD (and LAS) but not FCFS; the long one
    # keeps its KV (a pause, not a preemption). In vllm mode a running request keeps its slot.
    tr = make_trace([0.0, 1.0], [8, 8], [500, 5])
    prof = flat_profile(alpha=0.5, max_batch_size=1)
    out = {}
    for batching in ("preemptive", "vllm"):
        for pol in ("laps-sd", "las", "fcfs"):
            cfg = RunConfig(scheduler=ComponentSpec.parse(pol, "p"), method=ComponentSpec.parse("draft:k=3", "s"),
                            max_batch_size=1, kv_budget_tokens=10_000, seed=1, batching=batching)
            out[batching, pol] = simulate(cfg, tr, prof).requests
    for pol in ("laps-sd", "las"):
        r = out["preemptive", pol]
        assert r["start_s"][1] - r["arrival_s"][1] < 0.0131 + 1e-9  # the next step boundary (13 ms steps)
        assert r["pauses"][0] >= 1 and r["completion_s"][1] < r["completion_s"][0]
        assert r["preemptions"][0] == 0
    for pol in ("laps-sd", "las", "fcfs"):
        assert out["vllm", pol]["completion_s"][1] > out["vllm", pol]["completion_s"][0]
    assert out["preemptive", "fcfs"]["completion_s"][1] > out["preemptive", "fcfs"]["completion_s"][0]


# --------------------------------------------------------------------------- stability test


def reference_perceptible_step(accepted, drafted, m=5, w=8, eps=0.05):
    """1-based index of the drafting step after which the request becomes perceptible (or None)."""
    est = []
    acc = dr = 0
    for s, (a, d) in enumerate(zip(accepted, drafted), start=1):
        acc += a
        dr += d
        est.append(acc / dr)
        if s >= m:
            window = est[-w:]
            if max(window) - min(window) < eps:
                return s
    return None


def test_perceptible_only_after_stability_test_passes():
    pol = make("laps-sd", output=[1000])
    for s in range(1, 5):  # constant acceptance, but fewer than m = 5 steps
        step(pol, 0, committed=3, drafted=4, accepted=2, end_s=float(s))
        assert not pol.perceptible[0]
    step(pol, 0, committed=3, drafted=4, accepted=2, end_s=5.0)
    assert pol.perceptible[0] and pol.perceptible_at_s[0] == 5.0
    assert pol.extra_columns()["perceptible_at_s"][0] == 5.0


def test_steps_without_drafts_do_not_count():
    pol = make("laps-sd", output=[1000])
    for s in range(4):
        step(pol, 0, committed=3, drafted=4, accepted=2)
    for s in range(10):
        step(pol, 0, committed=1, drafted=0, accepted=0)
    step(pol, 0, committed=1, prefill=[True])
    assert not pol.perceptible[0]
    step(pol, 0, committed=3, drafted=4, accepted=2, end_s=7.0)
    assert pol.perceptible[0] and pol.perceptible_at_s[0] == 7.0


def test_stability_matches_reference_on_random_sequences():
    rng = np.random.default_rng(7)
    for trial in range(150):
        m, w = int(rng.integers(1, 8)), int(rng.integers(1, 10))
        eps = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        d = rng.integers(1, 6, 40)
        p = rng.uniform(0, 1)
        a = np.minimum(rng.binomial(d, p), d)
        want = reference_perceptible_step(a, d, m, w, eps)
        pol = make("laps-sd", {"m": m, "w": w, "eps": eps}, output=[10_000])
        got = None
        for s in range(40):
            step(pol, 0, committed=a[s] + 1, drafted=d[s], accepted=a[s], end_s=float(s + 1))
            if pol.perceptible[0] and got is None:
                got = s + 1
        assert got == want, (trial, m, w, eps)
        if want is not None:
            assert pol.perceptible_at_s[0] == float(want)


def test_unstable_acceptance_stays_non_perceptible():
    pol = make("laps-sd", output=[10_000])
    for s in range(12):  # estimate 1, .5, .67, .5, .6, .5, … swings more than 0.05 within 8 steps
        step(pol, 0, committed=1, drafted=4, accepted=4 if s % 2 == 0 else 0)
    assert not pol.perceptible[0]


# --------------------------------------------------------------------------- ordering by T̃


def make_perceptible(pol, i, accepted, drafted=4, steps=5, committed=None):
    for _ in range(steps):
        step(pol, i, committed=accepted + 1 if committed is None else committed, drafted=drafted, accepted=accepted)
    assert pol.perceptible[i]


def test_perceptible_ordered_by_estimated_time():
    method = StubMethod(draft_ms=2.0, verify_ms=20.0, per_k_ms=1.0)
    out = [400, 300, 500, 250, 800, 200]
    pol = make("laps-sd", {"queues": 1}, output=out, method=method)
    acc = [4, 1, 3, 0, 4, 2]
    drafts = [4, 4, 4, 4, 4, 2]
    for i in range(6):
        make_perceptible(pol, i, acc[i], drafted=drafts[i])
    active = np.arange(6)
    got = pol.order(active, 0.0)
    # by hand: T̃ = L̂·(n·T_draft + T_verify(n))/(n·Â + 1)
    t = []
    for i in range(6):
        served = 5 * (acc[i] + 1)
        L = out[i] - served
        n, A = drafts[i], acc[i] / drafts[i]
        t.append(L * (n * 2.0 + 20.0 + n * 1.0) / (n * A + 1))
    assert list(got) == list(np.argsort(t, kind="stable"))
    assert pol.remaining_time_ms(active, 8, 0.0) == pytest.approx(t)


def test_estimates_use_current_batch_shape():
    method = StubMethod()
    pol = make("laps-sd", {"queues": 1}, output=[100, 100, 100], prompt=[10, 20, 40], method=method)
    for i in range(3):
        make_perceptible(pol, i, 2)
    pol.table.in_batch[[0, 2]] = True  # the replica's last batch held requests 0 and 2
    method.calls.clear()
    pol.order(np.arange(3), 0.0)
    served = 5 * 3
    assert method.calls == [(2, float(10 + 40 + 2 * served), 4)]
    # no batch yet: the first max_batch of `active`
    pol.table.in_batch[:] = False
    method.calls.clear()
    pol.order(np.arange(3), 0.0)
    assert method.calls == [(3, float(70 + 3 * served), 4)]


def test_one_queue_stable_from_first_step_orders_like_srpt():
    rng = np.random.default_rng(3)
    n = 30
    out = rng.integers(50, 2000, n)
    laps = make("laps-sd", {"queues": 1, "m": 1}, output=out)
    srpt = make("srpt", output=out)
    served = rng.integers(1, 40, n)
    for i in range(n):
        step(laps, i, committed=int(served[i]), drafted=4, accepted=3)  # same acceptance for all
    assert laps.perceptible.all()
    srpt.table.generated[:] = laps.table.generated
    active = rng.permutation(n)
    active.sort()
    assert list(laps.order(active, 0.0)) == list(srpt.order(active, 0.0))
    # with different acceptance it is shortest remaining *time*: remaining tokens / tokens per step
    laps = make("laps-sd", {"queues": 1, "m": 1}, output=out)
    acc = rng.integers(0, 5, n)
    for i in range(n):
        step(laps, i, committed=int(served[i]), drafted=4, accepted=int(acc[i]))
    rem_time = (out - served) / (4 * acc / 4 + 1)
    assert list(laps.order(active, 0.0)) == list(active[np.lexsort((active, rem_time[active]))])


def test_merge_within_a_queue():
    # queue 0 (threshold 32): request 0 perceptible with 10 tokens left (finishes in the queue),
    # request 1 perceptible with 500 left (outlasts it), requests 2, 3 non-perceptible
    pol = make("laps-sd", {"within": "attained"}, output=[20, 510, 1000, 1000])
    make_perceptible(pol, 0, 1, steps=5, committed=2)  # 10 served
    make_perceptible(pol, 1, 1, steps=5, committed=2)
    step(pol, 2, committed=3)
    assert pol.queue[:4].tolist() == [0, 0, 0, 0] and not pol.perceptible[2:].any()
    assert list(pol.order(np.arange(4), 0.0)) == [0, 3, 2, 1]
    ahead = make("laps-sd", {"merge": "ahead", "within": "attained"}, output=[20, 510, 1000, 1000])
    make_perceptible(ahead, 0, 1, steps=5, committed=2)
    make_perceptible(ahead, 1, 1, steps=5, committed=2)
    step(ahead, 2, committed=3)
    assert list(ahead.order(np.arange(4), 0.0)) == [0, 1, 3, 2]
    # strict priority across queues: a perceptible short request in queue 1 stays behind queue 0
    pol = make("laps-sd", output=[60, 1000])
    make_perceptible(pol, 0, 4, steps=7)  # 35 served → queue 1, 25 left
    assert pol.queue[0] == 1
    assert list(pol.order(np.arange(2), 0.0)) == [1, 0]


def test_las_within_arrival_is_fcfs_per_queue():
    pol = make("las", {"within": "arrival"}, output=[1000, 1000, 1000])
    step(pol, 0, committed=20)
    step(pol, 1, committed=5)
    assert list(pol.order(np.arange(3), 0.0)) == [0, 1, 2]
    las = make("las", {"within": "attained"}, output=[1000, 1000, 1000])
    step(las, 0, committed=20)
    step(las, 1, committed=5)
    assert list(las.order(np.arange(3), 0.0)) == [2, 1, 0]
    # the default is MLFQ: FCFS within a queue, so queues and q change the order
    mlfq = make("las", output=[1000, 1000, 1000])
    step(mlfq, 0, committed=40)  # queue 1 (q = 32)
    step(mlfq, 1, committed=5)
    assert list(mlfq.order(np.arange(3), 0.0)) == [1, 2, 0]
    coarse = make("las", {"queues": 1}, output=[1000, 1000, 1000])
    step(coarse, 0, committed=40)
    assert list(coarse.order(np.arange(3), 0.0)) == [0, 1, 2]


# --------------------------------------------------------------------------- end to end


def _run(policy, spec="draft:k=4", n=60, seed=0):
    from simspec.profile import load_profile

    rng = np.random.default_rng(seed)
    tr = make_trace(np.sort(rng.uniform(0, 3, n)), rng.integers(10, 200, n), rng.integers(5, 300, n))
    cfg = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                    max_batch_size=8, kv_budget_tokens=20_000, seed=seed)
    return simulate(cfg, tr, load_profile("llama70b-4xh100-smartspec"))


def test_output_columns():
    r = _run("laps-sd").requests
    for col in ("perceptible_at_s", "queue_changes", "final_queue", "predicted_output_tokens"):
        assert col in r.columns
    p = r["perceptible_at_s"].to_numpy()
    seen = ~np.isnan(p)
    assert seen.any()
    assert (p[seen] >= r["first_token_s"].to_numpy()[seen]).all()
    assert (p[seen] <= r["completion_s"].to_numpy()[seen]).all()
    assert (r["queue_changes"] == r["final_queue"]).all()
    assert ((r["final_queue"] >= 0) & (r["final_queue"] <= 3)).all()
    r = _run("las").requests
    assert {"queue_changes", "final_queue"} <= set(r.columns) and "perceptible_at_s" not in r.columns


def test_without_drafts_laps_sd_is_las():
    a = _run("laps-sd", spec="none").requests
    b = _run("las", spec="none").requests
    assert a["perceptible_at_s"].isna().all()
    cols = [c for c in b.columns]
    assert a[cols].equals(b[cols])


def test_deterministic():
    a = _run("laps-sd:predictor=lognormal,sigma=0.8", seed=3)
    b = _run("laps-sd:predictor=lognormal,sigma=0.8", seed=3)
    assert a.requests.equals(b.requests) and a.steps.equals(b.steps)


@pytest.mark.parametrize("seed", range(6))
def test_window_observation_equals_step_by_step(seed):
    # the vectorised observe_window (the engine's fast path) leaves exactly the state that observe()
    # on each step in turn leaves: sums, ring of estimates, perceptibility and when it was detected
    from simspec.policies.base import WindowRecord

    rng = np.random.default_rng(seed)
    n = 6
    params = {"m": int(rng.integers(1, 6)), "w": int(rng.integers(1, 9)), "eps": float(rng.choice([0.0, 0.05, 0.3]))}
    a, b = make(params=params, output=[1000] * n), make(params=params, output=[1000] * n)
    idx = np.arange(n)
    t = 0.0
    for _ in range(4):  # several windows in a row: state carries over between them
        s_n = int(rng.integers(1, 30))
        drafted = rng.integers(0, 5, (s_n, n))
        accepted = np.minimum(rng.integers(0, 5, (s_n, n)), drafted)
        committed = accepted + 1
        active = None
        if rng.random() < 0.5:  # members dropping out as they finish
            stop = rng.integers(1, s_n + 1, n)
            active = np.arange(s_n)[:, None] < stop[None, :]
            drafted, accepted, committed = drafted * active, accepted * active, committed * active
        step_ms = rng.uniform(5, 20, s_n)
        end_s = t + np.cumsum(step_ms) / 1000.0
        t = float(end_s[-1])
        rec = WindowRecord(idx=idx, drafted=drafted, accepted=accepted, position_accepts=accepted,
                           committed=committed, fed_tokens=drafted + 1, step_ms=step_ms, end_s=end_s,
                           active=active if active is not None and not active.all() else None)
        a.observe_window(rec)
        for s in range(s_n):
            b.observe(rec.step(s))
    for name in ("drafted_sum", "accepted_sum", "acc_steps", "spec_len", "perceptible", "served_tokens",
                 "queue", "queue_changes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.history, b.history)
    np.testing.assert_array_equal(a.perceptible_at_s, b.perceptible_at_s)
    np.testing.assert_array_equal(a.attained, b.attained)
