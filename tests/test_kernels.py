"""The compiled per-event kernels (simulator/kernels.py) against the numpy code they replaced.

Each reference below is the numpy implementation that was in the engine before the kernel (kept
here verbatim in spirit: same operations, same order), run on random inputs; the kernel must give
exactly the same arrays. When numba is installed the compiled kernel and its plain-Python self
(``py_func``, what runs without numba) are both checked.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simspec.rng import counter_uniforms
from simspec.simulator import kernels as K
from simspec.simulator.batching import blocks_for

SEEDS = st.integers(0, 2**32 - 1)


def _both(name):
    """Kernel ``name`` in plain mode and, where numba is installed, compiled."""
    fns = [K.plain()[name]]
    if K.numba_available():
        fns.append(K.compiled()[name])
    return fns


def _eq(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _eq(x, y)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.tobytes() == b.tobytes(), (a, b)


# ------------------------------------------------------------------------------ draft acceptance
def _ref_draft_accept(probs, idx, base, ctr, k, kmax):
    pos = np.arange(max(kmax, 1), dtype=np.uint64)
    u = counter_uniforms(base[:, None], ctr[:, None] + pos[None, :kmax])
    ok = u < probs[idx, :kmax]
    ok &= pos[None, :kmax] < k.astype(np.uint64)[:, None]
    return np.logical_and.accumulate(ok, axis=1).sum(axis=1).astype(np.int64), ok.sum(axis=1).astype(np.int64)


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_draft_accept_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n_req, kk = 40, int(rng.integers(1, 7))
    n = int(rng.integers(0, 25))
    probs = rng.random((n_req, kk))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    base = rng.integers(0, 2**63, n).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    ctr = rng.integers(0, 10**9, n).astype(np.uint64)
    k = rng.integers(0, kk + 1, n).astype(np.int64)
    kmax = int(k.max()) if n else 0
    want = _ref_draft_accept(probs, idx, base, ctr, k, kmax)
    for fn in _both("draft_accept"):
        _eq(fn(probs, idx, base, ctr, k, kmax), want)


def test_uniform_equals_counter_uniforms():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 50).astype(np.uint64) * np.uint64(2)
    ctr = rng.integers(0, 2**40, 50).astype(np.uint64)
    want = counter_uniforms(base, ctr)
    for fn in (K._uniform, K._uniform_u64):
        with np.errstate(over="ignore"):  # uint64 wraps (by design) when run by the interpreter
            got = np.array([fn(b, c) for b, c in zip(base, ctr)])
        assert got.tobytes() == want.tobytes()


# ------------------------------------------------------------------------------ draft windows
def _ref_draft_window(probs, idx, base, draws, k, dps, steps, kk, pre, rem0):
    """The window sampling of DraftModel.decode_window before the kernel (lead: ``pre``)."""
    n = idx.size
    pos = np.arange(max(kk, 1))
    srel = np.maximum(np.arange(steps)[:, None] - pre.astype(np.int64)[None, :], 0).astype(np.uint64)
    ctr = draws[None, :, None] + srel[:, :, None] * np.uint64(dps) + pos[:kk].astype(np.uint64)[None, None, :]
    p = probs[idx, :kk]
    ok = counter_uniforms(base[None, :, None], ctr) < p[None]
    ok &= pos[:kk][None, None, :] < k[None, :, None]
    ok[0, pre, :] = False
    acc_full = np.cumprod(ok, axis=2).sum(axis=2)
    csum = np.cumsum(acc_full + 1, axis=0)
    done = csum >= rem0[None, :]
    done_step = np.where(done.any(axis=0), done.argmax(axis=0), steps)
    before = csum - (acc_full + 1)
    k_eff = np.minimum(k[None, :], rem0[None, :] - before - 1)
    positions = (ok & (pos[:kk][None, None, :] < k_eff[:, :, None])).sum(axis=2)
    # the kernel leaves entries after a member's completion at 0 (the caller masks them)
    live = np.arange(steps)[:, None] <= done_step[None, :]
    return (np.where(live, acc_full, 0).astype(np.int64), np.where(live, positions, 0).astype(np.int64),
            done_step.astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.booleans())
def test_draft_window_accept_equals_numpy(seed, lead):
    rng = np.random.default_rng(seed)
    n_req, dps = 30, int(rng.integers(1, 6))
    kk = int(rng.integers(1, dps + 1))
    n = int(rng.integers(1, 12))
    steps = int(rng.integers(1, 40))
    probs = rng.random((n_req, dps))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    base = rng.integers(0, 2**63, n).astype(np.uint64)
    draws = rng.integers(0, 1000, n).astype(np.uint64)
    k = rng.integers(0, kk + 1, n).astype(np.int64)
    k[0] = kk
    rem0 = rng.integers(1, 60, n).astype(np.int64)
    pre = (rng.random(n) < 0.4) if lead else np.zeros(n, dtype=bool)
    want = _ref_draft_window(probs, idx, base, draws, k, dps, steps, kk, pre, rem0)
    for fn in _both("draft_window_accept"):
        _eq(fn(probs, idx, base, draws, k, dps, steps, kk, pre, rem0), want)


# ------------------------------------------------------------------------------ mixed step
def _table(rng, n_req):
    prompt = rng.integers(1, 300, n_req).astype(np.int64)
    out = rng.integers(1, 50, n_req).astype(np.int64)
    gen = np.minimum(rng.integers(0, 50, n_req), out - 1).astype(np.int64)
    target = prompt + np.where(rng.random(n_req) < 0.2, gen, 0)
    computed = np.where(rng.random(n_req) < 0.5, target, rng.integers(0, 300, n_req) % np.maximum(target, 1))
    return dict(prompt=prompt, out=out, gen=gen, target=target.astype(np.int64), computed=computed.astype(np.int64))


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_mixed_step_progress_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n_req = 40
    tb = _table(rng, n_req)
    n = int(rng.integers(1, 20))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    pre = tb["computed"][idx] < tb["target"][idx]
    left = tb["target"][idx] - tb["computed"][idx]
    fed = np.where(pre, np.maximum(1, (left * rng.random(n)).astype(np.int64) + (rng.random(n) < 0.5) * left), 3)
    fed = np.where(pre, np.minimum(fed, left), fed).astype(np.int64)
    gen = tb["gen"][idx].copy()
    rem = tb["out"][idx] - gen
    o_drafted = rng.integers(0, 5, n).astype(np.int64)
    o_acc = np.minimum(rng.integers(0, 5, n), o_drafted).astype(np.int64)
    o_pos = o_acc + rng.integers(0, 2, n)
    start = np.where(rng.random(n_req) < 0.5, np.nan, 1.0)
    first = np.where(rng.random(n_req) < 0.5, np.nan, 2.0)
    now, end = 5.0, 5.25

    cols = lambda: {c: np.zeros(n_req, dtype=np.int64) for c in ("steps", "dec", "dr", "ac", "pa")}  # noqa: E731
    # the numpy reference (the engine's code before the kernel)
    r = cols()
    r_comp, r_gen, r_start, r_first = tb["computed"].copy(), tb["gen"].copy(), start.copy(), first.copy()
    pre_idx = idx[pre]
    ns = np.isnan(r_start[pre_idx])
    r_start[pre_idx[ns]] = now
    computed_after = r_comp[pre_idx] + fed[pre]
    done_pre = computed_after >= tb["target"][pre_idx]
    r_comp[pre_idx] = computed_after
    committed = np.minimum(o_acc + 1, rem)
    committed[pre] = done_pre
    r_gen[idx] = gen + committed
    r["steps"][idx] += 1
    r["dec"][idx[~pre]] += 1
    drafted, accepted, pos_acc = o_drafted.copy(), o_acc.copy(), o_pos.copy()
    drafted[pre] = accepted[pre] = pos_acc[pre] = 0
    r["dr"][idx] += drafted
    r["ac"][idx] += accepted
    r["pa"][idx] += pos_acc
    fi = pre_idx[done_pre]
    f1 = np.isnan(r_first[fi])
    r_first[fi[f1]] = end
    first_prompt = int(tb["prompt"][fi[f1]].sum())
    finished = gen + committed >= tb["out"][idx]
    for fn in _both("mixed_step_progress"):
        c = cols()
        comp, g, st_, ft = tb["computed"].copy(), tb["gen"].copy(), start.copy(), first.copy()
        res = fn(idx, pre, fed, o_drafted, o_acc, o_pos, rem, gen, now, end, comp, tb["target"], g, tb["out"],
                 tb["prompt"], c["steps"], c["dec"], c["dr"], c["ac"], c["pa"], st_, ft)
        _eq(res[:5], (drafted, accepted, pos_acc, committed, finished))
        assert int(res[5]) == int(committed.sum()) and int(res[6]) == first_prompt
        _eq((comp, g, st_, ft), (r_comp, r_gen, r_start, r_first))
        for key in c:
            _eq(c[key], r[key])


# ------------------------------------------------------------------------------ vLLM running pass
def _ref_running_asks(order, t, k_res, threshold, budget, chunked, bs):
    """BatchFormer.schedule_vllm's running-pass asks before the kernel."""
    computed, target = t["computed"][order], t["target"][order]
    pre = computed < target
    n_pre = int(pre.sum())
    if 0 < n_pre < order.size:
        perm = np.argsort(pre, kind="stable")
        order, computed, target, pre = order[perm], computed[perm], target[perm], pre[perm]
    gen = t["gen"][order]
    k = np.minimum(k_res, t["out"][order] - gen - 1)
    slots = t["prompt"][order] + gen + 1 + k
    if n_pre:
        k[pre] = 0
        left = target - computed
        chunk = np.minimum(left, threshold)
        fed = np.where(pre, chunk, k + 1)
        slots = np.where(pre, computed + chunk + (chunk == left), slots)
    else:
        fed = k + 1
    cum = np.cumsum(fed)
    cut = order.size
    if int(cum[-1]) > budget:
        j = int(np.searchsorted(cum, budget, side="right"))
        left_j = budget - (int(cum[j - 1]) if j else 0)
        if left_j > 0 and (not pre[j] or chunked):
            fed, k, slots = fed.copy(), k.copy(), slots.copy()
            if pre[j]:
                slots[j] -= fed[j] - left_j + (1 if slots[j] > t["computed"][order[j]] + fed[j] else 0)
                fed[j] = left_j
            else:
                k[j] = left_j - 1
                slots[j] -= fed[j] - left_j
                fed[j] = left_j
            cut = j + 1
        elif not pre[j] or chunked:
            cut = j
        else:
            cut = -1
    need = np.maximum(blocks_for(slots[:max(cut, 0)], bs) - t["kv_blocks"][order[:max(cut, 0)]], 0)
    return order, fed, k, slots, pre, need, cut


@settings(max_examples=80, deadline=None)
@given(SEEDS, st.booleans())
def test_vllm_running_asks_equals_numpy(seed, chunked):
    rng = np.random.default_rng(seed)
    n_req = 40
    t = _table(rng, n_req)
    t["kv_blocks"] = rng.integers(0, 20, n_req).astype(np.int64)
    n = int(rng.integers(1, 20))
    order = rng.choice(n_req, n, replace=False).astype(np.int64)
    k_res = int(rng.integers(0, 6))
    threshold = int(rng.choice([1 << 62, 64, 200]))
    budget = int(rng.choice([1 << 62, 16, 100, 512, int(rng.integers(1, 400))]))
    bs = int(rng.choice([1, 16, 32]))
    o, fed, k, slots, pre, need, cut = _ref_running_asks(order, t, k_res, threshold, budget, chunked, bs)
    for fn in _both("vllm_running_asks"):
        go, gfed, gk, gslots, gpre, gneed, gcut = fn(order, t["computed"], t["target"], t["gen"], t["out"],
                                                     t["prompt"], t["kv_blocks"], k_res, threshold, budget,
                                                     chunked, bs)
        assert int(gcut) == cut
        m = max(cut, 0)
        _eq((go, gpre), (o, pre))
        _eq((gfed[:m], gk[:m], gslots[:m], gneed), (fed[:m], k[:m], slots[:m], need))


def test_grant_blocks():
    kv_blocks = np.array([0, 2, 5], dtype=np.int64)
    kv_tokens = np.array([0, 20, 70], dtype=np.int64)
    resident = np.zeros(3, dtype=bool)
    for fn in _both("grant_blocks"):
        b, tk, r = kv_blocks.copy(), kv_tokens.copy(), resident.copy()
        got = fn(np.array([2, 0], dtype=np.int64), np.array([60, 33, 99]), np.array([1, 3, 7]), b, tk, r)
        assert int(got) == 4
        assert b.tolist() == [3, 2, 6] and tk.tolist() == [33, 20, 70] and r.tolist() == [True, False, True]


# ------------------------------------------------------------------------------ window KV
def _ref_window_kv(committed, k_steps, active, rem0, ctx0, held0, kr0, kr, bs, free, pre, ends, nxt):
    n_steps = committed.shape[0]
    before = np.cumsum(committed, axis=0) - committed
    rem_s = rem0[None, :] - before
    krs = np.full((n_steps, 1), kr, dtype=np.int64)
    krs[0] = kr0
    reserved = np.maximum(np.minimum(krs, rem_s - 1), k_steps)
    slots = ctx0[None, :] + before + 1 + reserved
    need = blocks_for(slots, bs)
    if active is not None:
        need = np.where(active, need, 0)
        slots = np.where(active, slots, 0)
    need[0, pre] = 0
    slots[0, pre] = 0
    held = np.maximum.accumulate(np.maximum(need, held0[None, :]), axis=0)
    grown = held.sum(axis=1) - int(held0.sum())
    fits = grown <= free
    s_n = int(fits.argmin()) if not fits.all() else n_steps
    if nxt <= ends[s_n - 1]:
        s_n = min(s_n, int(np.searchsorted(ends, nxt, side="left")) + 1)
    return s_n, held, slots[:s_n].max(axis=0)


@settings(max_examples=80, deadline=None)
@given(SEEDS, st.booleans(), st.booleans())
def test_window_kv_equals_numpy(seed, with_active, lead):
    rng = np.random.default_rng(seed)
    n, n_steps = int(rng.integers(1, 10)), int(rng.integers(2, 30))
    committed = rng.integers(1, 5, (n_steps, n)).astype(np.int64)
    k_steps = rng.integers(0, 5, (n_steps, n)).astype(np.int64)
    active = None
    if with_active:
        last = rng.integers(0, n_steps, n)
        last[0] = n_steps - 1
        active = np.arange(n_steps)[:, None] <= last[None, :]
        committed = np.where(active, committed, 0)
    rem0 = rng.integers(1, 200, n).astype(np.int64)
    ctx0 = rng.integers(1, 500, n).astype(np.int64)
    bs = int(rng.choice([1, 16]))
    held0 = (blocks_for(ctx0 + 5, bs)).astype(np.int64)
    pre = (rng.random(n) < 0.3) if lead else np.zeros(n, dtype=bool)
    free = int(rng.integers(0, 60))
    ends = np.cumsum(rng.random(n_steps) * 0.05 + 0.01)
    nxt = float(rng.choice([np.inf, ends[int(rng.integers(0, n_steps))], ends[0] * 0.5]))
    want = _ref_window_kv(committed, k_steps, active, rem0, ctx0, held0, 4, 3, bs, free, pre, ends, nxt)
    for fn in _both("window_kv"):
        s_n, held, slots_max = fn(committed, k_steps, active if active is not None else np.ones((1, 1), dtype=bool),
                                  active is not None, rem0, ctx0, held0, 4, 3, bs, free, pre, ends, nxt)
        assert int(s_n) == want[0]
        _eq((held, slots_max), want[1:])


# ------------------------------------------------------------------------------ ITL
def test_itl_chunk_gaps():
    last = np.array([np.nan, 1.0, 2.0, np.nan])
    for fn in _both("itl_chunk_gaps"):
        ls = last.copy()
        gaps = fn(ls, np.array([0, 1, 2, 3], dtype=np.int64), np.array([1, 2, 0, 1]), 3.5)
        assert gaps.tolist() == [2.5]
        assert ls[0] == 3.5 and ls[1] == 3.5 and ls[2] == 2.0 and ls[3] == 3.5


def test_select_modes(monkeypatch):
    """``select`` switches the module's kernels; ``SIMSPEC_JIT`` overrides the size rule."""
    before = K.MODE
    try:
        assert K.select(mode="plain") == "plain" and K.draft_accept is K.plain()["draft_accept"]
        monkeypatch.setenv("SIMSPEC_JIT", "0")
        assert K.select(10**9) == "plain"
        monkeypatch.setenv("SIMSPEC_JIT", "auto")
        assert K.select(K.JIT_MIN_REQUESTS - 1) == "plain"
        want = "compiled" if K.numba_available() else "plain"
        assert K.select(K.JIT_MIN_REQUESTS) == want
        monkeypatch.setenv("SIMSPEC_JIT", "1")
        assert K.select(1) == want
        if want == "compiled":
            assert K.draft_accept is K.compiled()["draft_accept"]
    finally:
        K.select(mode=before)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("spec,policy,spec_len,batching,router", [
    ("draft:k=4", "fcfs", "fixed", "vllm", "round-robin"),       # lead windows, mixed steps, preemptions
    ("none", "srpt", "fixed", "vllm", "least-outstanding"),
    ("draft:k=3", "laps-sd", "smartspec", "preemptive", "round-robin"),
    ("kangaroo", "fcfs", "smartspec", "vllm", "round-robin"),
])
def test_replay_identical_in_both_kernel_modes(monkeypatch, spec, policy, spec_len, batching, router):
    """A saturated run (chunked prefills, preemptions, windows cut by arrivals and KV) gives
    byte-identical requests, steps and summary with compiled and with plain kernels."""
    if not K.numba_available():
        pytest.skip("numba is not installed: only the plain kernels exist")
    from dataclasses import replace

    import pandas as pd

    from simspec.profile import load_profile
    from simspec.simulator.config import ComponentSpec, RunConfig
    from simspec.simulator.run import simulate
    from tests.conftest import make_trace

    rng = np.random.default_rng(11)
    n = 150
    tr = make_trace(np.cumsum(rng.exponential(1 / 25.0, n)), rng.integers(20, 1500, n), rng.integers(3, 300, n))
    prof = load_profile("vicuna7b-a100-analytic")
    c = RunConfig(scheduler=ComponentSpec.parse(policy, "p"), method=ComponentSpec.parse(spec, "s"),
                  spec_len=ComponentSpec.parse(spec_len, "l"), replicas=2, max_batch_size=12,
                  kv_budget_tokens=9000, max_batched_tokens=1024, batching=batching, allow_extrapolation=True)
    c = replace(c, router=router)
    before = K.MODE
    try:
        monkeypatch.setenv("SIMSPEC_JIT", "0")
        a = simulate(c, tr, prof)
        assert K.MODE == "plain"
        monkeypatch.setenv("SIMSPEC_JIT", "1")
        b = simulate(c, tr, prof)
        assert K.MODE == "compiled"
    finally:
        K.select(mode=before)
    pd.testing.assert_frame_equal(a.requests, b.requests, check_exact=True)
    pd.testing.assert_frame_equal(a.steps, b.steps, check_exact=True)
    assert a.summary == b.summary
    assert len(a.steps) > 200
