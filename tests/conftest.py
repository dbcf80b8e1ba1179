"""Shared fixtures: tiny hand-made profiles and traces."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from simspec.profile import profile_from_doc
from simspec.trace import Trace


def flat_profile_doc(step_ms: float = 10.0, draft_factor: float = 0.1, alpha: float | None = 1.0,
                     kv_budget_tokens: int = 10_000, max_batch_size: int = 8) -> dict:
    """A whole-model profile whose target step always takes ``step_ms`` and a draft pass
    ``draft_factor * step_ms``, no overhead; acceptance fixed at ``alpha`` for method draft."""
    doc = {
        "schema": "simspec-profile", "schema_version": 1,
        "meta": {"name": "flat-test", "source": "analytic", "description": "test profile"},
        "models": {"target": {"name": "test", "num_layers": 4}},
        "capacity": {"kv_budget_tokens": kv_budget_tokens, "max_batch_size": max_batch_size},
        "latency": {"unit": "ms", "overhead": {"fraction": 0.0, "fixed_ms": 0.0},
                    "stages": {"target_step": {"kind": "linear",
                                               "coef": {"c0": step_ms, "c_b": 0.0, "c_t": 0.0, "c_kv": 0.0}},
                               "draft_step": {"kind": "scaled", "of": "target_step", "factor": draft_factor}}},
        "acceptance": {},
    }
    if alpha is not None:
        doc["acceptance"]["draft"] = {"default": {"alpha": {"kind": "fixed", "value": alpha}}}
    return doc


@pytest.fixture
def flat_profile():
    def make(**kw):
        return profile_from_doc(flat_profile_doc(**kw), "flat-test")
    return make


def make_trace(arrival_s, prompt_tokens, output_tokens, classes=None) -> Trace:
    n = len(arrival_s)
    return Trace.from_columns(request_id=[f"r{i}" for i in range(n)], arrival_s=np.asarray(arrival_s, float),
                              prompt_tokens=np.asarray(prompt_tokens), output_tokens=np.asarray(output_tokens),
                              acceptance_class=classes, source="test")


@pytest.fixture
def write_profile(tmp_path):
    def write(doc: dict, name: str = "p.json") -> Path:
        p = tmp_path / name
        p.write_text(json.dumps(doc))
        return p
    return write


@pytest.fixture
def profile_doc():
    return lambda **kw: copy.deepcopy(flat_profile_doc(**kw))


def check_invariants(res, n, max_batch, kv, mbt):
    """Simulator invariants on a RunResult: exact tokens, completes once, no start before arrival,
    batch/KV/token limits, clock monotone per replica, accepted <= drafted."""
    req, steps = res.requests, res.steps
    assert len(req) == n
    # every request completes exactly once, with exactly its output tokens: nothing is committed
    # after completion (the steps log's committed tokens add up to the outputs)
    assert (req["generated_tokens"].to_numpy() == req["output_tokens"].to_numpy()).all()
    assert np.isfinite(req["completion_s"].to_numpy()).all()
    assert int(steps["committed"].sum()) == int(req["output_tokens"].sum())
    # nothing starts before it arrives
    assert (req["start_s"] >= req["arrival_s"] - 1e-12).all()
    assert (req["first_token_s"] > req["start_s"]).all()
    assert (req["completion_s"] >= req["first_token_s"]).all()
    # capacity
    assert (steps["batch_size"] >= 1).all()
    assert (steps["batch_size"] <= max_batch).all()
    assert (steps["kv_tokens_used"] <= kv).all()
    if res.audit is not None:  # recounted from the request table after every step
        assert max(res.audit["max_kv_tokens"]) <= res.audit["kv_capacity_tokens"] <= kv
    if mbt is not None:
        assert (steps["fed_tokens"] <= mbt).all()
    # clock monotone per replica
    for _, g in steps.groupby("replica"):
        s = g.sort_values("step")
        assert (s["step"].diff().dropna() == 1).all()
        assert (s["end_s"].to_numpy() >= s["start_s"].to_numpy()).all()
        assert (s["start_s"].to_numpy()[1:] >= s["end_s"].to_numpy()[:-1] - 1e-12).all()
    assert (req["accepted"] <= req["drafted"]).all()
    assert (steps["accepted"] <= steps["drafted"]).all()
