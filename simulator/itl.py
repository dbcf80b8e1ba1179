"""Inter-token latency samples, exactly as ``vllm bench serve`` collects them.

``vllm bench serve`` streams each request and appends one ITL sample per streamed chunk after
the first: the time since the previous chunk (``output.itl.append(timestamp -
most_recent_timestamp)`` in ``vllm/benchmarks/lib/endpoint_request_func.py``); ``mean``,
``median``, ``std`` and ``p90/95/99_itl_ms`` are taken over all requests' samples pooled. vLLM
streams the tokens one engine step commits for a request as one chunk, so with speculative
decoding a step that commits 3 tokens gives *one* sample (not one gap and two zeros).

In simspec a request's chunks are the ends of the steps that commit tokens for it: the step that
completes its prompt (the first token; again after a recompute preemption, which re-prefills and
samples the next token) and every decode step it is in. A sample is the time from the end of the
previous such step of the same request, so waiting while paused or preempted is inside the gap,
as a client sees it.

Samples are kept as (value, count) pairs, consolidated to the distinct values now and then, so
memory grows with the number of distinct gaps, not with the number of tokens, and the result
does not depend on how the engine grouped steps (one step per event or windows of many).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simspec.policies.base import StepRecord, WindowRecord
from simspec.simulator import kernels

_CONSOLIDATE_AT = 1 << 20  # buffered entries before merging equal values


@dataclass(frozen=True)
class ItlSamples:
    """The pooled ITL sample as distinct values (ms, ascending) and how often each occurred."""

    values_ms: np.ndarray
    counts: np.ndarray

    @property
    def n(self) -> int:
        return int(self.counts.sum())


def _merge(values: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not values:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    v = np.concatenate(values)
    c = np.concatenate(counts)
    u, inv = np.unique(v, return_inverse=True)
    return u, np.bincount(inv.ravel(), weights=c, minlength=u.size).astype(np.int64)


class ItlLog:
    """Collects every request's token-chunk gaps from the engine's step and window records."""

    def __init__(self, n_requests: int):
        self.last_token_s = np.full(n_requests, np.nan)
        self._values: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []
        self._buffered = 0

    def _add(self, gaps_s: np.ndarray, counts: np.ndarray) -> None:
        if gaps_s.size == 0:
            return
        self._values.append(gaps_s)
        self._counts.append(counts)
        self._buffered += int(gaps_s.size)
        if self._buffered >= _CONSOLIDATE_AT:
            u, c = _merge(self._values, self._counts)
            self._values, self._counts, self._buffered = [u], [c], int(u.size)

    def observe(self, rec: StepRecord) -> None:
        """One step: every member that committed a token got a chunk at the step's end."""
        gaps = kernels.itl_chunk_gaps(self.last_token_s, rec.idx, rec.committed, float(rec.end_s))
        if gaps.size:
            self._add(gaps, np.ones(gaps.size, dtype=np.int64))

    def observe_window(self, rec: WindowRecord) -> None:
        """Consecutive decode steps of one batch: each member that got a chunk in a step gives one
        sample, the time since its previous chunk (within the window: the step's duration, end
        minus the previous step's end). One compiled pass (simulator/kernels.py)."""
        act = rec.active
        values, counts = kernels.itl_window_gaps(self.last_token_s, rec.idx, rec.committed,
                                                 act if act is not None else kernels.NO_MASK, act is not None,
                                                 np.asarray(rec.end_s, dtype=np.float64))
        self._add(values, counts)

    def samples(self) -> ItlSamples:
        """All samples so far, in ms (distinct values ascending, with counts)."""
        u, c = _merge(self._values, self._counts)
        return ItlSamples(values_ms=u * 1000.0, counts=c)
