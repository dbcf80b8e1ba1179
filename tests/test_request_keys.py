"""request_keys hashes a trace's ids in place (no fixed-width copy) and gives the same keys as its
definition, pandas' hash of ``np.asarray(ids).astype(str).astype(object)``: every run's acceptance
draws depend on them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from simspec.rng import request_keys
from simspec.traces.formats import bundled_traces, load_trace


def _definition(ids):
    return pd.util.hash_array(np.asarray(ids).astype(str).astype(object)).astype(np.uint64)


@pytest.mark.parametrize("ids", [
    np.asarray(["a", "é", "日本", "y", "a\x00b", "z" * 3000], dtype=object),
    np.asarray(["x\x00", "x"], dtype=object),   # numpy's str conversion drops the trailing NUL
    np.asarray(["1", 2, 3.5, None], dtype=object),
    np.asarray(["u1", "u2"]),
    np.asarray([], dtype=object),
    [f"r{i}" for i in range(1000)],
])
def test_keys_are_the_definitions(ids):
    got = request_keys(ids)
    assert got.dtype == np.uint64 and np.array_equal(got, _definition(ids))


def test_keys_of_every_bundled_trace():
    for path in bundled_traces().values():
        ids = load_trace(path).request_id
        assert np.array_equal(request_keys(ids), _definition(ids))
