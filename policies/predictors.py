"""Output-length predictors shared by SRPT and LAPS-SD.

- ``oracle``: the true output length.
- ``lognormal``: true length × exp(N(0, σ)), one draw per request from stream ``predictor``.
- ``class-mean``: the mean output length of the request's acceptance class in the trace.
"""

from __future__ import annotations

import numpy as np

from simspec.errors import ConfigError
from simspec.rng import stream
from simspec.simulator.state import RequestTable

PREDICTORS = ("oracle", "lognormal", "class-mean")


def predict_output_tokens(kind: str, table: RequestTable, seed: int, sigma: float, flag: str) -> np.ndarray:
    """Predicted total output tokens per request (float, ≥ 1)."""
    true = table.output_tokens.astype(np.float64)
    if kind == "oracle":
        return true.copy()
    if kind == "lognormal":
        if not sigma >= 0:
            raise ConfigError(f"{flag}: sigma must be >= 0, got {sigma}")
        noise = stream(seed, "predictor").normal(0.0, float(sigma), size=true.shape[0])
        return np.maximum(1.0, true * np.exp(noise))
    if kind == "class-mean":
        out = np.empty_like(true)
        for ci in range(len(table.class_names)):
            sel = table.class_idx == ci
            if sel.any():
                out[sel] = true[sel].mean()
        return out
    raise ConfigError(f"{flag}: unknown predictor {kind!r} (choose from {', '.join(PREDICTORS)})")
