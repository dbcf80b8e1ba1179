"""The per-step log of one replica, kept as preallocated columns (no per-step tuples).

One row per step: ``replica``, ``step``, ``start_s``, ``end_s``, ``step_ms``, ``batch_size``,
``prefills``, ``k_max``, ``drafted``, ``accepted``, ``committed``, ``fed_tokens``,
``kv_tokens_used`` (KV slots allocated, tokens, after the step's allocation), ``queue_len``
(requests waiting for admission), ``policy_value`` (the speculation-length policy's number, e.g.
SmartSpec's acceptance estimate). Columns grow by doubling; a window of steps is one slice write.

What is kept is the run's ``steps_log`` mode (:data:`STEPS_LOG_MODES`): ``full`` every step;
``sampled`` the steps whose per-replica index is a multiple of ``every`` (step 0, every, 2·every,
... of each replica: deterministic, and the same rows whether the engine advances one step or a
window at a time); ``none`` no rows. Whatever the mode, :attr:`StepLog.n_steps` and
:attr:`StepLog.batch_size_sum` count every step, so the run's summary does not depend on it.
"""

from __future__ import annotations

import numpy as np

_FLOAT = ("start_s", "end_s", "step_ms", "policy_value")
_INT = ("replica", "step", "batch_size", "prefills", "k_max", "drafted", "accepted", "committed", "fed_tokens",
        "kv_tokens_used", "queue_len")
STEPS_LOG_MODES = ("full", "sampled", "none")
COLUMNS = ("replica", "step", "start_s", "end_s", "step_ms", "batch_size", "prefills", "k_max",
           "drafted", "accepted", "committed", "fed_tokens", "kv_tokens_used", "queue_len", "policy_value")


class StepLog:
    """Columnar step log of one replica (see the module docstring for ``mode`` and ``every``)."""

    def __init__(self, capacity: int = 1024, mode: str = "full", every: int = 1):
        if mode not in STEPS_LOG_MODES:
            raise ValueError(f"steps log mode {mode!r} (choose from {', '.join(STEPS_LOG_MODES)})")
        if every < 1:
            raise ValueError(f"steps log period must be >= 1, got {every}")
        self.mode = mode
        self.every = int(every) if mode == "sampled" else 1
        self.n = 0  # rows kept
        self.n_steps = 0  # steps taken (every step, whatever the mode)
        self.batch_size_sum = 0  # requests over all steps taken
        cap = 0 if mode == "none" else capacity
        self.cols = {c: np.empty(cap, dtype=np.float64 if c in _FLOAT else np.int64) for c in COLUMNS}

    def _reserve(self, extra: int) -> None:
        need = self.n + extra
        cap = self.cols["step"].shape[0]
        if need > cap:
            new = max(need, 2 * cap)
            for c, a in self.cols.items():
                b = np.empty(new, dtype=a.dtype)
                b[: self.n] = a[: self.n]
                self.cols[c] = b

    def append_one(self, replica, step, start_s, end_s, step_ms, batch_size, prefills, k_max, drafted, accepted,
                   committed, fed_tokens, kv_tokens_used, queue_len, policy_value) -> None:
        self.n_steps += 1
        self.batch_size_sum += int(batch_size)
        if self.mode != "full" and (self.mode == "none" or step % self.every):
            return
        self._reserve(1)
        i = self.n
        c = self.cols
        for name, v in (("replica", replica), ("step", step), ("start_s", start_s), ("end_s", end_s),
                        ("step_ms", step_ms), ("batch_size", batch_size), ("prefills", prefills), ("k_max", k_max),
                        ("drafted", drafted), ("accepted", accepted), ("committed", committed),
                        ("fed_tokens", fed_tokens), ("kv_tokens_used", kv_tokens_used), ("queue_len", queue_len),
                        ("policy_value", policy_value)):
            c[name][i] = v
        self.n = i + 1

    def append_window(self, replica, first_step, start_s, end_s, step_ms, batch_size, k_max, drafted, accepted,
                      committed, fed_tokens, kv_tokens_used, queue_len, policy_value) -> None:
        """Rows for consecutive decode-only steps (array arguments have one entry per step, or one
        entry for all of them)."""
        m = int(step_ms.shape[0])
        self.n_steps += m
        self.batch_size_sum += int(np.sum(batch_size)) if np.ndim(batch_size) else int(batch_size) * m
        if self.mode == "full":
            self._store_window(replica, first_step, m, start_s, end_s, step_ms, batch_size, k_max, drafted, accepted,
                               committed, fed_tokens, kv_tokens_used, queue_len, policy_value)
            return
        if self.mode == "none":
            return
        # steps first_step .. first_step + m - 1 whose index is a multiple of `every`
        j0 = (-first_step) % self.every
        if j0 >= m:
            return
        sel = np.arange(j0, m, self.every)

        def pick(v):
            return v[sel] if np.ndim(v) and np.shape(v)[0] == m and m > 1 else v

        self._store_window(replica, None, sel.size, pick(start_s), pick(end_s), step_ms[sel], pick(batch_size),
                           pick(k_max), pick(drafted), pick(accepted), pick(committed), pick(fed_tokens),
                           pick(kv_tokens_used), pick(queue_len), pick(policy_value),
                           steps=first_step + sel)

    def _store_window(self, replica, first_step, m, start_s, end_s, step_ms, batch_size, k_max, drafted, accepted,
                      committed, fed_tokens, kv_tokens_used, queue_len, policy_value, steps=None) -> None:
        self._reserve(m)
        sl = slice(self.n, self.n + m)
        c = self.cols
        c["replica"][sl] = replica
        c["step"][sl] = np.arange(first_step, first_step + m) if steps is None else steps
        c["start_s"][sl] = start_s
        c["end_s"][sl] = end_s
        c["step_ms"][sl] = step_ms
        c["batch_size"][sl] = batch_size
        c["prefills"][sl] = 0
        c["k_max"][sl] = k_max
        c["drafted"][sl] = drafted
        c["accepted"][sl] = accepted
        c["committed"][sl] = committed
        c["fed_tokens"][sl] = fed_tokens
        c["kv_tokens_used"][sl] = kv_tokens_used
        c["queue_len"][sl] = queue_len
        c["policy_value"][sl] = policy_value
        self.n += m

    def columns(self) -> dict[str, np.ndarray]:
        return {c: a[: self.n] for c, a in self.cols.items()}
