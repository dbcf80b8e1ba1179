"""Adding a policy is one decorated class: it becomes available to simulate() and the CLI."""

from __future__ import annotations

import numpy as np

from simspec.policies import SCHEDULERS, get_scheduler_class
from simspec.policies.base import Scheduler, register_scheduler
from simspec.simulator.config import ComponentSpec, RunConfig
from simspec.simulator.run import simulate
from tests.conftest import make_trace


def test_new_scheduler_in_one_class(flat_profile):
    @register_scheduler("test-shortest-prompt")
    class ShortestPrompt(Scheduler):
        def order(self, active, now_s):
            return active[np.lexsort((active, self.table.prompt_tokens[active]))]

    try:
        assert get_scheduler_class("test-shortest-prompt") is ShortestPrompt
        # one request per step: the 2-token prompt runs first although it arrived second
        tr = make_trace([0, 0], [8, 2], [1, 1])
        cfg = RunConfig(scheduler=ComponentSpec("test-shortest-prompt"), max_batch_size=1)
        res = simulate(cfg, tr, flat_profile(max_batch_size=1))
        assert list(res.requests["completion_s"].round(6)) == [0.02, 0.01]
    finally:
        SCHEDULERS.pop("test-shortest-prompt", None)
