"""SRPT: shortest remaining processing time first, by remaining output *tokens* (it ignores
acceptance), preemptive at step boundaries. Ties by arrival.

Parameters: ``predictor`` = ``oracle`` (true remaining length, default) | ``lognormal`` (true length
× lognormal noise of ``sigma``, default 0.5) | ``class-mean``. A predicted remaining length that the
request has already outrun is floored at 1 token.
"""

from __future__ import annotations

import numpy as np

from simspec.policies.base import PolicyContext, Scheduler, register_scheduler
from simspec.policies.predictors import predict_output_tokens


@register_scheduler("srpt")
class SRPT(Scheduler):
    preemptive = True
    param_defaults = {"predictor": "oracle", "sigma": 0.5}

    def __init__(self, params, ctx: PolicyContext):
        super().__init__(params, ctx)
        self.predicted = predict_output_tokens(self.params["predictor"], self.table, ctx.seed,
                                               float(self.params["sigma"]), "--policy srpt")

    def remaining_estimate(self, active: np.ndarray) -> np.ndarray:
        return np.maximum(self.predicted[active] - self.table.generated[active], 1.0)

    def order(self, active: np.ndarray, now_s: float) -> np.ndarray:
        key = self.remaining_estimate(active)
        return active[np.lexsort((active, key))]

    def extra_columns(self) -> dict[str, np.ndarray]:
        return {"predicted_output_tokens": self.predicted}
