"""Compiled per-event kernels: the loops of one step or window that numpy would spread over dozens
of small-array calls.

A step of a replica touches a few dozen requests; as numpy code each operation on those small
arrays costs about a microsecond of dispatch whatever the size, and a mixed step or a window made
~200 of them (docs/performance.md). The kernels here do the same arithmetic in one loop each.

Each kernel is written once, as plain Python over numpy arrays, and runs in one of two modes,
chosen per run by :func:`select` (``simulate()`` calls it):

- **compiled** — numba's ``njit(cache=True)`` of the same source; the machine code is cached
  in a directory named after a digest of every kernel module's source (:func:`cache_dir`:
  ``simulator/__pycache__/simspec-kernels-<digest>``, else under ``NUMBA_CACHE_DIR`` or a per-user
  cache), so only the first run on a machine compiles (~10 s, ~30 s with the fast lane); later
  processes pay ~0.5 s to import numba and load the kernels, once. (numba's own cache check looks
  at each function's own source file only, but a compiled kernel carries the code of the kernels
  it calls from other files — the fast lane's loop calls kernels of five modules — so an edit to a
  callee alone would leave a stale caller in numba's cache; the digest makes any edit start a fresh
  directory.) Used for runs of at least :data:`JIT_MIN_REQUESTS`
  requests, and for every run once a process has loaded them.
- **plain** — the functions as written, run by the interpreter: no start-up cost but 5–20×
  slower per step than compiled (per-element Python loops; ~3 ms per request on a synthetic
  low-load trace). Used for tiny runs, without numba, or with ``SIMSPEC_JIT=0``.

``SIMSPEC_JIT=1`` forces compiled, ``0`` plain, ``auto`` (the default) decides as above. Both modes
give bit-identical results: integer arithmetic, the same SplitMix64 counter draws as
:func:`simspec.rng.counter_uniforms` (on uint64 when compiled, on Python ints masked to 64 bits
when plain), comparisons of the same float64 values, and sums of integers only (exact);
``tests/test_kernels.py`` checks each kernel in both modes against the numpy code it replaced, and
an end-to-end test checks that a replay's outputs are identical in both.

Callers reach kernels as module attributes (``kernels.draft_accept(...)``), so :func:`select`
switches them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

import numpy as np

from simspec.rng import _G2, _INV53, _M1, _M2  # SplitMix64's constants (one definition)

#: runs with at least this many requests use the compiled kernels under ``SIMSPEC_JIT=auto``
#: (below it the plain kernels finish before numba would have loaded: ~0.5 s)
JIT_MIN_REQUESTS = 200

#: the placeholder a kernel's optional 2-D mask argument takes when its ``has_*`` flag is False
#: (numba needs an array of the right type there)
NO_MASK = np.ones((1, 1), dtype=np.bool_)

_KERNELS: dict[str, types.FunctionType] = {}  # name -> plain function
_COMPILED: dict[str, object] | None = None
MODE = "plain"  # the mode of the module's kernel attributes now


def jit(fn):
    """Register ``fn`` as a kernel (its plain form is the module attribute until :func:`select`)."""
    _KERNELS[fn.__name__] = fn
    return fn


_MASK = (1 << 64) - 1
_G2_I, _M1_I, _M2_I = int(_G2), int(_M1), int(_M2)


def _uniform(base, counter):
    """SplitMix64's output for draw ``counter`` of a stream starting at ``base``, as a float64 in
    [0, 1) (plain mode: Python ints wrapped to 64 bits): ``simspec.rng.counter_uniforms``."""
    z = (int(base) + int(counter) * _G2_I) & _MASK
    z = ((z ^ (z >> 30)) * _M1_I) & _MASK
    z = ((z ^ (z >> 27)) * _M2_I) & _MASK
    z = z ^ (z >> 31)
    return float(z >> 11) * _INV53


def _uniform_u64(base, counter):
    """:func:`_uniform` on uint64 (compiled mode: wraps natively)."""
    z = base + counter * _G2
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * _INV53


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_source_files() -> list[Path]:
    """The source files whose code or constants the compiled kernels hold: every module that
    registered a kernel, and :mod:`simspec.rng` (its SplitMix64 constants are frozen in)."""
    mods = {fn.__module__ for fn in _KERNELS.values()} | {__name__, "simspec.rng"}
    return sorted(Path(sys.modules[m].__file__) for m in mods if getattr(sys.modules.get(m), "__file__", None))


def source_digest(files: list[Path]) -> str:
    """A digest of ``files``' names and contents (16 hex digits)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


_PREFIX = "simspec-kernels-"


def cache_dir() -> Path:
    """Where the compiled kernels are cached: ``simspec-kernels-<digest of the kernel sources>``
    under ``NUMBA_CACHE_DIR`` when set, else beside this module (``__pycache__``) when writable,
    else under the user's cache directory."""
    from numba.core import config

    name = _PREFIX + source_digest(_kernel_source_files())
    if config.CACHE_DIR:
        return Path(config.CACHE_DIR) / name
    here = Path(__file__).resolve().parent / "__pycache__"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here / name
    except OSError:
        pass
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "simspec" / name


def _drop_stale_caches(current: Path) -> None:
    """Remove the kernel caches of other sources beside ``current`` (in-tree only: a directory
    under NUMBA_CACHE_DIR or the user's cache may be shared with other checkouts)."""
    import shutil

    parent = current.parent
    if parent != Path(__file__).resolve().parent / "__pycache__":
        return
    for d in parent.glob(_PREFIX + "*"):
        if d != current and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


def compiled() -> dict[str, object]:
    """The compiled kernels (compiling or loading them from the on-disk cache on first use)."""
    global _COMPILED
    if _COMPILED is None:
        from numba import njit
        from numba.core import config

        where = cache_dir()
        _drop_stale_caches(where)
        # numba's cache locator reads CACHE_DIR when a dispatcher is made: point it at the
        # digest-named directory for the kernels only, then restore the user's setting
        saved_dir = config.CACHE_DIR
        config.CACHE_DIR = str(where)

        try:
            out = _compile_all(njit)
        finally:
            config.CACHE_DIR = saved_dir
        _COMPILED = out
    return _COMPILED


def _compile_all(njit) -> dict[str, object]:
    """Dispatchers for every registered kernel (and ``_uniform``), each over its own module's
    globals with every other kernel compiled."""
    g = dict(globals())
    g["_uniform"] = njit(cache=True, nogil=True)(_uniform_u64)
    # numba sets up its CPU target on the first compiled call, and registering its BLAS-backed
    # functions (np.dot, np.linalg) imports scipy.linalg: ~0.3-0.6 s of start-up for functions
    # no kernel here uses. Make that one import fail while the target loads (numba then skips
    # BLAS: a kernel calling np.dot would not compile), and undo it: scipy.linalg imports as
    # usual afterwards (tests/test_kernels.py checks).
    key = "scipy.linalg.cython_blas"
    guard = key not in sys.modules
    if guard:
        sys.modules[key] = None  # type: ignore[assignment]
    try:
        g["_uniform"](np.uint64(1), np.uint64(2))
    finally:
        if guard and sys.modules.get(key, 0) is None:
            del sys.modules[key]
    out = {}
    # kernels registered from other modules (simulator/fastlane.py) run over a copy of their own
    # module's globals; every namespace then sees every kernel compiled (numba resolves a
    # called kernel when it first compiles its caller, after this loop)
    spaces = {__name__: g}
    for name, fn in _KERNELS.items():
        gm = spaces.get(fn.__module__)
        if gm is None:
            gm = spaces[fn.__module__] = dict(fn.__globals__)
        f2 = types.FunctionType(fn.__code__, gm, name, fn.__defaults__, fn.__closure__)
        f2.__qualname__, f2.__module__, f2.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        out[name] = njit(cache=True, nogil=True)(f2)
    for gm in spaces.values():
        gm.update(out)
        gm["_uniform"] = g["_uniform"]
    return out


def plain() -> dict[str, types.FunctionType]:
    """The kernels as plain Python functions."""
    return dict(_KERNELS)


def select(n_requests: int | None = None, mode: str | None = None) -> str:
    """Switch the module's kernels to ``compiled`` or ``plain`` for a run of ``n_requests``
    (``mode``: ``"compiled"``/``"plain"`` to force; default from ``SIMSPEC_JIT``: ``1``, ``0`` or
    ``auto``). Returns the mode chosen. Results do not depend on it."""
    global MODE
    if mode is None:
        env = os.environ.get("SIMSPEC_JIT", "auto").strip().lower()
        if env in ("0", "false", "no", "off", "plain"):
            mode = "plain"
        elif env in ("1", "true", "yes", "on", "compiled"):
            mode = "compiled"
        else:  # loaded already (their cost is paid), or a run large enough to pay for loading them
            big = n_requests is not None and n_requests >= JIT_MIN_REQUESTS
            mode = "compiled" if big or _COMPILED is not None else "plain"
    if mode == "compiled" and not numba_available():
        mode = "plain"
    if mode not in ("compiled", "plain"):
        raise ValueError(f"kernel mode {mode!r}: expected 'compiled' or 'plain'")
    if mode != MODE:
        globals().update(compiled() if mode == "compiled" else plain())
        MODE = mode
    return mode


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
    draft_accept_into(probs, idx, base, ctr, k, kmax, n, accepted, positions)
    return accepted, positions


@jit
def draft_accept_into(probs, idx, base, ctr, k, kmax, n, accepted, positions):
    """:func:`draft_accept` for the first ``n`` members, into ``accepted`` and ``positions``."""
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


@jit
def mixed_step_progress(idx, pre, fed_tokens, out_drafted, out_accepted, out_positions, rem, gen, now_s, end_s,
                        computed, prefill_target, generated, output_tokens, prompt_tokens, steps, decode_steps,
                        drafted_col, accepted_col, positions_col, start_s, first_token_s, k, fed, draws_col,
                        fixed_draws, used):
    """Book one step with prompt chunks in it (:meth:`Replica._mixed_step`) into the request table.

    Member m is request ``idx[m]``; ``pre[m]``: it ran a prompt chunk of ``fed_tokens[m]`` tokens
    (it commits one token when the chunk completes its prompt), else it decoded: the method's
    ``out_drafted``/``out_accepted``/``out_positions`` and ``min(accepted + 1, rem)`` committed.
    Updates the table columns in place (a request starting its first chunk gets ``start_s =
    now_s``; one completing its prompt for the first time ``first_token_s = end_s``). Returns
    ``(drafted, accepted, positions, committed, finished, n_committed, first_prompt_tokens, k_max,
    drafted_sum, accepted_sum, fed_sum)``: per member (zeros for prompt chunks), whether it has all
    its output tokens now, the step's committed tokens, the prompt tokens of requests that got
    their first token in this step, and the step's largest ``k``, drafts, accepted drafts and
    tokens ``fed`` (for the step log). Random draws: each decode member's count advances by
    ``fixed_draws`` (a method with a fixed draw width), or, with ``fixed_draws`` < 0, every
    member's by ``used[m]``.
    """
    n = idx.shape[0]
    drafted = np.zeros(n, dtype=np.int64)
    accepted = np.zeros(n, dtype=np.int64)
    positions = np.zeros(n, dtype=np.int64)
    committed = np.zeros(n, dtype=np.int64)
    finished = np.zeros(n, dtype=np.bool_)
    n_committed, first_prompt, k_max, d_sum, a_sum, f_sum = mixed_step_progress_into(
        idx, pre, fed_tokens, out_drafted, out_accepted, out_positions, rem, gen, now_s, end_s, computed,
        prefill_target, generated, output_tokens, prompt_tokens, steps, decode_steps, drafted_col, accepted_col,
        positions_col, start_s, first_token_s, k, fed, draws_col, fixed_draws, used, n, drafted, accepted, positions,
        committed, finished)
    return (drafted, accepted, positions, committed, finished, n_committed, first_prompt, k_max, d_sum, a_sum,
            f_sum)


@jit
def mixed_step_progress_into(idx, pre, fed_tokens, out_drafted, out_accepted, out_positions, rem, gen, now_s, end_s,
                             computed, prefill_target, generated, output_tokens, prompt_tokens, steps, decode_steps,
                             drafted_col, accepted_col, positions_col, start_s, first_token_s, k, fed, draws_col,
                             fixed_draws, used, n, drafted, accepted, positions, committed, finished):
    """:func:`mixed_step_progress` for the first ``n`` members, writing the per-member outputs
    into the given arrays (zeroed here) and returning ``(n_committed, first_prompt_tokens, k_max,
    drafted_sum, accepted_sum, fed_sum)``."""
    n_committed = 0
    first_prompt = 0
    for m in range(n):
        i = idx[m]
        drafted[m] = 0
        accepted[m] = 0
        positions[m] = 0
        committed[m] = 0
        if pre[m]:
            if np.isnan(start_s[i]):
                start_s[i] = now_s
            c = computed[i] + fed_tokens[m]
            computed[i] = c
            if c >= prefill_target[i]:
                committed[m] = 1
                if np.isnan(first_token_s[i]):
                    first_token_s[i] = end_s
                    first_prompt += prompt_tokens[i]
        else:
            a = out_accepted[m]
            committed[m] = min(a + 1, rem[m])
            drafted[m] = out_drafted[m]
            accepted[m] = a
            positions[m] = out_positions[m]
            decode_steps[i] += 1
            drafted_col[i] += drafted[m]
            accepted_col[i] += a
            positions_col[i] += positions[m]
        g = gen[m] + committed[m]
        generated[i] = g
        steps[i] += 1
        finished[m] = g >= output_tokens[i]
        n_committed += committed[m]
        if fixed_draws >= 0:
            if not pre[m]:
                draws_col[i] += np.uint64(fixed_draws)
        else:
            draws_col[i] += used[m]
    k_max = 0
    d_sum = 0
    a_sum = 0
    f_sum = 0
    for m in range(n):
        if m == 0 or k[m] > k_max:
            k_max = k[m]
        d_sum += drafted[m]
        a_sum += accepted[m]
        f_sum += fed[m]
    return n_committed, first_prompt, k_max, d_sum, a_sum, f_sum


@jit
def vllm_running_asks(order, computed, prefill_target, generated, output_tokens, prompt_tokens, kv_blocks,
                      k_res, threshold, budget, chunked, block_size, free_blocks, kv_tokens, kv_resident):
    """vLLM's running pass on precomputed asks (:meth:`BatchFormer.schedule_vllm`).

    ``order``: running requests in priority order. Decodes go before prompt chunks (a stable
    partition). A decode asks for ``1 + k`` tokens, ``k = min(k_res, left − 1)``; a request still
    prefilling for its next chunk (``min(prompt left, threshold)``). The token budget runs out at
    the first member whose ask does not fit: it gets what is left (a shorter chunk — only when
    chunking — or fewer drafts) and everyone after it nothing. Returns ``(order, fed, k, slots,
    pre, need, cut)`` in the partitioned order: tokens fed, drafts reserved, KV slots needed after
    the step and blocks still to allocate per member, and how many members are scheduled (``cut``;
    −1: a whole prompt that does not fit without chunking, which the caller's one-at-a-time loop
    handles). ``need`` covers the first ``cut`` members. When they all fit the ``free_blocks``, they
    are granted here (:func:`grant_blocks` on the table's ``kv_blocks``, ``kv_tokens``,
    ``kv_resident``): ``granted`` is then the blocks given (else −1: the caller preempts or loops),
    and ``fed_cut`` the tokens the scheduled members feed. Returns ``(order, fed, k, slots, pre,
    need, cut, granted, fed_cut)``."""
    n = order.shape[0]
    out_order = np.empty(n, dtype=np.int64)
    pre = np.empty(n, dtype=np.bool_)
    fed = np.empty(n, dtype=np.int64)
    k = np.empty(n, dtype=np.int64)
    slots = np.empty(n, dtype=np.int64)
    need = np.zeros(n, dtype=np.int64)
    cut, granted, fed_cut = vllm_running_asks_into(
        order, n, computed, prefill_target, generated, output_tokens, prompt_tokens, kv_blocks, k_res, threshold,
        budget, chunked, block_size, free_blocks, kv_tokens, kv_resident, out_order, fed, k, slots, pre, need)
    return out_order, fed, k, slots, pre, need[:max(cut, 0)], cut, granted, fed_cut


@jit
def vllm_running_asks_into(order, n, computed, prefill_target, generated, output_tokens, prompt_tokens, kv_blocks,
                           k_res, threshold, budget, chunked, block_size, free_blocks, kv_tokens, kv_resident,
                           out_order, fed, k, slots, pre, need):
    """:func:`vllm_running_asks` over the first ``n`` entries of ``order``, writing the
    per-member outputs into the given arrays (``need`` for the first ``cut``); returns ``(cut,
    granted, fed_cut)``."""
    # stable partition: decodes, then prompt chunks
    w = 0
    for m in range(n):
        i = order[m]
        if not (computed[i] < prefill_target[i]):
            out_order[w] = i
            pre[w] = False
            w += 1
    for m in range(n):
        i = order[m]
        if computed[i] < prefill_target[i]:
            out_order[w] = i
            pre[w] = True
            w += 1
    cut = n
    cum = 0
    for m in range(n):
        i = out_order[m]
        if pre[m]:
            left = prefill_target[i] - computed[i]
            chunk = min(left, threshold)
            k[m] = 0
            fed[m] = chunk
            slots[m] = computed[i] + chunk + (1 if chunk == left else 0)
        else:
            gen = generated[i]
            km = min(k_res, output_tokens[i] - gen - 1)
            k[m] = km
            fed[m] = km + 1
            slots[m] = prompt_tokens[i] + gen + 1 + km
        if cut == n and cum + fed[m] > budget:
            left_j = budget - cum
            if left_j > 0 and (not pre[m] or chunked):
                if pre[m]:
                    slots[m] -= fed[m] - left_j + (1 if slots[m] > computed[i] + fed[m] else 0)
                else:
                    k[m] = left_j - 1
                    slots[m] -= fed[m] - left_j
                fed[m] = left_j
                cut = m + 1
            elif not pre[m] or chunked:
                cut = m
            else:
                cut = -1
        cum += fed[m]
    need_sum = 0
    fed_cut = 0
    for m in range(max(cut, 0)):
        need[m] = blocks_needed(out_order[m], slots[m], block_size, kv_blocks)
        need_sum += need[m]
        fed_cut += fed[m]
    granted = -1
    if cut >= 0 and need_sum <= free_blocks:
        granted = grant_blocks(out_order[:cut], slots, need, kv_blocks, kv_tokens, kv_resident)
    return cut, granted, fed_cut


@jit
def blocks_needed(i, slots, block_size, kv_blocks):
    """``BatchFormer._allocate``: the KV blocks request ``i`` still needs to hold ``slots`` tokens."""
    nb = -(-slots // block_size) - kv_blocks[i]
    return nb if nb > 0 else 0


@jit
def grant_one(i, slots, need, kv_blocks, kv_tokens, kv_resident):
    """``BatchFormer._grant``: give request ``i`` ``need`` more KV blocks, raise its allocated
    slots to ``slots`` and mark it resident (the caller takes ``need`` off the free blocks)."""
    kv_blocks[i] += need
    if slots > kv_tokens[i]:
        kv_tokens[i] = slots
    kv_resident[i] = True


@jit
def grant_blocks(idx, slots, need, kv_blocks, kv_tokens, kv_resident):
    """Give members ``idx`` their ``need`` more KV blocks, raise their allocated slots to ``slots``
    and mark them resident; returns the blocks granted."""
    total = 0
    for m in range(idx.shape[0]):
        grant_one(idx[m], slots[m], need[m], kv_blocks, kv_tokens, kv_resident)
        total += need[m]
    return total


@jit
def preemption_plan(order, need, cut, live_end, free_blocks, kv_blocks):
    """vLLM's running pass when the KV is short (:meth:`BatchFormer._grant_preempting`): members
    ``order[:cut]`` get ``need`` more blocks each in priority order; when one does not fit, the
    lowest-priority running request (the last of ``order[:live_end]``) is preempted, its blocks
    freed, and the allocation retried; a member that preempts itself stops the pass. Nothing is
    modified. Returns ``(granted, live_end_after)``: the first ``granted`` members get their
    blocks; ``order[live_end_after:live_end]`` are the victims, preempted from the end."""
    free = free_blocks
    pos = 0
    while pos < cut and pos < live_end:
        nd = need[pos]
        if nd > free:
            stop = False
            while nd > free:
                live_end -= 1
                free += kv_blocks[order[live_end]]
                if live_end == pos:
                    stop = True
                    break
            if stop:
                break
        free -= nd
        pos += 1
    return pos, live_end


@jit
def preempt_kv(v, swap, kv_blocks, kv_tokens, kv_resident, preemptions, recomputes, recomputed_tokens,
               prefill_target, computed, prompt_tokens, generated):
    """The table side of preempting request ``v`` (:meth:`BatchFormer.preempt`): its KV freed
    (blocks and slots), one preemption counted, and in recompute mode (not ``swap``) the tokens it
    must prefill again (its prompt and what it generated). Returns the blocks freed."""
    freed = kv_blocks[v]
    kv_blocks[v] = 0
    kv_tokens[v] = 0  # off the GPU either way: a swapped request re-allocates on resume
    kv_resident[v] = False
    preemptions[v] += 1
    if not swap:
        if computed[v] < prefill_target[v]:
            lost = computed[v]
        else:
            lost = prompt_tokens[v] + generated[v]
        recomputes[v] += 1
        recomputed_tokens[v] += lost
        prefill_target[v] = prompt_tokens[v] + generated[v]
        computed[v] = 0
    return freed


@jit
def itl_chunk_gaps(last_token_s, idx, committed, end_s):
    """Members ``idx`` with ``committed > 0`` received a chunk at ``end_s``: returns the gaps
    (seconds) since each one's previous chunk (members with one before, in member order) and sets
    their latest chunk time to ``end_s``."""
    n = idx.shape[0]
    gaps = np.empty(n, dtype=np.float64)
    g = 0
    for m in range(n):
        if committed[m] > 0:
            i = idx[m]
            prev = last_token_s[i]
            if not np.isnan(prev):
                gaps[g] = end_s - prev
                g += 1
            last_token_s[i] = end_s
    return gaps[:g]


@jit
def window_kv(committed, k_steps, active, has_active, rem0, ctx0, held0, k_res_first, k_res_rest, block_size,
              free_blocks, lead_pre, ends_s, next_arrival_s):
    """KV blocks over a window of decode steps (:meth:`Replica._decode_steps`) and where it stops.

    Step s reserves, per member, slots for its context + 1 + max(min(reservation, left − 1),
    drafts chosen) (``k_res_first`` in step 0, ``k_res_rest`` after); a member holds the most
    blocks it has needed so far (``held0`` before the window). Inactive members (``has_active``
    and not ``active[s, m]``: completed) and newcomers' step 0 (``lead_pre``: the scheduler
    allocated their prompt chunks) need nothing. The window stops before the first step whose
    growth does not fit ``free_blocks``, and after the step during which ``next_arrival_s`` falls
    (steps end at ``ends_s``). Returns ``(steps, held, slots_max)``: steps kept, blocks held after
    each step (all steps), and each member's largest slot count over the steps kept."""
    n_steps, n = committed.shape
    held = np.empty((n_steps, n), dtype=np.int64)
    slots = np.zeros((n_steps, n), dtype=np.int64)
    held0_sum = 0
    for m in range(n):
        held0_sum += held0[m]
    before = np.zeros(n, dtype=np.int64)
    cur = held0.copy()
    s_n = n_steps
    for s in range(n_steps):
        kr = k_res_first if s == 0 else k_res_rest
        tot = 0
        for m in range(n):
            c = committed[s, m]
            live = not (has_active and not active[s, m]) and not (s == 0 and lead_pre[m])
            if live:
                r = min(kr, rem0[m] - before[m] - 1)
                if k_steps[s, m] > r:
                    r = k_steps[s, m]
                sl = ctx0[m] + before[m] + 1 + r
                slots[s, m] = sl
                nb = -(-sl // block_size)
                if nb > cur[m]:
                    cur[m] = nb
            held[s, m] = cur[m]
            tot += cur[m]
            before[m] += c
        if tot - held0_sum > free_blocks and s_n == n_steps:
            s_n = s
    if next_arrival_s <= ends_s[s_n - 1]:
        j = np.searchsorted(ends_s, next_arrival_s, side="left") + 1
        if j < s_n:
            s_n = j
    slots_max = np.zeros(n, dtype=np.int64)
    for s in range(s_n):
        for m in range(n):
            if slots[s, m] > slots_max[m]:
                slots_max[m] = slots[s, m]
    return s_n, held, slots_max


@jit
def draft_window_shape(acc_full, positions, done_step, k, rem0, ctx0, lead_pre, lead_fed, lead_ctx, draws_per_step):
    """Per-step shape of a window of draft-model decode steps (:meth:`DraftModel.decode_window`),
    from the sampled ``acc_full``/``positions`` (steps kept × members) and each member's
    completion step.

    Member m is in the batch at step s while ``s <= done_step[m]``; it decodes there unless it is
    a newcomer finishing its prompt (``lead_pre[m]`` at s = 0: it feeds ``lead_fed[m]`` tokens
    over a context of ``lead_ctx[m]`` and commits its first token). A decoding member drafts
    ``min(k, left − 1)``, accepts at most that, commits ``min(accepted + 1, left)``, feeds
    drafts + 1 tokens over its context ``ctx0 + tokens committed before``.

    Returns ``(act, all_act, k_eff, accepted, positions, committed, fed, draws, fed_sum, batch,
    kmax, ctx_sum, sel_count, sel_ctx, pass_batch, pass_kv)``: per (step, member) arrays (int64;
    ``draws``: uniforms consumed, uint64), per-step sums (float64: tokens fed, members, context;
    int64: largest k), the members drafting (k > 0) and their context per step, and per (step,
    draft pass j) the members in pass j (k > j) and the pass's KV tokens (their context + j each).
    All sums are of integers, so exact."""
    n_steps, n = acc_full.shape
    act = np.empty((n_steps, n), dtype=np.bool_)
    k_eff = np.zeros((n_steps, n), dtype=np.int64)
    accepted = np.zeros((n_steps, n), dtype=np.int64)
    pos_out = np.zeros((n_steps, n), dtype=np.int64)
    committed = np.zeros((n_steps, n), dtype=np.int64)
    fed = np.zeros((n_steps, n), dtype=np.int64)
    draws = np.zeros((n_steps, n), dtype=np.uint64)
    fed_sum = np.zeros(n_steps, dtype=np.float64)
    batch = np.zeros(n_steps, dtype=np.float64)
    kmax = np.zeros(n_steps, dtype=np.int64)
    ctx_sum = np.zeros(n_steps, dtype=np.float64)
    kk = 0
    for m in range(n):
        if k[m] > kk:
            kk = k[m]
    sel_count = np.zeros(n_steps, dtype=np.float64)
    sel_ctx = np.zeros(n_steps, dtype=np.float64)
    pass_batch = np.zeros((n_steps, kk), dtype=np.float64)
    pass_kv = np.zeros((n_steps, kk), dtype=np.float64)
    all_act = True
    dps = np.uint64(draws_per_step)
    bef = np.zeros(n, dtype=np.int64)  # tokens each member committed before the step
    for s in range(n_steps):
        f_tot = 0
        c_tot = 0
        b_tot = 0
        km = 0
        sc = 0
        sctx = 0
        for m in range(n):
            a = s <= done_step[m]
            act[s, m] = a
            if not a:
                all_act = False
                continue
            b_tot += 1
            before = bef[m]
            bef[m] += acc_full[s, m] + 1
            if s == 0 and lead_pre[m]:
                committed[s, m] = min(1, rem0[m] - before)  # accepted 0, left > 0: one token
                f_tot += lead_fed[m]
                c_tot += lead_ctx[m]
                continue
            left = rem0[m] - before
            ke = min(k[m], left - 1)
            k_eff[s, m] = ke
            ac = min(acc_full[s, m], ke)
            accepted[s, m] = ac
            pos_out[s, m] = positions[s, m]
            committed[s, m] = min(ac + 1, left)
            fed[s, m] = ke + 1
            draws[s, m] = dps
            ctx = ctx0[m] + before
            f_tot += ke + 1
            c_tot += ctx
            if ke > km:
                km = ke
            if ke > 0:
                sc += 1
                sctx += ctx
            for j in range(ke):
                pass_batch[s, j] += 1.0
                pass_kv[s, j] += ctx + j
        if s == 0:
            for m in range(n):
                if lead_pre[m]:
                    fed[s, m] = lead_fed[m]
        fed_sum[s] = f_tot
        batch[s] = b_tot
        kmax[s] = km
        ctx_sum[s] = c_tot
        sel_count[s] = sc
        sel_ctx[s] = sctx
    return (act, all_act, k_eff, accepted, pos_out, committed, fed, draws, fed_sum, batch, kmax, ctx_sum,
            sel_count, sel_ctx, pass_batch, pass_kv)


@jit
def window_book(idx, committed, drafted, accepted, positions, draws, fed, k_steps, active, has_active, held,
                has_held, lead_pre, generated, steps_col, decode_steps, drafted_col, accepted_col, positions_col,
                draws_col, output_tokens):
    """Book a window of steps (:meth:`Replica._decode_steps`) into the request table and sum it
    per step for the step log.

    Per (step, member) inputs as in :class:`~simspec.simulator.methods.base.WindowOutcome`;
    member m is in step s unless ``has_active`` and not ``active[s, m]``; ``lead_pre[m]``: its
    step 0 was a prompt chunk (not a decode step). ``held``: KV blocks held after each step (when
    ``has_held``). Returns ``(steps_run, done, committed_s, batch_s, kmax_s, drafted_s,
    accepted_s, fed_s, live_blocks_s, committed_total)``: steps each member ran and whether it
    has all its output tokens now; per step the tokens committed, members, largest k, drafts,
    accepted drafts, tokens fed and blocks held by members still in the batch; all tokens
    committed."""
    n_steps, n = committed.shape
    steps_run = np.zeros(n, dtype=np.int64)
    done = np.zeros(n, dtype=np.bool_)
    committed_s = np.zeros(n_steps, dtype=np.int64)
    batch_s = np.zeros(n_steps, dtype=np.int64)
    kmax_s = np.zeros(n_steps, dtype=np.int64)
    drafted_s = np.zeros(n_steps, dtype=np.int64)
    accepted_s = np.zeros(n_steps, dtype=np.int64)
    fed_s = np.zeros(n_steps, dtype=np.int64)
    live_blocks = np.zeros(n_steps, dtype=np.int64)
    if n > 0:
        for s in range(n_steps):
            kmax_s[s] = k_steps[s, 0]
    total = 0
    for m in range(n):
        i = idx[m]
        c_tot = 0
        sr = 0
        d = 0
        a = 0
        p = 0
        dw = np.uint64(0)
        for s in range(n_steps):
            live = (not has_active) or active[s, m]
            if live:
                sr += 1
                batch_s[s] += 1
                if has_held:
                    live_blocks[s] += held[s, m]
            c = committed[s, m]
            c_tot += c
            committed_s[s] += c
            d += drafted[s, m]
            a += accepted[s, m]
            p += positions[s, m]
            dw += draws[s, m]
            drafted_s[s] += drafted[s, m]
            accepted_s[s] += accepted[s, m]
            fed_s[s] += fed[s, m]
            if k_steps[s, m] > kmax_s[s]:
                kmax_s[s] = k_steps[s, m]
        g = generated[i] + c_tot
        generated[i] = g
        steps_col[i] += sr
        decode_steps[i] += sr - (1 if lead_pre[m] else 0)
        drafted_col[i] += d
        accepted_col[i] += a
        positions_col[i] += p
        draws_col[i] += dw
        done[m] = g >= output_tokens[i]
        steps_run[m] = sr
        total += c_tot
    return steps_run, done, committed_s, batch_s, kmax_s, drafted_s, accepted_s, fed_s, live_blocks, total


@jit
def draft_step_sums(k, pre, fed, ctx):
    """The sums one draft-model step is costed on (:meth:`DraftModel.step`), all of integers.

    Members have ``k`` drafts, ``pre`` (a prompt chunk), ``fed`` tokens and ``ctx`` context
    tokens. Returns ``(kmax, kmin, n_pre, fed_all, fed_pre, ctx_all, sel_count, sel_ctx, pass_count,
    pass_ctx)``: largest and smallest k, prompt chunks, tokens fed (all; by prompt chunks),
    context of all members, members drafting (k > 0) and their context, and per draft pass j <
    kmax the members in it (k > j) and their context."""
    n = k.shape[0]
    kmax = 0
    kmin = 0
    if n > 0:
        kmax = k[0]
        kmin = k[0]
    for m in range(n):
        if k[m] > kmax:
            kmax = k[m]
        if k[m] < kmin:
            kmin = k[m]
    pass_count = np.zeros(max(kmax, 0), dtype=np.int64)
    pass_ctx = np.zeros(max(kmax, 0), dtype=np.int64)
    n_pre = 0
    fed_all = 0
    fed_pre = 0
    ctx_all = 0
    sel_count = 0
    sel_ctx = 0
    for m in range(n):
        fed_all += fed[m]
        ctx_all += ctx[m]
        if pre[m]:
            n_pre += 1
            fed_pre += fed[m]
        if k[m] > 0:
            sel_count += 1
            sel_ctx += ctx[m]
        for j in range(k[m]):
            pass_count[j] += 1
            pass_ctx[j] += ctx[m]
    return kmax, kmin, n_pre, fed_all, fed_pre, ctx_all, sel_count, sel_ctx, pass_count, pass_ctx


@jit
def mixed_prepare(idx, pre, k_reserved, generated, output_tokens, prompt_tokens, computed, rng_base, draws, alpha,
                  class_idx):
    """Gather one step's members (:meth:`Replica._mixed_step`): per member the tokens generated and
    left, the context it runs over (a prompt chunk: the prompt computed so far; a decode: prompt
    + generated), its random stream (``rng_base``, ``draws``), acceptance level and class; and the
    decode members (positions in the step, request, drafts reserved, context, tokens left, and
    the sum of their contexts). Returns ``(gen, rem, ctx, base, draws, alpha, class_idx, dec_pos,
    dec_idx, dec_kres, dec_ctx, dec_rem, dec_ctx_sum)``."""
    n = idx.shape[0]
    gen = np.empty(n, dtype=np.int64)
    rem = np.empty(n, dtype=np.int64)
    ctx = np.empty(n, dtype=np.int64)
    base = np.empty(n, dtype=np.uint64)
    dr = np.empty(n, dtype=np.uint64)
    al = np.empty(n, dtype=np.float64)
    ci = np.empty(n, dtype=np.int64)
    n_dec, ctx_sum = gather_members_into(idx, pre, n, generated, output_tokens, prompt_tokens, computed, rng_base,
                                         draws, gen, rem, ctx, base, dr)
    dec_pos = np.empty(n_dec, dtype=np.int64)
    dec_idx = np.empty(n_dec, dtype=np.int64)
    dec_kres = np.empty(n_dec, dtype=np.int64)
    dec_ctx = np.empty(n_dec, dtype=np.int64)
    dec_rem = np.empty(n_dec, dtype=np.int64)
    d = 0
    for m in range(n):
        i = idx[m]
        al[m] = alpha[i]
        ci[m] = class_idx[i]
        if not pre[m]:
            dec_pos[d] = m
            dec_idx[d] = i
            dec_kres[d] = k_reserved[m]
            dec_ctx[d] = ctx[m]
            dec_rem[d] = rem[m]
            d += 1
    return gen, rem, ctx, base, dr, al, ci, dec_pos, dec_idx, dec_kres, dec_ctx, dec_rem, ctx_sum


@jit
def gather_members_into(idx, pre, n, generated, output_tokens, prompt_tokens, computed, rng_base, draws, gen, rem,
                        ctx, base, dr):
    """The per-member part of :func:`mixed_prepare` for the first ``n`` members, into the given
    arrays (tokens generated and left, context, random stream); returns ``(decode members, the
    sum of their contexts)``."""
    n_dec = 0
    ctx_sum = 0
    for m in range(n):
        i = idx[m]
        g = generated[i]
        gen[m] = g
        rem[m] = output_tokens[i] - g
        base[m] = rng_base[i]
        dr[m] = draws[i]
        if pre[m]:
            ctx[m] = computed[i]
        else:
            c = prompt_tokens[i] + g
            ctx[m] = c
            ctx_sum += c
            n_dec += 1
    return n_dec, ctx_sum


@jit
def clip_k(k_policy, rem, k_reserved):
    """The policy's k per member within ``0 .. rem − 1``, and whether any exceeds what was
    reserved for it (extra drafts to fit into the token budget and free KV)."""
    n = rem.shape[0]
    k = np.empty(n, dtype=np.int64)
    extra = False
    for m in range(n):
        km = k_policy[m]
        if km < 0:
            km = 0
        if km > rem[m] - 1:
            km = rem[m] - 1
        k[m] = km
        if km > k_reserved[m]:
            extra = True
    return k, extra


@jit
def mixed_k_fed(pre, plan_fed, dec_pos, k_dec):
    """k per member (the decode members' ``k_dec`` at ``dec_pos``, 0 for prompt chunks) and the
    tokens each feeds: its chunk, or k + 1."""
    n = pre.shape[0]
    k = np.zeros(n, dtype=np.int64)
    for d in range(dec_pos.shape[0]):
        k[dec_pos[d]] = k_dec[d]
    fed = np.empty(n, dtype=np.int64)
    for m in range(n):
        fed[m] = plan_fed[m] if pre[m] else k[m] + 1
    return k, fed


@jit
def itl_window_gaps(last_token_s, idx, committed, active, has_active, ends_s):
    """Chunk gaps of a window of steps (:meth:`ItlLog.observe_window`): at step s every member
    that committed a token (and is in the batch) received a chunk at ``ends_s[s]``; a member with
    a chunk before gives one sample, the time since its previous chunk. Updates ``last_token_s``.
    Returns ``(values_s, counts)``: the samples, equal values of one step merged into one entry
    with its count (a step's gaps are all ``ends[s] − ends[s−1]`` once members decode every step,
    so a window adds about one entry per step)."""
    n_steps, n = committed.shape
    values = np.empty(n_steps * n, dtype=np.float64)
    counts = np.empty(n_steps * n, dtype=np.int64)
    e = 0
    for s in range(n_steps):
        end = ends_s[s]
        first_e = e
        for m in range(n):
            if committed[s, m] <= 0 or (has_active and not active[s, m]):
                continue
            i = idx[m]
            prev = last_token_s[i]
            if not np.isnan(prev):
                g = end - prev
                if e > first_e and values[e - 1] == g:
                    counts[e - 1] += 1
                else:
                    values[e] = g
                    counts[e] = 1
                    e += 1
            last_token_s[i] = end
    return values[:e], counts[:e]


@jit
def window_clock(now_s, busy_s, step_ms):
    """The replica's clock over a window of steps taking ``step_ms`` each (ms), adding step times
    one at a time as a one-step engine's clock does (in seconds: ``step_ms / 1000``). Returns
    ``(starts_s, ends_s, busy_after_s)``: each step's start and end, and the replica's busy time
    after each step (from ``busy_s``)."""
    n = step_ms.shape[0]
    starts = np.empty(n, dtype=np.float64)
    ends = np.empty(n, dtype=np.float64)
    busy = np.empty(n, dtype=np.float64)
    t = now_s
    b = busy_s
    for s in range(n):
        x = step_ms[s] / 1000.0
        starts[s] = t
        t = t + x
        ends[s] = t
        b = b + x
        busy[s] = b
    return starts, ends, busy


# ------------------------------------------------------------------ early-exit methods (kangaroo, hispec)


@jit
def kangaroo_member_draws(p, conf_a, conf_r, early, base, c0, cap, wd):
    """One Kangaroo decode step of one member (:meth:`KangarooAcceptance.sample_drafts` at width
    ``wd``): ``p[j]`` its acceptance probability at position j, ``conf_a``/``conf_r`` its
    confidence-stop probabilities (P(conf ≥ η) after an accepted / a rejected draft), ``early``:
    whether drafting can stop early, ``base``/``c0`` its stream and first draw number (prefix
    uniforms ``c0 + j``, stop uniforms ``c0 + wd + j``), ``cap`` its most drafts (≤ ``wd``).
    Returns ``(d_full, acc)``: drafts made (the first j + 1 whose stop uniform is ≥ the
    confidence probability, else ``cap``) and the accepted prefix among them (tokens). Only the
    positions below ``d_full`` matter, so only those are drawn."""
    d_full = cap
    acc = 0
    prefix = True
    for j in range(cap):
        if prefix:
            if _uniform(base, c0 + np.uint64(j)) < p[j]:
                acc += 1
            else:
                prefix = False
                if not early:
                    break
        if early:
            pc = conf_a[j] if prefix else conf_r[j]
            if _uniform(base, c0 + np.uint64(wd + j)) >= pc:
                d_full = j + 1
                break
    return d_full, acc


@jit
def kangaroo_window(probs, rows, conf_a, conf_r, cls, early, base, draws, k, cap, rem0, ctx0, steps, through, wd,
                    per):
    """Sampling and per-step shape of a window of decode-only Kangaroo steps
    (:meth:`Kangaroo.decode_window`).

    Member m: probabilities ``probs[rows[m], :]`` (width ≥ ``wd``), confidence-stop rows
    ``conf_a/conf_r[cls[m]]``, stream ``base[m]`` from draw ``draws[m]`` (step s reads draws
    ``draws[m] + s·per + j``: :func:`kangaroo_member_draws`), policy cap ``k[m]``, draft cap
    ``cap[m] = min(k, γ)``, ``rem0[m]`` tokens left and ``ctx0[m]`` context tokens (tokens) at the
    window's start. A step's batch cap is the largest ``min(cap, left − 1)`` of its members; at 0
    nobody draws (each commits one token). A member leaves after the step that commits its last
    token; the window stops after ``steps`` steps, when all have left, or (not ``through``) after
    the first step in which one leaves.

    Returns ``(s_n, act, drafts, accepted, k_eff, committed, fed, draws_used, ctx, cnt_ge,
    ctx_ge, dmax)`` over the first ``s_n`` rows (steps run): per (step, member) whether it runs,
    drafts, accepted prefix, ``min(k, left − 1)``, tokens committed, tokens fed (k_eff + 1),
    uniforms consumed (uint64) and context tokens, all 0 where it does not run; per (step, round
    j ≤ γ) the running members with drafts ≥ j and the sum of their context (tokens, int64), and
    each step's largest drafts (−1: none running)."""
    n = rem0.shape[0]
    act = np.zeros((steps, n), dtype=np.bool_)
    drafts = np.zeros((steps, n), dtype=np.int64)
    accepted = np.zeros((steps, n), dtype=np.int64)
    k_eff = np.zeros((steps, n), dtype=np.int64)
    committed = np.zeros((steps, n), dtype=np.int64)
    fed = np.zeros((steps, n), dtype=np.int64)
    draws_used = np.zeros((steps, n), dtype=np.uint64)
    ctx_s = np.zeros((steps, n), dtype=np.int64)
    cnt_ge = np.zeros((steps, wd + 1), dtype=np.int64)
    ctx_ge = np.zeros((steps, wd + 1), dtype=np.int64)
    dmax = np.full(steps, -1, dtype=np.int64)
    rem = rem0.copy()
    ctx = ctx0.copy()
    alive = np.ones(n, dtype=np.bool_)
    pu = np.uint64(per)
    s_n = 0
    for s in range(steps):
        kmax = 0
        for m in range(n):
            if alive[m]:
                c = min(cap[m], rem[m] - 1)
                if c > kmax:
                    kmax = c
        any_done = False
        n_alive = 0
        dm = -1
        for m in range(n):
            if not alive[m]:
                continue
            d_full = 0
            pl = 0
            if kmax > 0:
                d_full, pl = kangaroo_member_draws(probs[rows[m]], conf_a[cls[m]], conf_r[cls[m]], early, base[m],
                                                   draws[m] + np.uint64(s) * pu, cap[m], wd)
            d = min(d_full, min(cap[m], rem[m] - 1))
            a = min(pl, d)
            act[s, m] = True
            drafts[s, m] = d
            accepted[s, m] = a
            k_eff[s, m] = min(k[m], rem[m] - 1)
            committed[s, m] = a + 1
            fed[s, m] = k_eff[s, m] + 1
            draws_used[s, m] = pu
            ctx_s[s, m] = ctx[m]
            if d > dm:
                dm = d
            for j in range(d + 1):
                cnt_ge[s, j] += 1
                ctx_ge[s, j] += ctx[m]
            got = min(pl, d_full) + 1
            rem[m] -= got
            ctx[m] += got
            if rem[m] <= 0:
                alive[m] = False
                any_done = True
            else:
                n_alive += 1
        dmax[s] = dm
        s_n = s + 1
        if n_alive == 0 or (any_done and not through):
            break
    return (s_n, act[:s_n], drafts[:s_n], accepted[:s_n], k_eff[:s_n], committed[:s_n], fed[:s_n], draws_used[:s_n],
            ctx_s[:s_n], cnt_ge[:s_n], ctx_ge[:s_n], dmax[:s_n])


@jit
def hispec_window(p_d, p_f, base, draws, k, rem0, ctx0, steps, through, nd, ni, wd):
    """Sampling and per-step shape of a window of decode-only two-level HiSpec steps
    (:meth:`HiSpec.decode_window`).

    Member m: draft-vs-intermediate agreement ``p_d[m, j]`` at position j of an inner block,
    intermediate-vs-full acceptance ``p_f[m, j]`` at buffer position j, stream ``base[m]`` from
    draw ``draws[m]``, policy cap ``k[m]``, ``rem0[m]`` tokens left and ``ctx0[m]`` context tokens
    (tokens) at the window's start. In step s member m reads draws ``draws[m] + s·wd + x``: inner
    iteration t at ``x = t·nd + j``, the full verification at ``x = ni·nd + j``. Per step with
    ``ks = min(k, left − 1)`` it runs inner iterations while its buffer is below ``min(ni, ks)``
    (iteration: ``d = min(nd, ks − buffer)`` drafts, appends ``min(agreed + 1, d)``), then the full
    model accepts a prefix of the buffer; it commits ``min(accepted + 1, left)``. A member leaves
    after the step that commits its last token; the window stops after ``steps`` steps, when all
    have left, or (not ``through``) after the first step in which one leaves.

    Returns ``(s_n, act, k_eff, buf, accepted, committed, fed, draws_used, n_it, it_b, it_tok,
    it_ctx, r_cnt, r_ctx, full_b, full_m, full_ctx)`` over the first ``s_n`` steps: per (step,
    member) whether it runs, ks, buffer tokens verified, accepted prefix, tokens committed,
    tokens fed (ks + 1), uniforms consumed (uint64; 0 where it does not run); the number of inner
    iterations run (all members); per (step, iteration t) the members in it, their drafts and
    their context (tokens: context + buffer before it); per (step, t, drafting round j) the
    members with d > j and the sum of their context; per step the members, the buffer tokens and
    the context tokens of the full verification. All int64 and exact."""
    n = rem0.shape[0]
    act = np.zeros((steps, n), dtype=np.bool_)
    k_eff = np.zeros((steps, n), dtype=np.int64)
    buf = np.zeros((steps, n), dtype=np.int64)
    accepted = np.zeros((steps, n), dtype=np.int64)
    committed = np.zeros((steps, n), dtype=np.int64)
    fed = np.zeros((steps, n), dtype=np.int64)
    draws_used = np.zeros((steps, n), dtype=np.uint64)
    it_b = np.zeros((steps, ni), dtype=np.int64)
    it_tok = np.zeros((steps, ni), dtype=np.int64)
    it_ctx = np.zeros((steps, ni), dtype=np.int64)
    r_cnt = np.zeros((steps, ni, nd), dtype=np.int64)
    r_ctx = np.zeros((steps, ni, nd), dtype=np.int64)
    full_b = np.zeros(steps, dtype=np.int64)
    full_m = np.zeros(steps, dtype=np.int64)
    full_ctx = np.zeros(steps, dtype=np.int64)
    rem = rem0.copy()
    ctx = ctx0.copy()
    alive = np.ones(n, dtype=np.bool_)
    wu = np.uint64(wd)
    n_it = 0
    s_n = 0
    for s in range(steps):
        n_alive = 0
        any_done = False
        fb = 0
        fm = 0
        fc = 0
        for i in range(n):
            if not alive[i]:
                continue
            c0 = draws[i] + np.uint64(s) * wu
            ks = min(k[i], rem[i] - 1)
            target = min(ni, ks)
            m = 0
            t = 0
            while m < target:
                d = min(nd, ks - m)
                o = t * nd
                agreed = 0
                while agreed < d and _uniform(base[i], c0 + np.uint64(o + agreed)) < p_d[i, agreed]:
                    agreed += 1
                cx = ctx[i] + m
                it_b[s, t] += 1
                it_tok[s, t] += d
                it_ctx[s, t] += cx
                for j in range(d):
                    r_cnt[s, t, j] += 1
                    r_ctx[s, t, j] += cx
                n_it += 1
                m += min(agreed + 1, d)
                t += 1
            a = 0
            o = ni * nd
            while a < m and _uniform(base[i], c0 + np.uint64(o + a)) < p_f[i, a]:
                a += 1
            cm = min(a + 1, rem[i])
            act[s, i] = True
            k_eff[s, i] = ks
            buf[s, i] = m
            accepted[s, i] = a
            committed[s, i] = cm
            fed[s, i] = ks + 1
            draws_used[s, i] = wu
            fb += 1
            fm += m
            fc += ctx[i]
            rem[i] -= cm
            ctx[i] += cm
            if rem[i] <= 0:
                alive[i] = False
                any_done = True
            else:
                n_alive += 1
        full_b[s] = fb
        full_m[s] = fm
        full_ctx[s] = fc
        s_n = s + 1
        if any_done and (not through or n_alive == 0):
            break
    return (s_n, act[:s_n], k_eff[:s_n], buf[:s_n], accepted[:s_n], committed[:s_n], fed[:s_n], draws_used[:s_n],
            n_it, it_b[:s_n], it_tok[:s_n], it_ctx[:s_n], r_cnt[:s_n], r_ctx[:s_n], full_b[:s_n], full_m[:s_n],
            full_ctx[:s_n])


@jit
def kangaroo_step_draws(probs, conf_a, conf_r, cls, early, base, ctr, cap, wd):
    """Drafts and accepted prefix of each member of one Kangaroo step
    (:meth:`KangarooAcceptance.sample_drafts` at width ``wd``, on the engine's counter-based draws).

    Member m: acceptance probabilities ``probs[m, :]`` (width ≥ ``wd``), confidence-stop rows
    ``conf_a/conf_r[cls[m]]``, stream ``base[m]`` from draw ``ctr[m]``, at most ``cap[m]`` drafts
    (:func:`kangaroo_member_draws`). Returns ``(drafts, accepted)`` (tokens, int64)."""
    n = cap.shape[0]
    drafts = np.zeros(n, dtype=np.int64)
    accepted = np.zeros(n, dtype=np.int64)
    for m in range(n):
        d, a = kangaroo_member_draws(probs[m], conf_a[cls[m]], conf_r[cls[m]], early, base[m], ctr[m], cap[m], wd)
        drafts[m] = d
        accepted[m] = a
    return drafts, accepted


@jit
def early_exit_step_sums(drafts, pre, fed, ctx):
    """The integer sums one single-level early-exit step is costed on (:func:`early_exit_step_ms`).

    Members have ``drafts`` (tokens; decode members), ``pre`` (a prompt chunk), ``fed`` tokens
    and ``ctx`` context tokens. Returns ``(n_pre, pre_tokens, dmax, cnt_ge, ctx_ge, deep_dec,
    ctx_all)``: prompt chunks and their tokens, the decode members' largest drafts (0 if none),
    per drafting round j ≤ dmax the decode members with drafts ≥ j and their context, the decode
    members' drafts + 1 summed, and all members' context (tokens, int64)."""
    n = drafts.shape[0]
    n_pre = 0
    pre_tokens = 0
    dmax = 0
    ctx_all = 0
    deep_dec = 0
    for m in range(n):
        ctx_all += ctx[m]
        if pre[m]:
            n_pre += 1
            pre_tokens += fed[m]
        else:
            deep_dec += drafts[m] + 1
            if drafts[m] > dmax:
                dmax = drafts[m]
    cnt_ge = np.zeros(dmax + 1, dtype=np.int64)
    ctx_ge = np.zeros(dmax + 1, dtype=np.int64)
    for m in range(n):
        if not pre[m]:
            for j in range(drafts[m] + 1):
                cnt_ge[j] += 1
                ctx_ge[j] += ctx[m]
    return n_pre, pre_tokens, dmax, cnt_ge, ctx_ge, deep_dec, ctx_all


@jit
def hispec_step(p_d, p_f, base, ctr, k, pre, fed, ctx, nd, ni):
    """Sampling and shape of one two-level HiSpec step (:meth:`HiSpec.step` on the engine's
    counter-based draws).

    Member m: agreement ``p_d[m, j]`` (draft vs intermediate, position j of an inner block),
    acceptance ``p_f[m, j]`` (intermediate vs full, buffer position j; width ≥ the largest
    buffer), stream ``base[m]`` from draw ``ctr[m]`` (inner iteration t reads ``ctr + t·nd + j``,
    the full verification ``ctr + ni·nd + j``), cap ``k[m]`` (0 for prompt chunks), ``pre[m]``
    (a prompt chunk of ``fed[m]`` tokens), ``ctx[m]`` context tokens. Inner iterations run while
    a member's buffer is below ``min(ni, k)``: ``d = min(nd, k − buffer)`` drafts, appending
    ``min(agreed + 1, d)``.

    Returns ``(buf, accepted, inner, n_iter, it_b, it_tok, it_ctx, it_dmax, r_cnt, r_ctx, n_pre,
    fed_pre, fed_last, fed_full, ctx_all, buf_all)``: per member the buffer verified, the full
    model's accepted prefix and the tokens each inner iteration appended; the iterations run (t <
    n_iter) and per iteration the members in it, their drafts, their context (context + buffer
    before it) and their largest d; per (iteration, drafting round j) the members with d > j and
    their context; the prompt chunks and their tokens, the tokens through layers 0..L_i−1 (one
    per decode member, the prompts), through L_i..N−1 (buffer + 1 per decode member, the
    prompts), all members' context and buffers. All int64 and exact."""
    n = k.shape[0]
    buf = np.zeros(n, dtype=np.int64)
    accepted = np.zeros(n, dtype=np.int64)
    inner = np.zeros((n, ni), dtype=np.int64)
    it_b = np.zeros(ni, dtype=np.int64)
    it_tok = np.zeros(ni, dtype=np.int64)
    it_ctx = np.zeros(ni, dtype=np.int64)
    it_dmax = np.zeros(ni, dtype=np.int64)
    r_cnt = np.zeros((ni, nd), dtype=np.int64)
    r_ctx = np.zeros((ni, nd), dtype=np.int64)
    n_iter = 0
    n_pre = 0
    fed_pre = 0
    fed_last = 0
    fed_full = 0
    ctx_all = 0
    buf_all = 0
    for i in range(n):
        target = min(ni, k[i])
        m = 0
        t = 0
        while m < target:
            d = min(nd, k[i] - m)
            o = t * nd
            agreed = 0
            while agreed < d and _uniform(base[i], ctr[i] + np.uint64(o + agreed)) < p_d[i, agreed]:
                agreed += 1
            cx = ctx[i] + m
            it_b[t] += 1
            it_tok[t] += d
            it_ctx[t] += cx
            if d > it_dmax[t]:
                it_dmax[t] = d
            for j in range(d):
                r_cnt[t, j] += 1
                r_ctx[t, j] += cx
            add = min(agreed + 1, d)
            inner[i, t] = add
            m += add
            t += 1
        if t > n_iter:
            n_iter = t
        a = 0
        o = ni * nd
        while a < m and _uniform(base[i], ctr[i] + np.uint64(o + a)) < p_f[i, a]:
            a += 1
        buf[i] = m
        accepted[i] = a
        ctx_all += ctx[i]
        buf_all += m
        if pre[i]:
            n_pre += 1
            fed_pre += fed[i]
            fed_last += fed[i]
            fed_full += fed[i]
        else:
            fed_last += 1
            fed_full += m + 1
    return (buf, accepted, inner, n_iter, it_b, it_tok, it_ctx, it_dmax, r_cnt, r_ctx, n_pre, fed_pre, fed_last,
            fed_full, ctx_all, buf_all)


@jit
def kangaroo_window_rounds(act, drafts, ctx, cnt_ge, ctx_ge, dmax):
    """The arrays a window of Kangaroo steps is costed on (:meth:`Kangaroo._window_ms`), from
    :func:`kangaroo_window`'s per (step, member) ``act``/``drafts``/``ctx`` (0 where not running)
    and per (step, round) ``cnt_ge``/``ctx_ge`` and ``dmax``.

    Returns ``(b, kv, bh, kvh, nb, deep, ctx_sum)`` as float64 (integer values, exact): per (step,
    round j < nj = max dmax + 1) the members through layers 0..ℓ−1 in round j (drafts ≥ j; 0 where
    the step runs no round j) and their KV tokens (context + j each), the members through the
    adapter and LM head in round j (drafts > j) and their KV tokens; per step the members, the
    tokens verified (drafts + 1 each) and the context (tokens)."""
    s_n, n = drafts.shape
    nj = 0
    for s in range(s_n):
        if dmax[s] + 1 > nj:
            nj = dmax[s] + 1
    b = np.zeros((s_n, nj), dtype=np.float64)
    kv = np.zeros((s_n, nj), dtype=np.float64)
    bh = np.zeros((s_n, nj), dtype=np.float64)
    kvh = np.zeros((s_n, nj), dtype=np.float64)
    nb = np.zeros(s_n, dtype=np.float64)
    deep = np.zeros(s_n, dtype=np.float64)
    ctx_sum = np.zeros(s_n, dtype=np.float64)
    for s in range(s_n):
        for j in range(dmax[s] + 1):
            b[s, j] = float(cnt_ge[s, j])
            kv[s, j] = float(ctx_ge[s, j] + j * cnt_ge[s, j])
            if j < dmax[s] and cnt_ge[s, j + 1] > 0:
                bh[s, j] = float(cnt_ge[s, j + 1])
                kvh[s, j] = float(ctx_ge[s, j + 1] + j * cnt_ge[s, j + 1])
        c = 0
        d = 0
        x = 0
        for m in range(n):
            if act[s, m]:
                c += 1
                d += drafts[s, m] + 1
            x += ctx[s, m]
        nb[s] = c
        deep[s] = d
        ctx_sum[s] = x
    return b, kv, bh, kvh, nb, deep, ctx_sum
