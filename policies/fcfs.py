"""FCFS: first come, first served by arrival time (ties by trace row), non-preemptive.

Running requests arrived before any waiting one, so ordering by arrival keeps them in the batch; a
later arrival never displaces a running request (only KV pressure can, which evicts the latest).
"""

from __future__ import annotations

import numpy as np

from simspec.policies.base import Scheduler, register_scheduler


@register_scheduler("fcfs")
class FCFS(Scheduler):
    preemptive = False

    def order(self, active: np.ndarray, now_s: float) -> np.ndarray:
        return active  # the engine keeps `active` in arrival order
