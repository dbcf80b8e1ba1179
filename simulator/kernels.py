"""Compiled per-event kernels: the loops of one step or window that numpy would spread over dozens
of small-array calls.

A step of a replica touches a few dozen requests; as numpy code each operation on those small
arrays costs about a microsecond of dispatch whatever the size, and a mixed step or a window made
~200 of them (docs/performance.md). The kernels here do the same arithmetic in one loop each,
compiled by numba when it is installed (``@jit``: ``numba.njit(cache=True)``; the machine code is
cached beside the module, so only the first run on a machine compiles). Without numba — or with
``SIMSPEC_JIT=0`` in the environment — the same functions run as plain Python: identical results,
much slower on large batches (for tests and for machines where numba has no wheel).

Every kernel is exact with respect to the numpy code it replaces: integer arithmetic, the same
SplitMix64 counter draws as :func:`simspec.rng.counter_uniforms`, comparisons of the same float64
values, and float sums accumulated in the order the callers' ``np.add.reduce`` would give on the
same data (each kernel says which). ``tests/test_kernels.py`` checks each compiled kernel against
its plain-Python self (``kernel.py_func``) and the numpy code it replaced.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - which branch runs depends on the install
    if os.environ.get("SIMSPEC_JIT", "1").strip() in ("0", "false", "no", "off"):
        raise ImportError("disabled by SIMSPEC_JIT")
    from numba import njit as _njit

    JIT = True

    def jit(fn):
        """Compile ``fn`` with numba (no Python objects, machine code cached on disk)."""
        return _njit(cache=True, nogil=True)(fn)

except ImportError:  # pragma: no cover
    JIT = False

    def jit(fn):
        """numba is not installed (or SIMSPEC_JIT=0): run ``fn`` as plain Python."""
        fn.py_func = fn
        return fn


from simspec.rng import _G2, _INV53, _M1, _M2  # SplitMix64's constants (one definition)


@jit
def _uniform(base, counter):
    """SplitMix64's output for draw ``counter`` of a stream starting at ``base`` (uint64), as a
    float64 in [0, 1): the same number as ``simspec.rng.counter_uniforms``."""
    z = base + counter * _G2
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * _INV53


@jit
def draft_accept(probs, idx, base, ctr, k, kmax):
    """Sampled accepted prefix and accepted positions of one draft-model step.

    ``probs[r, j]``: request r's acceptance probability at draft position j (precomputed per
    request); member m is request ``idx[m]`` with stream ``base[m]``, its next draw number
    ``ctr[m]`` and ``k[m]`` drafts; ``kmax`` draws are consumed per member (``ctr[m] + j``, j <
    kmax). Position j is accepted when its uniform is below the probability and j < k[m]; the
    accepted prefix counts positions up to the first rejection, positions counts them all."""
    n = idx.shape[0]
    accepted = np.zeros(n, dtype=np.int64)
    positions = np.zeros(n, dtype=np.int64)
    for m in range(n):
        r = idx[m]
        km = k[m]
        prefix = True
        a = 0
        p_ = 0
        for j in range(kmax):
            if j >= km:
                break
            u = _uniform(base[m], ctr[m] + np.uint64(j))
            if u < probs[r, j]:
                p_ += 1
                if prefix:
                    a += 1
            else:
                prefix = False
        accepted[m] = a
        positions[m] = p_
    return accepted, positions


@jit
def draft_window_accept(probs, idx, base, draws, k, draws_per_step, steps, kk, lead_pre, rem0):
    """Acceptance of a window of ``steps`` decode-only draft-model steps.

    Member m (request ``idx[m]``, stream ``base[m]``, next draw ``draws[m]``, ``k[m]`` drafts,
    ``rem0[m]`` tokens left) draws positions ``draws[m] + s'·draws_per_step + j`` in its s'-th
    decode step of the window; with ``lead_pre[m]`` its step 0 is the chunk that completes its
    prompt (no draws, one token committed) and decode step s' is window step s' + 1. Returns
    ``(accepted, positions, done_step)``: the accepted prefix per (step, member) over the first
    ``min(kk, k[m])`` positions; the accepted positions among the first ``min(k[m], left − 1)``
    (left = tokens still to come before that step); the step in which each member's committed
    tokens (accepted + 1 per step) reach ``rem0`` (``steps`` if none). Entries after a member's
    completion step are 0 (the caller masks them: the member has left the batch)."""
    n = idx.shape[0]
    acc = np.zeros((steps, n), dtype=np.int64)
    posn = np.zeros((steps, n), dtype=np.int64)
    done_step = np.full(n, steps, dtype=np.int64)
    dps = np.uint64(draws_per_step)
    for m in range(n):
        r = idx[m]
        km = min(kk, k[m])
        csum = 0
        for s in range(steps):
            a = 0
            pc = 0
            if not (lead_pre[m] and s == 0):
                srel = s - 1 if lead_pre[m] else s
                c0 = draws[m] + np.uint64(srel) * dps
                keff = min(k[m], rem0[m] - csum - 1)
                prefix = True
                for j in range(km):
                    if _uniform(base[m], c0 + np.uint64(j)) < probs[r, j]:
                        if prefix:
                            a += 1
                        if j < keff:
                            pc += 1
                    else:
                        prefix = False
            acc[s, m] = a
            posn[s, m] = pc
            csum += a + 1
            if csum >= rem0[m]:
                done_step[m] = s
                break
    return acc, posn, done_step
