"""The per-step log of one replica, kept as preallocated columns (no per-step tuples).

One row per step: ``replica``, ``step``, ``start_s``, ``end_s``, ``step_ms``, ``batch_size``,
``prefills``, ``k_max``, ``drafted``, ``accepted``, ``committed``, ``fed_tokens``,
``kv_tokens_used`` (KV slots allocated, tokens, after the step's allocation), ``queue_len``
(requests waiting for admission), ``policy_value`` (the speculation-length policy's number, e.g.
SmartSpec's acceptance estimate). Columns grow by doubling; a window of steps is one slice write.
"""

from __future__ import annotations

import numpy as np

_FLOAT = ("start_s", "end_s", "step_ms", "policy_value")
_INT = ("replica", "step", "batch_size", "prefills", "k_max", "drafted", "accepted", "committed", "fed_tokens",
        "kv_tokens_used", "queue_len")
COLUMNS = ("replica", "step", "start_s", "end_s", "step_ms", "batch_size", "prefills", "k_max",
           "drafted", "accepted", "committed", "fed_tokens", "kv_tokens_used", "queue_len", "policy_value")


class StepLog:
    """Columnar step log of one replica."""

    def __init__(self, capacity: int = 1024):
        self.n = 0
        self.cols = {c: np.empty(capacity, dtype=np.float64 if c in _FLOAT else np.int64) for c in COLUMNS}

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
        """Rows for consecutive decode-only steps (array arguments have one entry per step)."""
        m = int(step_ms.shape[0])
        self._reserve(m)
        sl = slice(self.n, self.n + m)
        c = self.cols
        c["replica"][sl] = replica
        c["step"][sl] = np.arange(first_step, first_step + m)
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
