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
    k = np.where(pre, 0, o_drafted)
    fed_all = np.where(pre, fed, k + 1)
    draws0 = rng.integers(0, 100, n_req).astype(np.uint64)
    used = rng.integers(0, 9, n).astype(np.uint64)
    for fixed in (-1, 4):
        r_draws = draws0.copy()
        if fixed >= 0:
            r_draws[idx[~pre]] += np.uint64(fixed)
        else:
            r_draws[idx] += used
        for fn in _both("mixed_step_progress"):
            c = cols()
            comp, g, st_, ft, dw = tb["computed"].copy(), tb["gen"].copy(), start.copy(), first.copy(), draws0.copy()
            res = fn(idx, pre, fed, o_drafted, o_acc, o_pos, rem, gen, now, end, comp, tb["target"], g, tb["out"],
                     tb["prompt"], c["steps"], c["dec"], c["dr"], c["ac"], c["pa"], st_, ft, k, fed_all, dw, fixed,
                     used)
            _eq(res[:5], (drafted, accepted, pos_acc, committed, finished))
            assert int(res[5]) == int(committed.sum()) and int(res[6]) == first_prompt
            assert [int(x) for x in res[7:]] == [int(k.max()), int(drafted.sum()), int(accepted.sum()),
                                                 int(fed_all.sum())]
            _eq((comp, g, st_, ft, dw), (r_comp, r_gen, r_start, r_first, r_draws))
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
    free = int(rng.choice([0, int(need.sum()), int(need.sum()) - 1, 10**6]))
    fits = cut >= 0 and int(need.sum()) <= free
    for fn in _both("vllm_running_asks"):
        blocks, tokens = t["kv_blocks"].copy(), rng.integers(0, 400, n_req).astype(np.int64)
        tokens0, resident = tokens.copy(), np.zeros(n_req, dtype=bool)
        go, gfed, gk, gslots, gpre, gneed, gcut, granted, fed_cut = fn(
            order, t["computed"], t["target"], t["gen"], t["out"], t["prompt"], blocks, k_res, threshold, budget,
            chunked, bs, free, tokens, resident)
        assert int(gcut) == cut
        m = max(cut, 0)
        _eq((go, gpre), (o, pre))
        _eq((gfed[:m], gk[:m], gslots[:m], gneed), (fed[:m], k[:m], slots[:m], need))
        assert int(fed_cut) == int(fed[:m].sum())
        if fits:  # granted as grant_blocks would: blocks, slots, residency of the first `cut`
            assert int(granted) == int(need.sum())
            want_b, want_t = t["kv_blocks"].copy(), tokens0.copy()
            want_b[o[:m]] += need
            want_t[o[:m]] = np.maximum(want_t[o[:m]], slots[:m])
            _eq((blocks, tokens), (want_b, want_t))
            assert resident[o[:m]].all() and resident.sum() == m
        else:
            assert int(granted) == -1
            _eq((blocks, tokens), (t["kv_blocks"], tokens0))
            assert not resident.any()


def test_grant_blocks():
    kv_blocks = np.array([0, 2, 5], dtype=np.int64)
    kv_tokens = np.array([0, 20, 70], dtype=np.int64)
    resident = np.zeros(3, dtype=bool)
    for fn in _both("grant_blocks"):
        b, tk, r = kv_blocks.copy(), kv_tokens.copy(), resident.copy()
        got = fn(np.array([2, 0], dtype=np.int64), np.array([60, 33, 99]), np.array([1, 3, 7]), b, tk, r)
        assert int(got) == 4
        assert b.tolist() == [3, 2, 6] and tk.tolist() == [33, 20, 70] and r.tolist() == [True, False, True]


def _ref_preemption(order, need, free, kv_blocks):
    """The loop BatchFormer._grant_preempting ran before ``preemption_plan`` (one at a time)."""
    live_end, pos, victims = len(order), 0, []
    while pos < len(need) and pos < live_end:
        nd = int(need[pos])
        if nd > free:
            stop = False
            while nd > free:
                live_end -= 1
                v = int(order[live_end])
                free += int(kv_blocks[v])
                victims.append(v)
                if live_end == pos:
                    stop = True
                    break
            if stop:
                break
        free -= nd
        pos += 1
    return pos, victims


@settings(max_examples=80, deadline=None)
@given(SEEDS)
def test_preemption_plan_equals_the_loop(seed):
    rng = np.random.default_rng(seed)
    n_req = 30
    kv_blocks = rng.integers(0, 12, n_req).astype(np.int64)
    n = int(rng.integers(1, 15))
    order = rng.choice(n_req, n, replace=False).astype(np.int64)
    cut = int(rng.integers(0, n + 1))
    need = rng.integers(0, 10, cut).astype(np.int64)
    free = int(rng.integers(0, 25))
    pos, victims = _ref_preemption(order, need, free, kv_blocks)
    for fn in _both("preemption_plan"):
        got_pos, live_end = fn(order, need, cut, n, free, kv_blocks)
        assert int(got_pos) == pos
        assert order[int(live_end):][::-1].tolist() == victims  # preempted from the end


def test_preempt_kv_recompute_and_swap():
    for fn in _both("preempt_kv"):
        for swap in (False, True):
            cols = dict(kv_blocks=np.array([3, 4]), kv_tokens=np.array([40, 60]), kv_resident=np.array([True, True]),
                        preemptions=np.array([0, 1]), recomputes=np.array([0, 0]), recomputed=np.array([0, 5]),
                        target=np.array([30, 50]), computed=np.array([30, 20]), prompt=np.array([30, 50]),
                        gen=np.array([7, 0]))
            c = {k: v.astype(bool) if v.dtype == bool else v.astype(np.int64) for k, v in cols.items()}
            for v in (0, 1):  # v 0 decoding (prompt + generated lost), v 1 mid-prefill (its chunks lost)
                freed = fn(v, swap, c["kv_blocks"], c["kv_tokens"], c["kv_resident"], c["preemptions"],
                           c["recomputes"], c["recomputed"], c["target"], c["computed"], c["prompt"], c["gen"])
                assert int(freed) == [3, 4][v]
            assert c["kv_blocks"].tolist() == [0, 0] and c["kv_tokens"].tolist() == [0, 0]
            assert c["kv_resident"].tolist() == [False, False] and c["preemptions"].tolist() == [1, 2]
            if swap:
                assert c["recomputes"].tolist() == [0, 0] and c["computed"].tolist() == [30, 20]
            else:
                assert c["recomputes"].tolist() == [1, 1] and c["recomputed"].tolist() == [37, 25]
                assert c["target"].tolist() == [37, 50] and c["computed"].tolist() == [0, 0]


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
    before, loaded = K.MODE, K._COMPILED
    try:
        assert K.select(mode="plain") == "plain" and K.draft_accept is K.plain()["draft_accept"]
        monkeypatch.setenv("SIMSPEC_JIT", "0")
        assert K.select(10**9) == "plain"
        monkeypatch.setenv("SIMSPEC_JIT", "auto")
        monkeypatch.setattr(K, "_COMPILED", None)  # a process that has not loaded them
        assert K.select(K.JIT_MIN_REQUESTS - 1) == "plain"
        want = "compiled" if K.numba_available() else "plain"
        assert K.select(K.JIT_MIN_REQUESTS) == want
        # once loaded, small runs use them too (their start-up is paid)
        assert K.select(1) == want
        monkeypatch.setenv("SIMSPEC_JIT", "1")
        assert K.select(1) == want
        if want == "compiled":
            assert K.draft_accept is K.compiled()["draft_accept"]
    finally:
        monkeypatch.undo()
        K._COMPILED = loaded if loaded is not None else K._COMPILED
        K.select(mode=before)


# ------------------------------------------------------------------------------ step preparation
@settings(max_examples=50, deadline=None)
@given(SEEDS)
def test_mixed_prepare_clip_k_and_k_fed_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n_req = 40
    tb = _table(rng, n_req)
    n = int(rng.integers(1, 20))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    pre = tb["computed"][idx] < tb["target"][idx]
    k_res = np.where(pre, 0, rng.integers(0, 5, n)).astype(np.int64)
    base = rng.integers(0, 2**63, n_req).astype(np.uint64)
    draws = rng.integers(0, 10**6, n_req).astype(np.uint64)
    alpha = rng.random(n_req)
    cls = rng.integers(0, 3, n_req).astype(np.int64)
    gen = tb["gen"][idx]
    rem = tb["out"][idx] - gen
    ctx_dec = tb["prompt"][idx] + gen
    ctx = ctx_dec.copy()
    ctx[pre] = tb["computed"][idx[pre]]
    dec = ~pre
    want = (gen, rem, ctx, base[idx], draws[idx], alpha[idx], cls[idx], np.flatnonzero(dec), idx[dec], k_res[dec],
            ctx_dec[dec], rem[dec])
    k_pol = rng.integers(-1, 7, int(dec.sum())).astype(np.int64)
    k_clip = np.minimum(np.maximum(k_pol, 0), rem[dec] - 1)
    k = np.zeros(n, dtype=np.int64)
    k[dec] = k_clip
    plan_fed = rng.integers(1, 100, n).astype(np.int64)
    fed = np.where(pre, plan_fed, k + 1)
    for name in ("mixed_prepare", "clip_k", "mixed_k_fed"):
        for fn in _both(name):
            if name == "mixed_prepare":
                res = fn(idx, pre, k_res, tb["gen"], tb["out"], tb["prompt"], tb["computed"], base, draws, alpha, cls)
                _eq(tuple(res[:12]), want)
                assert int(res[12]) == int(ctx_dec[dec].sum())
            elif name == "clip_k":
                kk, extra = fn(k_pol, rem[dec], k_res[dec])
                _eq(kk, k_clip)
                assert bool(extra) == bool((k_clip > k_res[dec]).any())
            else:
                _eq(fn(pre, plan_fed, np.flatnonzero(dec), k_clip), (k, fed))


@settings(max_examples=50, deadline=None)
@given(SEEDS)
def test_draft_step_sums_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    k = rng.integers(0, 6, n).astype(np.int64)
    if rng.random() < 0.4:
        k[:] = k[0]
    pre = rng.random(n) < 0.3
    k[pre] = 0
    fed = rng.integers(1, 500, n).astype(np.int64)
    ctx = rng.integers(0, 5000, n).astype(np.int64)
    kmax = int(k.max())
    want = (kmax, int(k.min()), int(pre.sum()), int(fed.sum()), int(fed[pre].sum()), int(ctx.sum()),
            int((k > 0).sum()), int(ctx[k > 0].sum()))
    for fn in _both("draft_step_sums"):
        res = fn(k, pre, fed, ctx)
        assert tuple(int(x) for x in res[:8]) == want
        _eq((res[8], res[9]), (np.array([(k > j).sum() for j in range(kmax)], dtype=np.int64),
                               np.array([ctx[k > j].sum() for j in range(kmax)], dtype=np.int64)))


def _ref_window_shape(acc_full, positions, done_step, k, rem0, ctx0, pre, lead_fed, lead_ctx, dps, lead):
    """DraftModel.decode_window's per-step shape before the kernel."""
    s_eff, n = acc_full.shape
    commit_full = acc_full + 1
    csum = np.cumsum(commit_full, axis=0)
    act = np.arange(s_eff)[:, None] <= done_step[None, :]
    all_act = bool(act.all())
    if lead:
        dec_act = act.copy()
        dec_act[0, pre] = False
        all_dec = False
    else:
        dec_act, all_dec = act, all_act
    before = csum - commit_full
    rem_s = rem0[None, :] - before
    k_eff = np.minimum(k[None, :], rem_s - 1)
    if not all_dec:
        k_eff = np.where(dec_act, k_eff, 0)
    accepted = np.minimum(acc_full, k_eff)
    if not all_dec:
        positions = np.where(dec_act, positions, 0)
    committed = np.minimum(accepted + 1, rem_s)
    fed = k_eff + 1
    ctx = ctx0[None, :] + before
    if not all_act:
        committed = np.where(act, committed, 0)
    if not all_dec:
        fed = np.where(dec_act, fed, 0)
        ctx = np.where(dec_act, ctx, 0)
    if lead:
        fed[0] += lead_fed
        ctx[0] += lead_ctx
    draws = np.full((s_eff, n), dps, dtype=np.uint64)
    if not all_dec:
        draws[~dec_act] = 0
    kk = int(k.max())
    sel = k_eff > 0
    passes = [k_eff > j for j in range(kk)]
    pb = np.stack([p_.sum(axis=1) for p_ in passes], axis=1).astype(np.float64) if kk else np.zeros((s_eff, 0))
    pkv = (np.stack([(ctx * p_).sum(axis=1) for p_ in passes], axis=1).astype(np.float64)
           + np.arange(kk)[None, :] * pb) if kk else np.zeros((s_eff, 0))
    return (act, all_act, k_eff, accepted, positions, committed, fed, draws, fed.sum(axis=1).astype(np.float64),
            act.sum(axis=1).astype(np.float64), k_eff.max(axis=1), ctx.sum(axis=1).astype(np.float64),
            sel.sum(axis=1).astype(np.float64), (ctx * sel).sum(axis=1).astype(np.float64), pb, pkv)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.booleans())
def test_draft_window_shape_equals_numpy(seed, lead):
    rng = np.random.default_rng(seed)
    n, s_eff, dps = int(rng.integers(1, 9)), int(rng.integers(1, 25)), 4
    k = rng.integers(0, dps + 1, n).astype(np.int64)
    rem0 = rng.integers(1, 80, n).astype(np.int64)
    pre = (rng.random(n) < 0.4) if lead else np.zeros(n, dtype=bool)
    # acceptance as the sampling kernel leaves it: zeros after each member's completion step
    probs = rng.random((n, dps))
    acc, pos, done = K.plain()["draft_window_accept"](probs, np.arange(n), rng.integers(0, 2**63, n).astype(np.uint64),
                                                      np.zeros(n, dtype=np.uint64), k, dps, s_eff, int(k.max()), pre,
                                                      rem0)
    last = min(s_eff, int(done.max()) + 1)
    acc, pos = acc[:last], pos[:last]
    ctx0 = rng.integers(1, 3000, n).astype(np.int64)
    lead_fed = np.where(pre, rng.integers(1, 300, n), 0).astype(np.int64)
    lead_ctx = np.where(pre, rng.integers(0, 3000, n), 0).astype(np.int64)
    want = _ref_window_shape(acc, pos, done, k, rem0, ctx0, pre, lead_fed, lead_ctx, dps, lead)
    for fn in _both("draft_window_shape"):
        res = fn(acc, pos, done, k, rem0, ctx0, pre, lead_fed, lead_ctx, dps)
        kk_all = int(res[10].max())
        assert bool(res[1]) == want[1]
        _eq((res[0],) + tuple(res[2:14]), (want[0],) + tuple(want[2:14]))
        _eq((res[14][:, :kk_all], res[15][:, :kk_all]), (want[14][:, :kk_all], want[15][:, :kk_all]))


@settings(max_examples=50, deadline=None)
@given(SEEDS, st.booleans(), st.booleans())
def test_window_book_equals_numpy(seed, with_active, lead):
    rng = np.random.default_rng(seed)
    n_req, n, s_n = 30, int(rng.integers(1, 9)), int(rng.integers(1, 20))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    shp = (s_n, n)
    committed, drafted, accepted = (rng.integers(0, 5, shp).astype(np.int64) for _ in range(3))
    positions, fed, kst = (rng.integers(0, 5, shp).astype(np.int64) for _ in range(3))
    draws = rng.integers(0, 5, shp).astype(np.uint64)
    act = None
    if with_active:
        last = rng.integers(0, s_n, n)
        act = np.arange(s_n)[:, None] <= last[None, :]
    held = rng.integers(0, 50, shp).astype(np.int64)
    pre = (rng.random(n) < 0.3) if lead else np.zeros(n, dtype=bool)
    cols0 = {c: rng.integers(0, 100, n_req).astype(np.int64) for c in ("gen", "steps", "dec", "dr", "ac", "pa")}
    draws0 = rng.integers(0, 100, n_req).astype(np.uint64)
    out_tok = rng.integers(50, 200, n_req).astype(np.int64)
    # the numpy reference (Replica._decode_steps before the kernel)
    r = {c: v.copy() for c, v in cols0.items()}
    r_draws = draws0.copy()
    steps_run = act.sum(axis=0) if act is not None else np.full(n, s_n)
    r["dec"][idx] += steps_run - pre
    r["gen"][idx] += committed.sum(axis=0)
    r["steps"][idx] += steps_run
    r["dr"][idx] += drafted.sum(axis=0)
    r["ac"][idx] += accepted.sum(axis=0)
    r["pa"][idx] += positions.sum(axis=0)
    r_draws[idx] += draws.sum(axis=0).astype(np.uint64)
    want = (steps_run, r["gen"][idx] >= out_tok[idx], committed.sum(axis=1),
            act.sum(axis=1) if act is not None else np.full(s_n, n), kst.max(axis=1), drafted.sum(axis=1),
            accepted.sum(axis=1), fed.sum(axis=1), (held * act).sum(axis=1) if act is not None else held.sum(axis=1))
    for fn in _both("window_book"):
        c = {k_: v.copy() for k_, v in cols0.items()}
        dw = draws0.copy()
        res = fn(idx, committed, drafted, accepted, positions, draws, fed, kst,
                 act if act is not None else np.ones((1, 1), dtype=bool), act is not None, held, True, pre,
                 c["gen"], c["steps"], c["dec"], c["dr"], c["ac"], c["pa"], dw, out_tok)
        _eq(tuple(res[:9]), tuple(np.asarray(w).astype(np.asarray(g).dtype) for w, g in zip(want, res[:9])))
        assert int(res[9]) == int(committed.sum())
        for key in c:
            _eq(c[key], r[key])
        _eq(dw, r_draws)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("spec,policy,spec_len,batching,router", [
    ("draft:k=4", "fcfs", "fixed", "vllm", "round-robin"),       # lead windows, mixed steps, preemptions
    ("none", "srpt", "fixed", "vllm", "least-outstanding"),
    ("draft:k=3", "laps-sd", "smartspec", "preemptive", "round-robin"),
    ("kangaroo", "fcfs", "smartspec", "vllm", "round-robin"),
    ("kangaroo:eta=0", "srpt", "fixed", "vllm", "least-outstanding"),
    ("hispec", "fcfs", "fixed", "vllm", "round-robin"),
    ("hispec:inter_exit=32", "laps-sd", "smartspec", "preemptive", "round-robin"),  # single-level
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


def test_scipy_linalg_imports_after_the_compiled_kernels_load():
    """compiled() keeps numba from importing scipy.linalg while its target loads; that must not
    leave scipy.linalg broken for the rest of the process."""
    if not K.numba_available():
        pytest.skip("numba is not installed")
    import subprocess
    import sys

    code = ("import numpy as np, simspec.simulator.kernels as K; K.compiled();"
            "import scipy.linalg, scipy.linalg.cython_blas;"
            "assert np.allclose(scipy.linalg.solve(np.eye(2) * 2, np.ones(2)), 0.5); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _ref_itl_window(last, idx, committed, active, ends):
    """ItlLog.observe_window before the kernel: (values, counts) appended, and last chunk times."""
    vals, cnts = [], []

    def members(sel, end):
        prev = last[sel]
        had = ~np.isnan(prev)
        vals.extend((end - prev[had]).tolist())
        cnts.extend([1] * int(had.sum()))
        last[sel] = end

    tok = committed > 0
    if active is not None:
        tok &= active
    if ends.shape[0] > 1 and bool((tok[1:] & ~tok[:-1]).any()):
        for s in range(ends.shape[0]):
            members(idx[tok[s]], float(ends[s]))
    else:
        members(idx[tok[0]], float(ends[0]))
        if ends.shape[0] > 1:
            both = tok[1:].sum(axis=1)
            keep = both > 0
            vals.extend((ends[1:] - ends[:-1])[keep].tolist())
            cnts.extend(both[keep].tolist())
            n_tok = tok.sum(axis=0)
            has = n_tok > 0
            last[idx[has]] = ends[n_tok[has] - 1]
    return vals, cnts


def _pooled(vals, cnts):
    u, inv = np.unique(np.asarray(vals, dtype=np.float64), return_inverse=True)
    return u, np.bincount(inv.ravel(), weights=np.asarray(cnts, dtype=np.float64), minlength=u.size)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.booleans(), st.booleans())
def test_itl_window_gaps_equal_numpy(seed, with_active, ragged):
    rng = np.random.default_rng(seed)
    n_req, n, s_n = 20, int(rng.integers(1, 8)), int(rng.integers(1, 15))
    idx = rng.choice(n_req, n, replace=False).astype(np.int64)
    committed = rng.integers(1, 4, (s_n, n)).astype(np.int64)
    if ragged:  # a member without a token in some step (the step-by-step branch)
        committed[rng.random((s_n, n)) < 0.2] = 0
    active = None
    if with_active:
        last_step = rng.integers(0, s_n, n)
        active = np.arange(s_n)[:, None] <= last_step[None, :]
    ends = np.cumsum(rng.random(s_n) * 0.1 + 0.001) + 10.0
    last0 = np.where(rng.random(n_req) < 0.3, np.nan, rng.random(n_req) * 10)
    ref_last = last0.copy()
    want = _pooled(*_ref_itl_window(ref_last, idx, committed, active, ends))
    for fn in _both("itl_window_gaps"):
        lt = last0.copy()
        v, c = fn(lt, idx, committed, active if active is not None else np.ones((1, 1), dtype=bool),
                  active is not None, ends)
        got = _pooled(v, c)
        _eq(got, want)
        _eq(lt, ref_last)


@settings(max_examples=40, deadline=None)
@given(SEEDS)
def test_window_clock_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    step_ms = rng.random(n) * 80 + 0.01
    now, busy = float(rng.random() * 1e4), float(rng.random() * 1e3)
    ends = np.cumsum(np.concatenate(([now], step_ms / 1000.0)))[1:]
    starts = np.concatenate(([now], ends[:-1]))
    busy_after = np.cumsum(np.concatenate(([busy], step_ms / 1000.0)))[1:]
    for fn in _both("window_clock"):
        _eq(fn(now, busy, step_ms), (starts, ends, busy_after))


# ------------------------------------------------------------------------------ kangaroo / hispec
# References: the numpy code of Kangaroo/HiSpec's decode_window, step and early_exit_step_ms as it
# was before the kernels (main at e8b8e5a), copied with ``self`` -> ``m``. The methods' outputs must
# be byte-identical to it with the kernels in either mode (``_kernel_mode`` swaps the module's
# attributes the methods call).
import contextlib  # noqa: E402

from simspec.rng import request_bases, stream_key  # noqa: E402
from simspec.simulator.methods.base import BatchStep, DecodeWindow, StepRandom, WindowOutcome  # noqa: E402
from simspec.simulator.methods.kangaroo import draft_rounds_ms, early_exit_step_ms, slices_ms  # noqa: E402
from simspec.analytic import KANGAROO_CONFIDENCE  # noqa: E402
from tests.test_early_exit import fixed, layer_doc, make_method  # noqa: E402

_EE_KERNELS = ("kangaroo_member_draws", "kangaroo_window", "kangaroo_window_rounds", "kangaroo_step_draws",
               "early_exit_step_sums", "hispec_window", "hispec_step")


def _modes():
    return ["plain"] + (["compiled"] if K.numba_available() else [])


@contextlib.contextmanager
def _kernel_mode(mode):
    """The early-exit kernels of ``mode`` as the module's attributes (restored after)."""
    table = K.plain() if mode == "plain" else K.compiled()
    saved = {name: getattr(K, name) for name in _EE_KERNELS}
    try:
        for name in _EE_KERNELS:
            setattr(K, name, table[name])
        yield
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)


class _NumpyRandom(StepRandom):
    """The engine's counter-based draws, but not of type StepRandom: the methods take their numpy
    path (draw_random / rng.random), the code the kernels replaced."""


def _ref_early_exit_step_ms(cost, batch, drafts, exit_layer, num_layers, adapter):
    pre = batch.prefill
    dec = ~pre
    n = batch.idx.shape[0]
    n_pre = int(np.count_nonzero(pre))
    pre_tokens = float(batch.fed_tokens[pre].sum()) if n_pre else 0.0
    if n_pre == n:
        ms = draft_rounds_ms(cost, drafts[:0], batch.ctx_tokens[:0], exit_layer, adapter, n_pre, pre_tokens)
        deep_tokens = pre_tokens
    elif n_pre:
        ms = draft_rounds_ms(cost, drafts[dec], batch.ctx_tokens[dec], exit_layer, adapter, n_pre, pre_tokens)
        deep_tokens = pre_tokens + float((drafts[dec] + 1).sum())
    else:
        ms = draft_rounds_ms(cost, drafts, batch.ctx_tokens, exit_layer, adapter)
        deep_tokens = float((drafts + 1).sum())
    logits = deep_tokens - pre_tokens + n_pre
    ms += cost.slice_ms(exit_layer, num_layers, n, deep_tokens, float(batch.ctx_tokens.sum()), lm_head=True,
                        logits_tokens=logits)
    return ms


def _ref_kangaroo_step(m, rng, batch):
    cap = np.minimum(batch.k, m.gamma)
    if cap.size and int(cap.max()) > 0:
        drafts, accepted = m.acceptance.sample_drafts(rng, batch.alpha, batch.class_idx, cap, width=m.gamma)
    else:
        drafts = np.zeros(batch.idx.shape[0], dtype=np.int64)
        accepted = drafts.copy()
    ms = _ref_early_exit_step_ms(m.cost, batch, drafts, m.exit_layer, m.num_layers, adapter=True)
    return m.cost.finish(ms), drafts, accepted


def _ref_kangaroo_window_ms(m, drafts, ctx, act, all_act):
    c = m.cost
    s_n, n = drafts.shape
    if s_n == 0:
        return np.zeros(0)
    d = np.where(act, drafts, -1) if not all_act else drafts
    dmax = d.max(axis=1)
    nj = int(dmax.max()) + 1
    key = (np.arange(s_n)[:, None] * (nj + 1) + d + 1).ravel()
    cnt = np.bincount(key, minlength=s_n * (nj + 1)).reshape(s_n, nj + 1)[:, ::-1].cumsum(axis=1)[:, ::-1]
    csum = np.bincount(key, weights=ctx.ravel(), minlength=s_n * (nj + 1)).reshape(s_n, nj + 1)
    csum = csum[:, ::-1].cumsum(axis=1)[:, ::-1]
    cnt_ge, ctx_ge = cnt[:, 1:], csum[:, 1:]
    jj = np.arange(nj)
    runs = jj[None, :] <= dmax[:, None]
    b = np.where(runs, cnt_ge, 0).astype(np.float64)
    kv = np.where(runs, ctx_ge + jj[None, :] * b, 0.0)
    bh = np.zeros_like(b)
    bh[:, :-1] = np.where(jj[None, :-1] < dmax[:, None], cnt_ge[:, 1:], 0)
    kvh = np.zeros_like(kv)
    kvh[:, :-1] = np.where(bh[:, :-1] > 0, ctx_ge[:, 1:] + jj[None, :-1] * bh[:, :-1], 0.0)
    nb = act.sum(axis=1).astype(np.float64) if not all_act else np.full(s_n, float(n))
    deep = (drafts + act).sum(axis=1).astype(np.float64)
    ex = m.exit_layer
    shallow, adapter, head, verify = slices_ms(c, [
        (0, ex, b, b, kv, True, False, False, None),
        (0, 0, bh, bh, kvh, False, True, False, None),
        (0, 0, bh, bh, kvh, False, False, True, None),
        (ex, m.num_layers, nb, deep, ctx.sum(axis=1).astype(np.float64), False, False, True, deep)])
    ms = np.zeros(s_n)
    for j in range(nj):
        ms = ms + shallow[:, j]
        ms = ms + adapter[:, j]
        ms = ms + head[:, j]
    return ms + verify


def _ref_kangaroo_window(m, w):
    n, steps = w.idx.shape[0], w.n_steps
    acc = m.acceptance
    cap_full = np.minimum(w.k, m.gamma)
    kk = int(cap_full.max()) if n else 0
    early = bool(acc.stops_early)
    wd = m.gamma
    if kk:
        p_all = acc.position_probs(w.alpha, w.class_idx, wd)
        if early:
            conf_a = acc.conf_acc[w.class_idx, :wd][None]
            conf_r = acc.conf_rej[w.class_idx, :wd][None]
    base = w.rng_base[None, :, None]
    ctr = w.draws.copy()
    rem = w.remaining.copy()
    ctx = w.ctx_tokens.copy()
    alive = np.ones(n, dtype=bool)
    segs = []
    s0 = 0
    while True:
        rem_alive = rem[alive]
        left = min(steps - s0, int(rem_alive.max() if w.through else rem_alive.min()))
        kmax = int(np.minimum(cap_full, rem - 1)[alive].max())
        per = wd * (2 if early else 1)
        if kmax:
            pos_u = np.arange(wd, dtype=np.uint64)
            c0 = (ctr[None, :] + np.arange(left, dtype=np.uint64)[:, None] * np.uint64(per))[:, :, None]
            prefix = np.cumprod(counter_uniforms(base, c0 + pos_u) < p_all[None, :, :wd], axis=2).astype(bool)
            p_len = prefix.sum(axis=2)
            if early:
                pc = np.where(prefix, conf_a[:, :, :wd], conf_r[:, :, :wd])
                low = counter_uniforms(base, c0 + (pos_u + np.uint64(wd))) >= pc
                first_low = np.where(low.any(axis=2), low.argmax(axis=2) + 1, wd)
                d_full = np.minimum(first_low, cap_full[None, :])
            else:
                d_full = np.broadcast_to(cap_full[None, :], (left, n))
            commit = np.minimum(p_len, d_full) + 1
        else:
            p_len = d_full = np.zeros((left, n), dtype=np.int64)
            commit = np.ones((left, n), dtype=np.int64)
        csum = np.cumsum(commit, axis=0)
        done = csum >= rem[None, :]
        done_step = np.where(alive, np.where(done.any(axis=0), done.argmax(axis=0), left), -1)
        ds = done_step[alive]
        last = min(left, int(ds.max() if w.through else ds.min()) + 1)
        act = np.arange(last)[:, None] <= done_step[None, :]
        before = (csum - commit)[:last]
        rem_s = rem[None, :] - before
        kmax_s = np.where(act, np.minimum(cap_full[None, :], rem_s - 1), -1).max(axis=1)
        changed = kmax_s != kmax
        if changed.any():
            last = int(changed.argmax())
            act, before, rem_s = act[:last], before[:last], rem_s[:last]
        segs.append((p_len[:last], d_full[:last], act, rem_s, ctx[None, :] + before, np.full(last, per)))
        got = np.where(act, commit[:last], 0).sum(axis=0)
        rem = rem - got
        ctx = ctx + got
        ctr = ctr + np.uint64(per * last)
        s0 += last
        finished = alive & (rem <= 0)
        alive &= ~finished
        if s0 >= steps or not alive.any() or (not w.through and finished.any()):
            break
    if len(segs) == 1:
        p_len, d_full, act, rem_s, ctx_s, per_s = segs[0]
    else:
        p_len, d_full, act, rem_s, ctx_s, per_s = (np.concatenate(x) for x in zip(*segs))
    all_act = bool(act.all())
    drafts = np.minimum(d_full, np.minimum(cap_full[None, :], rem_s - 1))
    accepted = np.minimum(p_len, drafts)
    k_s = np.minimum(w.k[None, :], rem_s - 1)
    committed = accepted + 1
    fed = k_s + 1
    draws = np.repeat(per_s.astype(np.uint64)[:, None], n, axis=1)
    if not all_act:
        drafts = np.where(act, drafts, 0)
        accepted = np.where(act, accepted, 0)
        committed = np.where(act, committed, 0)
        k_s = np.where(act, k_s, 0)
        fed = np.where(act, fed, 0)
        ctx_s = np.where(act, ctx_s, 0)
        draws[~act] = 0
    ms = _ref_kangaroo_window_ms(m, drafts, ctx_s, act, all_act)
    accepted = accepted.astype(np.int64)
    return WindowOutcome(step_ms=m.cost.finish(ms), k=k_s.astype(np.int64), drafted=drafts.astype(np.int64),
                         accepted=accepted, position_accepts=accepted, committed=committed.astype(np.int64),
                         fed_tokens=fed.astype(np.int64), draws=draws, active=None if all_act else act)


def _ref_hispec_window_ms(m, s_n, it_key, it_d, it_ctx, full_b, full_m, full_ctx):
    c, nd, ni = m.cost, m.nd, m.ni
    ld, li = m.draft_exit, m.inter_exit
    b = np.asarray(full_b, dtype=np.float64)
    m_sum = np.asarray(full_m, dtype=np.float64)
    ctx_sum = np.asarray(full_ctx, dtype=np.float64)
    fed = m_sum + b
    parts = [(0, li, b, b, ctx_sum + m_sum, True, False, False, None),
             (li, m.num_layers, b, fed, ctx_sum, False, False, True, fed)]
    ms = np.zeros(s_n)
    if it_key:
        key = np.asarray(it_key, dtype=np.int64)
        d = np.asarray(it_d, dtype=np.int64)
        cx = np.asarray(it_ctx, dtype=np.float64)
        n_it = s_n * ni
        b_i = np.bincount(key, minlength=n_it).astype(np.float64)
        tok_i = np.bincount(key, weights=d.astype(np.float64), minlength=n_it)
        kv_i = np.bincount(key, weights=cx, minlength=n_it)
        key2 = key * nd + (d - 1)
        cnt = np.bincount(key2, minlength=n_it * nd).reshape(s_n, ni, nd)[:, :, ::-1].cumsum(axis=2)[:, :, ::-1]
        csum = np.bincount(key2, weights=cx, minlength=n_it * nd).reshape(s_n, ni, nd)
        csum = csum[:, :, ::-1].cumsum(axis=2)[:, :, ::-1]
        b_r = cnt.astype(np.float64)
        kv_r = np.where(cnt > 0, csum + np.arange(nd)[None, None, :] * b_r, 0.0)
        full_1, full_2, inter, rounds = slices_ms(c, parts + [
            (ld, li, b_i, tok_i, kv_i, False, False, True, None),
            (0, ld, b_r, b_r, kv_r, True, False, True, None)])
        inter = inter.reshape(s_n, ni)
        for t in range(ni):
            r = np.zeros(s_n)
            for j in range(nd):
                r = r + rounds[:, t, j]
            ms = ms + r
            ms = ms + inter[:, t]
    else:
        full_1, full_2 = slices_ms(c, parts)
    ms = ms + full_1
    return ms + full_2


def _ref_hispec_window(m, w):
    acc = m.acceptance
    n, steps, nd, ni = w.idx.shape[0], w.n_steps, m.nd, m.ni
    kk = int(w.k.max()) if n else 0
    p_d = acc.draft_probs(acc.alpha_draft(w.alpha, w.class_idx), w.class_idx, nd).tolist()
    p_f = acc.position_probs(w.alpha, w.class_idx, max(kk, 1)).tolist()
    k, rem, ctx = w.k.tolist(), w.remaining.tolist(), w.ctx_tokens.tolist()
    base, ctr0 = w.rng_base, w.draws
    wd = m.draw_width
    block = min(steps, 32) * wd
    bufs = [[] for _ in range(n)]
    off = [0] * n

    def take(i, count):
        buf, o = bufs[i], off[i]
        if o + count > len(buf):
            start = ctr0[i] + np.uint64(len(buf))
            buf.extend(counter_uniforms(base[i], start + np.arange(max(block, count), dtype=np.uint64)).tolist())
        off[i] = o + count
        return buf, o

    rows_k, rows_m, rows_a, rows_c, rows_r, rows_act = [], [], [], [], [], []
    it_key, it_d, it_ctx, full_b, full_m, full_ctx = [], [], [], [], [], []
    alive = list(range(n))
    for s in range(steps):
        ks_s, m_s, u_s = {}, {}, {}
        for i in alive:
            ks = min(k[i], rem[i] - 1)
            target = min(ni, ks)
            mm = t = 0
            pdi = p_d[i]
            u, o0 = take(i, wd)
            u_s[i] = (u, o0 + ni * nd)
            while mm < target:
                d = min(nd, ks - mm)
                o = o0 + t * nd
                agreed = 0
                while agreed < d and u[o + agreed] < pdi[agreed]:
                    agreed += 1
                it_key.append(s * ni + t)
                it_d.append(d)
                it_ctx.append(ctx[i] + mm)
                mm += min(agreed + 1, d)
                t += 1
            ks_s[i], m_s[i] = ks, mm
        r_k, r_m, r_a, r_c, r_r, r_act = [0] * n, [0] * n, [0] * n, [0] * n, [0] * n, [False] * n
        m_tot = ctx_tot = 0
        for i in alive:
            mm = m_s[i]
            accepted = 0
            u, o = u_s[i]
            pfi = p_f[i]
            while accepted < mm and u[o + accepted] < pfi[accepted]:
                accepted += 1
            committed = min(accepted + 1, rem[i])
            r_k[i], r_m[i], r_a[i], r_c[i] = ks_s[i], mm, accepted, committed
            r_r[i] = wd
            r_act[i] = True
            m_tot += mm
            ctx_tot += ctx[i]
            rem[i] -= committed
            ctx[i] += committed
        full_b.append(len(alive))
        full_m.append(m_tot)
        full_ctx.append(ctx_tot)
        rows_k.append(r_k)
        rows_m.append(r_m)
        rows_a.append(r_a)
        rows_c.append(r_c)
        rows_r.append(r_r)
        rows_act.append(r_act)
        left = [i for i in alive if rem[i] > 0]
        if len(left) < len(alive) and (not w.through or not left):
            break
        alive = left
    s_n = len(rows_k)
    act = np.array(rows_act, dtype=bool)
    all_act = bool(act.all())
    k_out = np.array(rows_k, dtype=np.int64)
    accepted = np.array(rows_a, dtype=np.int64)
    ms = _ref_hispec_window_ms(m, s_n, it_key, it_d, it_ctx, full_b, full_m, full_ctx)
    return WindowOutcome(step_ms=m.cost.finish(ms), k=k_out, drafted=np.array(rows_m, dtype=np.int64),
                         accepted=accepted, position_accepts=accepted, committed=np.array(rows_c, dtype=np.int64),
                         fed_tokens=np.where(act, k_out + 1, 0), draws=np.array(rows_r, dtype=np.uint64),
                         active=None if all_act else act)


_WINDOW_FIELDS = ("step_ms", "k", "drafted", "accepted", "position_accepts", "committed", "fed_tokens", "draws")


def _eq_window(got, want):
    for f in _WINDOW_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.dtype == b.dtype, (f, a.dtype, b.dtype)
        _eq(a, b)
    assert (got.active is None) == (want.active is None)
    if want.active is not None:
        _eq(got.active, want.active)


def _early_exit_method(spec):
    if spec.startswith("kangaroo"):
        doc = layer_doc(kangaroo={"alpha": fixed(0.7), "confidence": KANGAROO_CONFIDENCE}, ct=0.01, ckv=1e-4)
    else:
        doc = layer_doc(hispec={"alpha": fixed(0.7), "draft_vs_inter": {"alpha": fixed(0.8)}}, ct=0.01, ckv=1e-4)
    return make_method(spec, doc)


def _random_window(rng, n, kmax, through, steps, short):
    rem = rng.integers(1, 12 if short else 400, n)
    return DecodeWindow(idx=np.arange(n), ctx_tokens=rng.integers(1, 3000, n), k=rng.integers(0, kmax + 1, n),
                        remaining=rem, alpha=rng.uniform(0.0, 1.0, n), class_idx=np.zeros(n, dtype=np.int64),
                        rng_base=request_bases(stream_key(int(rng.integers(1 << 30)), "acceptance"),
                                               rng.integers(0, 1 << 40, n).astype(np.uint64)),
                        draws=rng.integers(0, 1000, n).astype(np.uint64), n_steps=steps, through=through)


def _random_step_batch(rng, n, kmax):
    pre = rng.random(n) < 0.3
    k = np.where(pre, 0, rng.integers(0, kmax + 1, n)).astype(np.int64)
    fed = np.where(pre, rng.integers(1, 600, n), k + 1).astype(np.int64)
    return BatchStep(idx=np.arange(n), prefill=pre, fed_tokens=fed, ctx_tokens=rng.integers(0, 3000, n),
                     k=k, remaining=rng.integers(1, 400, n), alpha=rng.uniform(0.0, 1.0, n),
                     class_idx=np.zeros(n, dtype=np.int64))


KANGAROO_SPECS = ["kangaroo:exit=2,gamma=6,eta=0.6", "kangaroo:exit=3,gamma=4,eta=0", "kangaroo:exit=2,gamma=5,eta=1"]
HISPEC_SPECS = ["hispec:draft_exit=1,inter_exit=3,nd=2,ni=4", "hispec:draft_exit=2,inter_exit=5,nd=3,ni=2",
                "hispec:draft_exit=1,inter_exit=4,nd=1,ni=6"]


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.sampled_from(KANGAROO_SPECS), st.booleans(), st.booleans())
def test_kangaroo_window_equals_numpy(seed, spec, through, short):
    m = _early_exit_method(spec)
    rng = np.random.default_rng(seed)
    w = _random_window(rng, int(rng.integers(1, 20)), 8, through, int(rng.integers(1, 40)), short)
    want = _ref_kangaroo_window(m, w)
    for mode in _modes():
        with _kernel_mode(mode):
            _eq_window(m.decode_window(w), want)


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.sampled_from(HISPEC_SPECS), st.booleans(), st.booleans())
def test_hispec_window_equals_numpy(seed, spec, through, short):
    m = _early_exit_method(spec)
    rng = np.random.default_rng(seed)
    w = _random_window(rng, int(rng.integers(1, 20)), m.k_max, through, int(rng.integers(1, 40)), short)
    want = _ref_hispec_window(m, w)
    for mode in _modes():
        with _kernel_mode(mode):
            _eq_window(m.decode_window(w), want)


def _step_randoms(rng, n):
    base = request_bases(stream_key(int(rng.integers(1 << 30)), "acceptance"),
                         rng.integers(0, 1 << 40, n).astype(np.uint64))
    draws = rng.integers(0, 1000, n).astype(np.uint64)
    return (lambda: StepRandom(base, draws.copy())), (lambda: _NumpyRandom(base, draws.copy()))


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.sampled_from(KANGAROO_SPECS + ["kangaroo:exit=2,gamma=6,eta=0.6"]))
def test_kangaroo_step_equals_numpy(seed, spec):
    m = _early_exit_method(spec)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 20))
    batch = _random_step_batch(rng, n, 8)
    if rng.random() < 0.2:
        batch.k[:] = 0
    new_rng, old_rng = _step_randoms(rng, n)
    r0 = old_rng()
    want_ms, want_d, want_a = _ref_kangaroo_step(m, r0, batch)
    for mode in _modes():
        with _kernel_mode(mode):
            r1 = new_rng()
            out = m.step(r1, batch)
        assert out.step_ms == want_ms or (np.isnan(out.step_ms) and np.isnan(want_ms))
        assert np.float64(out.step_ms).tobytes() == np.float64(want_ms).tobytes()
        _eq(np.asarray(out.drafted, dtype=np.int64), want_d.astype(np.int64))
        _eq(np.asarray(out.accepted, dtype=np.int64), want_a.astype(np.int64))
        _eq(r1.used, r0.used)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.sampled_from(HISPEC_SPECS + ["hispec:draft_exit=2,inter_exit=8,nd=3"]))
def test_hispec_step_equals_numpy(seed, spec):
    """The two-level step's kernel path against its numpy path (draw_random + compute_ms, kept
    for other generators); the single-level step's early_exit_step_ms against the numpy one."""
    m = _early_exit_method(spec)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 20))
    batch = _random_step_batch(rng, n, m.k_max)
    if rng.random() < 0.2:
        batch.k[:] = 0
    new_rng, old_rng = _step_randoms(rng, n)
    r0 = old_rng()
    want = m.step(r0, batch)
    if m.single_level:
        drafts = np.minimum(batch.k, m.nd).astype(np.int64)
        want_ms = m.cost.finish(_ref_early_exit_step_ms(m.cost, batch, drafts, m.draft_exit, m.num_layers, False))
        assert np.float64(want.step_ms).tobytes() == np.float64(want_ms).tobytes()
    for mode in _modes():
        with _kernel_mode(mode):
            r1 = new_rng()
            out = m.step(r1, batch)
        assert np.float64(out.step_ms).tobytes() == np.float64(want.step_ms).tobytes()
        _eq(np.asarray(out.drafted, dtype=np.int64), np.asarray(want.drafted, dtype=np.int64))
        _eq(np.asarray(out.accepted, dtype=np.int64), np.asarray(want.accepted, dtype=np.int64))
        if want.inner is not None:
            _eq(np.asarray(out.inner, dtype=np.int64), np.asarray(want.inner, dtype=np.int64))
        _eq(r1.used, r0.used)


@settings(max_examples=60, deadline=None)
@given(SEEDS)
def test_early_exit_step_sums_equals_numpy(seed):
    """early_exit_step_ms (on the kernel's sums) against the numpy version, prompts included."""
    m = _early_exit_method("kangaroo:exit=2,gamma=6,eta=0.6")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 20))
    batch = _random_step_batch(rng, n, 6)
    if rng.random() < 0.2:
        batch.prefill[:] = True
    drafts = np.where(batch.prefill, 0, rng.integers(0, 7, n)).astype(np.int64)
    if rng.random() < 0.3:
        drafts = np.where(batch.prefill, 0, 3).astype(np.int64)  # uniform drafts
    for adapter in (True, False):
        want = _ref_early_exit_step_ms(m.cost, batch, drafts, m.exit_layer, m.num_layers, adapter)
        for mode in _modes():
            with _kernel_mode(mode):
                got = early_exit_step_ms(m.cost, batch, drafts, m.exit_layer, m.num_layers, adapter)
            assert np.float64(got).tobytes() == np.float64(want).tobytes()


def test_compiled_kernels_cache_is_keyed_on_every_kernel_source(tmp_path):
    """numba checks only a function's own file, but a compiled kernel carries the kernels it calls
    from other modules (the fast lane calls five): the cache directory is named after a digest of
    all kernel sources, so an edit to any of them starts a fresh one."""
    from pathlib import Path

    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    d0 = K.source_digest([a, b])
    b.write_text("y = 3\n")  # a callee's file changes, the caller's does not
    assert K.source_digest([a, b]) != d0
    files = {p.name for p in K._kernel_source_files()}
    assert {"kernels.py", "fastlane.py", "lane_methods.py", "lane_preemptive.py", "lane_policies.py",
            "lane_cost.py", "rng.py"} <= files
    where = K.cache_dir()
    assert where.name == "simspec-kernels-" + K.source_digest(K._kernel_source_files())
    if K.numba_available():
        k = K.compiled()
        assert Path(k["lane_replica"]._cache._cache_path).is_relative_to(where)
        assert Path(k["draft_accept"]._cache._cache_path).is_relative_to(where)
