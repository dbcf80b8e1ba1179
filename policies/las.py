"""LAS / MLFQ: least-attained-service multi-level feedback queues, without acceptance awareness.

The ablation of LAPS-SD (:mod:`simspec.policies.laps_sd`): the same queues and demotion, no
stability test, no remaining-time estimate.

- ``queues`` K priority queues (default 4), strict priority across queues (queue 0 first),
  preemptive at step boundaries (the order is recomputed every step).
- Attained service ``a`` per request: tokens processed (``service=tokens``, default) — prompt tokens
  as its prefill chunks run, then every committed token — or GPU time in ms, the sum of the
  durations of the steps it was in the batch of (``service=time``). A 7,000-token prompt has
  attained 7,000 tokens of service once prefilled, not 1.
- Thresholds ``q·2^j`` for j = 0..K-2 (``q`` = 32 tokens, or ``q_ms`` = 500 ms when
  ``service=time``). A request is in queue ``j = #{thresholds ≤ a}``: everyone starts in queue 0 and
  is demoted the moment its attained service *reaches* a threshold; the last queue has no threshold.
  A step that commits several tokens may move a request down more than one queue at once.
- Within a queue: first come, first served (``within=arrival``, default: classic MLFQ, so
  ``queues`` and ``q`` decide how coarse the priority levels are) or least attained service
  (``within=attained``: since the queue is a monotone function of ``a`` this is plain LAS, and
  ``queues``/``q`` then change nothing). Ties by arrival.

How the ranking acts depends on ``--batching``: in ``vllm`` mode it orders admission of waiting
requests and picks preemption victims (the lowest-priority running request); in ``preemptive``
mode it picks every step's batch.

Per-request output columns: ``queue_changes`` (queues moved down over the request's life; one per
level, so a jump over two queues counts 2) and ``final_queue``.
"""

from __future__ import annotations

import math

import numpy as np

from simspec.errors import ConfigError
from simspec.policies.base import PolicyContext, Scheduler, StepRecord, register_scheduler

SERVICES = ("tokens", "time")
WITHIN = ("attained", "arrival")


def _positive_int(flag: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{flag}: {name} must be an integer >= 1, got {v!r}")
    return v


def _positive_float(flag: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{flag}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


class MultiLevelQueues(Scheduler):
    """Shared machinery of LAS and LAPS-SD: attained service, queue index, demotion counts.

    All state is arrays over all requests of the run (index = request row); :meth:`observe` updates
    only the step's batch members, :meth:`order` is a handful of numpy operations over ``active``.
    """

    preemptive = True
    param_defaults = {"queues": 4, "q": 32, "q_ms": 500.0, "service": "tokens", "within": "arrival"}

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        p = self.params
        flag = f"--policy {self.name}"
        self.n_queues = _positive_int(flag, "queues", p["queues"])
        if p["service"] not in SERVICES:
            raise ConfigError(f"{flag}: service must be one of {', '.join(SERVICES)}, got {p['service']!r}")
        if p["within"] not in WITHIN:
            raise ConfigError(f"{flag}: within must be one of {', '.join(WITHIN)}, got {p['within']!r}")
        self.time_service = p["service"] == "time"
        q = _positive_float(flag, "q_ms" if self.time_service else "q", p["q_ms"] if self.time_service else p["q"])
        self.q = q
        #: demotion thresholds in the service's unit (tokens or ms); queue j ends at thresholds[j]
        self.thresholds = q * 2.0 ** np.arange(self.n_queues - 1)
        #: thresholds with +inf appended, so ``queue_end[queue]`` is the end of any queue
        self.queue_end = np.append(self.thresholds, np.inf)
        n = len(self.table)
        self.attained = np.zeros(n)  # tokens or ms
        self.served_tokens = np.zeros(n, dtype=np.int64)  # committed tokens seen in StepRecords
        self.queue = np.zeros(n, dtype=np.int64)
        self.queue_changes = np.zeros(n, dtype=np.int64)
        self.by_arrival = p["within"] == "arrival"

    def queue_of(self, attained: np.ndarray) -> np.ndarray:
        """Queue index for attained service values: the number of thresholds already reached."""
        return np.searchsorted(self.thresholds, attained, side="right")

    def observe(self, record: StepRecord) -> None:
        idx = record.idx
        if idx.size == 0:
            return
        self.served_tokens[idx] += record.committed
        if self.time_service:
            self.attained[idx] += record.step_ms
        else:
            fed = record.fed_tokens
            service = record.committed if fed is None else np.where(record.prefill, fed, record.committed)
            self.attained[idx] += service
        newq = self.queue_of(self.attained[idx])
        self.queue_changes[idx] += newq - self.queue[idx]
        self.queue[idx] = newq

    def observe_window(self, record) -> None:
        """Several decode-only steps at once: the same sums as step-by-step :meth:`observe`."""
        idx = record.idx
        if idx.size == 0:
            return
        self.served_tokens[idx] += record.committed.sum(axis=0)
        acc = np.empty((record.n_steps + 1, idx.size))
        acc[0] = self.attained[idx]
        if self.time_service:
            acc[1:] = record.step_ms[:, None] if record.active is None else record.step_ms[:, None] * record.active
        else:
            acc[1:] = record.committed
        self.attained[idx] = np.cumsum(acc, axis=0)[-1]  # sequential adds, as one step at a time
        newq = self.queue_of(self.attained[idx])
        self.queue_changes[idx] += newq - self.queue[idx]
        self.queue[idx] = newq

    def order(self, active: np.ndarray, now_s: float) -> np.ndarray:
        # stable sorts of ``active`` (arrival order), so ties go by arrival; the queue is a monotone
        # function of attained service, so (queue, attained) order is attained order
        if self.by_arrival:
            return active[np.argsort(self.queue[active], kind="stable")]
        return active[np.argsort(self.attained[active], kind="stable")]

    def extra_columns(self) -> dict[str, np.ndarray]:
        return {"queue_changes": self.queue_changes.copy(), "final_queue": self.queue.copy()}


@register_scheduler("las")
class LAS(MultiLevelQueues):
    """Least attained service over K multi-level feedback queues (no acceptance awareness).

    Parameters (defaults): ``queues=4``, ``q=32`` (tokens), ``q_ms=500`` (ms, used when
    ``service=time``), ``service=tokens|time``, ``within=arrival|attained``.
    """
